# Airflow image with this project's dependencies, pinned by constraints.txt (the same Airflow version as the image).
FROM apache/airflow:3.3.2-python3.11
COPY requirements.txt requirements-celery.txt constraints.txt /opt/backfill/
RUN pip install --no-cache-dir -r /opt/backfill/requirements.txt -r /opt/backfill/requirements-celery.txt \
    -c /opt/backfill/constraints.txt
