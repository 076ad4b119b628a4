# make test  — installs everything (three virtualenvs), runs lint, the test suite on today's versions and its
#              end-to-end core on the oldest supported ones; the tests start the services they need (BigQuery
#              emulator, Airflow, PgBouncer; an embedded PostgreSQL if none answers at 127.0.0.1:5432).
PYTHON ?= python3
VENV ?= .venv
EMU_VENV ?= .venv-bqemulator
OLDEST_VENV ?= .venv-oldest
PIP_FLAGS ?= -q --disable-pip-version-check

.PHONY: test lint install demo up bench clean dist differential

install: $(VENV)/.installed $(EMU_VENV)/.installed $(OLDEST_VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-celery.txt requirements-dev.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) -r requirements-dev.txt -c constraints.txt
	touch $@

$(EMU_VENV)/.installed: requirements-emulator.txt constraints-emulator.txt devtools/register_duckdb_spatial.py
	$(PYTHON) -m venv $(EMU_VENV)
	$(EMU_VENV)/bin/pip install $(PIP_FLAGS) -r requirements-emulator.txt -c constraints-emulator.txt
	$(EMU_VENV)/bin/python devtools/register_duckdb_spatial.py $(EMU_VENV)/duckdb-home
	touch $@

# The oldest supported stack: the package installed at pyproject.toml's lower bounds (Airflow 3.2.1 and its day's
# providers and libraries), pinned by constraints-oldest.txt.
# Installed as a wheel (not editable), so reinstalled whenever the package's code or SQL changes.
PACKAGE_FILES = $(shell find plugins/bq_backfill include/sql -type f ! -name '*.pyc')
$(OLDEST_VENV)/.installed: requirements-oldest.txt constraints-oldest.txt pyproject.toml $(PACKAGE_FILES)
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/pip install $(PIP_FLAGS) -r requirements-oldest.txt -c constraints-oldest.txt
	$(OLDEST_VENV)/bin/pip install $(PIP_FLAGS) --no-deps --force-reinstall .
	touch $@

# The end-to-end core on the oldest stack: cold run, failed chunk cleared and resumed (dag.test and the scheduler),
# nothing changed, the Backfills page (also through a transaction pooler).
OLDEST_TESTS = tests/test_resume.py::test_clearing_the_failed_chunk_with_downstream_resumes \
	tests/test_backfill.py::test_second_run_changes_no_row \
	tests/test_scheduler_e2e.py::test_resume_and_one_run_at_a_time_under_the_scheduler \
	tests/test_scheduler_e2e.py::test_the_backfills_page_is_only_served_to_logged_in_users \
	tests/test_scheduler_e2e.py::test_the_backfills_page_reads_through_a_transaction_pooler

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install lint
	$(VENV)/bin/python -m pytest tests
	$(OLDEST_VENV)/bin/python -c "import airflow; assert airflow.__version__ == '3.2.1', airflow.__version__"
	$(OLDEST_VENV)/bin/python -m pytest $(OLDEST_TESTS)

# The write paths against the plain upsert, with many more seeded random cases than `make test` runs (300).
differential: $(VENV)/.installed
	BACKFILL_DIFFERENTIAL_EXAMPLES=$${EXAMPLES:-3000} $(VENV)/bin/python -m pytest tests/test_write_paths_differential.py

clean:
	rm -rf $(VENV) $(EMU_VENV) $(OLDEST_VENV) dist

# What a deployment installs or uploads (README "Deploy"): the wheel, MWAA's plugins.zip and dags, Composer's folders.
dist: $(VENV)/.installed
	$(VENV)/bin/python -m devtools.dist

# The stuck tenant (207 jobs, 2% synced) and its fix by one DAG run under a real Airflow, on local services.
demo: $(VENV)/.installed $(EMU_VENV)/.installed
	$(VENV)/bin/python -m devtools.demo

# The demo's services, left running until Ctrl-C: prints the Airflow UI's address, user and password.
up: $(VENV)/.installed $(EMU_VENV)/.installed
	$(VENV)/bin/python -m devtools.up

# Throughput benchmark (see README "Performance"): prints figures and ratios, writes bench/results/. bench.run (~12
# minutes): the 1M-row tenant into an empty target, with latency, the chunk-size sweep and memory; bench.scale (~45
# minutes): a target shared with 20M rows of other tenants, the real scheduler's path, a 5M-row tenant.
bench: $(VENV)/.installed $(EMU_VENV)/.installed
	$(VENV)/bin/python -m bench.run
	$(VENV)/bin/python -m bench.scale --shared-target 20000000 --scheduler --tenant-rows 5000000
	$(VENV)/bin/python -m bench.fleet
