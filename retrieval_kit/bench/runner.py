"""Run a benchmark: datasets → methods → rankings → metrics → one results dict (JSON-able).

The results dict is the single source every output (JSON, markdown, plot, CLI table) is rendered from:

    {"bench", "label", "date", "config", "encoder", "machine", "methods", "metrics",
     "datasets": {name: {"n_queries", "n_docs", "notes", "meta", "doc_embedding", "results": {method: {...}}}},
     "summary": {method: {metric: value}},          # one dataset: its figures; several: the mean over them
     "published": {model: {domain: nDCG@10×100}}}  # BRIGHT only
"""

from __future__ import annotations

import datetime as _dt
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import BenchError
from ..machine import machine_info
from .datasets import BenchDataset, load_published_bright
from .methods import MethodConfig, MethodRunner, encoder_info
from .product import INDEX_ONLY, ProductRunner
from .metrics import ADV_KS, BEIR_METRICS, harm_metrics, harm_per_query, per_query, ranked
from .progress import note

HARM_METRICS = tuple(f"top_k_{kind}@{k}" for kind in ("acc", "any_harm") for k in ADV_KS)


@dataclass
class BenchOutcome:
    results: dict
    explanations: list[dict] = field(default_factory=list)


class LazyEncoder:
    """Load the encoder on first use only: a bm25-only run never touches the models."""

    def __init__(self, loader: Callable[[], Any] | None):
        self.loader, self.value = loader, None

    def __call__(self):
        if self.value is None:
            if self.loader is None:
                raise BenchError("this run needs the encoder but none was configured")
            note("loading the encoder")
            self.value = self.loader()
        return self.value


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=here)
        # code changes only: result files written by an earlier run of the same script do not make a run dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(exclude,top)benchmarks/results"], capture_output=True,
                               text=True, timeout=5, cwd=here).stdout.strip()
        return (out.stdout.strip() + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def score(ds: BenchDataset, run: dict, harm: bool) -> tuple[dict, dict]:
    """Mean metrics and per-query metrics of one run."""
    if harm:
        return harm_metrics(run, ds.qrels, ds.harmful), harm_per_query(run, ds.qrels, ds.harmful)
    rows = per_query(run, ds.qrels, BEIR_METRICS)
    return {m: sum(r[m] for r in rows.values()) / len(rows) for m in BEIR_METRICS}, rows


def _explain_rows(ds: BenchDataset, runner: MethodRunner, runs: dict, per_q: dict, cfg: MethodConfig,
                  tokens: int) -> list[dict]:
    """One line per query: the embedding read back as text, HyDE's answer, each method's top 5 and score."""
    decoded = runner.enc.decode(runner.texts, max_new_tokens=tokens, batch_size=max(1, min(cfg.batch_size, 16)))
    rows = []
    for i, (qid, text) in enumerate(zip(runner.qids, runner.texts)):
        row = {"dataset": ds.name, "query_id": qid, "query": text, "decoded": decoded[i],
               "gold": sorted(d for d, r in ds.qrels[qid].items() if r > 0),
               "top5": {m: ranked(run.get(qid, {}))[:5] for m, run in runs.items()},
               "metrics": {m: per_q[m].get(qid, {}) for m in runs}}
        if runner.answers is not None:
            row["hyde_answer"] = runner.answers[i]
        rows.append(row)
    return rows


def run_dataset(ds: BenchDataset, methods: list[str], cfg: MethodConfig, encoder: LazyEncoder, cache_root: Path,
                harm: bool, explain_tokens: int) -> tuple[dict, list[dict]]:
    """All methods on one dataset; `explain_tokens` > 0 also decodes each query's embedding (that many tokens)."""
    note(f"{ds.name}: {len(ds.queries):,} queries, {len(ds.corpus):,} documents")
    if cfg.path == "product":
        runner = ProductRunner(ds, cfg, cache_root, encoder)
        runner.retriever()  # the index every method searches: built (or checked) once, timed apart
        doc_stats = {"path": "product", **runner.index_report}
    else:
        runner = MethodRunner(ds, cfg, cache_root, encoder)
        if any(m != "bm25" for m in methods):
            runner.doc_matrix()  # shared by every dense method: computed (or loaded) once, timed apart
        doc_stats = {"path": "matrix", **runner.doc_stats} if runner.doc_stats else None
    try:
        return _run_methods(ds, runner, methods, cfg, harm, explain_tokens, doc_stats)
    finally:
        if isinstance(runner, ProductRunner):
            runner.close()


def _run_methods(ds, runner, methods, cfg, harm, explain_tokens, doc_stats) -> tuple[dict, list[dict]]:
    entry = {"n_queries": len(ds.queries), "n_docs": len(ds.corpus), "notes": ds.notes, "meta": ds.meta,
             "doc_embedding": doc_stats, "results": {}}
    runs, per_q = {}, {}
    for method in methods:
        start = time.perf_counter()
        runs[method] = runner.run(method)
        wall = time.perf_counter() - start
        metrics, per_q[method] = score(ds, runs[method], harm)
        # wall_s covers query-side work + scoring; with cached inputs it is not a speed figure (run on a fresh
        # --cache-dir to time a method). Document embedding is shared and timed under "doc_embedding".
        entry["results"][method] = {"metrics": metrics, "wall_s": round(wall, 3), "cached_inputs": not runner.computed,
                                    "queries_per_s": round(len(ds.queries) / wall, 2) if wall > 0 else None}
        note(f"  {method:8s} " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()) + f"  ({wall:.1f}s)")
    rows = _explain_rows(ds, runner, runs, per_q, cfg, explain_tokens) if explain_tokens else []
    return entry, rows


