"""`rkit`: index a corpus, search it (with the query embedding read back as text), train, benchmark."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

# quiet the libraries before they are imported: our own progress bars and one-line errors are the interface
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bars too

import typer  # noqa: E402

from .common import OneLineUsageErrors, console, guarded, print_json, quiet_libraries, warn  # noqa: E402

app = typer.Typer(cls=OneLineUsageErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="rkit: retrieval with generative query embeddings.")


@app.command("index")
@guarded
def index_cmd(
    corpus: Path = typer.Argument(..., help="Folder of .txt/.md/.html/.pdf/.jsonl files, a single file, or a BEIR folder."),
    name: Optional[str] = typer.Option(None, "--name", "-n", help="Index name (default: the corpus folder's name); a name, not a path."),
    index_dir: Optional[Path] = typer.Option(None, "--index-dir", help="Index home (default ./indexes or $RKIT_INDEX_HOME)."),
    backend: Optional[str] = typer.Option(None, help="faiss (default for a new index) or qdrant."),
    factory: Optional[str] = typer.Option(None, help="FAISS index_factory string, e.g. Flat (default), HNSW32, IVF256,Flat."),
    search_params: Optional[str] = typer.Option(None, "--search-params",
                                                help="FAISS search-time knobs, e.g. efSearch=128 (HNSW) or nprobe=32 (IVF); "
                                                     "over the defaults (efSearch 64, nprobe 16), kept by later runs."),
    qdrant_url: Optional[str] = typer.Option(None, "--qdrant-url", help="Qdrant server/cluster URL (default: embedded local mode)."),
    adapter: Optional[str] = typer.Option(None, help="Adapter folder (default: the one shipped with rkit)."),
    doc_encoder: str = typer.Option("teacher", "--doc-encoder", help="teacher (input side, default) or generative."),
    query_mode: Optional[str] = typer.Option(None, "--query-mode", help="Default for searches: auto (= hybrid), hybrid, bm25, generative, teacher, fused."),
    fuse_weight: Optional[float] = typer.Option(None, "--fuse-weight",
                                                help="Weight of the generative vector in fused mode (default: the adapter's fitted weight)."),
    chunk_words: Optional[int] = typer.Option(None, "--chunk-words", help="Words per chunk (default 200; chunks are also capped by the document encoder's token window)."),
    overlap: Optional[int] = typer.Option(None, "--overlap", help="Words shared by consecutive chunks (default 40)."),
    skip_bad_files: bool = typer.Option(False, "--skip-bad-files", help="Warn about unreadable files instead of stopping."),
    wait: bool = typer.Option(False, "--wait", help="If another rkit index is writing this index, wait for it instead of exiting."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Delete this index's own files first and build it again from the corpus."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 … (default: cuda when present)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Index a corpus (incremental: unchanged files are skipped, changed re-embedded, deleted removed)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from retrieval_kit.errors import InputError
    from retrieval_kit.index.core import check_name
    from retrieval_kit.indexer import IndexSettings, index_corpus, parse_search_params
    from retrieval_kit.paths import index_home
    from retrieval_kit.search import adapter_path

    quiet_libraries()
    if not corpus.exists():
        raise InputError(f"corpus path does not exist: {corpus}")
    name = check_name(name if name is not None else corpus.resolve().name or "index")  # --name "" is refused
    folder = (index_dir or index_home()) / name
    settings = IndexSettings(backend=backend, factory=factory, qdrant_url=qdrant_url, doc_mode=doc_encoder,
                             query_mode=query_mode, fuse_weight=fuse_weight, chunk_words=chunk_words, overlap=overlap,
                             on_error="skip" if skip_bad_files else "raise",
                             search_params=parse_search_params(search_params))  # checked before any model loads
    adapter_folder, adapter_name = adapter_path(adapter)

    def load():
        from retrieval_kit.models import load_encoder

        return load_encoder(adapter_folder, device=device)

    columns = (TextColumn("embedding chunks"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=as_json) as bar:
        task = bar.add_task("embed", total=None)
        report = index_corpus(corpus, folder, load, adapter_name, settings, wait=wait, rebuild=rebuild,
                              progress=lambda done, total: bar.update(task, completed=done, total=total),
                              warn=lambda message: warn(f"skipped {message}"))
    if as_json:
        print_json(report.as_dict())
        return
    console.print(f"[bold]{report.index}[/] → {folder}  (encoder {report.encoder['fingerprint']})", highlight=False)
    console.print(f"  documents: {report.added} added, {report.updated} updated, {report.unchanged} unchanged, "
                  f"{report.deleted} deleted · {report.chunks_embedded} chunk{'' if report.chunks_embedded == 1 else 's'} "
                  f"embedded in {report.seconds:.1f}s")
    console.print(f"  now holds {report.total_documents} documents / {report.total_chunks} chunks; "
                  f"queries default to '{report.encoder['query_mode']}' mode")
    for note in report.notes:
        console.print(f"  note: {note}", highlight=False)


@app.command("search")
@guarded
def search_cmd(
    query: list[str] = typer.Argument(..., help="One or more queries."),
    index: str = typer.Option(..., "--index", "-i", help="Index name (under the index home) or a path such as ./kb."),
    index_dir: Optional[Path] = typer.Option(None, "--index-dir", help="Index home (default ./indexes or $RKIT_INDEX_HOME)."),
    k: int = typer.Option(5, "-k", "--top-k", min=1, max=1000, help="Hits per query."),
    explain: bool = typer.Option(False, "--explain", help="Also decode each query's generative embedding back into text."),
    explain_tokens: int = typer.Option(48, "--explain-tokens", min=1, max=512, help="Tokens to decode for --explain."),
    query_mode: Optional[str] = typer.Option(None, "--query-mode",
                                             help="hybrid (BM25 + teacher + fused, DBSF score fusion), bm25, generative, teacher or fused (default: the index's)."),
    fuse_weight: Optional[float] = typer.Option(None, "--fuse-weight",
                                                help="Fused mode: weight of the generative vector, 0-1 (default: the index's)."),
    signals: Optional[str] = typer.Option(None, "--signals",
                                          help="Hybrid mode: weight per signal, e.g. bm25=1,teacher=1 (default: bm25=1,teacher=1,fused=1)."),
    fusion: Optional[str] = typer.Option(None, "--fusion", help="Hybrid mode: rrf (rank fusion), dbsf (Qdrant's score fusion, mean ± 3σ) or convex (min-max scores); default: the recipe's (dbsf)."),
    source_prefix: Optional[str] = typer.Option(None, "--source-prefix", help="Only chunks whose source starts with this, e.g. security/."),
    file_type: Optional[str] = typer.Option(None, "--file-type", help="Only chunks of this file type, e.g. md."),
    adapter: Optional[str] = typer.Option(None, help="Adapter folder (default: the one the index was built with)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 … (default: cuda when present)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable hits + explanation."),
):
    """Search an index (read-only: safe while rkit index writes it)."""
    import re

    from retrieval_kit.errors import InputError
    from retrieval_kit.index import ChunkFilter
    from retrieval_kit.search import DEFAULT_HYBRID, SEARCH_MODES, HybridRecipe, Retriever

    quiet_libraries()
    if file_type is not None and not re.fullmatch(r"\.?[A-Za-z0-9]{1,10}", file_type):
        raise InputError(f"--file-type '{file_type}' is not a file type such as md or pdf")
    where = ChunkFilter(source_prefix or None, file_type or None) or None
    if query_mode is not None and query_mode not in SEARCH_MODES:
        raise InputError(f"unknown --query-mode '{query_mode}' (use {', '.join(SEARCH_MODES)})")
    # checked before any model loads
    if (signals is not None or fusion is not None) and query_mode not in (None, "hybrid"):  # else silently ignored
        raise InputError(f"--signals and --fusion apply to --query-mode hybrid, not {query_mode}")
    hybrid = HybridRecipe.parse(signals if signals is not None else DEFAULT_HYBRID.spec(), fusion)
    with Retriever.open(index, adapter=adapter, device=device, index_dir=index_dir, decoding=explain) as retriever:
        results = retriever.search(query, k=k, query_mode=query_mode, fuse_weight=fuse_weight,
                                   explain=explain, explain_tokens=explain_tokens, hybrid=hybrid, where=where)
        info = retriever.encoder.describe()
        if as_json:
            print_json({"index": index, "encoder": info, "results": [r.as_dict() for r in results]})
            return
        for result in results:
            _print_result(result, info, filtered=where is not None)


def _print_result(result, info: dict, filtered: bool = False) -> None:
    from rich.table import Table

    from retrieval_kit.search import snippet

    state = "trained adapter" if info["trained"] else "UNTRAINED stand-in adapter"
    console.print(f"\n[bold]{result.query}[/]  [dim]query mode: {result.query_mode} · {state} {info['fingerprint']}[/]")
    for note in result.notes:
        console.print(f"note: {note}", highlight=False, markup=False)
    if result.told is not None:  # with the faithfulness note and lenses the server shows too (search.explanation)
        _print_explanation(result.told, brief=True)
    if not result.hits:
        lexical = result.query_mode == "bm25"
        if filtered:
            why = "no chunk matches --source-prefix/--file-type" + (
                ", or none of those shares a word with the query" if lexical else "")
        else:
            why = "no chunk shares a word with the query" if lexical else "the index is empty"
        console.print(f"no hits ({why})", highlight=False)
        return
    table = Table(show_lines=False)
    table.add_column("#", no_wrap=True)
    table.add_column("score", no_wrap=True)
    table.add_column("source", no_wrap=True, overflow="ellipsis")
    table.add_column("found by (rank)", no_wrap=True)
    table.add_column("snippet", overflow="fold")
    for rank, hit in enumerate(result.hits, 1):
        found = " ".join(f"{name}:{r}" for name, r in hit.signals.items())
        table.add_row(str(rank), f"{hit.score:.3f}", f"{hit.source}#{hit.chunk_id.rsplit('#', 1)[-1]}",
                      found, snippet(hit.text, 160, query=result.query))
    console.print(table)


def _print_explanation(told: dict, brief: bool = False) -> None:
    """An explanation (search.explanation): the decode with its faithfulness note, then the lenses."""
    from rich.markup import escape

    text = escape(told["text"]) or "∅" if told.get("shown") else "[dim]not shown[/]"  # --json keeps the text
    console.print(f"[italic]explanation:[/] {text} [dim]({escape(told['note'])})[/]", highlight=False)
    lens = told.get("lens") or {}
    if lens.get("words"):
        words = ", ".join(f"{escape(w)} {p:.2f}" for w, p in lens["words"])
        console.print(f"[italic]logit lens[/] [dim](the backbone's next-token guess at the compression tokens):[/] {words}",
                      highlight=False)
    if lens.get("latent"):
        console.print("[italic]latent lens[/] [dim](nearest training-pool answers to the generative embedding):[/]")
        for near in lens["latent"]:
            console.print(f"  {near['cos']:.3f}  [dim]{escape(near['query'][:70])}[/] → {escape(near['answer'][:150])}",
                          highlight=False)
    elif lens and not brief:
        console.print("[dim]latent lens: this adapter has no answer bank (rkit train writes one; for an older adapter: "
                      "python -m retrieval_kit.train.bank --adapter DIR --queries FILE)[/]")
    if lens.get("logit") and not brief:
        from rich.table import Table

        table = Table(title="logit lens per special token (t: thought, c: compression)", show_lines=False)
        table.add_column("token", no_wrap=True)
        table.add_column("top next tokens (probability)", overflow="fold")
        for row in lens["logit"]:
            table.add_row(row["position"], "  ".join(f"{escape(repr(t))} {p:.2f}" for t, p in row["top"]))
        console.print(table)


@app.command("explain")
@guarded
def explain_cmd(
    query: list[str] = typer.Argument(..., help="One or more queries."),
    adapter: Optional[str] = typer.Option(None, help="Adapter folder (default: the one shipped with rkit)."),
    tokens: int = typer.Option(48, "--tokens", min=1, max=512, help="Tokens to decode."),
    top_k: int = typer.Option(5, "--top-k", min=1, max=50, help="Logit lens: tokens shown per position."),
    answers: int = typer.Option(3, "--answers", min=0, max=50, help="Latent lens: nearest bank answers shown."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 … (default: cuda when present)."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Read a query's generative embedding back: greedy decode (with how faithful this adapter's decodes are),
    logit lens and latent lens. Needs no index."""
    from retrieval_kit.errors import InputError
    from retrieval_kit.search import adapter_path, explain_all

    quiet_libraries()
    queries = [q.strip() for q in query]
    if not all(queries):
        raise InputError("empty query")
    folder, _ = adapter_path(adapter)  # checked before any model loads
    if folder is not None and not (folder / "config.json").is_file():
        raise InputError(f"--adapter {adapter}: not an adapter folder (no config.json)")
    from retrieval_kit.models import load_encoder

    encoder = load_encoder(folder if adapter is not None else None, device=device, decoding=True)
    told = explain_all(encoder, queries, encoder.decode(queries, max_new_tokens=tokens), top_k=top_k, answers=answers)
    info = encoder.describe()
    if as_json:
        print_json({"encoder": info, "results": [{"query": q, "explanation": t} for q, t in zip(queries, told)]})
        return
    for q, t in zip(queries, told):
        console.print(f"\n[bold]{q}[/]  [dim]adapter {info['fingerprint']} · backbone {info['backbone']}[/]", highlight=False)
        _print_explanation(t)


