"""`rkit bench bright | advbench-ir | beir | mteb | perf`: one harness, baselines side by side, results written to disk."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from retrieval_kit.bench import datasets as bench_data
from retrieval_kit.bench import methods as bench_methods
from retrieval_kit.bench import progress
from retrieval_kit.bench.cache import default_cache_root
from retrieval_kit.bench.report import bright_table, summary_table, write_results
from retrieval_kit.bench.runner import BenchOutcome, run_benchmark
from retrieval_kit.errors import BenchError
from retrieval_kit.index.core import BACKENDS

from .common import console, guarded, print_json

bench_app = typer.Typer(
    help="Benchmarks: BRIGHT, AdvBench-IR, BEIR folders (CACM), MTEB; bm25/teacher/hyde/rkit/fused side by side.",
    no_args_is_help=True,
)

# ---- options shared by every command ------------------------------------------------------------
Methods = Annotated[Optional[str], typer.Option("--methods", help="Comma list: bm25, teacher, hyde, rkit, fused, hybrid, "
                                                                 "default (extra: hydeq, anchor, naive-rrf, naive-convex, "
                                                                 "hybrid-convex); default: all but the extras (matrix "
                                                                 "path: no hybrid/default).")]
SearchPath = Annotated[str, typer.Option("--path", help="product: index the corpus with rkit index and search it as rkit "
                                                        "search does (default); matrix: the fast whole-document "
                                                        "numpy ranking (no hybrid/default).")]
Backend = Annotated[str, typer.Option("--backend", help="Index backend on the product path: faiss | qdrant.")]
Json = Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout.")]
Out = Annotated[Path, typer.Option("--out", help="Results folder; files go to OUT/<bench>/<date>-<config>.*")]
Adapter = Annotated[Optional[str], typer.Option("--adapter", help="Adapter folder (default: the shipped adapter).")]
DocEncoder = Annotated[str, typer.Option("--doc-encoder", help="How documents are embedded: teacher | generative.")]
Limit = Annotated[Optional[int], typer.Option("--limit", min=1, help="Only the first N queries (smoke runs).")]
Explain = Annotated[bool, typer.Option("--explain", help="Also write per-query explanations as jsonl.")]
ExplainTokens = Annotated[int, typer.Option("--explain-tokens", min=1, help="Tokens decoded per explanation.")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Encoder batch size.")]
DataRoot = Annotated[Optional[Path], typer.Option("--data-root", help="Shared data folder (env RKIT_DATA; "
                                                                       "default /work/shared/data).")]
CacheDir = Annotated[Optional[Path], typer.Option("--cache-dir", help="Embedding/answer/BM25 cache "
                                                                     "(default $RKIT_HOME/bench).")]
FuseWeight = Annotated[Optional[float], typer.Option("--fuse-weight", min=0.0, max=1.0, help="Weight of rkit in `fused` (default: the adapter's fitted weight).")]
TopK = Annotated[int, typer.Option("--top-k", min=1, help="Ranking depth kept per query.")]
HydeTokens = Annotated[int, typer.Option("--hyde-tokens", min=1, help="Max new tokens of a HyDE answer.")]
HydeSystem = Annotated[Optional[str], typer.Option("--hyde-system-prompt",
                                                   help="System prompt HyDE answers under (default: the adapter's).")]
Device = Annotated[Optional[str], typer.Option("--device", help="cpu | cuda | mps (default: best available).")]
Plot = Annotated[bool, typer.Option("--plot/--no-plot", help="Write the bar plot PNG.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or status lines.")]


def _command_line() -> str | None:
    """The command as typed, for the results file (only when run as `rkit`)."""
    return "rkit " + shlex.join(sys.argv[1:]) if Path(sys.argv[0]).name == "rkit" else None


def _config(doc_encoder: str, fuse_weight: float | None, hyde_tokens: int, batch_size: int, top_k: int,
            hyde_system_prompt: str | None = None, path: str = "matrix", backend: str = "faiss"):
    if doc_encoder not in bench_methods.DOC_ENCODERS:
        raise BenchError(f"unknown --doc-encoder '{doc_encoder}' (use teacher or generative)")
    if path not in bench_methods.PATHS:
        raise BenchError(f"unknown --path '{path}' (use {' or '.join(bench_methods.PATHS)})")
    if backend not in BACKENDS:
        raise BenchError(f"unknown --backend '{backend}' (use {' or '.join(BACKENDS)})")
    return bench_methods.MethodConfig(doc_encoder=doc_encoder, fuse_weight=fuse_weight,
                                      hyde_max_new_tokens=hyde_tokens, batch_size=batch_size, top_k=top_k,
                                      hyde_system_prompt=hyde_system_prompt, path=path, backend=backend)


def _encoder_loader(adapter: str | None, device: str | None):
    # Looked up at call time so tests can substitute a fake encoder.
    return lambda: bench_methods.load_bench_encoder(adapter, device)


def _table(title: str, header: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title, title_justify="left")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    return table


def _report(outcome: BenchOutcome, out: Path, as_json: bool, plot: bool) -> None:
    results = outcome.results
    files = write_results(results, out, outcome.explanations, with_plot=plot)
    if as_json:
        print_json({**results, "files": files})
        return
    for name, ds in results["datasets"].items():
        for n in ds["notes"]:
            console.print(f"[dim]{name}: {n}[/]", highlight=False)
    console.print(_table(f"{results['bench']} — {results['label']}", *summary_table(results)))
    if results["bench"] == "bright":
        console.print(_table("nDCG@10 ×100 per domain (paper rows: BRIGHT v1)", *bright_table(results)))
    for kind, path in files.items():
        console.print(f"{kind}: {path}", highlight=False, soft_wrap=True)


def _run(bench: str, datasets, label: str, *, methods: str, as_json: bool, out: Path, adapter, doc_encoder: str,
         limit, explain: bool, explain_tokens: int, batch_size: int, cache_dir, fuse_weight: float, top_k: int,
         hyde_tokens: int, device, plot: bool, quiet: bool, data_root=None, extra: dict | None = None,
         hyde_system_prompt: str | None = None, path: str = "product", backend: str = "faiss") -> None:
    progress.ENABLED = not quiet
    progress.silence_library_bars()
    outcome = run_benchmark(
        bench, datasets, bench_methods.parse_methods(methods if methods is not None else ",".join(
            bench_methods.METHODS if path == "product" else bench_methods.MATRIX_METHODS)),  # "": refused
        cfg=_config(doc_encoder, fuse_weight, hyde_tokens, batch_size, top_k, hyde_system_prompt, path, backend),
        encoder_loader=_encoder_loader(adapter, device), cache_root=cache_dir or default_cache_root(),
        label=label, limit=limit, explain=explain, explain_tokens=explain_tokens, adapter=adapter,
        data_root=data_root, extra_config={"command": _command_line(), **(extra or {})})
    _report(outcome, out, as_json, plot)


DEFAULT_OUT = Path("benchmarks/results")


@bench_app.command("beir")
@guarded
def beir(folder: Annotated[Path, typer.Argument(help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv")],
         split: Annotated[str, typer.Option("--split", help="qrels/<split>.tsv")] = "test",
         methods: Methods = None, as_json: Json = False, out: Out = DEFAULT_OUT, adapter: Adapter = None,
         doc_encoder: DocEncoder = "teacher", limit: Limit = None, explain: Explain = False,
         explain_tokens: ExplainTokens = 64, batch_size: BatchSize = 32, cache_dir: CacheDir = None,
         fuse_weight: FuseWeight = None, top_k: TopK = 100, hyde_tokens: HydeTokens = 128, device: Device = None,
         plot: Plot = True, quiet: Quiet = False, hyde_system_prompt: HydeSystem = None,
        path: SearchPath = "product", backend: Backend = "faiss") -> None:
    """Any BEIR-format folder (e.g. the shared CACM): nDCG@10, Recall@100, MRR@10."""
    common = {k: v for k, v in locals().items() if k not in ("folder", "split")}
    ds = bench_data.load_beir(folder, split)
    _run("beir", [ds], ds.name, **common, extra={"folder": str(folder), "split": split})


@bench_app.command("advbench-ir")
@guarded
def advbench_ir(
        distractors: Annotated[str, typer.Option("--distractors", help="Benign corpus mixed in: cacm | none | "
                                                                        "a BEIR folder | a .jsonl file")] = "cacm",
        variant: Annotated[str, typer.Option("--variant", help="all (1,796 chunks) | llm2vecgen (1,280)")] = "all",
        data_root: DataRoot = None, methods: Methods = None, as_json: Json = False, out: Out = DEFAULT_OUT,
        adapter: Adapter = None, doc_encoder: DocEncoder = "teacher", limit: Limit = None, explain: Explain = False,
        explain_tokens: ExplainTokens = 64, batch_size: BatchSize = 32, cache_dir: CacheDir = None,
        fuse_weight: FuseWeight = None, top_k: TopK = 100, hyde_tokens: HydeTokens = 128, device: Device = None,
        plot: Plot = True, quiet: Quiet = False, hyde_system_prompt: HydeSystem = None,
        path: SearchPath = "product", backend: Backend = "faiss") -> None:
    """AdvBench-IR safety: share of harmful queries whose harmful chunk is retrieved (lower is safer)."""
    common = {k: v for k, v in locals().items() if k not in ("distractors", "variant")}
    common["top_k"] = max(top_k, 100)  # top_k_acc@100 needs 100 ranked documents
    ds = bench_data.load_advbench_ir(data_root, distractors, variant)
    _run("advbench-ir", [ds], ds.name, **common, extra={"distractors": ds.meta["distractors"], "variant": variant})


@bench_app.command("bright")
@guarded
def bright(
        domain: Annotated[str, typer.Option("--domain", help="A domain, a comma list, or all")] = "all",
        data_dir: Annotated[Optional[Path], typer.Option("--data-dir", help="Local copy of HF xlangai/BRIGHT: "
                                                         "documents/<domain>-*.parquet (or <domain>.jsonl)")] = None,
        long: Annotated[bool, typer.Option("--long", help="Long documents (long_documents, gold_ids_long)")] = False,
        data_root: DataRoot = None, methods: Methods = None, as_json: Json = False, out: Out = DEFAULT_OUT,
        adapter: Adapter = None, doc_encoder: DocEncoder = "teacher", limit: Limit = None, explain: Explain = False,
        explain_tokens: ExplainTokens = 64, batch_size: BatchSize = 32, cache_dir: CacheDir = None,
        fuse_weight: FuseWeight = None, top_k: TopK = 100, hyde_tokens: HydeTokens = 128, device: Device = None,
        plot: Plot = True, quiet: Quiet = False, hyde_system_prompt: HydeSystem = None,
        path: SearchPath = "product", backend: Backend = "faiss") -> None:
    """BRIGHT (reasoning-intensive retrieval): nDCG@10 per domain + average, beside the paper's figures."""
    common = {k: v for k, v in locals().items() if k not in ("domain", "data_dir", "long")}
    domains = bench_data.bright_domains(domain)
    label = ("all" if len(domains) == 12 else "+".join(domains)) + ("-long" if long else "")
    _run("bright", bench_data.iter_bright(domains, data_root, data_dir, long), label, **common,
         extra={"domains": domains, "data_dir": str(data_dir) if data_dir else None, "long": long})


