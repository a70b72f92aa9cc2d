"""What hybrid search costs per query, against dense searches of the same index, through Retriever.search.

    python -m benchmarks.hybrid_latency [BEIR_FOLDER] [--rounds 3] [--backend faiss] [--out benchmarks/results/hybrid]

The corpus is indexed as `rkit bench` does (the product path, reusing its cached index), the encoder is loaded
once, and every query is searched alone (batch 1, k=10) in each mode, the modes interleaved query by query so
machine noise hits them alike; rounds repeat the whole pass. Reported per mode: median and p90 of the whole
search call, and of its two parts (query encoding, the index's search + fusion). Timings are a benchmark,
never a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from retrieval_kit.bench import datasets as bench_data
from retrieval_kit.bench.cache import default_cache_root
from retrieval_kit.bench.methods import MethodConfig, load_bench_encoder
from retrieval_kit.bench.product import ProductRunner
from retrieval_kit.bench.runner import LazyEncoder
from retrieval_kit.machine import machine_info
from retrieval_kit.search import DEFAULT_HYBRID

MODES = ("teacher", "fused", "bm25", "hybrid")


def _stats(values: list[float]) -> dict:
    values = sorted(values)
    return {"median_ms": round(1000 * statistics.median(values), 2),
            "p90_ms": round(1000 * values[int(0.9 * (len(values) - 1))], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", nargs="?", type=Path, default=Path("/work/shared/data/cacm"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backend", default="faiss")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/hybrid"))
    args = ap.parse_args()
    ds = bench_data.load_beir(args.folder)
    runner = ProductRunner(ds, MethodConfig(backend=args.backend), default_cache_root(),
                           LazyEncoder(lambda: load_bench_encoder(None, None)))
    retriever = runner.retriever()
    queries = list(ds.queries.values())
    times = {m: {"total": [], "encode": [], "search": []} for m in MODES}
    try:
        for mode in MODES:  # warm-up: first calls pay for lazy initialisation
            retriever.search(queries[:2], k=10, query_mode=mode)
        for _ in range(args.rounds):
            for q in queries:
                for mode in MODES:
                    start = time.perf_counter()
                    (result,) = retriever.search([q], k=10, query_mode=mode)
                    times[mode]["total"].append(time.perf_counter() - start)
                    times[mode]["encode"].append(result.timings["encode_s"])
                    times[mode]["search"].append(result.timings["search_s"])
    finally:
        runner.close()
    rows = {m: {part: _stats(v) for part, v in parts.items()} for m, parts in times.items()}
    ratio = {f"hybrid/{m}": round(rows["hybrid"]["total"]["median_ms"] / rows[m]["total"]["median_ms"], 3)
             for m in ("teacher", "fused")}
    result = {"dataset": ds.name, "chunks": runner.index_report.get("chunks"), "backend": args.backend,
              "queries": len(queries), "rounds": args.rounds, "hybrid": DEFAULT_HYBRID.describe(), "modes": rows,
              "ratios_total_median": ratio, "machine": machine_info()}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"latency-{ds.name}-{args.backend}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| mode | whole search, median (p90) ms | encode median ms | index search + fusion median (p90) ms |",
             "|---|---:|---:|---:|"]
    for m, r in rows.items():
        lines.append(f"| {m} | {r['total']['median_ms']} ({r['total']['p90_ms']}) | {r['encode']['median_ms']} | "
                     f"{r['search']['median_ms']} ({r['search']['p90_ms']}) |")
    (args.out / f"{stem}.md").write_text(
        f"# Hybrid search latency — {ds.name}, {args.backend}, {result['chunks']} chunks\n\n"
        f"{len(queries)} queries × {args.rounds} rounds, batch 1, k=10, modes interleaved; machine "
        f"{result['machine'].get('cpu')} ×{result['machine'].get('cpu_count')}. hybrid = {result['hybrid']}. "
        f"Command: `python -m benchmarks.hybrid_latency {args.folder}`.\n\n" + "\n".join(lines) +
        f"\n\nhybrid / teacher (whole search, median): {ratio['hybrid/teacher']}×; hybrid / fused: "
        f"{ratio['hybrid/fused']}×\n")
    print(json.dumps({"ratios": ratio, **{m: r["total"] for m, r in rows.items()}}))


if __name__ == "__main__":
    main()