@app.command("info")
@guarded
def info_cmd(
    index: str = typer.Argument(..., help="Index name (under the index home) or a path such as ./kb."),
    index_dir: Optional[Path] = typer.Option(None, "--index-dir", help="Index home (default ./indexes or $RKIT_INDEX_HOME)."),
    as_json: bool = typer.Option(False, "--json"),
):
    """What an index holds: documents, chunks, dim, backend, encoder fingerprints (read-only)."""
    from retrieval_kit.search import open_index_info

    info = open_index_info(index, index_dir)
    if as_json:
        print_json(info)
        return
    enc = info.get("encoder", {})
    backend = info["backend"] + (f" ({info.get('factory')})" if info["backend"] == "faiss" else "")
    if info.get("exact_standin"):
        backend += " — exact search until there are enough vectors to train it"
    rows = [("folder", info["folder"]), ("backend", backend),
            ("documents", info["counts"]["documents"]), ("chunks", info["counts"]["chunks"]),
            ("vectors", info.get("vectors")), ("dim", info["dim"]), ("generation", info.get("generation")),
            ("lexical", _lexical_row(info.get("lexical") or {})),
            ("doc space", f"{enc.get('doc_fingerprint') or enc.get('fingerprint')} · embedded by {enc.get('doc_mode')}"),
            ("queries", f"encoder {enc.get('fingerprint')} · backbone {enc.get('backbone')} · teacher {enc.get('teacher')} · "
                        f"adapter {enc.get('adapter')} ({'trained' if enc.get('trained') else 'untrained'}) · "
                        f"default mode {enc.get('query_mode')}"),
            ("chunking", ", ".join(f"{k} {v}" for k, v in (info.get("chunking") or {}).items())),
            ("roots", ", ".join(info.get("corpus_roots") or []) or "-"),
            ("created", info.get("created")), ("updated", info.get("updated")),
            ("size", f"{info.get('size_bytes', 0) / 1e6:.1f} MB")]
    for key, value in rows:
        console.print(f"[bold]{key:>10}[/]  {value}", highlight=False)


