# The README's commands. Everything runs as root on a node (or CI machine) of this kind.
PY := .venv/bin/python
BENCH_OUT ?= bench/results

.PHONY: setup demo test unit bench bench-quick clean

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m ctlb.demo

test: setup
	$(PY) -m pytest -ra tests

bench: setup
	bash scripts/setup.sh --bench
	$(PY) -m bench.run --out $(BENCH_OUT)

bench-quick: setup
	bash scripts/setup.sh --bench
	$(PY) -m bench.run --quick --out $(BENCH_OUT)

unit: setup
	$(PY) -m pytest -ra tests/unit

clean:
	rm -rf .venv build *.egg-info .pytest_cache
