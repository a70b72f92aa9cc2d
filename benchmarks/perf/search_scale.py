"""Stage 5: dense search at scale: FAISS Flat / HNSW / IVF-PQ, Qdrant embedded (and Qdrant Edge, evaluated only).

    python -m benchmarks.perf.search_scale [--quick] [--sizes 100000,1000000] [--out FILE.json] [--workdir DIR]

What it measures, per engine and corpus size (k = 10): build time (empty to saved on disk), p50 / p99 latency of
one query at a time, QPS at batch 1 and 64, recall@10 against exact search, memory, disk.

How:

* Vectors are synthetic (encoding 1M texts takes ~45 min on this CPU), and every figure says so: unit vectors
  from a mixture of Gaussian clusters whose noise has a decaying spectrum, as real sentence embeddings do
  (uniform noise would have no meaningful neighbours). The base is the first n rows of one seeded stream, made in
  chunks and cached in ``workdir``; the queries are drawn from the same mixture by a stream of their own.
* Ground truth: the exact top-10 by inner product (faiss ``IndexFlatIP``, chunk by chunk); recall@10 =
  |approximate top-10 ∩ exact top-10| / 10, averaged over the queries.
* Every engine goes through the product's own class (``FaissBackend`` with ``default_params``, ``QdrantBackend``
  in local mode; ``EdgeBackend`` from the evaluation), so the figures are what a user gets: the engine is built,
  saved, closed, and opened again from disk as ``rkit`` opens an index, and then searched through its
  ``search`` method (without the doc-store lookup ``Index`` adds). FAISS therefore runs single-threaded where
  the product does (``SMALL_SEARCH``). HNSW's efSearch, IVF's nprobe and the refine's k_factor are swept; the
  headline rows use the product's defaults and the sweep sits in the p50 row's ``detail``.
* Memory: resident set (psutil RSS) after opening the saved index and searching it once, minus RSS just before
  opening, with freed memory handed back to the OS (gc + ``malloc_trim``) before each reading; one engine is
  loaded at a time. Disk: blocks allocated to the saved files.
* Peer: exact search (FAISS Flat) of the same size, in the same run: latencies, QPS, memory and disk rows carry
  Flat's figure as ``peer`` and the speed-up (or the size ratio) as ``ratio``.

Timings are one pass on a shared box: ratios travel, absolute times less so.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import faiss
import numpy as np
import psutil

from benchmarks.perf.common import Figure, check, percentile, timed
from retrieval_kit.index.base import one_line
from retrieval_kit.index.faiss_backend import _THREADS, SMALL_SEARCH, FaissBackend, default_params
from retrieval_kit.index.qdrant_backend import QdrantBackend

STAGE = "search"
DIM, K = 384, 10
SEED, CLUSTERS, NOISE = 0, 2_000, 0.5
DATA = (f"synthetic: {DIM}-d unit vectors, mixture of {CLUSTERS:,} Gaussian clusters (noise norm {NOISE} × the "
        f"centre's, variance ∝ 1/rank along shared random axes), seed {SEED}")
DATA_KEY = f"s{SEED}-c{CLUSTERS}-n{NOISE}"  # in cache file names: another distribution never reads a stale file
GEN_CHUNK = 10_000  # rows per generated chunk (and per upsert): keeps peak memory to a few chunks
QUICK_SIZES, FULL_SIZES = (20_000,), (100_000, 1_000_000)
QUICK_QUERIES, FULL_QUERIES = 250, 1_000
TIMED, WARMUP, BATCH = 200, 10, 64  # queries timed one by one, untimed ones before them, the batched size
QPS_BATCHES = 4  # batches of 64 per QPS pass: a second or more at 1M exact, the whole query set for slow engines
RECALL_GOAL = 0.95
HNSW_TARGET = "≤ 2"  # the issue: HNSW at 1M, p50 ≤ 2 ms with recall@10 ≥ 0.95
HNSW_BUILD_LIMIT_S = 720  # an HNSW build estimated longer than this halves the size (the stage has ~20 min)
EXACT_LIMIT = 100_000  # qdrant-client local mode and Edge scan every vector per query: run up to this size
QDRANT_LOAD_LIMIT_S = 180  # stop upserting into Qdrant local mode after this long and measure what is in
SLOW_QUERIES = 256  # queries for the exact-scan engines (their 1,000-query pass alone would take minutes)
IVF_TRAIN_PER_LIST = 50  # k-means sample: faiss wants ≥ 39 vectors per list; rows are iid, so a prefix will do
EDGE_NOTE = "not adopted (evaluation engine)"
SWEEP_KEYS = ("recall", "p50_ms", "p99_ms", "qps_b1", "qps_b64")  # per swept value, in the p50 row's detail


@dataclass
class Engine:
    label: str  # first words of every figure name
    kind: str  # "faiss", "qdrant" or "edge"
    factory: str = ""
    knob: str = ""  # the search parameter swept, "" for none
    default: float | None = None  # the knob's value as the product sets it
    sweep: tuple = ()
    max_rows: int | None = None  # a cap below the corpus size, said in ``note``
    max_queries: int | None = None
    repeat: int = 3  # passes of the batched QPS run behind the headline figure
    note: str = ""
    target: str | None = None  # HNSW only: the p50 target at recall ≥ RECALL_GOAL


@dataclass
class Data:
    """The cached synthetic base (a .npy read through a memory map), the queries, and the exact answers.

    ``trained`` keeps each size's trained, empty IVF-PQ (serialised, with its training seconds): the RFlat
    variant wraps the same IVF-PQ, so it reuses that training instead of paying for it twice."""

    workdir: Path
    base_path: Path
    queries: np.ndarray
    _truth: dict = field(default_factory=dict)
    trained: dict = field(default_factory=dict)

    def base(self) -> np.ndarray:
        return np.load(self.base_path, mmap_mode="r")

    def truth(self, n: int) -> np.ndarray:
        if n not in self._truth:
            self._truth[n] = _cached(self.workdir / f"truth-{n}-q{len(self.queries)}-{DATA_KEY}.npy",
                                     lambda: exact_top_k(self.base()[:n], self.queries))
        return self._truth[n]


# -- data -----------------------------------------------------------------------------------------------------

def _space() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cluster centres (unit), shared noise axes (a random rotation) and the noise scale along each axis."""
    rng = np.random.default_rng([SEED, 0])
    centres = _unit(rng.standard_normal((CLUSTERS, DIM), dtype=np.float32))
    axes = np.linalg.qr(rng.standard_normal((DIM, DIM)))[0].astype(np.float32)
    spectrum = 1.0 / np.arange(1, DIM + 1)
    scale = (NOISE * np.sqrt(spectrum / spectrum.sum())).astype(np.float32)  # total noise norm ≈ NOISE
    return centres, axes, scale


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _draw(rng: np.random.Generator, m: int, space) -> np.ndarray:
    centres, axes, scale = space
    cluster = rng.integers(CLUSTERS, size=m)
    noise = (rng.standard_normal((m, DIM), dtype=np.float32) * scale) @ axes.T
    return _unit(centres[cluster] + noise).astype(np.float32)


