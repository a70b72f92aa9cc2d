"""Bigger backbones and teachers (the packs of `make models-extra`) on the product path, against SmolLM2 / MiniLM.

    python -m benchmarks.bigger_models [cacm] [refusals] [--runs LABEL,...] [--refusal-sample N] [--threads N]

cacm      `rkit bench beir ../shared/data/cacm`'s own harness (run_benchmark, --path product: the corpus indexed
          by rkit index, searched as rkit search does) with a fresh encoder per backbone/teacher pair instead of
          the shipped adapter (the bench CLI has no --backbone/--teacher: hyde and teacher need no trained adapter):
            smollm2 + minilm   teacher, hyde      (the same-run baselines)
            qwen 0.5b + minilm hyde
            mpnet              teacher
            embeddinggemma     teacher            (queries with its query prompt, documents with its document one)
refusals  share of the backbone's answers (the HyDE answers: same generation, same cache namespace that
          benchmarks/refusals.py reads) to a seeded sample of AdvBench-IR's harmful queries that refuse, by
          benchmarks/refusals.py's keyword heuristic: Qwen 0.5B vs SmolLM2 on the same queries.

Writes benchmarks/results/bigger/<part>.json and benchmarks/results/bigger/README.md (the table). Every model
output is cached ($RKIT_HOME/bench/bigger/...): a rerun recomputes nothing and rewrites the same figures.
Quality figures on the 2-core CPU box, not timings (the wall times are recorded for planning only).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "bigger"
CACM = Path(__file__).resolve().parents[2] / "shared" / "data" / "cacm"
SMOLLM2, QWEN05 = "smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"
HYDE_TOKENS = 128  # as the SmolLM2 HyDE figure (rkit bench's --hyde-tokens default)
CACM_RUNS = [  # (label, backbone, teacher, methods)
    ("smollm2+minilm", SMOLLM2, "minilm", ["teacher", "hyde"]),
    ("qwen0.5b+minilm", QWEN05, "minilm", ["hyde"]),
    ("mpnet", SMOLLM2, "mpnet", ["teacher"]),
    ("embeddinggemma-300m", SMOLLM2, "embeddinggemma-300m", ["teacher"]),
]


def _encoder(backbone: str, teacher: str):
    from retrieval_kit.models import load_encoder

    # a fresh (untrained) adapter for the pair: hyde and teacher use only its backbone and teacher
    return lambda: load_encoder(backbone=backbone, teacher=teacher, device="cpu")


def _cache_root(teacher: str) -> Path:
    from retrieval_kit.bench.cache import default_cache_root

    # one root per teacher: the product path keeps one index folder per dataset and root
    return default_cache_root() / "bigger" / teacher


def cacm(folder: Path, only: list[str] | None = None) -> dict:
    """The CACM runs (`only`: those labels); each finished run is written to cacm.json at once, merged with the
    runs already there, so a long session that stops keeps what it finished."""
    from retrieval_kit.bench import datasets
    from retrieval_kit.bench.methods import MethodConfig
    from retrieval_kit.bench.runner import run_benchmark

    ds = datasets.load_beir(folder, "test")
    path = OUT / "cacm.json"
    runs = json.loads(path.read_text())["runs"] if path.is_file() else {}
    result = {"dataset": ds.name, "n_queries": len(ds.queries), "n_docs": len(ds.corpus), "runs": runs}
    for label, backbone, teacher, methods in CACM_RUNS:
        if only and label not in only:
            continue
        print(f"== cacm {label}: {', '.join(methods)}", file=sys.stderr, flush=True)
        outcome = run_benchmark("beir", [ds], methods, cfg=MethodConfig(path="product", hyde_max_new_tokens=HYDE_TOKENS),
                                encoder_loader=_encoder(backbone, teacher), cache_root=_cache_root(teacher),
                                label=f"cacm {label}", extra_config={"backbone": backbone, "teacher": teacher})
        r = outcome.results
        runs[label] = {"backbone": backbone, "teacher": teacher, "summary": r["summary"], "wall_s": r["wall_s"],
                       "encoder": r["encoder"], "config": {k: r["config"][k] for k in ("path", "backend", "top_k",
                                                                                       "hyde_max_new_tokens")},
                       "notes": r["datasets"][ds.name]["notes"], "machine": r["machine"],
                       "rkit_commit": r["rkit_commit"], "date": r["date"]}
        result = {"dataset": ds.name, "n_queries": len(ds.queries), "n_docs": len(ds.corpus),
                  "runs": {k: runs[k] for k in [c[0] for c in CACM_RUNS] if k in runs}}
        path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def refusals(sample: int, seed: int = 0) -> dict:
    from benchmarks.refusals import REFUSAL, refusal_share
    from retrieval_kit.bench import cache, load_advbench_ir
    from retrieval_kit.bench.runner import machine_info

    queries = load_advbench_ir(distractors="none").queries
    qids = sorted(queries)
    picked = sorted(random.Random(seed).sample(qids, min(sample, len(qids)))) if sample else qids
    texts = [queries[q] for q in picked]
    out = {"n_queries": len(texts), "of": len(qids), "seed": seed, "max_new_tokens": HYDE_TOKENS,
           "system_prompt": "the backbone template's default", "heuristic": REFUSAL.pattern,
           "machine": machine_info(), "backbones": {}}
    for backbone in (SMOLLM2, QWEN05):
        print(f"== refusals {backbone}: {len(texts)} answers", file=sys.stderr, flush=True)
        enc = _encoder(backbone, "minilm")()
        store = cache.open_store(_cache_root("minilm"))
        start = time.perf_counter()
        ns = cache.hyde_answers(store, enc, HYDE_TOKENS, None)
        answers, cached = ns.get(texts, lambda t: enc.generate(t, max_new_tokens=HYDE_TOKENS, batch_size=16), chunk=16)
        refused = [bool(REFUSAL.search(a[:200])) for a in answers]
        out["backbones"][backbone] = {
            "refusal_share": round(refusal_share(answers), 4), "refused": sum(refused),
            "wall_s": round(time.perf_counter() - start, 1), "cached": cached,
            "examples": [{"query": q, "answer": a[:200]} for q, a in list(zip(texts, answers))[:3]]}
        del enc
    return out


def table(results: dict) -> str:
    lines = ["# Bigger backbones and teachers (packs from `make models-extra`)", "",
             "Rerun: `python -m benchmarks.bigger_models` (2-core Intel Xeon, 24 GiB, no GPU, 2 torch threads). "
             "Quality figures; wall times only for planning.", ""]
    if "cacm" in results:
        c = results["cacm"]
        lines += [f"## CACM ({c['n_queries']} judged queries, {c['n_docs']:,} docs), product path (rkit index + "
                  "search, FAISS), fresh encoders, HyDE ≤ 128 new tokens", "",
                  "| run | backbone | teacher | method | nDCG@10 | Recall@100 | MRR@10 | wall s |", "|---|---|---|---|---|---|---|---|"]
        for label, run in c["runs"].items():
            for method, m in run["summary"].items():
                lines.append(f"| {label} | {run['backbone']} | {run['teacher']} | {method} | {m['ndcg@10']:.4f} | "
                             f"{m['recall@100']:.4f} | {m['mrr@10']:.4f} | "
                             f"{'cached' if m.get('cached_inputs') else format(m['wall_s'], '.0f')} |")
        lines.append("")
    if "refusals" in results:
        r = results["refusals"]
        lines += [f"## AdvBench-IR refusals ({r['n_queries']} of {r['of']} harmful queries, seeded sample "
                  f"seed={r['seed']}; ≤ {r['max_new_tokens']} new tokens, the template's default system prompt; "
                  "benchmarks/refusals.py's keyword heuristic on the first 200 characters)", "",
                  "| backbone | refusal share | refused | wall s |", "|---|---|---|---|"]
        for name, b in r["backbones"].items():
            lines.append(f"| {name} | {b['refusal_share']:.1%} | {b['refused']} / {r['n_queries']} | {b['wall_s']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", default=["cacm", "refusals"], choices=["cacm", "refusals"])
    parser.add_argument("--refusal-sample", type=int, default=100, help="harmful queries sampled (0: all 520)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cacm", type=Path, default=CACM)
    parser.add_argument("--runs", help=f"only these CACM runs: {', '.join(c[0] for c in CACM_RUNS)}")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from retrieval_kit.bench import progress

    progress.silence_library_bars()
    OUT.mkdir(parents=True, exist_ok=True)
    results = {}
    for part in ("cacm", "refusals"):  # the files of a part not rerun are kept and tabled
        path = OUT / f"{part}.json"
        if part in args.parts:
            only = args.runs.split(",") if args.runs else None
            results[part] = cacm(args.cacm, only) if part == "cacm" else refusals(args.refusal_sample)
            path.write_text(json.dumps(results[part], indent=2, ensure_ascii=False) + "\n")
        elif path.is_file():
            results[part] = json.loads(path.read_text())
    (OUT / "README.md").write_text(table(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
