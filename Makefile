# The README's commands. Everything runs as root on a node (or CI machine) of this kind.
PY := .venv/bin/python
BENCH_OUT ?= bench/results

.PHONY: setup demo test unit bench bench-quick bench-established clean

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

# The 2% established-throughput target: round-to-round noise on this kind of VM is 5-20%, so
# it takes ~250 alternated one-second rounds (~13 min) for the 95% interval to be that narrow.
bench-established: setup
	bash scripts/setup.sh --bench
	$(PY) -m bench.established_ab --rounds 250 --seconds 1 --phases iperf --json $(BENCH_OUT)/established_ab.json

unit: setup
	$(PY) -m pytest -ra tests/unit

clean:
	rm -rf .venv build *.egg-info .pytest_cache
