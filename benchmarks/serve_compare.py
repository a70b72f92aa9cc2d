"""`rkit serve` of this checkout against an earlier commit's, same index, same box, alternating rounds.

    python -m benchmarks.serve_compare --ref 1290f82 [--seconds 12] [--rounds 2] [--out benchmarks/results/serve]

Why: the box is shared and its speed moves from day to day (benchmarks/perf/README.md), so a change to the
server is judged against the code before it **in the same run**, never against a committed table from another
day. The earlier commit is checked out in a scratch git worktree and its server runs from there (its
``retrieval_kit`` and ``rkit_cli`` first on ``PYTHONPATH``, this environment's packages otherwise). Where the
earlier commit's ``requirements.lock`` lacks a package this environment has and uvicorn picks up by itself
(uvloop, httptools), it is hidden from that server, so each side runs the stack its own lock installs.

Index: serve_load's corpus, 5,000 chunks (its ``--quick`` index) or ``--chunks N`` (built there if missing). Phases, per side and
round (rounds alternate old, new, old, new): teacher at 1 and 16 clients, bm25 at 16 (the HTTP path alone),
hybrid-lexical (bm25 + teacher) at 16. Results: ``compare-<ref>.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

from retrieval_kit.machine import machine_info
from retrieval_kit.paths import rkit_home

from .serve_load import MODES, Server, _public, build, load, query_sets

AUTO_PICKED = ("uvloop", "httptools")  # what uvicorn uses when importable, whether or not it was asked for
PHASES = [("teacher · 1 client", MODES["teacher"], 1), ("teacher · 16 clients", MODES["teacher"], 16),
          ("bm25 · 16 clients", {"query_mode": "bm25"}, 16),
          ("hybrid-lexical · 16 clients", MODES["hybrid-lexical"], 16)]


def _side_env(worktree: Path, scratch: Path) -> tuple[dict, list[str]]:
    """PYTHONPATH for the earlier commit's server: its code first, and stubs that hide what its lock lacks."""
    lock = (worktree / "requirements.lock").read_text().lower()
    hide = [name for name in AUTO_PICKED if f"\n{name}==" not in lock]
    stubs = scratch / "hidden"
    stubs.mkdir(exist_ok=True)
    for name in hide:
        (stubs / f"{name}.py").write_text(f'raise ImportError("{name} is not in this commit\'s lock")\n')
    return {"PYTHONPATH": os.pathsep.join([str(worktree / "cli-root"), str(worktree), str(stubs)])}, hide


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", required=True, help="the earlier commit (any git revision)")
    ap.add_argument("--seconds", type=float, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--chunks", type=int, default=5000, help="index size (serve_load's corpus, built if missing)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/serve"))
    args = ap.parse_args()
    repo = Path(__file__).resolve().parents[1]
    ref = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", args.ref], check=True,
                         capture_output=True, text=True).stdout.strip()
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    _, folder = build(args.chunks, rkit_home() / "bench" / "serve")
    short = query_sets()["short"]  # held out, serve_load's search-box queries

    with tempfile.TemporaryDirectory(prefix="rkit-compare-") as scratch:
        worktree = Path(scratch) / "ref"
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", "-q", str(worktree), ref], check=True)
        # the installed console script imports rkit_cli: the earlier commit's cli/ folder under that name
        (worktree / "cli-root").mkdir()
        (worktree / "cli-root" / "rkit_cli").symlink_to(worktree / "cli")
        env, hidden = _side_env(worktree, Path(scratch))
        sides = {f"{ref} (before)": env, f"{head} (this checkout)": {}}
        runs: dict = {name: {label: [] for label, _, _ in PHASES} for name in sides}
        try:
            for _ in range(args.rounds):
                for name, extra in sides.items():
                    server = Server(folder, env=extra)
                    server.start()
                    try:
                        load(server.url, short, MODES["teacher"], 4, 3)  # warm-up
                        for label, body, clients in PHASES:
                            r = _public(load(server.url, short, body, clients, args.seconds, pid=server.proc.pid))
                            runs[name][label].append(r)
                            print(f"{name:24s} {label:28s} {r['qps']:7} QPS  p50 {r['p50_ms']} ms  "
                                  f"server CPU {r.get('server_cpu_ms_per_request')} ms/req", flush=True)
                    finally:
                        server.stop()
        finally:
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(worktree)], check=False)

    command = f"python -m benchmarks.serve_compare --ref {args.ref}" + " ".join(
        [""] + [f"--{k} {v}" for k, v in (("chunks", args.chunks), ("rounds", args.rounds), ("seconds", args.seconds))
                if v != ap.get_default(k)])
    result = {"machine": machine_info(), "command": command, "chunks": args.chunks,
              "ref": ref, "head": head, "hidden_from_ref": hidden, "seconds": args.seconds, "rounds": args.rounds,
              "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"compare-{ref}" + ("" if args.chunks == 5000 else f"-{args.chunks}")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(report(result))
    print(report(result))


def report(r: dict) -> str:
    med = lambda rows, key: statistics.median(x[key] for x in rows if x.get(key) is not None)  # noqa: E731
    sides = list(r["runs"])
    lines = [f"# rkit serve: {r['head']} against {r['ref']}, same index and box, alternating rounds", "",
             f"Machine: {r['machine'].get('cpu')}, {r['machine'].get('cpu_count')} cores; clients on the same box. "
             f"Index: {r.get('chunks', 5000):,} chunks, FAISS Flat (`benchmarks.serve_load`'s corpus). {r['rounds']} rounds of "
             f"{r['seconds']} s per phase and side, medians shown. Hidden from {r['ref']}'s server (not in its "
             f"lock): {', '.join(r['hidden_from_ref']) or 'nothing'}. Command: `{r['command']}`.", "",
             "| phase | " + " | ".join(f"{s} QPS | p50 ms | server CPU ms/req" for s in sides) + " |",
             "|---|" + "---|---|---|" * len(sides)]
    for label in r["runs"][sides[0]]:
        cells = []
        for side in sides:
            rows = r["runs"][side][label]
            cells += [f"{med(rows, 'qps'):.1f}", f"{med(rows, 'p50_ms'):.1f}",
                      f"{med(rows, 'server_cpu_ms_per_request'):.2f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
