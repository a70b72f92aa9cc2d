"""What every vector backend shares: the search result type, the backend interface, small helpers."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np

# One batch of stored chunks, as the doc store hands them to a backend rebuild:
# (rows int64 (n,), vectors float32 (n, dim), payloads: one dict per row, BM25 terms: one list per row).
Batch = tuple[np.ndarray, np.ndarray, list[dict], list[list[str]]]


@dataclass
class Hit:
    """One search result: a chunk and its inner-product score with the query."""

    chunk_id: str
    doc_id: str
    score: float
    text: str
    title: str
    source: str
    metadata: dict = field(default_factory=dict)
    signals: dict = field(default_factory=dict)  # hybrid search: signal name -> rank (1 = best) where it found this


@dataclass
class Signal:
    """One ranked list for a hybrid search: dense query vectors (a row per query) or the query texts for BM25."""

    name: str
    weight: float
    vectors: np.ndarray | None = None
    texts: Sequence[str] | None = None

    @property
    def lexical(self) -> bool:
        return self.vectors is None


@dataclass(frozen=True)
class ChunkFilter:
    """Which chunks a search may return (fields left None do not filter): the chunk's source starts with
    ``source_prefix`` (a folder of the corpus, e.g. 'security/'), its file type is ``file_type`` ('md', 'pdf')."""

    source_prefix: str | None = None
    file_type: str | None = None

    def __bool__(self) -> bool:
        return bool(self.source_prefix or self.file_type)


# the embedded Qdrant folder inside an index folder (here, so the index need not import qdrant-client to name it)
QDRANT_DIR = "qdrant"


class VectorBackend(Protocol):
    """Vectors and integer row ids only; the doc store keeps everything else.

    Rows are never reused by ``Index``, so ``upsert`` only ever sees new rows in practice.
    """

    kind: str  # "faiss" or "qdrant": what the index checks instead of isinstance (qdrant-client loads lazily)
    needs_rebuild: bool  # True when pending changes can only be applied by ``rebuild`` (HNSW delete, untrained IVF)
    standin: bool  # True while an exact index serves for a factory that cannot be trained yet (FAISS IVF/PQ)

    def upsert(self, rows: np.ndarray, vectors: np.ndarray, payloads: list[dict] | None = None,
               terms: list[list[str]] | None = None) -> None: ...
    def delete(self, rows: np.ndarray) -> None: ...
    # rows -1 past the end; ``allowed``: only these rows may be returned (a ChunkFilter's rows), None = all
    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]: ...
    def rebuild(self, batches: Iterable[Batch]) -> None: ...  # replace everything with these rows
    def ids(self) -> np.ndarray: ...  # every row id held: ``Index`` checksums them against the doc store
    def count(self) -> int: ...
    def save(self) -> None: ...
    def close(self) -> None: ...


def one_line(exc: BaseException | str) -> str:
    """A library's exception text as one short line (faiss prefixes 'Error in <C++ signature> at file:line:')."""
    text = " ".join(str(exc).split())
    text = re.sub(r"^Error in .*? at \S+:\d+: ", "", text)
    text = re.sub(r"^Error: '.*?' failed: ", "", text)
    text = re.sub(r"^\[Errno \d+\] ", "", text)
    return text or type(exc).__name__


def empty_result(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and rows for queries that found nothing (rows are -1, as faiss pads)."""
    return np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64)


def chunked(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