def _cached(path: Path, make: Callable[[], np.ndarray]) -> np.ndarray:
    if path.exists():
        return np.load(path)
    value = make()
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, value)
    tmp.replace(path)  # an interrupted run never leaves a half-written cache
    return value


def make_data(workdir: Path, n: int, n_queries: int, log: Callable[[str], None]) -> Data:
    """The first ``n`` base rows and ``n_queries`` queries, generated once and cached in ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    space = _space()
    base_path = workdir / f"base-{n}-{DATA_KEY}.npy"
    if not base_path.exists():
        log(f"search: generating {n:,} synthetic vectors in {workdir}")
        tmp = base_path.with_suffix(".tmp.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, DIM))
        for i, start in enumerate(range(0, n, GEN_CHUNK)):
            # every chunk is drawn whole from its own stream, so any base is a prefix of a larger one
            chunk = _draw(np.random.default_rng([SEED, 1, i]), GEN_CHUNK, space)
            out[start:start + GEN_CHUNK] = chunk[:n - start]
        out.flush()
        del out
        tmp.replace(base_path)
    queries = _cached(workdir / f"queries-{n_queries}-{DATA_KEY}.npy",
                      lambda: _draw(np.random.default_rng([SEED, 2]), n_queries, space))
    return Data(workdir, base_path, queries)


def _chunks(base: np.ndarray, n: int, size: int = GEN_CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in range(0, n, size):
        end = min(n, start + size)
        yield np.arange(start, end, dtype=np.int64), np.ascontiguousarray(base[start:end])


def exact_top_k(base: np.ndarray, queries: np.ndarray, k: int = K, chunk: int = 100_000) -> np.ndarray:
    """Exact top-k rows by inner product, one chunk of the base at a time (never the whole base in memory)."""
    faiss.omp_set_num_threads(_THREADS)  # a product search may have left faiss on one thread
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for rows, vectors in _chunks(base, len(base), chunk):
        flat = faiss.IndexFlatIP(DIM)
        flat.add(vectors)
        scores, found = flat.search(queries, k)
        heap.add_result(scores, found + rows[0])
    heap.finalize()
    return heap.I


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """|found ∩ truth| / k, averaged over the queries."""
    k = truth.shape[1]
    return float(np.mean([len(np.intersect1d(f[:k], t)) / k for f, t in zip(found, truth)]))


# -- memory and disk ------------------------------------------------------------------------------------------

_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None)
_TRIM = getattr(_LIBC, "malloc_trim", None)  # glibc only: without it freed heap pages may stay in the RSS


def _settle() -> None:
    """Free what is unreachable and hand free heap pages back to the OS, so that RSS is what is in use."""
    gc.collect()
    if _TRIM is not None:
        _TRIM(0)


def _rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def _disk(folder: Path) -> tuple[float, float]:
    """MiB allocated on disk, and apparent MiB (Edge preallocates sparse files)."""
    files = [p.stat() for p in folder.rglob("*") if p.is_file()]
    return sum(s.st_blocks * 512 for s in files) / 2**20, sum(s.st_size for s in files) / 2**20


# -- engines --------------------------------------------------------------------------------------------------

def _nlist(n: int) -> int:
    """IVF lists ≈ 4·√n, rounded to a power of two (IVF1024 at 100k, IVF4096 at 1M)."""
    return 2 ** round(math.log2(4 * math.sqrt(n)))


def faiss_engine(factory: str, **kw) -> Engine:
    knob = "efSearch" if "HNSW" in factory else "nprobe" if "IVF" in factory else ""
    return Engine(factory, "faiss", factory, knob, default_params(factory).get(knob), **kw)


def engines_for(n: int, hnsw_build: tuple[int, float] | None, log: Callable[[str], None]) -> list[Engine]:
    """Every engine at size ``n``; ``hnsw_build`` (size, seconds) from a smaller size sizes the HNSW run."""
    ivfpq = f"IVF{_nlist(n)},PQ48"
    engines = [
        faiss_engine("Flat"),
        _hnsw(n, hnsw_build, log),
        faiss_engine(ivfpq, sweep=(1, 4, 8, 16, 32, 64, 128),
                     note=f"nlist {_nlist(n)} ≈ 4·√n; k-means on the first {IVF_TRAIN_PER_LIST}·nlist rows; "
                          "PQ48 (48 bytes a vector) bounds recall whatever nprobe; the training includes the "
                          "polysemous code ordering faiss's factory enables for PQ (most of train_s; never used "
                          "by the product's searches)"),
        # default_params sets no k_factor_rf, so the product's refine re-ranks only faiss's default 1·k candidates
        replace(faiss_engine(ivfpq + ",RFlat"), knob="k_factor_rf", default=1, sweep=(1, 2, 4, 8, 16),
                note="IVF-PQ + exact re-rank of k·k_factor_rf candidates (keeps the float32 vectors too); "
                     "k_factor_rf swept at the product's nprobe 16"),
    ]
    if n <= EXACT_LIMIT:
        engines.append(Engine("Qdrant embedded", "qdrant", max_queries=SLOW_QUERIES, repeat=1, note=(
            "qdrant-client local mode: a pure-Python/numpy store scanning every vector per query; "
            f"run up to {EXACT_LIMIT:,} vectors only (at 1M a single query pass would take tens of minutes), "
            f"and its upserts stop after {QDRANT_LOAD_LIMIT_S} s")))
        if importlib.util.find_spec("qdrant_edge") is not None:
            engines.append(Engine("Qdrant Edge", "edge", max_queries=SLOW_QUERIES, repeat=1, note=(
                f"{EDGE_NOTE}: benchmarks/edge/edge_backend.py, dense search only; its config never builds "
                f"HNSW (exact scan, like local mode), so it runs up to {EXACT_LIMIT:,} vectors")))
        else:
            log("search: qdrant_edge is not importable: no Qdrant Edge rows")
    return engines


def _hnsw(n: int, build: tuple[int, float] | None, log: Callable[[str], None]) -> Engine:
    """HNSW32, halved in size when the build measured at a smaller size extrapolates past the limit."""
    engine = faiss_engine("HNSW32", sweep=(16, 32, 64, 128, 256, 512), target=HNSW_TARGET)
    if build is None:
        return engine
    n0, seconds = build
    estimate = seconds * (n / n0) * math.log(n) / math.log(n0)  # insertion cost grows as n log n
    log(f"search: HNSW32 build at {n:,} estimated {estimate:.0f} s (from {seconds:.0f} s at {n0:,})")
    if estimate <= HNSW_BUILD_LIMIT_S:
        return engine
    return replace(engine, max_rows=n // 2, note=(
        f"built on the first {n // 2:,} vectors: the build at {n:,} was estimated at {estimate:.0f} s "
        f"(from {seconds:.0f} s at {n0:,}, n log n), over the stage's {HNSW_BUILD_LIMIT_S} s allowance"))


def _build_faiss(engine: Engine, folder: Path, data: Data, n: int, log) -> dict:
    backend = FaissBackend(folder, DIM, engine.factory, params=default_params(engine.factory), create=True)
    faiss.omp_set_num_threads(_THREADS)  # builds use every core, whatever the last small search set
    base, build = data.base(), {"rows": n, "train_s": 0.0}
    if not backend.index.is_trained:  # IVF / PQ: trained on a sample, then filled as FaissBackend.upsert does
        log(f"search: {engine.label} at {n:,}: training")
        build |= _train(backend, engine.factory, data, n)
    t0 = time.perf_counter()
    for rows, vectors in _chunks(base, n):
        backend.upsert(rows, vectors)
    t1 = time.perf_counter()
    backend.save()
    t2 = time.perf_counter()
    backend.close()
    return build | {"add_s": t1 - t0, "save_s": t2 - t1}


def _train(backend: FaissBackend, factory: str, data: Data, n: int) -> dict:
    """k-means for the lists, the PQ codebooks, and the polysemous code ordering that faiss's factory turns on
    for PQ (~100 s on this box at 20k: it permutes the codebooks, whatever n; the product never searches in
    polysemous mode). Once per size: the RFlat variant gets a copy of the trained IVF-PQ and is charged the same
    training seconds."""
    quantiser = factory.removesuffix(",RFlat")
    if factory != quantiser and (quantiser, n) in data.trained:
        blob, seconds = data.trained[(quantiser, n)]
        backend.index = faiss.IndexIDMap2(faiss.IndexRefineFlat(faiss.deserialize_index(blob)))
        return {"train_s": seconds, "train_shared_with": quantiser}
    t0 = time.perf_counter()
    backend.index.train(np.ascontiguousarray(data.base()[:min(n, IVF_TRAIN_PER_LIST * _nlist(n))]))
    seconds = time.perf_counter() - t0
    if factory == quantiser:
        data.trained[(quantiser, n)] = faiss.serialize_index(faiss.downcast_index(backend.index.index)), seconds
    return {"train_s": seconds}


def _build_qdrant(engine: Engine, folder: Path, data: Data, n: int, log) -> dict:
    backend = QdrantBackend(DIM, "bench", folder=folder, create=True)
    t0, rows_in = time.perf_counter(), 0
    for rows, vectors in _chunks(data.base(), n):
        backend.upsert(rows, vectors)  # no payloads or BM25 terms: dense search only
        rows_in = int(rows[-1]) + 1
        if time.perf_counter() - t0 > QDRANT_LOAD_LIMIT_S and rows_in < n:
            log(f"search: Qdrant local mode: stopped at {rows_in:,} vectors after {QDRANT_LOAD_LIMIT_S} s")
            break
    t1 = time.perf_counter()
    backend.close()  # local mode persists each upsert; closing checkpoints its SQLite file
    return {"rows": rows_in, "add_s": t1 - t0, "save_s": time.perf_counter() - t1}


def _build_edge(engine: Engine, folder: Path, data: Data, n: int, log) -> dict:
    from benchmarks.edge.edge_backend import EdgeBackend

    backend = EdgeBackend(DIM, folder=folder, create=True)
    t0 = time.perf_counter()
    for rows, vectors in _chunks(data.base(), n):
        backend.upsert(rows, vectors)
    t1 = time.perf_counter()
    backend.save()
    t2 = time.perf_counter()
    backend.close()
    return {"rows": n, "add_s": t1 - t0, "save_s": t2 - t1}


def _open(engine: Engine, folder: Path):
    """The saved engine, opened as the product opens an index."""
    if engine.kind == "faiss":
        return FaissBackend(folder, DIM, engine.factory, params=default_params(engine.factory))
    if engine.kind == "qdrant":
        return QdrantBackend(DIM, "bench", folder=folder)
    from benchmarks.edge.edge_backend import EdgeBackend

    return EdgeBackend(DIM, folder=folder)


BUILDERS = {"faiss": _build_faiss, "qdrant": _build_qdrant, "edge": _build_edge}


# -- measuring ------------------------------------------------------------------------------------------------

def measure_point(backend, queries: np.ndarray, truth: np.ndarray, repeat: int = 1) -> dict:
    """Recall over every query (in batches of 64, which also warms the engine up), QPS of ``QPS_BATCHES``
    batches of 64 (median of ``repeat`` passes: the shared box makes single passes jumpy), then the latency of
    ``TIMED`` queries one at a time after ``WARMUP`` untimed ones."""
    def search(q: np.ndarray) -> np.ndarray:
        return backend.search(q, K)[1]

    def batches(qs: np.ndarray) -> np.ndarray:
        return np.vstack([search(qs[i:i + BATCH]) for i in range(0, len(qs), BATCH)])

    found = batches(queries)
    batched = queries[:QPS_BATCHES * BATCH]
    qps = timed(lambda: batches(batched), repeat=repeat)
    n_timed = min(TIMED, len(queries) - WARMUP)
    for i in range(len(queries) - WARMUP, len(queries)):  # single-query warm-up on queries not timed below
        search(queries[i:i + 1])
    latencies = []
    for i in range(n_timed):
        t0 = time.perf_counter()
        search(queries[i:i + 1])
        latencies.append(time.perf_counter() - t0)
    return {"recall": recall_at_k(found, truth), "p50_ms": 1000 * percentile(latencies, 50),
            "p99_ms": 1000 * percentile(latencies, 99), "qps_b1": n_timed / sum(latencies),
            "qps_b64": len(batched) / qps.median, "qps_b64_range": [len(batched) / qps.max, len(batched) / qps.min],
            "timed": n_timed}


def _set(backend, knob: str, value) -> None:
    faiss.ParameterSpace().set_index_parameter(backend.index, knob, value)


def measure(engine: Engine, n: int, data: Data, log: Callable[[str], None]) -> dict:
    """Build and save the engine, then measure it opened from disk; its files go afterwards."""
    folder = data.workdir / "engines" / re.sub(r"[^A-Za-z0-9]+", "-", f"{engine.label}-{n}")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        rows = min(n, engine.max_rows or n)
        log(f"search: {engine.label} at {rows:,}: building")
        build = BUILDERS[engine.kind](engine, folder, data, rows, log)
        disk, apparent = _disk(folder)
        return {"engine": engine, "rows": build["rows"], "build": build, "disk_mib": disk,
                "disk_apparent_mib": apparent} | _search(engine, folder, build["rows"], data, log)
    finally:
        _settle()
        shutil.rmtree(folder, ignore_errors=True)  # 1M × 384 floats is 1.5 GB a copy


def _search(engine: Engine, folder: Path, rows: int, data: Data, log: Callable[[str], None]) -> dict:
    """Open the saved engine (RSS read around it), measure it at the product's settings, then sweep the knob."""
    queries = data.queries[:engine.max_queries]
    truth = data.truth(rows)[:len(queries)]  # before the first RSS reading: exact search allocates as it goes
    _settle()
    load_avg = os.getloadavg()[0]  # the box is shared: a busy one slows multi-threaded batches most
    rss0, t0 = _rss_mib(), time.perf_counter()
    backend = _open(engine, folder)
    try:
        load_s = time.perf_counter() - t0
        log(f"search: {engine.label} at {rows:,}: searching")
        main = measure_point(backend, queries, truth, repeat=engine.repeat)
        _settle()
        memory = _rss_mib() - rss0
        sweep = {engine.default: main} if engine.sweep else {}
        for value in sorted(set(engine.sweep) - {engine.default}):
            _set(backend, engine.knob, value)
            sweep[value] = measure_point(backend, queries, truth)
    finally:
        backend.close()
    return {"load_s": load_s, "memory_mib": memory, "main": main, "sweep": sweep, "queries": len(queries),
            "load_avg": load_avg}


