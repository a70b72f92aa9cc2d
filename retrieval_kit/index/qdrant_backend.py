"""Qdrant backend: embedded local mode in ``<folder>/qdrant``, an in-memory copy, or a server/cluster at a URL.

Distance is Dot: on L2-normalised vectors it equals the FAISS inner product, so both backends
score alike. Point id = doc-store row; the payload repeats the chunk so points are readable on a server.

Local mode lets one process open its folder, and that is the writer's. A reader loads the committed
vectors of its SQLite snapshot into an in-memory collection instead (``memory=True``): the same engine,
the same scores, and readers keep working while ``rkit index`` runs.

On a server the collection may be shared and live, so nothing here ever drops it: ``rebuild`` is a
diff (upsert what is missing, delete what the doc store no longer has), every request is idempotent, and
transient errors (timeouts, connection resets, 429/5xx) are retried with backoff (tenacity).

The lexical side is a sparse vector ``bm25`` in the same collection (see lexical.py), and a hybrid search is
one Query API request per query: one prefetch per signal, fused on the server by weighted RRF.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import httpx
import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

from ..errors import IndexError_
from .base import QDRANT_DIR, Batch, Signal, chunked, empty_result, one_line
from .lexical import average_length, query_terms, sparse_document, sparse_query

BATCH = 256  # points per upsert request: keeps requests small for a server
SCROLL = 4096  # ids per page when listing what a collection holds
SPARSE = "bm25"  # the sparse vector's name; the dense one is the collection's unnamed default


def _transient(exc: BaseException) -> bool:
    """Worth retrying: the network or an overloaded server, not a request the server rejected."""
    if isinstance(exc, UnexpectedResponse):
        return exc.status_code is not None and (exc.status_code == 429 or exc.status_code >= 500)
    return isinstance(exc, (httpx.TransportError, ResponseHandlingException, ConnectionError, TimeoutError))


# every server request below is idempotent (upsert by id, delete by id, reads), so a retry cannot double-apply
_retrying = retry(retry=retry_if_exception(_transient), stop=stop_after_attempt(5),
                  wait=wait_exponential(multiplier=0.2, max=5), reraise=True)


def connect(*, folder: Path | None = None, url: str | None = None, label: str = "index",
            timeout: float = 10, memory: bool = False) -> QdrantClient:
    """A live client, or an IndexError_ one-liner (unreachable server, local folder already in use)."""
    if memory:
        return QdrantClient(location=":memory:")
    if url:
        try:
            # API key from the environment, never from the manifest (it is not a secret store).
            client = QdrantClient(url=url, timeout=int(max(1, timeout)), check_compatibility=False,
                                  api_key=os.environ.get("QDRANT_API_KEY") or None)
            client.get_collections()  # the constructor does not connect; this does
        except Exception as exc:  # httpx/grpc/qdrant errors vary; all mean the same to the user
            raise IndexError_(f"{label}: cannot reach Qdrant at {url}: {one_line(exc).lower()}") from None
        return client
    busy = IndexError_(f"{label}: Qdrant local storage is open in another process (local mode allows one); "
                       "close it or use a Qdrant server URL")
    path = Path(folder) / QDRANT_DIR
    if _locked(path / ".lock"):  # checked first: qdrant would load every point, then fail and leak the lock file
        raise busy
    try:
        return QdrantClient(path=str(path))
    except RuntimeError as exc:  # lost a race with another opener
        if "already accessed" not in str(exc):
            raise
        raise busy from None


def _only(allowed: np.ndarray | None) -> models.Filter | None:
    """A ChunkFilter's rows as a Qdrant filter (point ids are rows), applied inside the search."""
    if allowed is None:
        return None
    return models.Filter(must=[models.HasIdCondition(has_id=[int(r) for r in allowed])])


def _locked(lock_file: Path) -> bool:
    """Whether a Qdrant local-mode client (in any process) holds this folder's lock."""
    import portalocker  # a qdrant-client dependency; imported late as qdrant does (it probes the file system)

    if not lock_file.exists():
        return False
    with open(lock_file, "r+") as fh:
        try:
            portalocker.lock(fh, portalocker.LockFlags.EXCLUSIVE | portalocker.LockFlags.NON_BLOCKING)
        except portalocker.exceptions.LockException:
            return True
        portalocker.unlock(fh)
    return False


