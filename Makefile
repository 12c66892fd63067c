# diffalign: `make demo` runs the quick start, `make test` runs lint and the test suite.
# Both create .venv when it is missing and (re)install when pyproject.toml or constraints.txt changes:
# every extra the demo and the suite need (EXTRAS), at the exact versions pinned in constraints.txt.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= all,ray,dev
# No network at run time: a stray hub id must fail at once instead of retrying for minutes.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install demo test lint bench clean

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip check
	touch $@

install: $(BIN)/.installed

# The quick start: DDPO teaches the 16x16 flow-matching digit model to draw the digit its prompt asks for
# (about 4 minutes on 2 CPU cores); prints the reward before/after and where the sample grids are.
demo: $(BIN)/.installed
	$(BIN)/diffalign fit --config recipes/image/ddpo_digit_fidelity.yaml

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n auto --dist loadgroup --durations=30

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/throughput.py --config recipes/toy/ddpo_mode.yaml

clean:
	rm -rf runs .pytest_cache
