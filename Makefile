# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8080

.PHONY: install run test e2e bench rules-check clean

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

## End to end in the CDS Hooks Sandbox (its built files in CDS_E2E_SANDBOX_DIR) with Debian's chromium.
E2E_SECONDS ?= 290
$(VENV)/.installed-e2e: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test,bench,e2e]'
	touch $@

e2e:
	@if [ -z "$$CDS_E2E_SANDBOX_DIR" ]; then \
	  echo "make e2e: not run: CDS_E2E_SANDBOX_DIR is not set. Point it at the CDS Hooks Sandbox's built files (README, 'End-to-end tests')."; \
	  exit 0; \
	elif [ ! -f "$$CDS_E2E_SANDBOX_DIR/index.html" ]; then \
	  echo "make e2e: not run: CDS_E2E_SANDBOX_DIR=$$CDS_E2E_SANDBOX_DIR has no index.html. Build the sandbox first (README, 'End-to-end tests')."; \
	  exit 0; \
	fi; \
	$(MAKE) --no-print-directory $(VENV)/.installed-e2e && \
	timeout --signal=INT --kill-after=20 $(E2E_SECONDS) $(BIN)/python -m pytest tests/e2e -m e2e --durations=8 || { \
	  status=$$?; [ $$status -ne 124 ] || echo "make e2e: stopped: the run took longer than E2E_SECONDS=$(E2E_SECONDS) s"; exit $$status; }

## Validate every file in rules/ (what rule authors run after an edit).
rules-check: install
	$(BIN)/rules check

## Benchmarks: in-process and over HTTP beside a floor (not part of `make test`).
bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache data
