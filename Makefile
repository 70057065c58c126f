# The two commands: `make run` (a dev instance) and `make test` (the suite);
# and `make fuzz`, the fuzz targets for longer than the suite's smoke run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
FUZZ_SECONDS ?= 60

.PHONY: run test fuzz clean

# editable_mode=compat keeps twisted/plugins/ visible to twistd; a plain
# `pip install -e .` hides it behind an import hook twistd does not use.
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --editable '.[test]' --config-settings editable_mode=compat
	touch $@

run: $(BIN)/.installed
	$(BIN)/python -m mailplat.devinstance

# Tests wait on real servers more than they compute: four at once on two
# cores (measured before the suite got faster: 4 min 11 s, against 4 min 33 s
# with three; now 1,575 tests in 2 min 35 s), each test file in one worker
# (its module-scoped servers are shared).
# mypy first (with mypy-zope, configured in pyproject.toml): a wrong type
# fails in seconds, before the suite's minutes.
test: $(BIN)/.installed
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q -n 4 --dist loadfile

# Each target (fuzz/README.md) for FUZZ_SECONDS; new inputs stay in
# fuzz/work/, crashes land in fuzz/crashes/.
fuzz: $(BIN)/.installed
	$(BIN)/python fuzz/run.py --seconds $(FUZZ_SECONDS)

clean:
	rm -rf $(VENV) dev build *.egg-info
