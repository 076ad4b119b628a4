# The local BigQuery stand-in (REST :9050, Storage Read gRPC :9060), for local use only.
FROM python:3.11-slim
COPY requirements-emulator.txt constraints-emulator.txt devtools/register_duckdb_spatial.py /opt/bqemulator/
RUN pip install --no-cache-dir -r /opt/bqemulator/requirements-emulator.txt -c /opt/bqemulator/constraints-emulator.txt \
 && python /opt/bqemulator/register_duckdb_spatial.py /opt/bqemulator/home
ENV HOME=/opt/bqemulator/home
EXPOSE 9050 9060
CMD ["bqemulator", "start", "--rest-host", "0.0.0.0", "--rest-port", "9050", "--grpc-host", "0.0.0.0", \
     "--grpc-port", "9060", "--project", "local-project", "--log-level", "warning", \
     "--persistent", "--data-dir", "/data"]
