# make test  — installs everything (two virtualenvs), runs lint and the test suite; the tests start the services
#              they need (BigQuery emulator, Airflow; an embedded PostgreSQL if none answers at 127.0.0.1:5432).
PYTHON ?= python3
VENV ?= .venv
EMU_VENV ?= .venv-bqemulator
PIP_FLAGS ?= -q --disable-pip-version-check

.PHONY: test lint install demo up bench clean dist

install: $(VENV)/.installed $(EMU_VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) -r requirements-dev.txt -c constraints.txt
	touch $@

$(EMU_VENV)/.installed: requirements-emulator.txt constraints-emulator.txt devtools/register_duckdb_spatial.py
	$(PYTHON) -m venv $(EMU_VENV)
	$(EMU_VENV)/bin/pip install $(PIP_FLAGS) -r requirements-emulator.txt -c constraints-emulator.txt
	$(EMU_VENV)/bin/python devtools/register_duckdb_spatial.py $(EMU_VENV)/duckdb-home
	touch $@

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install lint
	$(VENV)/bin/python -m pytest tests

clean:
	rm -rf $(VENV) $(EMU_VENV) dist

# What a deployment installs or uploads (README "Deploy"): the wheel, MWAA's plugins.zip and dags, Composer's folders.
dist: $(VENV)/.installed
	$(VENV)/bin/python -m devtools.dist

# The stuck tenant (207 jobs, 2% synced) and its fix by one DAG run under a real Airflow, on local services.
demo: install
	$(VENV)/bin/python -m devtools.demo

# The demo's services, left running until Ctrl-C: prints the Airflow UI's address, user and password.
up: install
	$(VENV)/bin/python -m devtools.up

# Throughput benchmark (see README "Performance"): prints figures and ratios, writes bench/results/. bench.run (~12
# minutes): the 1M-row tenant into an empty target, with latency, the chunk-size sweep and memory; bench.scale (~45
# minutes): a target shared with 20M rows of other tenants, the real scheduler's path, a 5M-row tenant.
bench: install
	$(VENV)/bin/python -m bench.run
	$(VENV)/bin/python -m bench.scale --shared-target 20000000 --scheduler --tenant-rows 5000000
