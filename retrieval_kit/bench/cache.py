"""On-disk caches that make a rerun with another method cheap.

Layout under the cache root (default `$RKIT_HOME/bench`, `--cache-dir` overrides):

    <dataset name>-<corpus hash>/
        docs-<space>/part-0000.npy + part-0000.keys.json   document vectors (append-only parts)
        queries-<space>/...                                 query / HyDE-answer vectors
        answers-<generator key>.jsonl                        HyDE answers, one line per query text
        bm25-<params>/                                       the bm25s index

`space` names what produced a vector: `teacher-<name>` (shared by every adapter) or `gen-<fingerprint>`.
Keys are hashes of the exact text, so a `--limit 5` run fills part of the cache a full run then reuses.
Parts are written as they are computed: an interrupted embedding run keeps what it finished.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..paths import rkit_home
from .progress import stage


def default_cache_root() -> Path:
    return rkit_home() / "bench"


def text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:20]


def prompt_tag(prompt: str) -> str:
    """A system prompt's short tag in cache keys and result file names (the same tag in both)."""
    return text_key(prompt)[:8]


def slug(text: str, max_len: int = 60) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in str(text))
    return keep.strip("-")[:max_len] or "x"


class VectorStore:
    """text -> vector, stored as numbered parts; `get` computes only the texts not stored yet."""

    def __init__(self, folder: Path, chunk: int = 2048):  # one part per chunk: also the progress step
        self.folder = Path(folder)
        self.chunk = chunk

    def _load(self) -> dict[str, np.ndarray]:
        rows: dict[str, np.ndarray] = {}
        for keys_file in sorted(self.folder.glob("part-*.keys.json")):
            matrix_file = keys_file.with_name(keys_file.name.replace(".keys.json", ".npy"))
            if not matrix_file.is_file():
                continue  # a part whose matrix never got written: recompute those texts
            keys = json.loads(keys_file.read_text())
            matrix = np.load(matrix_file)
            rows.update(zip(keys, matrix))
        return rows

    def _write_part(self, keys: list[str], matrix: np.ndarray) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        n = len(list(self.folder.glob("part-*.npy")))
        stem = self.folder / f"part-{n:04d}"
        np.save(stem.with_suffix(".npy"), matrix.astype(np.float32))
        (self.folder / f"part-{n:04d}.keys.json").write_text(json.dumps(keys))

    def get(self, texts: Sequence[str], compute: Callable[[list[str]], np.ndarray],
            description: str = "embedding") -> tuple[np.ndarray, bool]:
        """Vectors for `texts` in order, and whether all came from the cache."""
        stored = self._load()
        keys = [text_key(t) for t in texts]
        todo = list(dict.fromkeys(k for k in keys if k not in stored))
        first = {k: t for k, t in zip(keys, texts)}
        with stage(description, len(todo)) as advance:
            for start in range(0, len(todo), self.chunk):
                part = todo[start:start + self.chunk]
                matrix = np.asarray(compute([first[k] for k in part]), dtype=np.float32)
                self._write_part(part, matrix)
                stored.update(zip(part, matrix))
                advance(len(part))
        if not keys:
            return np.zeros((0, 0), dtype=np.float32), not todo
        return np.stack([stored[k] for k in keys]).astype(np.float32), not todo


class TextStore:
    """text -> generated text (HyDE answers), one JSON line per answer, appended as produced."""

    def __init__(self, path: Path, chunk: int = 64):
        self.path = Path(path)
        self.chunk = chunk

    def _load(self) -> dict[str, str]:
        if not self.path.is_file():
            return {}
        out = {}
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interrupted run
            out[row["key"]] = row["answer"]
        return out

    def get(self, texts: Sequence[str], compute: Callable[[list[str]], list[str]],
            description: str = "generating") -> tuple[list[str], bool]:
        stored = self._load()
        keys = [text_key(t) for t in texts]
        todo = list(dict.fromkeys(k for k in keys if k not in stored))
        first = {k: t for k, t in zip(keys, texts)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with stage(description, len(todo)) as advance:
            for start in range(0, len(todo), self.chunk):
                part = todo[start:start + self.chunk]
                answers = compute([first[k] for k in part])
                with open(self.path, "a", encoding="utf-8") as fh:
                    for k, a in zip(part, answers):
                        fh.write(json.dumps({"key": k, "answer": a}, ensure_ascii=False) + "\n")
                stored.update(zip(part, answers))
                advance(len(part))
        return [stored[k] for k in keys], not todo
