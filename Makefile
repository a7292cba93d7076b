# The README's commands. Everything runs as root on a node (or CI machine) of this kind.
PY := .venv/bin/python

.PHONY: setup demo test unit clean

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m ctlb.demo

test: setup
	$(PY) -m pytest -ra tests

unit: setup
	$(PY) -m pytest -ra tests/unit

clean:
	rm -rf .venv build *.egg-info .pytest_cache
