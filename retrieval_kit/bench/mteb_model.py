"""MTEB: the rkit encoder as an mteb model, local retrieval tasks, and a runner that reports like the others.

Queries go through the chosen query method (rkit = generative path by default), documents through the doc
encoder (teacher by default), exactly as in `rkit bench beir`. Any task mteb knows runs by name when its data
can be fetched; `cacm` and `beir:<folder>` build a custom retrieval task from a local BEIR folder (offline).
"""

from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import BenchError
from .datasets import BenchDataset, data_root, load_beir
from .methods import MethodConfig, encoder_info, normalise
from .progress import note, stage
from .runner import BenchOutcome, LazyEncoder, git_commit, machine_info, summarise

MTEB_METHODS = ("teacher", "hyde", "hydeq", "rkit", "fused")
DEFAULT_MTEB_METHODS = ("teacher", "rkit", "fused")
_RETRIEVAL_KEYS = {"ndcg@10": "ndcg_at_10", "recall@100": "recall_at_100", "mrr@10": "mrr_at_10"}


def _mteb():
    try:
        import mteb
    except ImportError:
        raise BenchError("the mteb benchmark needs the mteb package: pip install 'retrieval-kit[bench]'") from None
    return mteb


class RkitMtebEncoder:
    """mteb's EncoderProtocol over an rkit encoder; `method` picks how queries are embedded."""

    def __init__(self, enc, method: str = "rkit", cfg: MethodConfig | None = None):
        if method not in MTEB_METHODS:
            raise BenchError(f"method '{method}' cannot run under mteb (use {', '.join(MTEB_METHODS)})")
        self.enc, self.method, self.cfg = enc, method, cfg or MethodConfig()
        self.mteb_model_meta = model_meta(enc, method, self.cfg)

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        enc, bs = self.enc, self.cfg.batch_size
        if self.method in ("teacher", "rkit", "fused"):
            mode = {"teacher": "teacher", "rkit": "generative", "fused": "fused"}[self.method]
            return enc.encode_queries(texts, mode=mode, fuse_weight=self.cfg.fuse_weight, batch_size=bs)
        answers = enc.generate(texts, max_new_tokens=self.cfg.hyde_max_new_tokens, batch_size=min(bs, 16))
        hyde = enc.encode_documents(answers, mode="teacher", batch_size=bs)  # a HyDE answer is a hypothetical document
        return hyde if self.method == "hyde" else normalise(hyde + enc.encode_queries(texts, mode="teacher"))

    def encode(self, inputs, *, task_metadata=None, hf_split=None, hf_subset=None, prompt_type=None,
               **kwargs: Any) -> np.ndarray:
        texts = [t for batch in inputs for t in batch["text"]]
        # Documents (retrieval corpora) go through the doc encoder; everything else is a query-side text.
        if prompt_type is not None and str(getattr(prompt_type, "value", prompt_type)) == "document":
            encode = lambda chunk: self.enc.encode_documents(chunk, mode=self.cfg.doc_encoder,
                                                             batch_size=self.cfg.batch_size)
            return _with_bar(texts, encode, f"mteb: embedding {len(texts):,} documents")
        return _with_bar(texts, self.encode_queries, f"mteb: {self.method} queries")

    def similarity(self, a, b):
        return np.asarray(a, dtype=np.float32) @ np.asarray(b, dtype=np.float32).T  # unit vectors: cosine

    def similarity_pairwise(self, a, b):
        return (np.asarray(a, dtype=np.float32) * np.asarray(b, dtype=np.float32)).sum(-1)


def _with_bar(texts: list[str], encode: Callable[[list[str]], np.ndarray], description: str,
              chunk: int = 256) -> np.ndarray:
    """Encode in chunks under one of rkit's bars (mteb's and sentence-transformers' tqdm bars stay off)."""
    parts = []
    with stage(description, len(texts)) as advance:
        for start in range(0, len(texts), chunk):
            parts.append(np.asarray(encode(texts[start:start + chunk]), dtype=np.float32))
            advance(len(parts[-1]))
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


def model_meta(enc, method: str, cfg: MethodConfig):
    from mteb.models.model_meta import ModelMeta

    info = encoder_info(enc)
    return ModelMeta(
        loader=None, name=f"rkit/{method}-{info['fingerprint']}", revision=info["fingerprint"], release_date=None,
        languages=None, n_parameters=None, memory_usage_mb=None, max_tokens=None, embed_dim=info.get("dim"),
        license=None, open_weights=True, public_training_code=None, public_training_data=None,
        framework=["PyTorch"], similarity_fn_name="cosine", use_instructions=False, training_datasets=None)


# ---- local tasks -------------------------------------------------------------------------------

