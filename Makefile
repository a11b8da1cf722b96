# The two commands: `make run` and `make test`. Both create the virtualenv (.venv) and install the
# pinned requirements on first use, so a machine with Python 3.11 and make needs nothing else.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# the stamp names what was installed: a change to the pins or to the package's metadata reinstalls
STAMP := $(VENV)/.installed-$(shell cat requirements.txt setup.cfg pyproject.toml | cksum | cut -d' ' -f1)
HOST ?= 127.0.0.1
PORT ?= 8000
COVERAGE_FLOOR ?= 95
# make bench's PostgreSQL column (a schema of its own, dropped at the end); skipped when no server
# answers there. MORAG_REMOTE_BENCH_DATABASE_URL= (empty) leaves it out.
MORAG_REMOTE_BENCH_DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/test
export HOST PORT

.PHONY: run test bench install clean

# the pins, then the project itself (editable, without dependencies: the pins are them), so that the
# console scripts (morag-remote-worker) are in $(BIN)
$(STAMP): requirements.txt setup.cfg pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11 or run make PYTHON=python3"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

run: $(STAMP)
	$(if $(MORAG_REMOTE_DATABASE_URL),$(BIN)/flask --app morag_remote db upgrade)
	$(BIN)/flask --app morag_remote keys bootstrap-admin
	$(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

test: $(STAMP)
	$(BIN)/python -m pytest --cov=morag_remote --cov-report=term --cov-fail-under=$(COVERAGE_FLOOR)

bench: $(STAMP)
	MORAG_REMOTE_BENCH_DATABASE_URL='$(MORAG_REMOTE_BENCH_DATABASE_URL)' $(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .coverage .hypothesis
