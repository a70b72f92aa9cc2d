"""Qdrant Edge backend (evaluation): Qdrant's own Rust engine in-process, one shard in ``<folder>/qdrant-edge``.

A drop-in for ``QdrantBackend``'s local mode (same methods, same attributes, same scores): the dense vector is
the shard's unnamed default with Distance.Dot, the lexical side a sparse vector ``bm25`` with the IDF modifier
whose stored values come from ``lexical.sparse_document`` (so BM25 equals the FAISS side's bm25s for the
same avgdl), and a hybrid search is one fused query per query (a prefetch per signal, weighted RRF).

What differs from qdrant-client local mode (see benchmarks/results/edge/EVALUATION.md):

* the engine is Qdrant's (segments, WAL, mmap storage), not qdrant-client's Python re-implementation, and
  there is no SQLite file: an update is appended to the shard's write-ahead log before ``update`` returns,
  and ``flush`` (``save``) writes the segments;
* one ``EdgeShard`` per folder at a time, in any process: the shard holds an exclusive ``flock`` on its ``wal``
  directory, and a second ``load`` fails ("Can't init WAL: Kind(WouldBlock)") -- but only after it has loaded
  the segments, and on the way it deletes the open shard's ``tracker_journal.dat`` files, so the holder's next
  ``flush`` fails ("Tracker journal ... is shorter than expected"; nothing is lost: the WAL replays on reopen).
  So this backend probes the lock itself (``_held``) and never calls ``load`` on a folder that is in use;
* a reader therefore never opens the writer's folder: ``memory=True`` gives a private shard in a temporary
  folder (deleted by ``close``), filled by ``rebuild`` from the reader's own snapshot, exactly as
  ``QdrantBackend(memory=True)`` is used today;
* no server: ``url`` is not supported (a Qdrant server stays on ``QdrantBackend``).

Segment optimisation only runs when ``optimize`` is called, and ``save`` calls it with HNSW indexing turned
off (``indexing_threshold=0``): it only vacuums deleted points, so every search stays an exact full scan, like
qdrant-client local mode and FAISS ``Flat``. The vacuum matters for BM25: the engine's IDF counts deleted (and
replaced) points until their segment is vacuumed, so between a ``delete`` and the next ``save`` the lexical
scores drift from those of the live chunks (qdrant-client local mode counts live points only).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

from retrieval_kit.errors import IndexError_
from retrieval_kit.index.base import Batch, Signal, chunked, empty_result, one_line
from retrieval_kit.index.lexical import average_length, query_terms, sparse_document, sparse_query

DIRNAME = "qdrant-edge"
BATCH = 1024  # points per update operation (each is one WAL record)
SCROLL = 4096  # ids per page when listing what the shard holds
SPARSE = "bm25"  # the sparse vector's name; the dense one is the shard's unnamed default
CONFIG_FILE = "edge_config.json"


def _edge():
    try:
        import qdrant_edge
    except ImportError as exc:  # an optional dependency while this backend is evaluated
        raise IndexError_("the qdrant-edge backend needs the qdrant-edge-py package: "
                          "pip install qdrant-edge-py") from exc
    return qdrant_edge


def _busy(exc: BaseException) -> bool:
    """The error ``EdgeShard.load`` raises when another shard object (this process or another) holds the WAL."""
    return "WouldBlock" in str(exc) or "failed to open WAL" in str(exc)


def _held(path: Path) -> bool:
    """Whether an open EdgeShard (any process, this one included) holds ``path``: its flock on ``wal/``.

    Checked before ``EdgeShard.load``, because a refused load has already damaged the holder's files.
    Without fcntl (Windows: not evaluated) it cannot tell, and says no."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fd = os.open(path / "wal", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing our own descriptor drops our flock, never the holder's
    return False