def _lexical_row(lex: dict) -> str:
    if not lex.get("engine"):
        return lex.get("note") or "-"
    extra = f", avgdl {lex['avgdl']}" if "avgdl" in lex else ""
    return f"BM25 ({lex['engine']}, k1 {lex['k1']}, b {lex['b']}{extra}): {lex['chunks']} chunks"


@app.command("list")
@guarded
def list_cmd(index_dir: Optional[Path] = typer.Option(None, "--index-dir", help="Index home (default ./indexes or $RKIT_INDEX_HOME)."),
             as_json: bool = typer.Option(False, "--json")):
    """Indexes under the index home."""
    from rich.table import Table

    from retrieval_kit.index import list_indexes
    from retrieval_kit.paths import index_home

    home = index_dir or index_home()
    found = list_indexes(home)
    if as_json:
        print_json(found)
        return
    if not found:
        console.print(f"no indexes under {home} (build one: rkit index DOCS --name kb)", highlight=False)
        return
    table = Table()
    for col in ("name", "backend", "documents", "chunks", "dim", "encoder", "updated", "size"):
        table.add_column(col, no_wrap=True)
    for item in found:
        if "error" in item:
            table.add_row(item["name"], f"[red]{item['error']}[/]", "", "", "", "", "", "")
            continue
        backend = item["backend"] + (f" {item['factory']}" if item.get("factory") else "") + (
            f" {item['qdrant_url']}" if item.get("qdrant_url") else "")
        table.add_row(item["name"], backend, str(item["documents"]), str(item["chunks"]), str(item["dim"]),
                      item["encoder"], str(item["updated"]), f"{item['size_bytes'] / 1e6:.1f} MB")
    console.print(table)


from .bench import bench_app  # noqa: E402
from .serve import serve as serve_cmd  # noqa: E402
from .train import train as train_cmd  # noqa: E402

app.command("train")(train_cmd)
app.command("serve")(serve_cmd)
app.add_typer(bench_app, name="bench", help="Benchmarks: bright, advbench-ir, beir, mteb; perf (the performance suite, from a source checkout).")

if __name__ == "__main__":
    app()
