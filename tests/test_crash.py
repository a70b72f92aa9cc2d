"""Kill -9 a real `rkit index` at random moments (benchmarks/crash.py); the long run is a benchmark command."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.crash import crash_test  # noqa: E402


@pytest.mark.parametrize("backend", ["faiss", "qdrant"])
def test_index_survives_kill_9_and_equals_a_clean_build(tmp_path, backend):
    # 3 kills per backend keep CI short; `python -m benchmarks.crash --kills N` is the long run (30 per backend
    # committed under benchmarks/results/crash/)
    result = crash_test(tmp_path / backend, backend=backend, kills=3, files=24, changes=6, seed=1, log=lambda m: None)
    assert result["kills"] == 3 and sum(result["kill_phases"].values()) == 3
    assert result["bad_opens"] == []  # after every kill the index opened and every chunk was its own top-1
    v = result["vs_clean_build"]
    assert (v["missing"], v["phantom"], v["duplicates"], v["text_mismatch"], v["wrong_top1"],
            v["lexical_missing"]) == (0, 0, 0, 0, 0, 0), v
    assert v["max_vector_diff"] < 1e-4 and result["chunks"] > 24
    assert result["ok"]