# -- figures --------------------------------------------------------------------------------------------------

def size_label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else f"{n:,}"


def _threads(engine: Engine, rows: int) -> dict | str:
    if engine.kind != "faiss":
        return "numpy, one query after another" if engine.kind == "qdrant" else "the engine's default pool"
    used = {batch: 1 if batch * rows < SMALL_SEARCH else _THREADS for batch in (1, BATCH)}
    return {"faiss_max": _THREADS, "batch_1": used[1], f"batch_{BATCH}": used[BATCH]}


def _operating_point(sweep: dict) -> tuple[float | None, dict | None]:
    """The smallest knob value whose recall reaches the goal, and its measurements."""
    for value, point in sorted(sweep.items()):
        if point["recall"] >= RECALL_GOAL:
            return value, point
    return None, None


def _target_why(engine: Engine, value, point: dict | None, sweep: dict) -> str:
    if point is None:
        best = max(sweep, key=lambda v: sweep[v]["recall"])
        return (f"no {engine.knob} up to {max(sweep)} reaches recall@10 {RECALL_GOAL} (best "
                f"{sweep[best]['recall']:.3f} at {best}); a denser graph would (HNSW48/64, efConstruction ≥ 80: "
                "a longer build) or an exact re-rank of a deeper candidate list")
    return (f"recall {RECALL_GOAL} needs {engine.knob} {value}: {point['p50_ms']:.2f} ms a query on this shared "
            "box; one query's graph walk runs on one thread (faiss splits HNSW work by query) and reads a whole "
            "1.5 KB float32 vector per step (memory-bound). What would close it: compressed vectors with an exact "
            "re-rank (HNSW32,SQ8 or PQ + refine: 4-8× less memory traffic), a faster or idle CPU, or batching "
            f"(QPS at batch 64 is {point['qps_b64']:.0f})")


