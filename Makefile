# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8080

.PHONY: install run test bench rules-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $@

install: $(VENV)/.installed

## Serve on http://127.0.0.1:$(PORT) with the embedded defaults. Auth is disabled for local demos
## only while no CDS_TRUSTED_ISSUERS is set; with it, auth is on unless CDS_AUTH=disabled is explicit.
run: install
	$(if $(CDS_TRUSTED_ISSUERS),,CDS_AUTH=$${CDS_AUTH:-disabled}) $(BIN)/gunicorn --config gunicorn.conf.py --bind 127.0.0.1:$(PORT) 'service:create_app()'

## Install and run the whole test suite.
test: install
	$(BIN)/python -m pytest

## Validate every file in rules/ (what rule authors run after an edit).
rules-check: install
	$(BIN)/rules check

## Benchmarks: in-process, and over HTTP beside a floor and the HealthChain peer (not part of `make test`;
## the first run installs the peer into bench/.cache/, its own virtualenv).
bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache data