class QdrantBackend:
    kind = "qdrant"

    def __init__(self, dim: int, collection: str, *, folder: Path | None = None, url: str | None = None,
                 label: str = "index", create: bool = False, timeout: float = 10, memory: bool = False):
        self.dim, self.collection, self.url, self.label = dim, collection, url, label
        self.needs_rebuild = False  # qdrant applies every change directly
        self.standin = False  # nothing to train
        self.avgdl: float | None = None  # BM25 length normalisation baked into the sparse values (Index sets it)
        self.client = connect(folder=folder, url=url, label=label, timeout=timeout, memory=memory)
        self.local = not url  # local folder or in-memory: ours alone, so a rebuild may recreate the collection
        exists = _retrying(self.client.collection_exists)(collection)
        if create and exists and url:
            self.close()
            raise IndexError_(f"{label}: Qdrant collection '{collection}' already exists at {url}; "
                              "choose another collection name or delete it first")
        if not exists:
            self._create_collection()  # also when opening: an empty collection gets rebuilt from the store
        self._fast_local_storage()
        sparse = _retrying(self.client.get_collection)(collection).config.params.sparse_vectors or {}
        # a collection made before the lexical side: a local one is rebuilt (ours alone), a server's is not
        self.lexical = SPARSE in sparse
        self.needs_rebuild = not self.lexical and self.local

    def _create_collection(self) -> None:
        _retrying(self.client.create_collection)(
            self.collection, vectors_config=models.VectorParams(size=self.dim, distance=models.Distance.DOT),
            sparse_vectors_config={SPARSE: models.SparseVectorParams(modifier=models.Modifier.IDF)},
        )
        self.lexical = True
        self._fast_local_storage()

    def _fast_local_storage(self) -> None:
        """Local mode commits (and fsyncs) its SQLite file once per point: ~20 ms each, minutes for 10k chunks.

        WAL + synchronous=NORMAL makes those commits cheap and stays safe against a crashed process;
        after a power cut the points can always be rebuilt from our own doc store. Reaches into
        qdrant-client internals, so any surprise just leaves the default (slow but correct) settings.
        """
        if self.url:
            return
        try:
            db = self.client._client.collections[self.collection].storage.storage
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
        except Exception:  # noqa: BLE001 - an optimisation only
            pass

    def upsert(self, rows: np.ndarray, vectors: np.ndarray, payloads: list[dict] | None = None,
               terms: list[list[str]] | None = None) -> None:
        payloads = payloads or [{} for _ in range(len(rows))]
        terms = terms if terms is not None else [[] for _ in range(len(rows))]
        if self.avgdl is None:
            self.avgdl = average_length(terms)
        for start in range(0, len(rows), BATCH):
            end = start + BATCH
            vectors_part = {"": np.asarray(vectors[start:end], dtype=np.float32).tolist()}
            if self.lexical:
                vectors_part[SPARSE] = [self._sparse_document(t) for t in terms[start:end]]
            _retrying(self.client.upsert)(self.collection, wait=True, points=models.Batch(
                ids=[int(r) for r in rows[start:end]], vectors=vectors_part, payloads=payloads[start:end],
            ))

    def delete(self, rows: np.ndarray) -> None:
        for part in chunked([int(r) for r in rows], 1024):
            _retrying(self.client.delete)(self.collection, wait=True, points_selector=models.PointIdsList(points=part))

    def rebuild(self, batches: Iterable[Batch]) -> None:
        """Make the collection hold exactly these rows. Local: recreate it. Server: upsert them all, then delete
        any other point (a shared, live collection is never dropped)."""
        if self.local:
            self.client.delete_collection(self.collection)
            self._create_collection()
        keep: list[np.ndarray] = []
        for rows, vectors, payloads, terms in batches:
            self.upsert(rows, vectors, payloads, terms)
            keep.append(rows)
        if not self.local:
            kept = np.concatenate(keep) if keep else np.zeros(0, np.int64)
            self.delete(np.setdiff1d(self.ids(), kept))
        self.needs_rebuild = False

    def reweight(self, batches: Iterable[tuple[np.ndarray, list[list[str]]]], avgdl: float) -> None:
        """Rewrite every point's sparse BM25 values for a new average chunk length (dense vectors untouched)."""
        self.avgdl = avgdl
        for rows, terms in batches:
            for start in range(0, len(rows), BATCH):
                points = [models.PointVectors(id=int(r), vector={SPARSE: self._sparse_document(t)})
                          for r, t in zip(rows[start:start + BATCH], terms[start:start + BATCH])]
                _retrying(self.client.update_vectors)(self.collection, points=points, wait=True)

    def ids(self) -> np.ndarray:
        """Every point id in the collection (paged scroll, no payloads or vectors)."""
        found, offset = [], None
        while True:
            points, offset = _retrying(self.client.scroll)(self.collection, limit=SCROLL, offset=offset,
                                                           with_payload=False, with_vectors=False)
            found += [int(p.id) for p in points]
            if offset is None:
                return np.asarray(sorted(found), dtype=np.int64)

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        where = _only(allowed)
        return self._run([models.QueryRequest(query=q.tolist(), limit=k, filter=where)
                          for q in np.asarray(queries, np.float32)], k)

    def _sparse_document(self, terms: list[str]) -> models.SparseVector:
        indices, values = sparse_document(terms, self.avgdl)
        return models.SparseVector(indices=indices, values=values)

    def _sparse_query(self, terms: list[str]) -> models.SparseVector:
        indices, values = sparse_query(terms)
        return models.SparseVector(indices=indices, values=values)

    def search_lexical(self, texts, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """BM25 (Qdrant's IDF modifier × the stored tf part), best first."""
        where = _only(allowed)
        return self._run([models.QueryRequest(query=self._sparse_query(t), using=SPARSE, limit=k, filter=where)
                          for t in query_terms(texts)], k)

    def hybrid(self, signals: list[Signal], k: int, depth: int, rrf_k: int, fusion: str = "rrf",
               allowed: np.ndarray | None = None):
        """One batch request: per query the fused Query API search (a prefetch per signal, weighted RRF on the
        server), then each signal's own list (to say which signals found a hit).
        Returns (fused scores, fused rows, [rows per signal])."""
        nq = len(signals[0].texts if signals[0].lexical else signals[0].vectors)
        terms = {s.name: query_terms(s.texts) for s in signals if s.lexical}

        where = _only(allowed)

        def single(s: Signal, i: int, limit: int) -> dict:
            if s.lexical:
                return {"query": self._sparse_query(terms[s.name][i]), "using": SPARSE, "limit": limit, "filter": where}
            return {"query": np.asarray(s.vectors[i], np.float32).tolist(), "limit": limit, "filter": where}

        fused = [models.QueryRequest(prefetch=[models.Prefetch(**single(s, i, depth)) for s in signals],
                                     query=(models.RrfQuery(rrf=models.Rrf(k=rrf_k, weights=[s.weight for s in signals]))
                                            if fusion == "rrf" else models.FusionQuery(fusion=models.Fusion.DBSF)),
                                     limit=k) for i in range(nq)]
        parts = [models.QueryRequest(**single(s, i, depth)) for s in signals for i in range(nq)]
        scores, rows = self._run(fused, k)
        _, part_rows = self._run(parts, depth)
        return scores, rows, [part_rows[j * nq:(j + 1) * nq] for j in range(len(signals))]

    def _run(self, requests: list, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, rows = empty_result(len(requests), k)
        if not requests:
            return scores, rows
        for i, response in enumerate(_retrying(self.client.query_batch_points)(self.collection, requests=requests)):
            for j, point in enumerate(response.points[:k]):
                scores[i, j], rows[i, j] = point.score, int(point.id)
        return scores, rows

    def count(self) -> int:
        return int(_retrying(self.client.count)(self.collection, exact=True).count)

    def save(self) -> None:
        """Nothing to do: local mode and servers persist each change as it is made."""

    def close(self) -> None:
        if self.client is not None:
            self.client.close()  # releases the local-mode folder lock
            self.client = None