def beir_task(ds: BenchDataset, name: str):
    """An mteb retrieval task over a BenchDataset (built from a local BEIR folder): runs offline."""
    _mteb()
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata

    metadata = TaskMetadata(
        type="Retrieval", name=name, main_score="ndcg_at_10", description=f"local BEIR folder {ds.meta.get('source')}",
        reference=None, dataset={"path": f"local/{name}", "revision": ds.corpus_hash()}, category="t2t",
        eval_splits=["test"], eval_langs=["eng-Latn"], date=None, dialect=None, domains=None, task_subtypes=None,
        license=None, annotations_creators=None, modalities=["text"], sample_creation=None, bibtex_citation=None)

    def load_data(self, num_proc=None, **kwargs):
        split = RetrievalSplitData(
            queries=Dataset.from_list([{"id": q, "text": t} for q, t in ds.queries.items()]),
            corpus=Dataset.from_list([{"id": d, "title": v["title"], "text": v["text"]} for d, v in ds.corpus.items()]),
            relevant_docs=ds.qrels, top_ranked=None)
        self.dataset = {"default": {"test": split}}
        self.data_loaded = True

    task = type(name, (AbsTaskRetrieval,), {"metadata": metadata, "load_data": load_data})()
    task.rkit_counts = (len(ds.queries), len(ds.corpus))  # for the results file; registry tasks have none
    return task


def resolve_task(name: str, root=None, limit: int | None = None):
    """`cacm` | `beir:<folder>` | an existing folder → a local task; anything else → mteb's registry."""
    if name.lower() in ("cacm", "rkitcacm"):
        return beir_task(load_beir(data_root(root) / "cacm", name="cacm").limit(limit), "RkitCACM")
    if name.startswith("beir:") or Path(name).expanduser().is_dir():
        folder = Path(name.removeprefix("beir:")).expanduser()
        return beir_task(load_beir(folder).limit(limit), f"RkitLocal-{folder.name}")
    mteb = _mteb()
    try:
        task = mteb.get_task(name)
    except Exception as exc:  # mteb raises KeyError/ValueError with suggestions
        raise BenchError(f"unknown mteb task '{name}': {str(exc).splitlines()[0][:160]}") from None
    try:
        task.load_data()
    except Exception as exc:  # data comes from the HF hub
        raise BenchError(f"mteb task '{name}' could not load its data (offline? it comes from the Hugging Face hub): "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}") from None
    return task


def _scores(task_result, metrics: list[str]) -> dict[str, float]:
    """Mean over the subsets of the first evaluated split."""
    split_scores = next(iter(task_result.scores.values()))
    out = {}
    for ours in metrics:
        key = "main_score" if ours == "main_score" else _RETRIEVAL_KEYS[ours]
        vals = [s[key] for s in split_scores if key in s]
        out[ours] = float(sum(vals) / len(vals)) if vals else None
    return out


def run_mteb(task_names: list[str], methods: list[str], *, cfg: MethodConfig, encoder_loader: Callable[[], Any],
             limit: int | None = None, adapter: str | None = None, root=None, extra_config: dict | None = None
             ) -> BenchOutcome:
    mteb = _mteb()
    bad = [m for m in methods if m not in MTEB_METHODS]
    if bad:
        raise BenchError(f"method {', '.join(bad)} cannot run under mteb (use {', '.join(MTEB_METHODS)})")
    encoder = LazyEncoder(encoder_loader)
    tasks = [resolve_task(n, root, limit) for n in task_names]
    retrieval = all(t.metadata.type == "Retrieval" for t in tasks)
    metrics = ["main_score", *(_RETRIEVAL_KEYS if retrieval else [])]
    per_task, started = {}, time.perf_counter()
    for task in tasks:
        name = task.metadata.name
        n_queries, n_docs = getattr(task, "rkit_counts", (None, None))
        entry = {"n_queries": n_queries, "n_docs": n_docs, "notes": [f"mteb {mteb.__version__}, type {task.metadata.type}"],
                 "meta": {"main_score": task.metadata.main_score}, "doc_embedding": None, "results": {}}
        for method in methods:
            note(f"mteb {name}: {method}")
            start = time.perf_counter()
            # mteb's own bars are tqdm bars: off (rkit's bars come from RkitMtebEncoder.encode)
            res = mteb.evaluate(RkitMtebEncoder(encoder(), method, cfg), task, cache=None, show_progress_bar=False,
                                encode_kwargs={"batch_size": cfg.batch_size, "show_progress_bar": False})
            wall = time.perf_counter() - start
            entry["results"][method] = {"metrics": _scores(res.task_results[0], metrics), "wall_s": round(wall, 3)}
        per_task[name] = entry
    results = {
        "bench": "mteb", "label": "+".join(per_task),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "config": {**cfg.__dict__, "methods": methods, "limit": limit, "adapter": adapter or "default",
                   "tasks": task_names, **(extra_config or {})},
        "encoder": encoder_info(encoder.value), "machine": machine_info(), "rkit_commit": git_commit(),
        "methods": methods, "metrics": metrics, "datasets": per_task,
        "summary": _summary(per_task, methods, metrics), "wall_s": round(time.perf_counter() - started, 3)}
    return BenchOutcome(results)


def _summary(per_task: dict, methods: list[str], metrics: list[str]) -> dict:
    present = [m for m in metrics if all(t["results"][x]["metrics"][m] is not None for t in per_task.values()
                                         for x in methods)]
    out = summarise(per_task, methods, present)
    for row in out.values():
        row.update({m: None for m in metrics if m not in present})
    return out
