# Documented commands: `make test`, `make bench`, `make lint`.
PY ?= python

test:
	$(PY) -m pytest -q

bench:
	$(PY) -m pytest benchmarks/ --benchmark-only

lint:
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

.PHONY: test bench lint
