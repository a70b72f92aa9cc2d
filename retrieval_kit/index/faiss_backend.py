"""FAISS backend: any ``index_factory`` string, inner-product metric, ids = doc-store rows.

Some factories cannot remove ids (HNSW, PQ) and some must be trained before adding (IVF, PQ).
Rather than failing, those changes set ``needs_rebuild``; ``Index`` then calls ``rebuild`` with
every vector from the doc store before the next search or save. A factory that cannot be trained yet
(IVF256 on 29 vectors) is served by an exact ``Flat`` stand-in until enough vectors are stored, so a small
index is never stuck: ``standin`` says so, and every rebuild tries the real factory again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import faiss
import numpy as np

from ..errors import InputError
from .base import Batch, empty_result, one_line

FILENAME = "faiss.index"
# faiss-cpu has no GPUs; the guard keeps builds without get_num_gpus working too.
_NUM_GPUS = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
# faiss-cpu 1.15 ships with exact search switching to BLAS only from 128,000 queries at once: a batch of 16
# queries then costs 16 separate scans of the vectors (memory-bound). Measured on a 100k × 384 Flat index
# (2-core box): 16 queries 120 ms per-query scans vs 46 ms BLAS, 8: 60 vs 31, 2: 13 vs 20, so BLAS from 4
# queries on (scores equal to 1e-7; only exact ties may order differently). A server's batches gain most.
faiss.cvar.distance_compute_blas_threshold = 4
# A small search runs on one thread: faiss's OpenMP threads otherwise fight torch's, still spinning after the
# query encode (measured, 2-core box, right after a teacher encode: 1 query × 5k vectors 5.1 ms on 2 threads,
# 1.5 ms on 1; 1 × 100k: 16.8 ms on 2, 24.3 on 1). Queries × vectors below this go single-threaded.
SMALL_SEARCH = 50_000
_THREADS = faiss.omp_get_max_threads()


def new_faiss_index(dim: int, factory: str, params: dict | None = None) -> faiss.Index:
    """An empty index for ``factory``, wrapped so it takes our row ids. InputError on a bad factory."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise InputError(f"bad faiss factory '{factory}' for dim {dim}: {one_line(exc)}") from None
    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:  # not an IVF index
        ivf = None
    if ivf is not None and hasattr(ivf, "do_polysemous_training"):
        # IVF-PQ factories train polysemous codes by default, for a Hamming pre-filter rkit never turns on: 60-130 s
        # per build at 20k vectors on a 2-core box (benchmarks/perf), whatever the corpus size
        ivf.do_polysemous_training = False
    if not factory.replace(" ", "").upper().startswith("IDMAP"):
        index = faiss.IndexIDMap2(index)
    _apply_params(index, params or {})
    return index


def default_params(factory: str) -> dict:
    """Search-time knobs better than faiss's defaults (nprobe=1 misses too much); stored in the manifest."""
    params = {}
    if "IVF" in factory.upper():
        params["nprobe"] = 16
    if "HNSW" in factory.upper():
        params["efSearch"] = 64
    return params


SEARCH_PARAMS = ("efSearch", "nprobe")  # the knobs `rkit index --search-params` sets (default_params' names)


def check_search_params(params: dict, factory: str) -> None:
    """InputError naming a knob this factory has no use for (efSearch needs HNSW, nprobe IVF) or a bad value."""
    takes = default_params(factory)
    for name, value in params.items():
        if name not in SEARCH_PARAMS:
            raise InputError(f"--search-params: unknown '{name}' (use {' or '.join(SEARCH_PARAMS)})")
        if name not in takes:
            needs = "an HNSW" if name == "efSearch" else "an IVF"
            raise InputError(f"--search-params: {name} needs {needs} factory, not '{factory}' "
                             f"(e.g. --factory {'HNSW32' if name == 'efSearch' else 'IVF256,Flat'})")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"--search-params: {name} must be a positive integer, got {value!r}")


def describe_params(params: dict | None) -> str:
    """{"efSearch": 64} → 'efSearch=64' (the form --search-params takes); 'none' when empty."""
    return ",".join(f"{k}={v}" for k, v in (params or {}).items()) or "none"


def _is_flat(factory: str) -> bool:
    return factory.replace(" ", "").upper().removeprefix("IDMAP2,").removeprefix("IDMAP,") == "FLAT"


def _inner(index: faiss.Index) -> faiss.Index:
    """The index inside our IDMap wrapper (the factory's own index)."""
    return faiss.downcast_index(index.index) if hasattr(index, "index") else index


def _selecting(index: faiss.Index, allowed: np.ndarray) -> faiss.SearchParameters:
    """Search parameters that admit only ``allowed`` row ids, keeping the index's own nprobe / efSearch
    (IVF and HNSW refuse parameters of another type)."""
    selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
    inner = _inner(index)
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        params = faiss.SearchParametersIVF(sel=selector, nprobe=int(ivf.nprobe))
    elif hasattr(inner, "hnsw"):
        params = faiss.SearchParametersHNSW(sel=selector, efSearch=int(inner.hnsw.efSearch))
    else:
        params = faiss.SearchParameters(sel=selector)
    params.keep = selector  # the swig object must outlive the search
    return params


def _min_training_rows(index: faiss.Index) -> int:
    """faiss refuses to train IVF on fewer vectors than lists, and PQ on fewer than its 2^nbits centroids."""
    inner = _inner(index)
    ivf = faiss.try_extract_index_ivf(inner)
    quantiser = faiss.downcast_index(ivf) if ivf is not None else inner
    pq = getattr(quantiser, "pq", None)
    return max(int(ivf.nlist) if ivf is not None else 1, 1 << int(pq.nbits) if pq is not None else 1)