@bench_app.command("mteb")
@guarded
def mteb_cmd(
        task: Annotated[list[str], typer.Option("--task", help="mteb task name (repeatable); offline: cacm or "
                                                "beir:<folder> build a local retrieval task")],
        methods: Annotated[str, typer.Option("--methods", help="Query methods: teacher, hyde, hydeq, rkit, fused")]
        = "teacher,rkit,fused",
        data_root: DataRoot = None, as_json: Json = False, out: Out = DEFAULT_OUT, adapter: Adapter = None,
        doc_encoder: DocEncoder = "teacher", limit: Limit = None, batch_size: BatchSize = 32,
        fuse_weight: FuseWeight = None, hyde_tokens: HydeTokens = 128, device: Device = None, plot: Plot = True,
        quiet: Quiet = False) -> None:
    """Any mteb task through the mteb package; queries via the chosen method, documents via the doc encoder."""
    from retrieval_kit.bench.mteb_model import MTEB_METHODS, run_mteb

    progress.ENABLED = not quiet
    progress.silence_library_bars()
    outcome = run_mteb(task, bench_methods.parse_methods(methods, MTEB_METHODS),
                       cfg=_config(doc_encoder, fuse_weight, hyde_tokens, batch_size, 100),
                       encoder_loader=_encoder_loader(adapter, device), limit=limit, adapter=adapter, root=data_root,
                       extra_config={"command": _command_line()})
    _report(outcome, out, as_json, plot)


