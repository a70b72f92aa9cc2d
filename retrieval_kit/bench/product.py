"""The product path: a benchmark corpus indexed by ``rkit index``'s indexer and searched by ``Retriever.search``,
exactly as ``rkit search`` does (same chunking, same backend, same BM25 side, same fusion).

Each query asks the index for its top ``top_k`` chunks (what a user asking ``-k 100`` gets) and a document
scores as its best chunk (max-pooling), so every figure is what a user gets. The whole-document numpy path
(methods.py) stays available as ``--path matrix``, labelled as such.

    method      how it searches the index
    bm25        query mode bm25 (the index's lexical side)
    teacher     query mode teacher
    rkit        query mode generative
    fused       query mode fused
    hybrid      query mode hybrid (the default recipe, search.DEFAULT_HYBRID)
    default     the index's default query mode (what `rkit search` uses without --query-mode)
    hyde, hydeq, anchor   their query vectors (methods.py) as one dense signal on the same index
    naive-rrf   plain RRF of bm25 and teacher (k=60, equal weights) on the same index: the naive hybrid
    naive-convex  the other naive hybrid: 0.5·minmax(bm25) + 0.5·minmax(teacher) of each signal's top chunks
                (--fusion convex, equal weights) on the same index; ``--path matrix`` keeps the whole-document twin
    hybrid-convex the default signals fused by the convex min-max combination (equal weights): the default until
                2026-12-07, an option since
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import BenchError
from .cache import slug
from .methods import MethodRunner
from .metrics import Run
from .progress import counter, note, stage

MODES = {"bm25": "bm25", "teacher": "teacher", "rkit": "generative", "fused": "fused", "hybrid": "hybrid",
         "naive-rrf": "hybrid", "naive-convex": "hybrid", "hybrid-convex": "hybrid"}
NAIVE_RRF = {"bm25": 1.0, "teacher": 1.0}
VECTOR_METHODS = ("hyde", "hydeq", "anchor")
INDEX_ONLY = ("default",) + tuple(m for m, mode in MODES.items()  # no --path matrix twin
                                   if mode == "hybrid" and m != "naive-convex")
QUERY_BATCH = 32


class ProductRunner(MethodRunner):
    """MethodRunner whose rankings come from a real index and ``Retriever.search``."""

    def __init__(self, ds, cfg, cache_root: Path, encoder):
        super().__init__(ds, cfg, cache_root, encoder)
        from ..search import DEFAULT_HYBRID

        self.backend, self.hybrid = cfg.backend, DEFAULT_HYBRID
        self.home = Path(cache_root) / "product" / f"{slug(ds.name)}-{ds.corpus_hash()}"
        self._retriever = None
        self.index_report: dict = {}

    def retriever(self):
        """Index the corpus (incremental: a rerun only checks it) and open it read-only with the bench encoder."""
        if self._retriever is None:
            from ..indexer import IndexSettings, index_corpus
            from ..search import Retriever

            corpus = self.home / "corpus"
            self._write_corpus(corpus)
            folder = self.home / f"index-{self.backend}-{self.cfg.doc_encoder}"
            settings = IndexSettings(backend=self.backend, doc_mode=self.cfg.doc_encoder)
            with counter(f"rkit index: embedding the chunks of {len(self.ds.corpus):,} documents ({self.backend})") as show:
                report = index_corpus(corpus, folder, self._encoder, "bench", settings, progress=show)
            self.index_report = {"backend": self.backend, "documents": report.total_documents,
                                 "chunks": report.total_chunks, "chunks_embedded": report.chunks_embedded,
                                 "wall_s": report.seconds}
            note(f"index {folder}: {report.total_documents:,} documents, {report.total_chunks:,} chunks "
                 f"({report.chunks_embedded:,} embedded now)")
            self._retriever = Retriever.attach(folder, self.enc)
        return self._retriever

    def _write_corpus(self, folder: Path) -> None:
        path = folder / "corpus.jsonl"
        if path.is_file():  # the folder name carries the corpus hash: present means complete (written aside)
            return
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"corpus.jsonl.tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as fh:
            for doc_id, doc in self.ds.corpus.items():
                fh.write(json.dumps({"_id": doc_id, "title": doc.get("title") or "", "text": doc.get("text") or ""},
                                    ensure_ascii=False) + "\n")
        os.replace(tmp, path)

    def run(self, method: str, hybrid=None) -> Run:
        from ..index.base import Signal
        from ..search import HybridRecipe

        if method in ("naive-rrf", "naive-convex"):
            hybrid = HybridRecipe.of(NAIVE_RRF, fusion="rrf" if method == "naive-rrf" else "convex")
        if method == "hybrid-convex":
            hybrid = HybridRecipe.of({n: 1.0 for n, w in self.hybrid.weights if w > 0}, fusion="convex")
        # a mode search encodes its queries afresh; a vector method's inputs may all come from the cache
        self.computed = method not in VECTOR_METHODS
        retriever = self.retriever()
        k = self.cfg.top_k
        if method in VECTOR_METHODS:
            vectors = self.query_vectors(method)
            ranked = []
            for start in range(0, len(vectors), QUERY_BATCH):
                ranked += retriever.index.search_hybrid([Signal(method, 1.0, vectors=vectors[start:start + QUERY_BATCH])],
                                                        k=k)
        elif method in MODES or method == "default":
            mode = MODES.get(method) or retriever.default_query_mode()
            ranked = []
            with stage(f"{method} searches ({mode})", len(self.texts)) as advance:
                for start in range(0, len(self.texts), QUERY_BATCH):
                    part = self.texts[start:start + QUERY_BATCH]
                    results = retriever.search(part, k=k, query_mode=mode, fuse_weight=self.cfg.fuse_weight,
                                               hybrid=hybrid or self.hybrid)
                    ranked += [r.hits for r in results]
                    advance(len(part))
        else:
            known = [*MODES, "default", *VECTOR_METHODS]
            raise BenchError(f"unknown method '{method}' on the product path (use {', '.join(known)})")
        return {qid: pool(hits, self.ds.excluded.get(qid)) for qid, hits in zip(self.qids, ranked)}

    def close(self) -> None:
        if self._retriever is not None:
            self._retriever.close()
            self._retriever = None


def pool(hits, excluded: set[str] | None = None) -> dict[str, float]:
    """Chunk hits → documents, each scored by its best chunk (hits arrive best first)."""
    out: dict[str, float] = {}
    for hit in hits:
        if hit.doc_id not in out and not (excluded and hit.doc_id in excluded):
            out[hit.doc_id] = float(hit.score)
    return out
