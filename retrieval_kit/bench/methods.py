"""Retrieval methods compared by the benchmarks, all ranking the same corpus.

    bm25     bm25s over "title text" (k1=0.9, b=0.4, the Pyserini/BRIGHT defaults)
    teacher  teacher(query)                       — the input-side baseline
    hyde     teacher(backbone's generated answer) — the generate-then-embed baseline
    hydeq    normalise(hyde + teacher)            — HyDE with the query kept (optional extra)
    rkit     generative query embedding           — the method
    anchor   the adapter's query anchor alone: teacher(query) moved by a fitted teacher-space map (optional extra;
             the ablation that shows what `fused` owes to the LLM and what to the anchor)
    fused    normalise(w·rkit + (1−w)·anchor)     — models.encoder.fuse_queries, as encode_queries(mode="fused")
    naive-convex  0.5·minmax(bm25) + 0.5·minmax(teacher) over whole documents (optional extra: the naive hybrid
             a hybrid default has to beat; min-max per query over every document's score)

Every dense method scores against ONE document matrix per dataset (teacher by default, or the generative
encoder with doc_encoder="generative"), computed once and cached (see cache.py).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import BenchError
from ..index.lexical import BM25_B, BM25_K1, analyse, query_terms
from . import cache
from .cache import config_value, slug
from .datasets import BenchDataset
from .metrics import Run
from .progress import note, stage

METHODS = ("bm25", "teacher", "hyde", "rkit", "fused", "hybrid", "default")
MATRIX_METHODS = ("bm25", "teacher", "hyde", "rkit", "fused")  # hybrid/default exist on the product path only
EXTRA_METHODS = ("hydeq", "anchor", "naive-rrf", "naive-convex", "hybrid-convex")
PATHS = ("product", "matrix")
DOC_ENCODERS = ("teacher", "generative")
BM25_PARAMS = {"k1": BM25_K1, "b": BM25_B}


@dataclass
class MethodConfig:
    doc_encoder: str = "teacher"
    fuse_weight: float | None = None  # weight of the generative vector in `fused` (None: the adapter's fitted one)
    hyde_max_new_tokens: int = 128
    hyde_system_prompt: str | None = None  # None: the adapter's (the backbone template's default unless trained with one)
    batch_size: int = 32
    top_k: int = 100  # ranking depth kept per query (Recall@100, AdvBench top-100)
    path: str = "product"  # product: a real index + Retriever.search (what users get); matrix: whole-document numpy
    backend: str = "faiss"  # the product path's index backend


def parse_methods(spec: str | list[str] | None, allowed=METHODS + EXTRA_METHODS) -> list[str]:
    names = spec.split(",") if isinstance(spec, str) else list(spec or METHODS)
    names = list(dict.fromkeys(n.strip().lower() for n in names if n.strip()))
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise BenchError(f"unknown method {', '.join(unknown) or '(none)'} (use {', '.join(allowed)})")
    return names


def load_bench_encoder(adapter: str | Path | None = None, device: str | None = None):
    """The encoder under test (the shipped default adapter unless --adapter). Tests replace this function."""
    try:
        from ..models import load_encoder
    except ImportError as exc:
        raise BenchError(f"the rkit models package cannot be imported ({exc})") from None
    return load_encoder(adapter=adapter, device=device)


def encoder_info(enc) -> dict:
    """JSON-able description of the encoder for result files."""
    if hasattr(enc, "describe"):
        info = dict(enc.describe())
    else:
        config = getattr(enc, "config", {}) or {}
        info = asdict(config) if is_dataclass(config) else dict(config)
    info["fingerprint"] = enc.fingerprint
    return {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool, type(None)))}


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


# ---- ranking -----------------------------------------------------------------------------------

def top_k(row: np.ndarray, k: int, doc_ids: list[str], drop: np.ndarray | None = None) -> dict[str, float]:
    """The k best documents of one score row, excluded indices removed first (BRIGHT's rule).

    Documents tied with the k-th score are kept in trec_eval's tie order (metrics.ranked: higher doc id
    first), so the kept set is the top k of the ranking the metrics then compute on."""
    if drop is not None and len(drop):
        row = row.copy()
        row[drop] = -np.inf
    k = min(k, len(row))
    if k == 0:
        return {}
    kth = row[np.argpartition(-row, k - 1)[k - 1]]
    keep = list(np.flatnonzero(row > kth))
    tied = sorted(np.flatnonzero(row == kth), key=lambda i: doc_ids[i], reverse=True)
    keep += tied[:k - len(keep)]
    return {doc_ids[i]: float(row[i]) for i in keep if np.isfinite(row[i])}


def _drop_indices(excluded: dict[str, set[str]], doc_index: dict[str, int]) -> dict[str, np.ndarray]:
    return {q: np.fromiter((doc_index[d] for d in docs if d in doc_index), dtype=np.int64)
            for q, docs in excluded.items()}


def rank_dense(queries: np.ndarray, docs: np.ndarray, qids: list[str], doc_ids: list[str],
               excluded: dict[str, set[str]], k: int, description: str = "scoring") -> Run:
    """Exact inner product (vectors are unit-norm: cosine), in query blocks that bound memory."""
    drops = _drop_indices(excluded, {d: i for i, d in enumerate(doc_ids)}) if excluded else {}
    block = max(1, int(2e7 // max(1, len(doc_ids))))
    run: Run = {}
    with stage(description, len(qids)) as advance:
        for start in range(0, len(qids), block):
            scores = queries[start:start + block] @ docs.T
            for row, qid in zip(scores, qids[start:start + block]):
                run[qid] = top_k(row, k, doc_ids, drops.get(qid))
            advance(len(scores))
    return run


def bm25_index(ds: BenchDataset, folder: Path):
    """Build (or load from the cache) the bm25s index of the corpus."""
    import bm25s

    path = folder / f"bm25-k1_{BM25_PARAMS['k1']}-b_{BM25_PARAMS['b']}-stem"
    if (path / "params.index.json").is_file():
        try:
            return bm25s.BM25.load(str(path)), True
        except (OSError, ValueError, KeyError, EOFError) as exc:  # damaged by hand or by a disk problem: build it again
            note(f"the cached BM25 index {path} is unreadable ({type(exc).__name__}): rebuilding it")
    note(f"indexing {len(ds.corpus):,} documents with BM25")
    # bm25s's own progress bars are tqdm bars: rkit shows only its own (see progress.py)
    tokens = analyse(ds.doc_texts())  # the indexes' own analyser (index/lexical.py)
    model = bm25s.BM25(**BM25_PARAMS)
    model.index(tokens, show_progress=False)
    # written aside and renamed: a killed run or a concurrent bench never leaves a half-written index behind
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save(str(tmp), show_progress=False)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / "params.index.json").is_file():  # not just another bench that renamed its copy first
            raise BenchError(f"cannot write the BM25 index {path}: {exc.strerror or exc}") from None
    return model, False


def _minmax(x: np.ndarray) -> np.ndarray:
    span = float(x.max() - x.min())
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def rank_convex(model, queries: list[str], dense: np.ndarray, docs: np.ndarray, qids: list[str],
                doc_ids: list[str], excluded: dict[str, set[str]], k: int, weight: float = 0.5) -> Run:
    """The naive hybrid: per query, min-max both score lists over all documents, then a convex mix."""
    drops = _drop_indices(excluded, {d: i for i, d in enumerate(doc_ids)}) if excluded else {}
    run: Run = {}
    with stage("naive-convex scoring", len(qids)) as advance:
        for qid, toks, q in zip(qids, query_terms(queries), dense):
            lexical = np.asarray(model.get_scores(toks), dtype=np.float32)
            mixed = weight * _minmax(lexical) + (1 - weight) * _minmax(docs @ q)
            run[qid] = top_k(mixed.astype(np.float32), k, doc_ids, drops.get(qid))
            advance(1)
    return run


def rank_bm25(model, queries: list[str], qids: list[str], doc_ids: list[str], excluded: dict[str, set[str]],
              k: int) -> Run:
    tokens = query_terms(queries)
    drops = _drop_indices(excluded, {d: i for i, d in enumerate(doc_ids)}) if excluded else {}
    run: Run = {}
    with stage("bm25 scoring", len(qids)) as advance:
        for qid, toks in zip(qids, tokens):
            run[qid] = top_k(np.asarray(model.get_scores(toks), dtype=np.float32), k, doc_ids, drops.get(qid))
            advance(1)
    return run


# ---- one dataset, several methods ---------------------------------------------------------------

class MethodRunner:
    """Runs methods on one dataset; document vectors, HyDE answers and BM25 index are computed once."""

    def __init__(self, ds: BenchDataset, cfg: MethodConfig, cache_root: Path, encoder: Callable[[], Any]):
        if cfg.doc_encoder not in DOC_ENCODERS:
            raise BenchError(f"unknown doc encoder '{cfg.doc_encoder}' (use {', '.join(DOC_ENCODERS)})")
        self.ds, self.cfg, self._encoder = ds, cfg, encoder
        self.store = cache.open_store(Path(cache_root))
        self.folder = Path(cache_root) / f"{slug(ds.name)}-{ds.corpus_hash()}"  # the BM25 index
        self.qids = list(ds.queries)
        self.texts = [ds.queries[q] for q in self.qids]
        self._docs: np.ndarray | None = None
        self.answers: list[str] | None = None
        self.doc_stats: dict = {}
        self.computed = False  # did the last run() compute anything, or read it all from the cache?

    @property
    def enc(self):
        return self._encoder()

    # -- shared inputs --
    def _vectors(self, mode: str, role: str, texts: list[str], compute, description: str) -> tuple[np.ndarray, bool]:
        """Vectors from the cache, computing only the missing ones; and whether all came from the cache."""
        return cache.vectors(self.store, self.enc, mode, role).get(texts, compute,
                                                                   stage=lambda n: stage(description, n))

    def _queries(self, mode: str, texts: list[str], description: str) -> np.ndarray:
        bs = self.cfg.batch_size
        vectors, cached = self._vectors(mode, "queries", texts,
                                        lambda t: self.enc.encode_queries(t, mode=mode, batch_size=bs), description)
        self.computed |= not cached
        return vectors

    def _teacher(self, texts: list[str], description: str) -> np.ndarray:
        return self._queries("teacher", texts, description)

    def _hyde_vectors(self, answers: list[str]) -> np.ndarray:
        """teacher(answer) in the document role: a HyDE answer is a hypothetical document, so a teacher with
        per-role prompts (EmbeddingGemma) embeds it as it embeds the corpus, not as a query."""
        bs = self.cfg.batch_size
        vectors, cached = self._vectors("teacher", "documents", answers,
                                        lambda t: self.enc.encode_documents(t, mode="teacher", batch_size=bs),
                                        "HyDE answer embeddings")
        self.computed |= not cached
        return vectors

    def _generative(self, texts: list[str]) -> np.ndarray:
        return self._queries("generative", texts, "rkit query embeddings")

    def doc_matrix(self) -> np.ndarray:
        """The one document matrix every dense method scores against (timed apart: not in `computed`)."""
        if self._docs is None:
            mode, bs = self.cfg.doc_encoder, self.cfg.batch_size
            start = time.perf_counter()
            self._docs, cached = self._vectors(mode, "documents", self.ds.doc_texts(),
                                               lambda t: self.enc.encode_documents(t, mode=mode, batch_size=bs),
                                               f"embedding {len(self.ds.corpus):,} documents ({mode})")
            self.doc_stats = {"doc_encoder": mode, "wall_s": round(time.perf_counter() - start, 3),
                              "cached": cached, "n_docs": len(self._docs)}
        return self._docs

    def hyde_answers(self) -> list[str]:
        if self.answers is None:
            n, bs = self.cfg.hyde_max_new_tokens, max(1, min(self.cfg.batch_size, 16))
            system = self.cfg.hyde_system_prompt
            extra = {"system_prompt": system} if system is not None else {}
            ns = cache.hyde_answers(self.store, self.enc, n, system)
            self.answers, cached = ns.get(self.texts,
                                          lambda t: self.enc.generate(t, max_new_tokens=n, batch_size=bs, **extra),
                                          chunk=bs, stage=lambda total: stage("HyDE: generating answers", total))
            self.computed |= not cached
        return self.answers

    # -- methods --
    def fuse_weight(self) -> float:
        """The --fuse-weight given, else the adapter's fitted weight (0.5 for adapters without one)."""
        if self.cfg.fuse_weight is not None:
            return self.cfg.fuse_weight
        fitted = config_value(self.enc, "fuse_weight")
        return 0.5 if fitted is None else float(fitted)

    def query_vectors(self, method: str) -> np.ndarray:
        if method == "teacher":
            return self._teacher(self.texts, "teacher query embeddings")
        if method == "rkit":
            return self._generative(self.texts)
        if method == "anchor":
            return self.enc.anchor_queries(self._teacher(self.texts, "teacher queries"))
        if method == "fused":
            from ..models.encoder import fuse_queries  # lazy: the bench imports no model code until it runs one

            anchored = self.enc.anchor_queries(self._teacher(self.texts, "teacher queries"))
            return fuse_queries(self._generative(self.texts), anchored, self.fuse_weight())
        if method in ("hyde", "hydeq"):
            hyde = self._hyde_vectors(self.hyde_answers())
            return hyde if method == "hyde" else normalise(hyde + self._teacher(self.texts, "teacher queries"))
        raise BenchError(f"unknown method '{method}'")

    def run(self, method: str) -> Run:
        k, doc_ids = self.cfg.top_k, self.ds.doc_ids
        self.computed = False
        if method == "bm25":
            model, cached = bm25_index(self.ds, self.folder)
            self.computed = not cached
            return rank_bm25(model, self.texts, self.qids, doc_ids, self.ds.excluded, k)
        if method == "naive-convex":
            model, _ = bm25_index(self.ds, self.folder)
            return rank_convex(model, self.texts, self.query_vectors("teacher"), self.doc_matrix(), self.qids,
                               doc_ids, self.ds.excluded, k)
        docs = self.doc_matrix()
        return rank_dense(self.query_vectors(method), docs, self.qids, doc_ids, self.ds.excluded, k,
                          f"{method} scoring")
