# Documented commands: `make test`, `make bench`, `make report`, `make lint`.
PY ?= python

test:
	$(PY) -m pytest -q

bench:
	$(PY) -m pytest benchmarks/ --benchmark-only

report:
	$(PY) -m benchmarks.report --quick

lint:
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

.PHONY: test bench report lint
