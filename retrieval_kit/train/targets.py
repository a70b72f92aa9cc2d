"""Stage 2 of training: teacher embeddings of the responses (the targets) and of the queries (the baseline).

A vector depends only on (teacher, text), so the cache is one text -> vector namespace per teacher (its name,
resolved path and a digest of its files) in the one store of `<cache_dir>/cache.sqlite3`
(retrieval_kit/cache_store.py). Vectors are float32, L2-normalised, committed after every chunk, so a killed run
loses at most one chunk and a rerun — or another training run whose responses or queries overlap — embeds only
what is missing.

Target caches written by earlier rkit versions (`<cache_dir>/targets/*/shard-*`) are ignored.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..cache_store import CacheStore, VectorNamespace, teacher_identity
from ..errors import TrainError

CHUNK = 1024  # texts per transaction: small enough to lose little when killed, large enough to be cheap


def target_cache(cache_dir: str | Path, teacher_name: str, role: str | None = None) -> VectorNamespace:
    """`role` ("query" | "document", as GenerativeEncoder.encode_teacher): a teacher with per-role prompts
    (EmbeddingGemma) gives a text two vectors, so each role is its own namespace; None is the namespace of caches
    written before roles existed (right for role-free teachers such as MiniLM, whose vectors are the same)."""
    store = CacheStore.in_folder(cache_dir, TrainError)
    identity = {"teacher": teacher_identity(teacher_name), "normalised": True}
    if role is not None:
        if role not in ("query", "document"):
            raise TrainError(f"unknown teacher role '{role}' (use query or document)")
        identity["role"] = role
    return store.vectors("train-teacher", identity)


def embed_texts(
    cache: VectorNamespace,
    texts: Sequence[str],
    embed: Callable[[list[str]], np.ndarray],
    on_chunk: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Unit vectors for `texts` (in order), embedding and caching only those the cache lacks.

    `on_chunk(n)` is first called with the number of distinct texts already cached, then after every chunk."""
    distinct = len(set(texts))

    @contextmanager
    def stage(todo: int):
        if on_chunk:
            on_chunk(distinct - todo)  # what the cache already had
        yield on_chunk or (lambda n: None)

    def unit(chunk: list[str]) -> np.ndarray:
        vectors = np.asarray(embed(chunk), dtype=np.float32)
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    vectors, _ = cache.get(texts, unit, chunk=CHUNK, stage=stage)
    return vectors
