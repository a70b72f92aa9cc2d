"""Shared test set-up: offline hub, a persistent model cache, and one encoder loaded per session."""

from __future__ import annotations

import os
from pathlib import Path

# set before anything imports huggingface_hub: proves the embedded default needs no hub access
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
# the dequantised backbone (~0.5 GB, ~20 s to make) is kept between runs, like a user's cache
os.environ.setdefault("RKIT_HOME", str(REPO / ".cache" / "rkit"))
# the suite's tight numeric comparisons (cache vs no cache, FAISS vs Qdrant) are written for float32, which every CPU
# runs the same way; an AMX CPU would otherwise pick bf16. tests/test_dtype.py checks bf16 on its own.
os.environ.setdefault("RKIT_DTYPE", "float32")

import pytest  # noqa: E402

SHARED_DATA = Path(os.environ.get("RKIT_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def encoder():
    """The shipped default encoder (real backbone + teacher from the wheels)."""
    import torch

    from retrieval_kit.models import load_encoder

    torch.manual_seed(0)
    return load_encoder(device="cpu")


@pytest.fixture()
def index_home(tmp_path, monkeypatch):
    home = tmp_path / "indexes"
    monkeypatch.setenv("RKIT_INDEX_HOME", str(home))
    return home


def assert_same_hits(ours, theirs, abs_tol: float = 1e-6) -> None:
    """Two backends' results, as lists of (chunk_id, score[, signals]) rows per query, are the same hits in the
    same order with the same signals, and scores within abs_tol (each caller keeps the precision it compared at
    before). FAISS and Qdrant sum dot products in different orders, so comparing rounded decimals fails whenever
    a score sits on a rounding boundary."""
    assert [[(row[0], *row[2:]) for row in hits] for hits in ours] == \
           [[(row[0], *row[2:]) for row in hits] for hits in theirs]
    assert [row[1] for hits in ours for row in hits] == \
           pytest.approx([row[1] for hits in theirs for row in hits], abs=abs_tol)
