# make test  — installs everything (two virtualenvs), starts what the tests need, runs lint and the test suite.
PYTHON ?= python3
VENV ?= .venv
EMU_VENV ?= .venv-bqemulator
PIP_FLAGS ?= -q --disable-pip-version-check

.PHONY: test lint install postgres clean

install: $(VENV)/.installed $(EMU_VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) -r requirements-dev.txt -c constraints.txt
	touch $@

$(EMU_VENV)/.installed: requirements-emulator.txt constraints-emulator.txt tests/register_duckdb_spatial.py
	$(PYTHON) -m venv $(EMU_VENV)
	$(EMU_VENV)/bin/pip install $(PIP_FLAGS) -r requirements-emulator.txt -c constraints-emulator.txt
	$(EMU_VENV)/bin/python tests/register_duckdb_spatial.py $(EMU_VENV)/duckdb-home
	touch $@

# The local PostgreSQL server: started if it does not answer (BACKFILL_PG_DSN points the tests elsewhere).
postgres:
	@if [ -z "$$BACKFILL_PG_DSN" ] && ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then \
		echo "starting the local PostgreSQL server"; \
		pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start; \
	fi

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install postgres lint
	$(VENV)/bin/python -m pytest tests

clean:
	rm -rf $(VENV) $(EMU_VENV)
