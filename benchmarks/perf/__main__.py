"""The performance suite: every stage measured beside its peer in the same run, results in benchmarks/perf/.

    python -m benchmarks.perf [--quick] [--only cli,encode,indexing,search,decode,training] [--device cuda]

Stages (each a module here): cold CLI search and bad-input errors vs a bare sentence-transformers + FAISS script
(cold_cli), generative encode vs HyDE and its share of the matmul peak (encode), `rkit index` vs the bare teacher
encode (indexing), FAISS/Qdrant at 100k and 1M (search_scale), KV-cached explanation decode (decode), the training
step vs a per-sample loop (training). ``--quick`` runs small sizes (about 15 minutes on a 2-core box). Results:
``--out``/results/perf[-quick].json (every figure, with min/max and details), README.md's table between its
markers, and a plot. The machine is recorded with every run; timings are benchmarks, never tests.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

from .report import write

STAGES = ("cli", "encode", "indexing", "search", "decode", "training")
HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: the whole suite in ~15 minutes on 2 cores")
    parser.add_argument("--only", default=",".join(STAGES), help=f"comma list of stages ({', '.join(STAGES)})")
    parser.add_argument("--device", default=None, help="cpu or cuda for the model stages (default: cuda when present)")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for README.md, results/ and the plot")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch (default $RKIT_HOME/bench/perf)")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage {', '.join(unknown)} (use {', '.join(STAGES)})")

    from retrieval_kit.machine import machine_info
    from retrieval_kit.paths import rkit_home

    workdir = args.workdir or rkit_home() / "bench" / "perf"
    workdir.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True)
    log = lambda message: console.log(message)  # noqa: E731
    figures, timings, failures = [], {}, {}
    for stage in only:
        t0 = time.perf_counter()
        try:
            figures += _stage(stage).run(args.quick, workdir, log, **_device(stage, args.device))
        except Exception as exc:  # one broken stage is reported, the others still run
            failures[stage] = f"{type(exc).__name__}: {exc}"
            console.print(f"[red]stage {stage} failed:[/] {failures[stage]}")
        timings[stage] = round(time.perf_counter() - t0, 1)
        log(f"stage {stage} done in {timings[stage]} s")
    run = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quick": args.quick,
           "stages": only, "stage_seconds": timings, "failures": failures, "machine": machine_info(),
           "command": "python -m benchmarks.perf" + (" --quick" if args.quick else "")
                      + (f" --only {args.only}" if only != list(STAGES) else ""),
           "figures": [f.as_dict() for f in figures]}
    path = write(run, args.out)
    console.print(f"results: {path}")
    print(json.dumps({"results": str(path), "failures": failures}))
    return 1 if failures else 0


def _stage(name: str):
    import importlib

    module = {"cli": "cold_cli", "search": "search_scale"}.get(name, name)
    return importlib.import_module(f"benchmarks.perf.{module}")


def _device(stage: str, device: str | None) -> dict:
    return {"device": device} if stage in ("encode", "decode", "training") else {}


if __name__ == "__main__":
    raise SystemExit(main())
