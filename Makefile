# Two entry points: `make demo` (set up, then train DLRM with a few table types on synthetic data and
# print a comparison) and `make test` (set up, then run the whole suite). Both bootstrap .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean

$(STAMP): pyproject.toml requirements-ci.txt requirements-torchrec.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements-ci.txt
	$(BIN)/pip install -q -r requirements-torchrec.txt
	$(BIN)/pip install -q --no-deps torchrec==1.8.0
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/embcompress demo --out demo-out --overwrite

# One torch thread per worker: two xdist workers with two threads each would oversubscribe two cores.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 tests

clean:
	rm -rf $(VENV) demo-out
