# servesim: `make demo` and `make test` do all set-up on a fresh machine (Python 3.10+ and PyPI).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench accuracy venv clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/servesim run experiments/configs/quickstart.yaml -o runs/quickstart
	@echo "report: runs/quickstart/summary.md, runs/quickstart/report.json, plots: runs/quickstart/*.png"

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m servesim.experiments.bench

accuracy: $(STAMP)
	$(BIN)/servesim accuracy -o runs/accuracy

clean:
	rm -rf $(VENV) runs .pytest_cache
