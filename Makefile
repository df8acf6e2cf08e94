# The two commands a newcomer needs: `make run` and `make test`. Both set themselves up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt -e .
	touch $(STAMP)

## Run every function locally on SQLite (.local/push.sqlite3), with local provider receivers.
run: $(STAMP)
	$(PY) scripts/run_local.py

## Run the whole test suite (SQLite and MariaDB; with CI=true a missing MariaDB fails).
test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .local .pytest_cache
