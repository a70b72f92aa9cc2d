"""Stage 2 of training: teacher embeddings of the responses (the targets) and of the queries (the baseline).

A vector depends only on (teacher, text), so the cache is one text -> vector store per teacher, next to the
response caches: ``<cache_dir>/targets/<teacher-key>/shard-*.{jsonl,npy}``. Each shard holds the texts of one
embedded chunk (a JSON string per line) and their vectors (float32, L2-normalised, one row per text). Shards are
written after every chunk, the ``.npy`` last, so a killed run loses at most one chunk and a rerun — or another
training run whose responses or queries overlap — embeds only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import TrainError

CHUNK = 1024  # texts per shard: small enough to lose little when killed, large enough to keep few files


def teacher_key(teacher_name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", teacher_name.lower()).strip("-")[-40:]
    return f"{slug}-{hashlib.sha256(teacher_name.lower().encode()).hexdigest()[:8]}"


class EmbeddingStore:
    """text -> teacher vector, persisted as shards in one folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.index: dict[str, tuple[int, int]] = {}  # text -> (shard number, row)
        self.shards: list[np.ndarray] = []
        for npy in sorted(self.folder.glob("shard-*.npy")):
            self._load_shard(npy)

    def _load_shard(self, npy: Path) -> None:
        names = npy.with_suffix(".jsonl")
        try:
            texts = [json.loads(line) for line in names.read_text(encoding="utf-8").splitlines()]
            vectors = np.load(npy)
        except (OSError, ValueError):
            return  # a torn shard (killed mid-write): its texts are simply embedded again
        if len(texts) != len(vectors):
            return
        number = len(self.shards)
        self.shards.append(vectors.astype(np.float32, copy=False))
        for row, text in enumerate(texts):
            self.index[text] = (number, row)

    def __contains__(self, text: str) -> bool:
        return text in self.index

    def missing(self, texts: Sequence[str]) -> list[str]:
        return [t for t in dict.fromkeys(texts) if t not in self.index]

    def add(self, texts: list[str], vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        stem = self.folder / f"shard-{time.time_ns()}-{os.getpid()}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            stem.with_suffix(".jsonl").write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts),
                                                  encoding="utf-8")
            tmp = stem.with_suffix(".tmp.npy")
            np.save(tmp, vectors)
            os.replace(tmp, stem.with_suffix(".npy"))  # the shard exists only once both halves are complete
        except OSError as exc:
            raise TrainError(f"cannot write the target cache {self.folder}: {exc.strerror or exc}") from exc
        number = len(self.shards)
        self.shards.append(vectors)
        for row, text in enumerate(texts):
            self.index[text] = (number, row)

    def get(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), D) float32; every text must be present."""
        if not texts:
            return np.zeros((0, self.shards[0].shape[1] if self.shards else 0), dtype=np.float32)
        return np.stack([self.shards[s][r] for s, r in (self.index[t] for t in texts)])


def embed_texts(
    store: EmbeddingStore,
    texts: Sequence[str],
    embed: Callable[[list[str]], np.ndarray],
    on_chunk: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Vectors for `texts` (in order), embedding and caching only those the store lacks."""
    todo = store.missing(texts)
    if on_chunk:
        on_chunk(len(set(texts)) - len(todo))  # what the cache already had
    for start in range(0, len(todo), CHUNK):
        chunk = todo[start : start + CHUNK]
        vectors = embed(chunk)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        store.add(chunk, vectors / np.maximum(norms, 1e-12))
        if on_chunk:
            on_chunk(len(chunk))
    return store.get(list(texts))


def target_store(cache_dir: str | Path, teacher_name: str) -> EmbeddingStore:
    return EmbeddingStore(Path(cache_dir) / "targets" / teacher_key(teacher_name))
