"""The server's search engine room: indexes and models loaded once, queries batched, new generations picked up.

One worker thread owns every index (reads, refreshes) and runs the searches: requests put jobs on a queue and
wait on a future. Whatever is queued when the worker comes round is taken together, and the queries of jobs
that agree on (index, mode, k, filter) are encoded in one batch and searched in one call — no waiting window,
so a lone query pays nothing and a burst shares one forward pass (``benchmarks/serve_load.py --max-batch 1``
measures what that buys). A writer's update is picked up within ``refresh_s`` of the writer finishing,
without a restart, and a batch never sees half of one: a watcher thread opens each new committed generation as a fresh read-only snapshot,
prepares it (FAISS file and BM25 side loaded, or rebuilt in memory) off the serving path, and the worker swaps
it in between batches. If a new generation cannot be opened (the folder removed, rebuilt with another
encoder), the last good one goes on serving and ``GET /indexes`` shows the error.

Decoding an explanation takes seconds on a CPU, so it runs on a thread of its own: it never holds up searches.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import InputError, RkitError
from ..index import Index
from ..index.base import ChunkFilter
from ..index.core import committed_generation
from ..index.lock import writer_active
from ..search import DEFAULT_HYBRID, SEARCH_MODES, HybridRecipe, Retriever, encoder_spec, explain_all

log = logging.getLogger("rkit.serve")

MAX_BATCH = 32  # queries per encode: past this a CPU gains nothing and the first request waits longer
WRITER_GRACE_S = 60  # a new generation whose writer still runs waits this long for the writer's own save


@dataclass(frozen=True)
class SearchJob:
    """Queries that share one search call: the same index, mode, k and filter."""

    index: str
    queries: tuple[str, ...]
    k: int
    mode: str | None
    where: ChunkFilter | None = None
    hybrid: HybridRecipe = DEFAULT_HYBRID
    future: Future = field(default_factory=Future, compare=False, hash=False)

    @property
    def key(self) -> tuple:
        return self.index, self.mode, self.k, self.where, self.hybrid


@dataclass
class Served:
    """One searched index: the retriever serving it, the next generation being made ready, refresh errors."""

    name: str
    folder: Path
    retriever: Retriever | None = None  # owned by the worker thread
    pending: Retriever | None = None  # a newer generation, ready to swap in (set by the watcher thread)
    error: str | None = None  # the last refresh failed (index removed, rebuilt with another encoder…)
    errors_seen: set[str] = field(default_factory=set)  # every error of this failing spell, logged once each
    waiting_since: float | None = None  # a new generation seen while its writer still runs


class Searcher:
    def __init__(self, folders: dict[str, Path], *, adapter: str | None = None, device=None, encoder=None,
                 max_batch: int = MAX_BATCH, refresh_s: float = 0.25):
        if not folders:
            raise InputError("serve at least one index (--index NAME)")
        self.served = {name: Served(name, Path(folder)) for name, folder in folders.items()}
        self.default = next(iter(self.served))
        self.adapter, self.device, self._encoder = adapter, device, encoder
        self.max_batch, self.refresh_s = max(1, int(max_batch)), float(refresh_s)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._explainer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rkit-explain")
        self._worker: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self._swap_lock = threading.Lock()
        self._stop = threading.Event()
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.batches = 0  # searches run (a batch of one or more jobs); the server exports them as metrics
        self.batched_queries = 0
        self.on_batch: Callable[[int], None] | None = None  # called with each batch's query count

    # -- life cycle -----------------------------------------------------------------------------
    def load(self) -> None:
        """Open every index read-only and load each distinct encoder once (indexes built alike share one)."""
        try:
            encoders: dict[tuple, object] = {}
            for served in self.served.values():
                index = Index.open(served.folder)
                try:
                    encoder = self._encoder_for(index, encoders)
                except BaseException:
                    index.close()
                    raise
                # "ready" means the first search pays no one-off load (BM25 side, rebuilds)
                served.retriever = _ready(index, encoder)
            self._worker = threading.Thread(target=self._work, name="rkit-search", daemon=True)
            self._worker.start()
            self._watcher = threading.Thread(target=self._watch, name="rkit-refresh", daemon=True)
            self._watcher.start()
            self.ready.set()
        except RkitError as exc:
            self.load_error = str(exc)
            raise

    def _encoder_for(self, index: Index, loaded: dict):
        if self._encoder is not None:
            return self._encoder
        from ..models import load_encoder

        key = encoder_spec(index.manifest, self.adapter)
        if key not in loaded:
            # a saved adapter loads its models on first use; a server loads both now, before /health says ready,
            # so no request pays for it (any mode and the explanations may come)
            loaded[key] = load_encoder(key[0], backbone=key[1], teacher=key[2], device=self.device).load_models()
        return loaded[key]

    def close(self) -> None:
        self._stop.set()
        self._jobs.put(None)
        if self._worker is not None:
            self._worker.join(timeout=30)
        if self._watcher is not None:
            self._watcher.join(timeout=30)
        self._explainer.shutdown(wait=False, cancel_futures=True)
        for served in self.served.values():
            for retriever in (served.retriever, served.pending):
                if retriever is not None:
                    retriever.close()

    # -- what requests call ---------------------------------------------------------------------
    def search(self, index: str | None, queries: list[str], k: int, mode: str | None,
               where: ChunkFilter | None = None, hybrid: HybridRecipe = DEFAULT_HYBRID) -> Future:
        """A future of one SearchResult per query (the worker's batch fills it)."""
        name = self.check_index(index)
        if mode is not None and mode not in SEARCH_MODES:
            raise InputError(f"unknown query mode '{mode}' (use {', '.join(SEARCH_MODES)})")
        job = SearchJob(name, tuple(queries), int(k), mode, where, hybrid)
        self._jobs.put(job)
        return job.future

    def call(self, index: str | None, fn: Callable[[Served], object]) -> Future:
        """Run ``fn(served)`` on the worker thread (every index read happens there, between batches)."""
        served = self.served[self.check_index(index)]
        future: Future = Future()
        self._jobs.put((served, fn, future))
        return future

    def explain(self, index: str | None, queries: list[str], tokens: int, mode: str = "generative") -> Future:
        """A future of one explanation dict per query, lenses included (decoded as one batch on the explain thread,
        never blocking searches); ``mode``: the query mode that searched, which the explanation's note names."""
        served = self.served[self.check_index(index)]
        encoder = served.retriever.encoder
        return self._explainer.submit(
            lambda: explain_all(encoder, queries, encoder.decode(queries, max_new_tokens=tokens), mode))

    def check_index(self, name: str | None) -> str:
        name = name or self.default
        if name not in self.served:
            raise KeyError(name)
        return name

    # -- the worker -----------------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._jobs.get(timeout=self.refresh_s)
            except queue.Empty:
                self._swap()
                continue
            if first is None:
                break
            jobs, n = [first], _size(first)
            while n < self.max_batch:  # take what is already waiting, never wait for more
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._stop.set()
                    break
                jobs.append(more)
                n += _size(more)
            self._swap()
            self._run(jobs)

    def _run(self, jobs: list) -> None:
        groups: dict[tuple, list[SearchJob]] = {}
        for job in jobs:
            if isinstance(job, SearchJob):
                groups.setdefault(job.key, []).append(job)
            else:
                served, fn, future = job
                _settle(future, lambda: fn(served))
        for (name, mode, k, where, hybrid), group in groups.items():
            retriever = self.served[name].retriever
            queries = [q for job in group for q in job.queries]
            try:
                results = retriever.search(queries, k=k, query_mode=mode, hybrid=hybrid, where=where)
            except BaseException as exc:  # every job of the batch gets the error
                for job in group:
                    job.future.set_exception(exc)
                continue
            self.batches += 1
            self.batched_queries += len(queries)
            if self.on_batch is not None:
                self.on_batch(len(queries))
            start = 0
            for job in group:
                job.future.set_result(results[start:start + len(job.queries)])
                start += len(job.queries)

    def _swap(self) -> None:
        """Worker, between batches: serve the newer generations the watcher made ready (an attribute swap)."""
        for served in self.served.values():
            with self._swap_lock:
                pending, served.pending = served.pending, None
                if pending is None:
                    continue
                old, served.retriever = served.retriever, pending
            old.close()
            log.info("%s: now serving generation %s", served.name, pending.index.generation)

    def _watch(self) -> None:
        """Watcher thread: look for newer committed generations and open, check and prepare each one here
        (a FAISS file or BM25 side reloaded, or rebuilt in memory when the writer has not saved it yet), so the
        worker never stalls on it and every batch reads one complete snapshot."""
        while not self._stop.wait(self.refresh_s):
            for served in self.served.values():
                try:
                    self._prepare(served)
                except Exception as exc:  # an index folder moved or replaced under us: report it, keep serving
                    self._failed(served, exc)
                else:
                    if served.error is not None:
                        log.warning("%s: refreshing again (was: %s)", served.name, served.error)
                    served.error = None
                    served.errors_seen.clear()

    @staticmethod
    def _failed(served: Served, exc: Exception) -> None:
        """Log a refresh error when the index starts failing, not on every poll (4 a second: a moved index
        folder wrote ~80 tracebacks in 20 s). A moved folder can fail one way then another (SQLite's
        'disk I/O error', then 'unable to open database file'): later errors of the same spell log at info,
        each once; /indexes shows the current one meanwhile."""
        ours = isinstance(exc, RkitError)  # our one-line errors need no traceback
        error = str(exc) if ours else f"{type(exc).__name__}: {exc}"
        if served.error is None:
            log.log(logging.WARNING if ours else logging.ERROR, "%s: %s", served.name,
                    error if ours else "refresh failed", exc_info=not ours)
        elif error not in served.errors_seen:
            log.info("%s: still failing, now: %s", served.name, error)
        served.errors_seen.add(error)
        served.error = error

    def _prepare(self, served: Served) -> None:
        newest = committed_generation(served.folder)
        known = served.pending or served.retriever
        if newest == known.index.generation:
            return
        if writer_active(served.folder):  # its save follows its commit: wait for it rather than rebuild
            served.waiting_since = served.waiting_since or time.monotonic()
            if time.monotonic() - served.waiting_since < WRITER_GRACE_S:
                return
        served.waiting_since = None
        # checked again: a rebuild may have changed the document encoder
        fresh = _ready(Index.open(served.folder), known.encoder)
        with self._swap_lock:
            stale, served.pending = served.pending, fresh
        if stale is not None:  # made ready but never swapped in: the worker never saw it
            stale.close()


def _ready(index: Index, encoder) -> Retriever:
    """``index`` checked against ``encoder`` and prepared for its first search; closed if either fails."""
    retriever = Retriever._checked(index, encoder)  # closes the index on a mismatch
    try:
        index.prepare()
    except BaseException:
        retriever.close()
        raise
    return retriever


def _size(job) -> int:
    return len(job.queries) if isinstance(job, SearchJob) else 1


def _settle(future: Future, fn: Callable[[], object]) -> None:
    try:
        future.set_result(fn())
    except BaseException as exc:
        future.set_exception(exc)