def summarise(datasets: dict, methods: list[str], metrics: list[str]) -> dict:
    """One dataset: its figures. Several (BRIGHT domains): the unweighted mean, as the BRIGHT paper averages."""
    out = {}
    for m in methods:
        vals = [d["results"][m]["metrics"] for d in datasets.values()]
        out[m] = {k: sum(v[k] for v in vals) / len(vals) for k in metrics}
        out[m]["wall_s"] = round(sum(d["results"][m]["wall_s"] for d in datasets.values()), 3)
        out[m]["cached_inputs"] = all(d["results"][m].get("cached_inputs", False) for d in datasets.values())
    return out


def published_bright(domains: list[str], root=None) -> dict:
    """Published nDCG@10 (×100) for the domains run; avg = the paper's when all 12 ran, else their mean."""
    out = {}
    for row in load_published_bright(root):
        vals = {d: float(row[d]) for d in domains if row.get(d)}
        if len(vals) != len(domains):
            continue
        vals["avg"] = float(row["avg"]) if len(domains) == 12 else sum(vals.values()) / len(vals)
        out[row["Model"]] = vals
    return out


def run_benchmark(bench: str, datasets: Iterable[BenchDataset], methods: list[str], *, cfg: MethodConfig,
                  encoder_loader: Callable[[], Any] | None, cache_root: Path, label: str,
                  limit: int | None = None, explain: bool = False, explain_tokens: int = 64, adapter: str | None = None,
                  extra_config: dict | None = None, data_root=None) -> BenchOutcome:
    harm = bench == "advbench-ir"
    index_only = [m for m in methods if m in INDEX_ONLY]
    if cfg.path == "matrix" and index_only:
        raise BenchError(f"{', '.join(index_only)} search a real index: use --path product, or drop them")
    metric_names = list(HARM_METRICS if harm else BEIR_METRICS)
    encoder = LazyEncoder(encoder_loader)
    started = _dt.datetime.now().astimezone()
    per_dataset, explanations = {}, []
    for ds in datasets:
        entry, rows = run_dataset(ds.limit(limit), methods, cfg, encoder, Path(cache_root), harm,
                                  explain_tokens if explain else 0)
        per_dataset[ds.name] = entry
        explanations.extend(rows)
    if not per_dataset:
        raise BenchError(f"{bench}: no dataset to run")
    results = {
        "bench": bench, "label": label, "date": started.isoformat(timespec="seconds"),
        "config": {**asdict(cfg), "methods": methods, "limit": limit, "adapter": adapter or "default",
                   "bm25": _bm25_config(), **_hybrid_config(cfg), **(extra_config or {})},
        "encoder": encoder_info(encoder.value) if encoder.value is not None else None,
        "machine": machine_info(), "rkit_commit": git_commit(),
        "methods": methods, "metrics": metric_names, "datasets": per_dataset,
        "summary": summarise(per_dataset, methods, metric_names),
        "wall_s": round((_dt.datetime.now().astimezone() - started).total_seconds(), 3),
    }
    if bench == "bright":
        results["published"] = published_bright(list(per_dataset), data_root)
    return BenchOutcome(results, explanations)


def _hybrid_config(cfg: MethodConfig) -> dict:
    if cfg.path != "product":
        return {}
    from ..search import DEFAULT_HYBRID

    return {"hybrid": DEFAULT_HYBRID.describe()}


def _bm25_config() -> dict:
    from ..index.lexical import QUERY_STOPWORDS
    from .methods import BM25_PARAMS

    return {**BM25_PARAMS, "stemmer": "snowball-english", "stopwords": "en", "query_stopwords": QUERY_STOPWORDS}