class EdgeBackend:
    def __init__(self, dim: int, collection: str = "", *, folder: Path | None = None, url: str | None = None,
                 label: str = "index", create: bool = False, timeout: float = 10, memory: bool = False,
                 search_threads: int | None = None):
        if url:
            raise IndexError_(f"{label}: the qdrant-edge backend is embedded only; use the qdrant backend for {url}")
        if folder is None and not memory:
            raise IndexError_(f"{label}: the qdrant-edge backend needs a folder (or memory=True)")
        self.dim, self.collection, self.url, self.label = int(dim), collection, None, label
        self.needs_rebuild = False  # the engine applies every change directly
        self.standin = False  # nothing to train
        self.local = True  # always ours alone: a rebuild may recreate the shard
        self.lexical = True
        self.avgdl: float | None = None  # BM25 length normalisation baked into the sparse values (Index sets it)
        self.search_threads = search_threads
        self._qe = _edge()
        self._tmp: Path | None = None
        if memory:  # a reader's private copy: nobody else ever opens it
            self._tmp = Path(tempfile.mkdtemp(prefix="rkit-edge-"))
            self.path = self._tmp / DIRNAME
        else:
            self.path = Path(folder) / DIRNAME
        self.shard = None
        if create or memory or not (self.path / CONFIG_FILE).exists():
            self._create()
        else:
            self._load()

    # -- opening --------------------------------------------------------------------------------
    def _config(self):
        qe = self._qe
        return qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(size=self.dim, distance=qe.Distance.Dot),
            sparse_vectors={SPARSE: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)},
            # optimize() vacuums any segment with a deleted point and never builds HNSW (exact search only)
            optimizers=qe.EdgeOptimizersConfig(deleted_threshold=0.0, vacuum_min_vector_number=1,
                                               indexing_threshold=0),
            max_search_threads=self.search_threads,
        )

    def _in_use(self) -> IndexError_:
        return IndexError_(f"{self.label}: its Qdrant Edge shard is open in another process or object "
                           "(one at a time); close it first")

    def _create(self) -> None:
        """A new empty shard (whatever was in the folder goes: it is rebuilt from the doc store)."""
        if self.path.exists():
            if self.shard is None and _held(self.path):
                raise self._in_use()
            shutil.rmtree(self.path)
        try:
            self.shard = self._qe.EdgeShard.create(str(self.path), self._config())
        except Exception as exc:  # noqa: BLE001 - qdrant_edge raises plain Exception for everything
            raise IndexError_(f"{self.label}: cannot create the Qdrant Edge shard in {self.path}: "
                              f"{one_line(exc)}") from None
        self.lexical = True

    def _load(self) -> None:
        """The saved shard. Another open shard object: IndexError_. A shard of another dimension, one without the
        lexical side, or one that does not load (corrupt): an empty one flagged for rebuild, as FAISS does."""
        try:
            saved = json.loads((self.path / CONFIG_FILE).read_text())
            size = int(saved["vectors"][""]["size"])
            has_sparse = SPARSE in (saved.get("sparse_vectors") or {})
        except (OSError, ValueError, KeyError, TypeError):
            size, has_sparse = None, False
        if _held(self.path):  # before anything else: a refused load would break the holder's next flush
            raise self._in_use()
        if size != self.dim:
            self._create()
            self.needs_rebuild = True
            return
        try:
            self.shard = self._qe.EdgeShard.load(str(self.path))
        except Exception as exc:  # noqa: BLE001
            if _busy(exc):  # lost a race with another opener between the probe and the load
                raise self._in_use() from None
            self._create()  # unreadable: derived data, the doc store holds every vector
            self.needs_rebuild = True
            return
        # a shard made before the lexical side: upserts skip the sparse vector until rebuild recreates it
        self.lexical = has_sparse
        self.needs_rebuild = not has_sparse

    # -- changes --------------------------------------------------------------------------------
    def upsert(self, rows: np.ndarray, vectors: np.ndarray, payloads: list[dict] | None = None,
               terms: list[list[str]] | None = None) -> None:
        qe = self._qe
        payloads = payloads or [{} for _ in range(len(rows))]
        terms = terms if terms is not None else [[] for _ in range(len(rows))]
        if self.avgdl is None:
            self.avgdl = average_length(terms)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or (len(rows) and vectors.shape[1] != self.dim):
            raise IndexError_(f"{self.label}: vectors of shape {vectors.shape}, expected (n, {self.dim})")
        for start in range(0, len(rows), BATCH):
            points = []
            for i in range(start, min(start + BATCH, len(rows))):
                vector = {"": vectors[i]}
                if self.lexical:
                    indices, values = sparse_document(terms[i], self.avgdl)
                    vector[SPARSE] = qe.SparseVector(indices=indices, values=values)
                points.append(qe.Point(id=int(rows[i]), vector=vector, payload=payloads[i]))
            self.shard.update(qe.UpdateOperation.upsert_points(points))

    def delete(self, rows: np.ndarray) -> None:
        for part in chunked([int(r) for r in rows], BATCH):
            self.shard.update(self._qe.UpdateOperation.delete_points(part))

    def rebuild(self, batches: Iterable[Batch]) -> None:
        """Make the shard hold exactly these rows: a new empty shard, then every batch."""
        self.shard.close()
        self.shard = None
        self._create()
        for rows, vectors, payloads, terms in batches:
            self.upsert(rows, vectors, payloads, terms)
        self.needs_rebuild = False

    # -- reading --------------------------------------------------------------------------------
    def ids(self) -> np.ndarray:
        """Every point id in the shard (paged scroll, no payloads or vectors)."""
        qe = self._qe
        found, offset = [], None
        while True:
            points, offset = self.shard.scroll(qe.ScrollRequest(offset=offset, limit=SCROLL, with_payload=False,
                                                                with_vector=False))
            found += [int(p.id) for p in points]
            if offset is None:
                return np.asarray(sorted(found), dtype=np.int64)

    def _dense(self, vector) -> object:
        return self._qe.Query.Nearest(np.asarray(vector, np.float32).tolist())

    def _sparse(self, terms: list[str]) -> object:
        indices, values = sparse_query(terms)
        return self._qe.Query.Nearest(self._qe.SparseVector(indices=indices, values=values), using=SPARSE)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        qe = self._qe
        return self._run([qe.QueryRequest(limit=k, query=self._dense(q)) for q in np.asarray(queries, np.float32)], k)

    def search_lexical(self, texts, k: int) -> tuple[np.ndarray, np.ndarray]:
        """BM25 (the engine's IDF modifier × the stored tf part), best first."""
        qe = self._qe
        return self._run([qe.QueryRequest(limit=k, query=self._sparse(t)) for t in query_terms(texts)], k)

    def hybrid(self, signals: list[Signal], k: int, depth: int, rrf_k: int):
        """Per query the fused search (a prefetch per signal, weighted RRF in the engine), then each signal's own
        list (to say which signals found a hit). Returns (fused scores, fused rows, [rows per signal])."""
        qe = self._qe
        nq = len(signals[0].texts if signals[0].lexical else signals[0].vectors)
        terms = {s.name: query_terms(s.texts) for s in signals if s.lexical}

        def single(s: Signal, i: int):
            return self._sparse(terms[s.name][i]) if s.lexical else self._dense(s.vectors[i])

        fusion = qe.Fusion.Rrf(k=int(rrf_k), weights=[float(s.weight) for s in signals])
        fused = [qe.QueryRequest(limit=k, query=fusion,
                                 prefetches=[qe.Prefetch(limit=depth, query=single(s, i)) for s in signals])
                 for i in range(nq)]
        parts = [qe.QueryRequest(limit=depth, query=single(s, i)) for s in signals for i in range(nq)]
        scores, rows = self._run(fused, k)
        _, part_rows = self._run(parts, depth)
        return scores, rows, [part_rows[j * nq:(j + 1) * nq] for j in range(len(signals))]

    def _run(self, requests: list, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, rows = empty_result(len(requests), k)
        if not requests or k <= 0:
            return scores, rows
        responses = self.shard.query_batch(self._qe.QueryBatchRequest(requests))
        for i, points in enumerate(responses):
            for j, point in enumerate(points[:k]):
                scores[i, j], rows[i, j] = point.score, int(point.id)
        return scores, rows

    def count(self) -> int:
        return int(self.shard.count(self._qe.CountRequest(exact=True)))

    # -- lifetime -------------------------------------------------------------------------------
    def optimize(self) -> bool:
        """Vacuum deleted points and merge segments (no HNSW with this shard's config). True if it changed any."""
        return bool(self.shard.optimize())

    def save(self) -> None:
        """Vacuum deleted points (so BM25's IDF counts live chunks only), then flush the segments to disk. Every
        update is already in the WAL before ``update`` returns, so the flush only shortens a replay."""
        if self.shard is not None:
            self.shard.optimize()
            self.shard.flush()

    def close(self) -> None:
        if self.shard is not None:
            self.shard.close()  # releases the WAL lock
            self.shard = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
