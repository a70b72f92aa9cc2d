"""The GPU side of benchmarks/gpu_train (called through run.sh), and `import-responses` for back here.

    python3 -m benchmarks.gpu_train.run stash  --carried .gpu_parts/call1 --parts /root/gpu_train/parts
    python3 -m benchmarks.gpu_train.run train  --carried .gpu_parts/call3 --parts … --stage … --work … --out $OUT [job options]
    python3 -m benchmarks.gpu_train.run perf   --stage … --perf-out …       # after train, while warm: GPU perf rows
    python3 -m benchmarks.gpu_train.run import-responses responses.jsonl.gz --cache-dir cache   # here, after the run
    python3 -m benchmarks.gpu_train.run compare back/adapter --responses responses.jsonl.gz      # here: vs the shipped adapter

Errors (a missing or corrupt part, a machine without torch, …) are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.gpu_train.parts import PartsError, assemble, stash


def _paths(parser) -> None:
    parser.add_argument("--carried", type=Path, default=None, help="the call folder this call carried (.gpu_parts/callK)")
    parser.add_argument("--parts", type=Path, default=Path("/root/gpu_train/parts"), help="where parts wait between calls")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_train.run", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("stash", help="check this call's parts and keep them for the last call; print the machine's packages")
    _paths(p)
    p = sub.add_parser("assemble", help="join + verify + extract the bundle")
    _paths(p)
    p.add_argument("--stage", type=Path, default=Path("/root/gpu_train/stage"))
    p = sub.add_parser("train", help="stash, assemble, then the training job")
    _paths(p)
    p.add_argument("--stage", type=Path, default=Path("/root/gpu_train/stage"))
    p.add_argument("--work", type=Path, default=Path("/root/gpu_train/work"))
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    from benchmarks.gpu_train.job import add_arguments

    add_arguments(p)
    p = sub.add_parser("perf", help="the perf suite's model stages on the GPU, on the bundle a train call assembled")
    p.add_argument("--stage", type=Path, default=Path("/root/gpu_train/stage"))
    p.add_argument("--perf-out", type=Path, default=Path("/root/gpu_train/perf"), help="the suite's --out")
    p.add_argument("--stages", default="encode,decode,training", help="the suite's --only [encode,decode,training]")
    p = sub.add_parser("import-responses", help="(here) put a job's responses.jsonl.gz into a response cache")
    p.add_argument("file", type=Path)
    p.add_argument("--cache-dir", type=Path, required=True, help="the --cache-dir you will give rkit train")
    p = sub.add_parser("compare", help="(here) the new adapter vs the shipped one on one held-out set")
    p.add_argument("adapter", type=Path, help="the new adapter folder (tar xf adapter.tar)")
    p.add_argument("--responses", type=Path, required=True, help="the job's responses.jsonl.gz")
    p.add_argument("--against", type=Path, action="append", default=None, help="other adapter folder(s) [the shipped default]")
    p.add_argument("--queries", type=Path, default=None, help="the pool it trained on [$RKIT_DATA or ../shared/data: train_queries/mixed.jsonl]")
    args = parser.parse_args(argv)
    t0 = float(os.environ.get("GPU_TRAIN_T0") or time.time())  # run.sh's start: the deadline counts from there

    from benchmarks.gpu_train.job import JobError

    try:
        from retrieval_kit.errors import RkitError
    except ImportError:  # run from elsewhere than the repository root
        RkitError = JobError
    try:
        if args.mode in ("stash", "assemble", "train") and args.carried is not None:
            names = stash(args.carried, args.parts)
            print(f"[gpu_train] {args.carried}: {', '.join(names)} verified and kept in {args.parts}", flush=True)
        if args.mode == "stash":
            from benchmarks.gpu_train.job import environment

            print("[gpu_train] environment: " + json.dumps(environment()), flush=True)
            return 0
        if args.mode == "perf":
            from benchmarks.gpu_train.job import use_stage

            use_stage(args.stage)  # the packed models and fallbacks, as the train call had them
            os.environ["RKIT_DATA"] = str(args.stage / "data")  # its query pool: the suite's held-out queries
            from benchmarks.perf.__main__ import main as perf

            return perf(["--quick", "--only", args.stages, "--device", "cuda", "--out", str(args.perf_out)])
        if args.mode == "import-responses":
            from benchmarks.gpu_train.job import import_responses

            n = import_responses(args.file, args.cache_dir)
            print(f"{n} responses put into {args.cache_dir}: rkit train --cache-dir {args.cache_dir} with the same "
                  f"--max-new-tokens reuses them")
            return 0
        if args.mode == "compare":
            from benchmarks.gpu_train.job import compare
            from benchmarks.gpu_train.pack import default_queries
            from retrieval_kit.paths import DEFAULT_ADAPTER

            result = compare(args.adapter, args.against or [DEFAULT_ADAPTER], args.responses, args.queries or default_queries())
            print(f"held-out: {result['n']} queries (the new run's validation split; {result['dropped_trained_on']} dropped "
                  f"as trained on by another adapter); mean cos to teacher(response); teacher(query) baseline "
                  f"{result['baseline_teacher_query_cos']:.4f}")
            print("| adapter | student | fused | its card's student |\n|---|---:|---:|---:|")
            for row in result["adapters"]:
                print(f"| {row['adapter']} | {row['student_cos']:.4f} | {row['fused_cos'] if row['fused_cos'] is not None else '–'} "
                      f"| {row['card_student_cos'] if row['card_student_cos'] is not None else '–'} |")
            print(json.dumps(result))
            return 0
        manifest = assemble(args.parts, args.stage)
        print(f"[gpu_train] bundle {manifest['bundle']['sha256'][:16]}… verified ({len(manifest['files'])} files) "
              f"in {args.stage} after {time.time() - t0:.1f} s", flush=True)
        if args.mode == "assemble":
            return 0
        from benchmarks.gpu_train import job

        args.argv = argv[argv.index("train") + 1 :]
        args.out.mkdir(parents=True, exist_ok=True)
        job.run(args, args.stage, args.work, args.out, t0)
        return 0
    except (PartsError, JobError, RkitError) as exc:
        print(f"gpu_train: error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