def figures_for(result: dict, flat: dict | None) -> list[Figure]:
    """About eight rows per engine and size, against Flat of the same size when there is one."""
    engine, rows, main = result["engine"], result["rows"], result["main"]
    name = f"{engine.label} {size_label(rows)}"
    peer = flat if flat is not None and flat is not result and flat["rows"] == rows else None
    build_s = _value(result, "build_s")
    detail = {"data": DATA, "vectors": rows, "dim": DIM, "k": K, "queries": result["queries"],
              "timed_one_by_one": main["timed"], "threads": _threads(engine, rows),
              "build": {k: _round(v) for k, v in result["build"].items() if k != "rows"},
              "load_s": _round(result["load_s"]), "load_avg_1m": _round(result["load_avg"]),
              "cpu_count": os.cpu_count()}
    if engine.kind == "faiss":
        detail |= {"factory": engine.factory, "params": default_params(engine.factory)}
    if engine.knob:
        detail[engine.knob] = engine.default
    if engine.note:
        detail["note"] = engine.note
    if engine.kind == "edge":
        detail["status"] = EDGE_NOTE

    def row(what: str, ours: float, unit: str, key: str | None, speedup: bool | None, extra=None) -> Figure:
        other = None if peer is None or key is None else _value(peer, key)
        ratio = None if other is None or speedup is None or not ours else (other / ours if speedup else ours / other)
        return Figure(STAGE, f"{name} {what}", _round(ours), unit, _round(other),
                      "FAISS Flat (exact)" if other is not None else None, _round(ratio), detail=detail | (extra or {}))

    sweep = {str(v): {k: _round(p[k]) for k in SWEEP_KEYS} for v, p in sorted(result["sweep"].items())}
    value, point = _operating_point(result["sweep"])
    on_sweep = {"sweep": sweep, f"smallest_{engine.knob}_at_recall_{RECALL_GOAL}": value} if sweep else {}
    figures = [
        row("p50 (batch 1)", main["p50_ms"], "ms", "p50_ms", True, on_sweep),
        row("p99 (batch 1)", main["p99_ms"], "ms", "p99_ms", True),
        row("QPS (batch 1)", main["qps_b1"], "q/s", "qps_b1", False),
        row(f"QPS (batch {BATCH})", main["qps_b64"], "q/s", "qps_b64", False,
            {"qps_passes": engine.repeat, "qps_range": _round(main["qps_b64_range"])}),
        row("recall@10", main["recall"], "", "recall", None),
        row("build", build_s, "s", "build_s", None),
        row("memory", result["memory_mib"], "MiB", "memory_mib", False,
            {"memory_method": "psutil RSS after opening the saved index and one search pass, minus RSS just "
                              "before opening; gc + malloc_trim before each reading; one engine loaded at a time"}),
        row("disk", result["disk_mib"], "MiB", "disk_mib", False,
            {"disk_apparent_mib": _round(result["disk_apparent_mib"])}),
    ]
    if engine.target:
        figures.append(_target_figure(engine, name, value, point, result, peer, detail | on_sweep))
    return figures


