"""Results of the performance suite: raw JSON, the README table and a plot.

A run with ``--only`` replaces its own stages' figures in the results file and keeps the others, so one slow
stage can be re-measured without re-running the suite; every figure keeps the date and machine of its run.
"""

from __future__ import annotations

import json
from pathlib import Path

START, END = "<!-- perf:table -->", "<!-- /perf:table -->"
STAGE_OF = {"cli": "cold CLI", "encode": ("query encode", "encode efficiency"), "indexing": "indexing",
            "search": "search", "decode": "decode", "training": "training"}


def write(run: dict, out: Path) -> Path:
    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    path = results / ("perf-quick.json" if run["quick"] else "perf.json")
    merged = _merge(json.loads(path.read_text()) if path.is_file() else None, run)
    path.write_text(json.dumps(merged, indent=2, ensure_ascii=False) + "\n")
    if not run["quick"] or not (results / "perf.json").is_file():  # the README shows the full run once there is one
        _readme(out / "README.md", merged, path.relative_to(out))
        _plot(merged, out / "perf.png")
    return path


BF16_LABEL = {"amx": "AMX", "avx512-bf16": "AVX512-BF16", "emulated": "no bf16 in hardware"}


def _merge(old: dict | None, run: dict) -> dict:
    stamp = {"date": run["date"], "machine": run["machine"]["cpu"], "cpus": run["machine"]["cpu_count"],
             "gpu": run["machine"].get("gpu"), "cpu_bf16": run["machine"].get("cpu_bf16")}
    fresh = [{**f, "run": stamp} for f in run["figures"]]
    if old is None:
        return {**run, "figures": fresh}
    replaced = {s for name in run["stages"] for s in _names(name)}
    kept = [f for f in old["figures"] if f["stage"] not in replaced]
    runs = [r for r in old.get("runs", [_summary(old)]) if set(r["stages"]) - set(run["stages"])]
    return {**run, "runs": runs + [_summary(run)], "figures": kept + fresh}


def _names(stage: str) -> tuple:
    names = STAGE_OF[stage]
    return names if isinstance(names, tuple) else (names,)


def _summary(run: dict) -> dict:
    return {k: run[k] for k in ("date", "command", "stages", "stage_seconds", "failures", "machine")}


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


SEARCH_COLUMNS = ("p50 (batch 1)", "p99 (batch 1)", "QPS (batch 1)", "QPS (batch 64)", "recall@10", "build", "memory",
                  "disk")


def search_table(figures: list[dict]) -> str:
    """The search stage's per-engine rows as one engine × measure table (the README's second table)."""
    cells: dict[str, dict[str, str]] = {}
    for f in figures:
        what = next((c for c in SEARCH_COLUMNS if f["name"].endswith(" " + c)), None)
        if f["stage"] != "search" or f["target"] or what is None:
            continue
        engine = f["name"][: -len(what) - 1]
        cells.setdefault(engine, {})[what] = f"{_fmt(f['ours'])} {f['unit']}".strip()
    if not cells:
        return ""
    rows = ["| engine, vectors | " + " | ".join(SEARCH_COLUMNS) + " |", "|---" * (len(SEARCH_COLUMNS) + 1) + "|"]
    rows += [f"| {engine} | " + " | ".join(c.get(col, "–") for col in SEARCH_COLUMNS) + " |"
             for engine, c in cells.items()]
    data = next(f["detail"].get("data") for f in figures if f["stage"] == "search")
    return "\n".join(rows) + f"\n\nVectors: {data}. Peer for every row: FAISS Flat (exact) of the same size (JSON)."


def table(figures: list[dict]) -> str:
    rows = ["| stage | figure | ours | peer | ratio | target | met? | machine |", "|---|---|---|---|---|---|---|---|"]
    figures = [f for f in figures if f["stage"] != "search" or f["target"]]  # the rest: search_table
    for f in figures:
        met = {True: "✅", False: "❌", None: "–"}[f["met"]]
        machine = f"{f['run']['cpus']}× {f['run']['machine']}" + (f" + {f['run']['gpu']}" if f["run"].get("gpu") else "")
        if f["run"].get("cpu_bf16"):  # "AMD EPYC" names a Zen 3 (bf16 emulated) and a Zen 4 (AVX512-BF16) alike
            machine += f" ({BF16_LABEL.get(f['run']['cpu_bf16'], f['run']['cpu_bf16'])})"
        peer = f"{_fmt(f['peer'])} ({f['peer_name']})" if f.get("peer_name") else _fmt(f["peer"])
        rows.append(f"| {f['stage']} | {f['name']} | {_fmt(f['ours'])} {f['unit']} | {peer} | {_fmt(f['ratio'])} | "
                    f"{f['target'] or '–'} | {met} | {machine} |")
    unmet = [f for f in figures if f["met"] is False]
    if unmet:
        rows += ["", "**Unmet targets — why, and what would close them:**", ""]
        rows += [f"- *{f['name']}*: {f['why'] or 'not analysed yet'}" for f in unmet]
    return "\n".join(rows)


def _readme(path: Path, merged: dict, results: Path) -> None:
    text = path.read_text() if path.is_file() else f"# Performance\n\n{START}\n{END}\n"
    body = (f"{START}\n_From `{results}` — last run {merged['date']}, `{merged['command']}`._\n\n"
            f"{table(merged['figures'])}\n\n### Search engines\n\n{search_table(merged['figures'])}\n{END}")
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    path.write_text(head + body + tail)


def _plot(merged: dict, path: Path) -> None:
    """Each figure with a target: how far past (or short of) it, as ratio / target on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [f for f in merged["figures"] if f["target"] and f["ratio"] is not None and f["met"] is not None]
    if not rows:
        return
    scores = []
    for f in rows:
        bound = float(f["target"].split()[1])
        ratio = f["ratio"] if f["stage"] != "search" else f["ours"]
        scores.append(ratio / bound if f["target"].startswith("≥") else bound / max(ratio, 1e-9))
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    ax.barh([f["name"] for f in rows], scores, color=["tab:green" if f["met"] else "tab:red" for f in rows])
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("how far past the target (× ; right of 1 = met)")
    ax.set_title(f"rkit performance vs targets ({merged['machine']['cpu_count']}-core {merged['machine']['cpu']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