def _apply_params(index: faiss.Index, params: dict) -> None:
    space = faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, value)


class FaissBackend:
    kind = "faiss"

    def __init__(self, folder: Path, dim: int, factory: str, *, params: dict | None = None,
                 label: str = "index", create: bool = False):
        self.path = Path(folder) / FILENAME
        self.dim, self.factory, self.params, self.label = dim, factory, params or {}, label
        self.needs_rebuild = False
        self.standin = False  # True: an exact Flat index stands in for a factory that cannot be trained yet
        self._gpu = None  # GPU copy for search, dropped on every change
        self._gpu_failed = False
        self.index = new_faiss_index(dim, factory, self.params) if create else self._load()

    def _load(self) -> faiss.Index:
        """The saved index; a missing or unreadable file yields an empty one flagged for rebuild from SQLite."""
        try:
            index = faiss.read_index(str(self.path))
            if index.d != self.dim:
                raise RuntimeError(f"dimension {index.d} != {self.dim}")
            self.standin = isinstance(_inner(index), faiss.IndexFlat) and not _is_flat(self.factory)
            if not self.standin:  # a Flat stand-in has no nprobe/efSearch to set
                _apply_params(index, self.params)
        except RuntimeError:
            self.needs_rebuild, self.standin = True, False
            return new_faiss_index(self.dim, self.factory, self.params)
        return index

    def set_params(self, params: dict) -> None:
        """New search-time knobs (efSearch, nprobe), applied to the index now and to every rebuild."""
        self.params = dict(params)
        self._gpu = None
        if not self.standin and not self.needs_rebuild:
            _apply_params(self.index, self.params)

    def ids(self) -> np.ndarray:
        """The row ids this index holds (what ``Index`` checks against the doc store)."""
        if not hasattr(self.index, "id_map"):
            return np.zeros(0, np.int64)
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def upsert(self, rows: np.ndarray, vectors: np.ndarray, payloads: list[dict] | None = None,
               terms: list[list[str]] | None = None) -> None:  # BM25 terms: the index's Bm25Side keeps them
        if not len(rows):
            return
        self._gpu = None
        if self.needs_rebuild or not self.index.is_trained or self.standin:  # a stand-in retries the real factory
            self.needs_rebuild = True  # the rebuild reads these rows from the store anyway
            return
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), rows.astype(np.int64))

    def delete(self, rows: np.ndarray) -> None:
        if not len(rows) or self.needs_rebuild:
            return
        self._gpu = None
        try:
            self.index.remove_ids(np.ascontiguousarray(rows, dtype=np.int64))
        except RuntimeError:  # "remove_ids not implemented for this type of index" (HNSW, PQ...)
            self.needs_rebuild = True

    def rebuild(self, batches: Iterable[Batch]) -> None:
        """Replace the index with these rows, training first when the factory needs it."""
        parts = [(rows, vectors) for rows, vectors, _, _ in batches]
        rows = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
        vectors = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, self.dim), np.float32)
        index, standin = new_faiss_index(self.dim, self.factory, self.params), False
        if not index.is_trained:
            try:
                if len(rows) < _min_training_rows(index):
                    raise RuntimeError(f"{len(rows)} vectors")
                index.train(vectors)
            except RuntimeError:  # too few vectors for this factory yet: exact search until there are enough
                index, standin = new_faiss_index(self.dim, "Flat"), True
        if len(rows):
            index.add_with_ids(vectors, rows)
        self.index, self.needs_rebuild, self.standin, self._gpu = index, False, standin, None

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        n = self.index.ntotal if allowed is None else min(self.index.ntotal, len(allowed))
        if n == 0 or not self.index.is_trained:
            return empty_result(len(queries), k)
        kk = min(k, n)  # GPU faiss caps k; asking for more than we hold is pointless anyway
        x = np.ascontiguousarray(queries, dtype=np.float32)
        faiss.omp_set_num_threads(1 if len(x) * n < SMALL_SEARCH else _THREADS)
        try:
            if allowed is None:
                scores, rows = self._search_index().search(x, kk)
            else:  # the filter inside the search (faiss IDSelector), not after it: a rare source still gets k hits
                scores, rows = self.index.search(x, kk, params=_selecting(self.index, allowed))
        finally:  # the setting is process-wide: a later build or big search gets every thread back
            faiss.omp_set_num_threads(_THREADS)
        if kk < k:
            pad_scores, pad_rows = empty_result(len(queries), k - kk)
            scores, rows = np.hstack([scores, pad_scores]), np.hstack([rows, pad_rows])
        return scores, rows

    def _search_index(self) -> faiss.Index:
        if not _NUM_GPUS or self._gpu_failed:
            return self.index
        if self._gpu is None:
            try:
                self._gpu = faiss.index_cpu_to_all_gpus(self.index)
            except (RuntimeError, AttributeError):  # factory without a GPU version (e.g. HNSW): stay on CPU
                self._gpu_failed = True
                return self.index
        return self._gpu

    def count(self) -> int:
        return int(self.index.ntotal)

    def save(self) -> None:
        """Write to a temp file, fsync, then rename: a crash mid-write leaves the previous file intact, and a reader
        opens either the old file or the new one (each is then checked against its SQLite snapshot by content)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        faiss.write_index(self.index, str(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)

    def close(self) -> None:
        self.index = self._gpu = None