def _target_figure(engine: Engine, name: str, value, point, result: dict, peer, detail: dict) -> Figure:
    chosen = point or result["sweep"][max(result["sweep"])]
    met = bool(point is not None and check(point["p50_ms"], engine.target))
    default = result["sweep"][engine.default]
    other = None if peer is None else _value(peer, "p50_ms")
    return Figure(STAGE, f"{name} p50 at recall@10 ≥ {RECALL_GOAL} (batch 1)", _round(chosen["p50_ms"]), "ms",
                  _round(other), "FAISS Flat (exact)" if other is not None else None,
                  _round(other / chosen["p50_ms"]) if other else None, engine.target, met,
                  "" if met else _target_why(engine, value, point, result["sweep"]),
                  detail | {"issue_target": f"HNSW at 1M: p50 {engine.target} ms with recall@10 ≥ {RECALL_GOAL}",
                            "operating_point": {engine.knob: value if point else max(result["sweep"]),
                                                "recall": _round(chosen["recall"])},
                            "at_product_default": {engine.knob: engine.default, "recall": _round(default["recall"]),
                                                   "p50_ms": _round(default["p50_ms"])}})


def _value(result: dict, key: str) -> float:
    if key in result["main"]:
        return result["main"][key]
    if key == "build_s":  # empty to saved on disk
        return sum(v for k, v in result["build"].items() if k.endswith("_s"))
    return result[key]


