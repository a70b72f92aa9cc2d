"""Render a results dict: `<out>/<bench>/<date>-<config>.{json,md,png}` (+ `-explain.jsonl`)."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

from .cache import slug
from .methods import METHODS


def prompt_tag(prompt: str) -> str:
    """A system prompt's short tag in result file names (8 hex of its sha1: the names earlier versions wrote)."""
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:8]


def result_stem(results: dict) -> str:
    """`<date>-<dataset>-doc-<doc encoder>-<adapter>[-<methods>][-matrix|-<backend>][-limitN]`: reruns of one
    config overwrite (write_results numbers a different config that would share the name)."""
    cfg = results["config"]
    adapter = "default" if cfg.get("adapter") in (None, "default") else Path(str(cfg["adapter"])).name
    parts = [results["date"][:10], results["label"], f"doc-{cfg['doc_encoder']}", f"adapter-{adapter}"]
    if results["methods"] != list(METHODS):
        parts.append("+".join(results["methods"]))
    if cfg.get("hyde_system_prompt"):  # HyDE answered under another system prompt: another result
        parts.append(f"hydesys-{prompt_tag(cfg['hyde_system_prompt'])}")
    if cfg.get("path") == "matrix":
        parts.append("matrix")
    elif cfg.get("backend") not in (None, "faiss"):
        parts.append(cfg["backend"])
    if cfg.get("limit"):
        parts.append(f"limit{cfg['limit']}")
    return slug("-".join(parts), max_len=200)  # never cut: two configs must not share a file


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _short(metric: str) -> str:
    """Table headers: AdvBench's long names shortened (acc@5, harm@5); the JSON keeps the full ones."""
    return metric.replace("top_k_any_harm", "harm").replace("top_k_acc", "acc")


def summary_table(results: dict) -> tuple[list[str], list[list[str]]]:
    metrics = results["metrics"]
    header = ["method", *map(_short, metrics), "wall s"]
    rows = [[m, *(_fmt(results["summary"][m][k]) for k in metrics), _wall(results["summary"][m])]
            for m in results["methods"]]
    return header, rows


def _wall(summary: dict) -> str:
    """Seconds of query-side work + scoring; '(cached)' when its inputs came from the cache (not a speed figure)."""
    return f"{summary['wall_s']:.1f}" + (" (cached)" if summary.get("cached_inputs") else "")


def bright_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """nDCG@10 ×100 per domain, ours then the paper's, on the same scale as the BRIGHT leaderboard."""
    domains = list(results["datasets"])
    header = ["retriever", *domains, "avg"]
    rows = []
    for m in results["methods"]:
        vals = [results["datasets"][d]["results"][m]["metrics"]["ndcg@10"] * 100 for d in domains]
        rows.append([f"ours: {m}", *(f"{v:.1f}" for v in vals), f"{sum(vals) / len(vals):.1f}"])
    for model, vals in (results.get("published") or {}).items():
        rows.append([f"{model} (paper)", *(f"{vals[d]:.1f}" for d in domains), f"{vals['avg']:.1f}"])
    return header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def markdown(results: dict) -> str:
    enc, mach, cfg = results.get("encoder") or {}, results["machine"], results["config"]
    out = [f"# {results['bench']} — {results['label']} ({results['date'][:10]})", ""]
    out.append(f"- encoder: {enc.get('fingerprint', 'not loaded (bm25 only)')}"
               + (f" — backbone {enc.get('backbone')}, teacher {enc.get('teacher')}, trained {enc.get('trained')}"
                  if enc else ""))
    weight = cfg["fuse_weight"] if cfg.get("fuse_weight") is not None else f"{enc.get('fuse_weight', 0.5)} (the adapter's)"
    anchor = "fitted query anchor" if enc.get("anchor") else "no query anchor"
    out.append(f"- documents embedded by: {cfg['doc_encoder']}; fuse weight {weight}, {anchor}; "
               f"top-k {cfg['top_k']}; limit {cfg.get('limit') or 'none'}")
    if cfg.get("path") == "product":
        out.append(f"- search path: product — the corpus indexed by `rkit index` ({cfg.get('backend', 'faiss')}), "
                   f"every method searched as `rkit search` does (Retriever.search), top {cfg['top_k']} chunks "
                   f"max-pooled per document; hybrid = {cfg.get('hybrid', '?')}")
    elif cfg.get("path") == "matrix":
        out.append("- search path: matrix — whole documents ranked by a numpy matmul / bm25s (fast; not the index "
                   "`rkit search` runs)")
    out.append(f"- machine: {mach.get('cpu')} ×{mach.get('cpu_count')}, GPU {mach.get('gpu') or 'none'}; "
               f"commit {results.get('rkit_commit') or '?'}")
    if cfg.get("command"):
        out.append(f"- command: `{cfg['command']}`")
    for name, ds in results["datasets"].items():
        notes = "; ".join(ds["notes"]) or "–"
        counts = f"{ds['n_queries'] or '?'} queries, {ds['n_docs'] or '?'} docs"
        out.append(f"- {name}: {counts}; {notes}")
    out += ["", _md_table(*summary_table(results))]
    if results["bench"] == "bright":
        out += ["", "nDCG@10 ×100 per domain (paper rows: BRIGHT v1 main table)", "",
                _md_table(*bright_table(results))]
    if results["bench"] == "advbench-ir":
        out += ["", "Lower is safer. acc@k = top_k_acc (share of queries with their gold harmful chunk in the top k); "
                    "harm@k = top_k_any_harm (share with any harmful chunk in the top k)."]
    return "\n".join(out) + "\n"


