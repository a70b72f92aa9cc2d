"""Choose the hybrid recipe (and the index's default query mode) by retrieval on tune data, not on an evaluation set.

    python -m benchmarks.tune_hybrid [--collections pool,stdlib-docs,stdlib-code,man] [--out benchmarks/results/tune]

Tune data (benchmarks/tune_collections.py): four collections that are no evaluation set, of four kinds.
``pool``: prompts from the default training pool that the shipped adapter never saw, each with the backbone's own
answer as its one relevant document (the generative embedding's home ground: it was trained to predict exactly
these documents). ``stdlib-docs`` and ``stdlib-code``: a docstring's summary line from the running Python's
standard library as the query, the rest of the docstring, or the function's code without it, as the document
(written by people, not by the backbone). ``man``: a manual page's NAME description vs its DESCRIPTION section,
technical prose where exact names and flags matter (added because the first three all favour dense retrieval;
the candidates and the rule did not change with it). No CACM, AdvBench-IR or BRIGHT query or judgment is read.

Every candidate runs through the product path (``rkit index``'s indexer + ``Retriever.search``). The rule,
declared with the candidates before any run: the best mean nDCG@10 over the collections wins; a candidate within
0.002 of it with fewer signals wins instead (the simpler recipe). RRF k stays 60 (literature), never tuned. The
winner is written into ``search.HybridRecipe``'s defaults by hand, with a pointer to the result file this writes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from retrieval_kit.bench import cache, progress
from retrieval_kit.bench.cache import default_cache_root
from retrieval_kit.bench.methods import MethodConfig, load_bench_encoder
from retrieval_kit.bench.product import ProductRunner
from retrieval_kit.bench.runner import LazyEncoder, score
from retrieval_kit.machine import machine_info
from retrieval_kit.paths import DEFAULT_ADAPTER
from retrieval_kit.search import HybridRecipe

from .tune_collections import COLLECTIONS, load

# The candidates, declared before any run: (weights, fusion). Single signals for reference, then the fusions worth
# asking about: RRF with the generative side at full or half vote (or sharing one dense vote with the
# teacher), Qdrant's DBSF, and the convex combination of min-max scores (Bruch et al., TOIS 2023).
CANDIDATES = {
    "bm25": ({"bm25": 1}, "rrf"),
    "teacher": ({"teacher": 1}, "rrf"),
    "generative": ({"generative": 1}, "rrf"),
    "fused": ({"fused": 1}, "rrf"),
    "rrf bm25+teacher": ({"bm25": 1, "teacher": 1}, "rrf"),
    "rrf bm25+fused": ({"bm25": 1, "fused": 1}, "rrf"),
    "rrf bm25+teacher+fused": ({"bm25": 1, "teacher": 1, "fused": 1}, "rrf"),
    "rrf bm25+teacher+0.5fused": ({"bm25": 1, "teacher": 1, "fused": 0.5}, "rrf"),
    "rrf bm25+0.5teacher+0.5fused": ({"bm25": 1, "teacher": 0.5, "fused": 0.5}, "rrf"),
    "rrf bm25+teacher+0.5gen": ({"bm25": 1, "teacher": 1, "generative": 0.5}, "rrf"),
    "dbsf bm25+teacher": ({"bm25": 1, "teacher": 1}, "dbsf"),
    "dbsf bm25+teacher+fused": ({"bm25": 1, "teacher": 1, "fused": 1}, "dbsf"),
    "convex bm25+teacher": ({"bm25": 1, "teacher": 1}, "convex"),
    "convex bm25+fused": ({"bm25": 1, "fused": 1}, "convex"),
    "convex bm25+teacher+fused": ({"bm25": 1, "teacher": 1, "fused": 1}, "convex"),
    "convex bm25+0.5teacher+0.5fused": ({"bm25": 1, "teacher": 0.5, "fused": 0.5}, "convex"),
}
RULE = "best mean nDCG@10 over the collections; within 0.002 of it, fewer signals"


def choose(rows: dict) -> str:
    """The rule above, on {name: {"weights", "mean": {"ndcg@10"}}}; single signals compete too."""
    best = max(r["mean"]["ndcg@10"] for r in rows.values())
    close = [n for n, r in rows.items() if r["mean"]["ndcg@10"] >= best - 0.002]
    return min(close, key=lambda n: (len(rows[n]["weights"]), -rows[n]["mean"]["ndcg@10"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--collections", default=",".join(COLLECTIONS))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/tune"))
    ap.add_argument("--cache-dir", type=Path, default=None)
    args = ap.parse_args()
    started = time.time()
    root = args.cache_dir or default_cache_root()
    encoder = LazyEncoder(lambda: load_bench_encoder(None, None))
    names = [c.strip() for c in args.collections.split(",") if c.strip()]
    rows = {name: {"weights": w, "fusion": f, "per": {}} for name, (w, f) in CANDIDATES.items()}
    described, store = {}, cache.open_store(root)  # the pool collection's cached backbone answers
    for collection in names:
        ds = load(collection, encoder(), store)
        runner = ProductRunner(ds, MethodConfig(), root, encoder)
        try:
            for name, (weights, fusion) in CANDIDATES.items():
                metrics, _ = score(ds, runner.run("hybrid", hybrid=HybridRecipe.of(weights, fusion=fusion)), harm=False)
                rows[name]["per"][collection] = {k: round(v, 4) for k, v in metrics.items()}
                progress.note(f"{collection:12s} {name:34s} " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        finally:
            runner.close()
        described[collection] = {"queries": len(ds.queries), "documents": len(ds.corpus), "notes": ds.notes,
                                 "index": runner.index_report}
    for row in rows.values():
        keys = next(iter(row["per"].values()))
        row["mean"] = {k: round(sum(p[k] for p in row["per"].values()) / len(row["per"]), 4) for k in keys}
    winner = choose(rows)
    result = {"what": "hybrid recipe chosen on tune collections (no evaluation set)", "collections": described,
              "adapter": str(DEFAULT_ADAPTER), "candidates": rows, "winner": winner, "rule": RULE,
              "machine": machine_info(), "wall_s": round(time.time() - started, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hybrid-recipe.json").write_text(json.dumps(result, indent=2) + "\n")
    head = "| candidate | fusion | weights | " + " | ".join(f"{c} nDCG@10" for c in names) + " | mean nDCG@10 | mean MRR@10 |"
    lines = [head, "|---|---|---|" + "---:|" * (len(names) + 2)]
    for n, r in rows.items():
        mark = " **(chosen)**" if n == winner else ""
        cells = " | ".join(f"{r['per'][c]['ndcg@10']:.4f}" for c in names)
        lines.append(f"| {n}{mark} | {r['fusion']} | {r['weights']} | {cells} | {r['mean']['ndcg@10']:.4f} | "
                     f"{r['mean']['mrr@10']:.4f} |")
    about = "; ".join(f"{c}: {d['queries']} queries, {d['documents']} documents ({d['notes'][0]})"
                      for c, d in described.items())
    (args.out / "hybrid-recipe.md").write_text(
        f"# Hybrid recipe, chosen on tune data\n\n{result['what']}. {about}. Rule: {RULE}. "
        f"Machine: {result['machine'].get('cpu', '')}. Command: `python -m benchmarks.tune_hybrid`.\n\n"
        + "\n".join(lines) + "\n")
    print(json.dumps({"winner": winner, **rows[winner]}))


if __name__ == "__main__":
    main()