def _round(x):
    if isinstance(x, list):
        return [_round(v) for v in x]
    return float(f"{x:.4g}") if isinstance(x, float) else x


def failure_figures(engine: Engine, n: int, exc: BaseException) -> list[Figure]:
    """An engine that failed is a row saying so (and the target row, unmet), not a crashed stage."""
    name, why = f"{engine.label} {size_label(n)}", f"failed: {type(exc).__name__}: {one_line(exc)}"
    detail = {"data": DATA, "vectors": n, "factory": engine.factory or engine.kind}
    figures = [Figure(STAGE, f"{name} (failed)", 0.0, "failed", why=why, detail=detail)]
    if engine.target:
        figures.append(Figure(STAGE, f"{name} p50 at recall@10 ≥ {RECALL_GOAL} (batch 1)", 0.0, "failed",
                              target=engine.target, met=False, why=why, detail=detail))
    return figures


# -- the stage ------------------------------------------------------------------------------------------------

def run_size(n: int, data: Data, engines: list[Engine], log: Callable[[str], None]) -> tuple[list[Figure], dict]:
    """Every engine at size ``n``, Flat first (the peer). Returns the figures and the raw results by label."""
    figures, results = [], {}
    for engine in engines:
        try:
            results[engine.label] = result = measure(engine, n, data, log)
        except Exception as exc:  # noqa: BLE001 - one engine's failure is a figure, the others still run
            log(f"search: {engine.label} at {n:,} failed: {one_line(exc)}")
            figures += failure_figures(engine, n, exc)
            continue
        figures += figures_for(result, results.get("Flat"))
    return figures, results


