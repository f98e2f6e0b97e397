# Documented commands: `make test`, `make bench` (quick shapes, minutes), `make bench-full` (the issues'
# shapes, hours on CPU), `make report`, `make lint`.
PY ?= python

test:
	$(PY) -m pytest -q

bench:
	$(PY) -m pytest benchmarks/ --benchmark-only

bench-full:
	$(PY) -m pytest benchmarks/ --benchmark-only --bench-size full

report:
	$(PY) -m benchmarks.report --quick

lint:
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

.PHONY: test bench bench-full report lint