PERF_SUITE = Path("benchmarks") / "perf" / "__main__.py"


@bench_app.command("perf", options_metavar="[SUITE ARGS]...",
                   context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@guarded
def perf(ctx: typer.Context) -> None:
    """The performance suite (python -m benchmarks.perf), run from the root of a source checkout.

    Every argument goes to the suite unchanged: [--quick] [--only cli,encode,indexing,search,decode,training]
    [--device cuda] [--out DIR] [--workdir DIR]. Results: benchmarks/perf/README.md's table,
    benchmarks/perf/results/perf[-quick].json and the plot; timings are benchmarks, never tests."""
    import importlib

    from .common import fail

    root = Path.cwd()
    if not (root / PERF_SUITE).is_file():
        fail(f"rkit bench perf runs from a source checkout of rkit: {PERF_SUITE.parent} is not in {root} "
             "(cd to the repository root)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))  # the rkit script's own folder is on sys.path, the checkout is not
    try:
        suite = importlib.import_module("benchmarks.perf.__main__")
    except Exception as exc:  # a missing extra, a broken checkout: one line, not a traceback
        fail(f"rkit bench perf could not import benchmarks.perf from {root}: {type(exc).__name__}: {exc}")
    try:
        code = suite.main(list(ctx.args))
    except SystemExit as exc:  # argparse: --help, a bad argument (its own message is already printed)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    raise typer.Exit(code or 0)