def run(quick: bool, workdir: Path, log: Callable[[str], None], sizes: tuple[int, ...] | None = None) -> list[Figure]:
    """The stage: every engine at every size, smallest first (its HNSW build time sizes the next HNSW run)."""
    sizes = tuple(sorted(sizes or (QUICK_SIZES if quick else FULL_SIZES)))
    data = make_data(Path(workdir), max(sizes), QUICK_QUERIES if quick else FULL_QUERIES, log)
    figures, hnsw_build = [], None
    for n in sizes:
        found, results = run_size(n, data, engines_for(n, hnsw_build, log), log)
        figures += found
        if "HNSW32" in results:
            hnsw_build = results["HNSW32"]["rows"], _value(results["HNSW32"], "build_s")
    return figures


def table(figures: list[Figure]) -> str:
    def cell(x) -> str:
        return "" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)

    head = ("figure", "ours", "unit", "peer", "ratio", "target", "met")
    lines = [(f.name, cell(f.ours), f.unit, cell(f.peer), cell(f.ratio), f.target or "", cell(f.met))
             for f in figures]
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *lines])


def _sizes(text: str) -> tuple[int, ...]:
    return tuple(int(s.replace("_", "")) for s in text.split(",") if s.strip())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_SIZES[0]:,} vectors, {QUICK_QUERIES} queries")
    ap.add_argument("--sizes", type=_sizes, help="comma-separated corpus sizes (default 100000,1000000)")
    ap.add_argument("--out", type=Path, help="write the figures here as JSON")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "rkit-perf-search",
                    help="vectors and indexes (the vectors are kept for the next run)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    figures = run(args.quick, args.workdir, lambda line: print(line, file=sys.stderr, flush=True), args.sizes)
    wall = time.perf_counter() - t0
    print(table(figures))
    print(f"stage wall time {wall:.0f} s", file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps({"stage": STAGE, "wall_s": round(wall, 1),
                                        "figures": [f.as_dict() for f in figures]}, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