def plot(results: dict, path: Path) -> Path:
    """Grouped bars: metrics (or BRIGHT domains) on the x axis, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = results["methods"]
    if results["bench"] == "bright":
        groups = [*results["datasets"], "avg"]
        values = {m: [results["datasets"][d]["results"][m]["metrics"]["ndcg@10"] for d in results["datasets"]]
                  for m in methods}
        values = {m: v + [sum(v) / len(v)] for m, v in values.items()}
        ylabel = "nDCG@10"
    else:
        values = {m: [results["summary"][m][k] or 0.0 for k in results["metrics"]] for m in methods}
        groups = [_short(k) for k in results["metrics"]]
        ylabel = "share of queries (lower is safer)" if results["bench"] == "advbench-ir" else "score"
    x, width = np.arange(len(groups)), 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(methods)) / 2.5), 4.0))
    for i, m in enumerate(methods):
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, values[m], width, label=m)
    ax.set_xticks(x, groups, rotation=30 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, max(1e-6, max(max(v) for v in values.values())) * 1.15)
    ax.set_title(f"{results['bench']}: {results['label']}")
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: never hides a bar
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _identity(results: dict) -> tuple:
    """What makes two runs the same experiment: every setting (not the command line that gave them: the same
    run from another folder is the same run) and the query encoder's fingerprint."""
    config = {k: v for k, v in (results.get("config") or {}).items() if k != "command"}
    return json.dumps(config, sort_keys=True, default=str), (results.get("encoder") or {}).get("fingerprint")


def _other_config(path: Path, results: dict) -> bool:
    """``path`` holds the result of another experiment (a rerun of the same one is replaced)."""
    try:
        return _identity(json.loads(path.read_text())) != _identity(results)
    except FileNotFoundError:
        return False
    except (OSError, ValueError):  # unreadable: keep it, write beside it
        return True


def write_results(results: dict, out_dir: str | Path, explanations: list[dict] | None = None,
                  with_plot: bool = True) -> dict[str, str]:
    folder = Path(out_dir).expanduser() / results["bench"]
    folder.mkdir(parents=True, exist_ok=True)
    base = stem = str(folder / result_stem(results))  # no with_suffix: a stem may contain dots (adapter-v0.2)
    for n in itertools.count(2):  # the name leaves out settings (--top-k, --fuse-weight, the adapter's folder…)
        if not _other_config(Path(stem + ".json"), results):
            break
        stem = f"{base}-{n}"
    files = {"json": Path(stem + ".json"), "markdown": Path(stem + ".md")}
    files["json"].write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str) + "\n")
    files["markdown"].write_text(markdown(results), encoding="utf-8")
    if with_plot:
        files["plot"] = plot(results, Path(stem + ".png"))
    if explanations:
        files["explain"] = Path(stem + "-explain.jsonl")
        files["explain"].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in explanations),
                                    encoding="utf-8")
    return {k: str(v) for k, v in files.items()}
