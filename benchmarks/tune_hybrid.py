"""Choose the hybrid recipe (and the index's default query mode) by retrieval on tune data, not on an evaluation set.

    python -m benchmarks.tune_hybrid [--pool FILE] [--skip 3000] [--queries 200] [--corpus 400] \
                                     [--out benchmarks/results/tune]

Tune data: pseudo-queries. From the default training pool (``train_queries/mixed.jsonl``) it takes records the
shipped adapter never saw (it trained on the first 3,000: ``--skip``), asks the backbone for its answer to
each (greedy, the adapter's 96-token training setting; cached with the HyDE answers), and makes a corpus of
those answers. The first ``--queries`` pool records are the queries, each with its own answer as the one
relevant document; the other answers are distractors. No CACM, AdvBench-IR or BRIGHT query or judgment is read.

Every candidate runs through the product path (``rkit index``'s indexer + ``Retriever.search``), and the best
nDCG@10 wins; a candidate within 0.002 of the best with fewer signals wins instead (the simpler recipe).
RRF k stays 60 (literature), never tuned. The winner is written into ``search.DEFAULT_HYBRID`` by hand, with a
pointer to the result file this writes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from retrieval_kit.bench import cache, progress
from retrieval_kit.bench.cache import default_cache_root
from retrieval_kit.bench.datasets import BenchDataset
from retrieval_kit.bench.methods import MethodConfig, load_bench_encoder
from retrieval_kit.bench.product import ProductRunner
from retrieval_kit.bench.runner import LazyEncoder, score
from retrieval_kit.machine import machine_info
from retrieval_kit.paths import DEFAULT_ADAPTER
from retrieval_kit.search import HybridRecipe

POOL = Path("/work/shared/data/train_queries/mixed.jsonl")
ANSWER_TOKENS = 96  # the shipped adapter's training targets were this long (its config.json, training.command)

# The candidates, declared before any run: single signals for reference, then the fusions worth asking about.
CANDIDATES = {
    "bm25": {"bm25": 1},
    "teacher": {"teacher": 1},
    "generative": {"generative": 1},
    "fused": {"fused": 1},
    "bm25+teacher": {"bm25": 1, "teacher": 1},
    "bm25+fused": {"bm25": 1, "fused": 1},
    "bm25+teacher+fused": {"bm25": 1, "teacher": 1, "fused": 1},
    "bm25+teacher+0.25gen": {"bm25": 1, "teacher": 1, "generative": 0.25},
    "bm25+teacher+0.5gen": {"bm25": 1, "teacher": 1, "generative": 0.5},
    "bm25+teacher+gen": {"bm25": 1, "teacher": 1, "generative": 1},
}


def tune_dataset(pool: Path, skip: int, n_queries: int, n_corpus: int, enc, store) -> BenchDataset:
    records = []
    with open(pool, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i < skip:
                continue
            if len(records) >= n_corpus:
                break
            records.append(json.loads(line))
    texts = [r["text"] for r in records]
    ns = cache.hyde_answers(store, enc, ANSWER_TOKENS, None)
    answers, _ = ns.get(texts, lambda t: enc.generate(t, max_new_tokens=ANSWER_TOKENS, batch_size=16), chunk=16,
                        stage=lambda total: progress.stage("backbone answers (tune corpus)", total))
    corpus = {r["_id"]: {"title": "", "text": a} for r, a in zip(records, answers) if a.strip()}
    queries = {r["_id"]: r["text"] for r in records[:n_queries] if r["_id"] in corpus}
    return BenchDataset(name="tune-pool", corpus=corpus, queries=queries, qrels={q: {q: 1} for q in queries},
                        notes=[f"{pool.name} records {skip}..{skip + len(records) - 1}: pseudo-queries vs backbone answers"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", type=Path, default=POOL)
    ap.add_argument("--skip", type=int, default=3000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--corpus", type=int, default=400)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/tune"))
    ap.add_argument("--cache-dir", type=Path, default=None)
    args = ap.parse_args()
    started = time.time()
    root = args.cache_dir or default_cache_root()
    encoder = LazyEncoder(lambda: load_bench_encoder(None, None))
    ds = tune_dataset(args.pool, args.skip, args.queries, args.corpus, encoder(), cache.open_store(root))
    runner = ProductRunner(ds, MethodConfig(), root, encoder)
    rows = {}
    try:
        for name, weights in CANDIDATES.items():
            metrics, _ = score(ds, runner.run("hybrid", hybrid=HybridRecipe.of(weights)), harm=False)
            rows[name] = {"weights": weights, **{k: round(v, 4) for k, v in metrics.items()}}
            progress.note(f"{name:24s} " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    finally:
        runner.close()
    best = max(rows.values(), key=lambda r: r["ndcg@10"])["ndcg@10"]
    close = [n for n, r in rows.items() if r["ndcg@10"] >= best - 0.002 and len(r["weights"]) > 1]
    winner = min(close, key=lambda n: len(rows[n]["weights"])) if close else max(rows, key=lambda n: rows[n]["ndcg@10"])
    result = {"what": "hybrid recipe chosen on pseudo-queries from the training pool (not an evaluation set)",
              "pool": str(args.pool), "skip": args.skip, "n_queries": len(ds.queries), "n_docs": len(ds.corpus),
              "answer_tokens": ANSWER_TOKENS, "adapter": str(DEFAULT_ADAPTER), "index": runner.index_report,
              "candidates": rows, "winner": winner, "rule": "best nDCG@10; within 0.002 of it, fewer signals",
              "machine": machine_info(), "wall_s": round(time.time() - started, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hybrid-recipe.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| candidate | weights | nDCG@10 | Recall@100 | MRR@10 |", "|---|---|---:|---:|---:|"]
    for n, r in rows.items():
        mark = " **(chosen)**" if n == winner else ""
        lines.append(f"| {n}{mark} | {r['weights']} | {r['ndcg@10']:.4f} | {r['recall@100']:.4f} | {r['mrr@10']:.4f} |")
    (args.out / "hybrid-recipe.md").write_text(
        f"# Hybrid recipe, chosen on tune data\n\n{result['what']}: {len(ds.queries)} queries, {len(ds.corpus)} "
        f"answers ({ds.notes[0]}). Machine: {result['machine'].get('cpu', '')}. "
        f"Command: `python -m benchmarks.tune_hybrid`.\n\n" + "\n".join(lines) + "\n")
    print(json.dumps({"winner": winner, **rows[winner]}))


if __name__ == "__main__":
    main()
