"""Build or update an index from a corpus: files → chunks → document vectors → index.

Order of work, so that mistakes cost seconds and nothing already indexed is lost:
1. read and validate every file (all bad files are reported at once), before any model loads;
2. take the index's writer lock and check the settings against the index (a second writer fails here);
3. load the encoder (the caller's ``load_encoder``), chunk by its document tokenizer, embed what changed;
4. write whole documents per transaction, prune what vanished from this corpus root, save.

Incremental: a document is re-embedded when its content hash changes or when the chunking recipe
changed; documents are owned by the corpus root they were read from, so two folders can feed one index
without overwriting each other, and pruning only ever removes documents of the root being indexed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from .corpus import Chunk, Document, chunk_document, embed_text, read_documents
from .errors import IndexError_, InputError
from .index import Index
from .index.core import MANIFEST, check_name, existing_index, read_manifest, remove_index
from .index.faiss_backend import SEARCH_PARAMS, check_search_params, default_params, describe_params
from .search import DEFAULT_MODE, SEARCH_MODES
from .modes import DOC_MODES

if TYPE_CHECKING:
    from .models import GenerativeEncoder

EMBED_BATCH_CHUNKS = 256  # chunks embedded and written per step: bounds memory, keeps progress moving
QUERY_MODE_CHOICES = ("auto",) + SEARCH_MODES
DEFAULTS = {"backend": "faiss", "factory": "Flat", "chunk_words": 200, "overlap": 40}


@dataclass
class IndexSettings:
    """What the user asked for. None: keep what the index already records (or the default for a new index)."""

    backend: str | None = None
    factory: str | None = None
    qdrant_url: str | None = None
    doc_mode: str = "teacher"  # documents embedded input-side by the teacher (cheap) or by the generative encoder
    query_mode: str | None = None  # default for searches; auto: see resolve_query_mode
    fuse_weight: float | None = None  # None: the adapter's fitted weight
    chunk_words: int | None = None
    overlap: int | None = None
    on_error: str = "raise"
    prune: bool = True  # remove documents that vanished from this corpus root
    search_params: dict | None = None  # FAISS search-time knobs (efSearch, nprobe) over the factory's defaults


def parse_search_params(spec: str | None) -> dict | None:
    """``efSearch=128,nprobe=32`` → {"efSearch": 128, "nprobe": 32} (names case-insensitive); InputError naming
    what is wrong. Which names a factory takes is checked against it (``check_search_params``)."""
    if spec is None:
        return None
    canonical = {name.lower(): name for name in SEARCH_PARAMS}
    params: dict[str, int] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        key, sep, value = (x.strip() for x in part.partition("="))
        name = canonical.get(key.lower())
        if not sep:
            raise InputError(f"--search-params: '{part}' is not name=value (e.g. efSearch=128,nprobe=32)")
        if name is None:
            raise InputError(f"--search-params: unknown '{part}' (use name=value with {' or '.join(SEARCH_PARAMS)}, "
                             "e.g. efSearch=128,nprobe=32)")
        if not value.isdecimal() or int(value) < 1:  # int() takes exactly the decimal digits (no sign, no "_")
            raise InputError(f"--search-params: {name} must be a positive integer, got '{value}'")
        params[name] = int(value)
    if not params:
        raise InputError("--search-params is empty (use e.g. efSearch=128 or nprobe=32)")
    return params


@dataclass
class IndexReport:
    index: str
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    chunks_embedded: int = 0
    total_documents: int = 0
    total_chunks: int = 0
    seconds: float = 0.0
    encoder: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # settings changes, moves, stand-ins: said once, plainly

    def as_dict(self) -> dict:
        return asdict(self)


def resolve_query_mode(mode: str | None) -> str:
    """auto: hybrid (chosen by retrieval on tune data, see search.DEFAULT_MODE); it keeps only BM25 and teacher
    signals for the untrained stand-in."""
    return DEFAULT_MODE if mode in (None, "auto") else mode


def encoder_record(encoder: GenerativeEncoder, adapter: str, doc_mode: str, query_mode: str | None,
                   fuse_weight: float | None) -> dict:
    """What the manifest remembers about the encoder: enough to reload it and to refuse a different one."""
    return {
        **encoder.describe(),
        "doc_fingerprint": encoder.doc_fingerprint(doc_mode),
        "adapter": adapter,
        "doc_mode": doc_mode,
        "query_mode": resolve_query_mode(query_mode),
        "fuse_weight": encoder.config.fuse_weight if fuse_weight is None else fuse_weight,
    }


def chunk_recipe(encoder: GenerativeEncoder, doc_mode: str, chunk_words: int, overlap: int) -> dict:
    """Everything chunk boundaries depend on; a change re-chunks and re-embeds every document."""
    return {"chunk_words": chunk_words, "overlap": overlap, "max_tokens": _max_tokens(encoder, doc_mode),
            "tokenizer": encoder.doc_fingerprint("teacher") if doc_mode == "teacher" else encoder.config.backbone}


def check_settings(settings: IndexSettings) -> None:
    """Flags that are wrong whatever the corpus: checked before anything is read or loaded."""
    if settings.doc_mode not in DOC_MODES:
        raise InputError(f"unknown --doc-encoder '{settings.doc_mode}' (use {' or '.join(DOC_MODES)})")
    if settings.query_mode is not None and settings.query_mode not in QUERY_MODE_CHOICES:
        raise InputError(f"unknown --query-mode '{settings.query_mode}' (use {', '.join(QUERY_MODE_CHOICES)})")
    if settings.backend is not None and settings.backend not in ("faiss", "qdrant"):
        raise InputError(f"unknown --backend '{settings.backend}' (use faiss or qdrant)")
    if settings.qdrant_url and settings.backend not in (None, "qdrant"):
        raise InputError("--qdrant-url is for --backend qdrant")
    if settings.factory is not None and settings.backend == "qdrant":
        raise InputError("--factory is for the faiss backend")
    if settings.search_params is not None and settings.backend == "qdrant":
        raise InputError("--search-params is for the faiss backend (efSearch, nprobe); Qdrant indexes have none")
    if settings.fuse_weight is not None and not 0 <= settings.fuse_weight <= 1:
        raise InputError(f"--fuse-weight must be between 0 and 1, got {settings.fuse_weight}")
    words = settings.chunk_words if settings.chunk_words is not None else DEFAULTS["chunk_words"]
    overlap = settings.overlap if settings.overlap is not None else DEFAULTS["overlap"]
    if words < 1:
        raise InputError(f"--chunk-words must be at least 1, got {words}")
    if not 0 <= overlap < words:
        raise InputError(f"--overlap must be from 0 to --chunk-words - 1 ({words - 1}), got {overlap}")


def index_corpus(corpus: str | Path, folder: Path, load_encoder: Callable[[], GenerativeEncoder], adapter: str,
                 settings: IndexSettings, progress=None, *, wait: float | bool = False,
                 rebuild: bool = False, warn: Callable[[str], None] | None = None) -> IndexReport:
    """Bring the index in ``folder`` in step with ``corpus`` (creating it if needed).

    ``load_encoder`` is called only once the corpus is read and the index is locked and checked.
    ``progress(done, total)`` is called as chunks embed; ``warn(message)`` for every skipped bad file.
    """
    start = time.perf_counter()
    check_settings(settings)
    check_name(Path(folder).name)
    kept = None
    if rebuild:
        settings, kept = _recorded_settings(Path(folder), settings)
    if settings.search_params is not None and (rebuild or not _exists(folder)):
        # a new index (or the one --rebuild makes) gets this factory: check its knobs before anything is removed
        check_search_params(settings.search_params, settings.factory or DEFAULTS["factory"])
    docs, root, not_indexed = _read(corpus, settings.on_error, warn)
    if rebuild:
        remove_index(folder, wait=wait)
    index = Index.open(folder, writable=True, wait=wait) if _exists(folder) else None
    try:
        if index is not None:
            _check_against_index(index, settings)
        encoder = load_encoder()
        if index is None:
            try:
                index = _create(folder, encoder, adapter, settings, wait)
            except IndexError_:
                if not (folder / MANIFEST).is_file():
                    raise
                index = Index.open(folder, writable=True, wait=wait)  # another run created it meanwhile
                _check_against_index(index, settings)
        report = IndexReport(index=index.name)
        if kept:
            report.notes.append(f"rebuilt with the settings the old index recorded: {kept}")
        if not_indexed:
            report.notes.append(not_indexed)
        _adopt_encoder(index, encoder, adapter, settings)
        recipe = chunk_recipe(encoder, settings.doc_mode, *_chunking(index, settings))
        rechunk = index.manifest.get("chunking") != recipe and index.count_documents() > 0
        _check_roots(index, docs, root, rechunk, report)
        if settings.factory is not None and settings.factory != index.manifest.get("factory"):
            params = _factory_params(index, settings)
            knobs = f", search params {describe_params(params)}" if params else ""
            report.notes.append(f"factory changed from {index.manifest.get('factory')} to {settings.factory}: "
                                f"rebuilt from the stored vectors (nothing re-embedded){knobs}")
            index.set_factory(settings.factory, params)
        elif settings.search_params is not None:
            _set_search_params(index, settings.search_params, report)
        if rechunk:
            report.notes.append(f"chunking changed ({_describe_recipe(index.manifest.get('chunking'))} → "
                                f"{_describe_recipe(recipe)}): re-chunking and re-embedding every document")
        index.manifest["chunking"] = recipe

        known = index.doc_hashes()
        changed = [d for d in docs if rechunk or known.get(d.doc_id) != d.content_hash]
        report.updated = sum(d.doc_id in known for d in changed)
        report.added = len(changed) - report.updated
        report.unchanged = len(docs) - len(changed)
        chunks = _chunk(changed, encoder, settings.doc_mode, recipe)
        report.chunks_embedded = _embed_and_write(index, encoder, changed, chunks, settings.doc_mode, root, progress)
        if settings.prune:
            present = {d.doc_id for d in docs}
            gone = [d for d, r in index.doc_roots().items() if r == root and d not in present]
            report.deleted = index.delete_documents(gone)
        roots = index.manifest.setdefault("corpus_roots", [])
        if root not in roots:
            roots.append(root)
        index.save()
        if index.backend.standin:
            report.notes.append(f"factory {index.manifest['factory']} needs more vectors to train than the "
                                f"{index.count_chunks()} stored: exact search serves until there are enough")
        report.total_documents, report.total_chunks = index.count_documents(), index.count_chunks()
        report.encoder = index.manifest["encoder"]
    finally:
        if index is not None:
            index.close()
    report.seconds = round(time.perf_counter() - start, 3)
    return report


# -- steps ------------------------------------------------------------------------------------
def _read(corpus, on_error: str, warn) -> tuple[list[Document], str, str | None]:
    """(documents, corpus root, a note on the files found but not indexed: empty ones, other types)."""
    import warnings

    from .corpus.readers import CorpusNotice, CorpusWarning, EmptyFileNotice

    path = Path(corpus)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CorpusWarning)
        warnings.simplefilter("always", CorpusNotice)
        docs = read_documents(path, on_error=on_error)
    empty, other = [], []
    for w in caught:
        if issubclass(w.category, CorpusWarning) and warn is not None:
            warn(str(w.message))
        elif issubclass(w.category, CorpusNotice):
            (empty if issubclass(w.category, EmptyFileNotice) else other).append(str(w.message))
    parts = other + ([f"{len(empty)} empty file{'s' if len(empty) > 1 else ''} ({', '.join(empty[:3])}"
                      f"{', …' if len(empty) > 3 else ''})"] if empty else [])
    # a single file's documents are keyed by its name, a folder's by paths relative to it: the root owns them
    return docs, str(path.resolve()), ("not indexed: " + "; ".join(parts)) if parts else None


def _exists(folder: Path) -> bool:
    """An index to update (a folder that is not rkit's is refused now, before any model loads)."""
    return existing_index(folder) and ((folder / MANIFEST).is_file() or (folder / "docs.sqlite").is_file())


def _check_against_index(index: Index, settings: IndexSettings) -> None:
    """Settings an existing index cannot take without a new index: said before any model loads."""
    m = index.manifest
    if settings.backend is not None and settings.backend != m["backend"]:
        raise IndexError_(f"{index.label} uses the {m['backend']} backend, not {settings.backend}; "
                          "build a new index for it (another --name), or pass --rebuild to replace this one")
    url = (m.get("qdrant") or {}).get("url")
    if settings.qdrant_url is not None and settings.qdrant_url != url:
        raise IndexError_(f"{index.label} lives at {url or 'local mode'}, not {settings.qdrant_url}; "
                          "use another --name for another Qdrant")
    if settings.factory is not None and m["backend"] != "faiss":
        raise InputError(f"{index.label} uses the qdrant backend; --factory is for faiss indexes")
    if settings.search_params is not None:
        if m["backend"] != "faiss":
            raise InputError(f"{index.label} uses the qdrant backend; --search-params is for faiss indexes")
        check_search_params(settings.search_params, settings.factory or m["factory"])
    stored = (m.get("encoder") or {}).get("doc_mode")
    if stored and stored != settings.doc_mode:
        raise IndexError_(f"{index.label} embeds documents with '{stored}', not '{settings.doc_mode}'; "
                          "use a new --name (or --rebuild) to change it")


def _recorded_settings(folder: Path, settings: IndexSettings) -> tuple[IndexSettings, str | None]:
    """``--rebuild`` empties the folder: the flags left out take what the old index recorded (settings are the
    index's), where its manifest still reads; a broken one (what --rebuild is the way out of) gives the defaults.
    Returns the settings and a description of what was carried over (None: nothing)."""
    try:
        manifest = read_manifest(folder)
    except IndexError_:
        return settings, None
    chunking, qdrant = manifest.get("chunking") or {}, manifest.get("qdrant") or {}
    recorded = {"backend": manifest.get("backend"), "factory": manifest.get("factory"), "qdrant_url": qdrant.get("url"),
                "query_mode": (manifest.get("encoder") or {}).get("query_mode"),
                "chunk_words": chunking.get("chunk_words"), "overlap": chunking.get("overlap"),
                "search_params": manifest.get("faiss_params")}
    if settings.backend not in (None, recorded["backend"]):  # another backend: its own defaults, not the old knobs
        recorded.update(factory=None, qdrant_url=None, search_params=None)
    elif settings.factory is not None and recorded["search_params"]:  # another factory: the knobs it takes
        takes = default_params(settings.factory)
        recorded["search_params"] = {k: v for k, v in recorded["search_params"].items() if k in takes} or None
    kept = {name: value for name, value in recorded.items() if value is not None and getattr(settings, name) is None}
    shown = [f"{name.replace('_', ' ')} {describe_params(value) if name == 'search_params' else value}"
             for name, value in kept.items()]
    return replace(settings, **kept), ", ".join(shown) or None


def _create(folder: Path, encoder: GenerativeEncoder, adapter: str, settings: IndexSettings, wait) -> Index:
    record = encoder_record(encoder, adapter, settings.doc_mode, settings.query_mode, settings.fuse_weight)
    factory = settings.factory or DEFAULTS["factory"]
    params = None if settings.search_params is None else {**default_params(factory), **settings.search_params}
    return Index.create(folder, dim=encoder.config.embed_dim, backend=settings.backend or DEFAULTS["backend"],
                        factory=factory, qdrant_url=settings.qdrant_url, faiss_params=params,
                        encoder=record, name=folder.name, wait=wait)


def _stored_params(index: Index) -> dict:
    """The search knobs the index records (an index from before they were recorded: its factory's defaults)."""
    stored = index.manifest.get("faiss_params")
    return dict(stored) if stored is not None else default_params(index.manifest["factory"])


def _factory_params(index: Index, settings: IndexSettings) -> dict:
    """Knobs for a new factory: its defaults, then what the index recorded that it still takes, then the flag."""
    defaults = default_params(settings.factory)
    kept = {k: v for k, v in _stored_params(index).items() if k in defaults}
    return {**defaults, **kept, **(settings.search_params or {})}


def _set_search_params(index: Index, params: dict, report: IndexReport) -> None:
    """--search-params on an existing index: merged over what it records, said when it changes anything."""
    old = _stored_params(index)
    new = {**old, **params}
    if new != index.manifest.get("faiss_params"):
        if new != old:
            report.notes.append(f"search params changed from {describe_params(old)} to {describe_params(new)} "
                                "(applied at search time; nothing re-embedded or rebuilt)")
        index.set_search_params(new)


def _adopt_encoder(index: Index, encoder: GenerativeEncoder, adapter: str, settings: IndexSettings) -> None:
    """Refuse an encoder whose documents live in another space; otherwise record it as the index's query encoder."""
    index.check_document_space(encoder.doc_fingerprint(settings.doc_mode), encoder.config.embed_dim)
    old = index.manifest.get("encoder") or {}
    query_mode = settings.query_mode if settings.query_mode is not None else old.get("query_mode")
    fuse = settings.fuse_weight if settings.fuse_weight is not None else (
        old.get("fuse_weight") if old.get("fingerprint") == encoder.fingerprint else None)
    index.manifest["encoder"] = encoder_record(encoder, adapter, settings.doc_mode, query_mode, fuse)


def _chunking(index: Index, settings: IndexSettings) -> tuple[int, int]:
    stored = index.manifest.get("chunking") or {}
    words = settings.chunk_words if settings.chunk_words is not None else stored.get("chunk_words", DEFAULTS["chunk_words"])
    overlap = settings.overlap if settings.overlap is not None else stored.get("overlap", DEFAULTS["overlap"])
    if not 0 <= overlap < words:
        raise InputError(f"--overlap must be from 0 to --chunk-words - 1 ({words - 1}), got {overlap}")
    return int(words), int(overlap)


def _check_roots(index: Index, docs: list[Document], root: str, rechunk: bool, report: IndexReport) -> None:
    """Documents belong to the corpus root they came from. Refuse id clashes with another root; adopt a moved root."""
    roots = index.manifest.setdefault("corpus_roots", [])
    owners = index.doc_roots()
    if "" in owners.values() and len(roots) <= 1:  # written before documents recorded their root
        index.move_root("", roots[0] if roots else root)
        owners = index.doc_roots()
    if root not in roots and len(roots) == 1 and not Path(roots[0]).exists():
        moved = index.move_root(roots[0], root)
        report.notes.append(f"corpus root {roots[0]} no longer exists: its {moved} documents now belong to {root}")
        roots[:] = [root]
        owners = index.doc_roots()
    clashes = [d.doc_id for d in docs if owners.get(d.doc_id, root) not in (root, "")]
    if clashes:
        other = owners[clashes[0]]
        raise IndexError_(f"{index.label}: {len(clashes)} document id(s) of {root} are already indexed from {other} "
                          f"(e.g. '{clashes[0]}'); index their common parent folder instead, or use another --name")
    others = sorted({r for r in owners.values() if r != root})
    if rechunk and others:
        raise IndexError_(f"{index.label}: the chunking changed but documents of other corpus roots "
                          f"({', '.join(others)}) would keep the old one; "
                          "re-index with the old --chunk-words/--overlap, or build a new index (--rebuild)")


def _max_tokens(encoder: GenerativeEncoder, doc_mode: str) -> int | None:
    if doc_mode == "teacher" and encoder.teacher is not None:
        return int(encoder.teacher.max_seq_length)
    return int(encoder.config.max_query_tokens)


def _tokenizer(encoder: GenerativeEncoder, doc_mode: str):
    return encoder.teacher.tokenizer if doc_mode == "teacher" and encoder.teacher is not None else encoder.tokenizer


def _chunk(docs: list[Document], encoder: GenerativeEncoder, doc_mode: str, recipe: dict) -> list[Chunk]:
    tokenizer = _tokenizer(encoder, doc_mode)
    return [c for d in docs for c in chunk_document(d, chunk_words=recipe["chunk_words"], overlap=recipe["overlap"],
                                                   tokenizer=tokenizer, max_tokens=recipe["max_tokens"])]


def _describe_recipe(recipe: dict | None) -> str:
    recipe = recipe or {}
    cap = f", ≤{recipe['max_tokens']} tokens" if recipe.get("max_tokens") else ""
    return f"{recipe.get('chunk_words', '?')} words, overlap {recipe.get('overlap', '?')}{cap}"


def _embed_and_write(index: Index, encoder: GenerativeEncoder, changed: list[Document], chunks: list[Chunk],
                     doc_mode: str, root: str, progress) -> int:
    """Embed the chunks of changed documents in bounded batches and write whole documents at a time."""
    by_doc: dict[str, list[Chunk]] = {}
    for c in chunks:
        by_doc.setdefault(c.doc_id, []).append(c)
    total = len(chunks)
    done = pending_chunks = 0
    pending: list[Document] = []
    # documents of like chunk length flushed together: the encoder pads each batch to its longest text, and a
    # flush of mixed lengths embedded 2,000 one-chunk documents in 28 s instead of 21 s (benchmarks/perf, indexing)
    mean_chars = {d.doc_id: sum(len(c.text) for c in by_doc.get(d.doc_id, [])) / max(1, len(by_doc.get(d.doc_id, [])))
                  for d in changed}
    for doc in sorted(changed, key=lambda d: -mean_chars[d.doc_id]):
        pending.append(doc)
        pending_chunks += len(by_doc.get(doc.doc_id, []))
        if pending_chunks >= EMBED_BATCH_CHUNKS:
            done += _flush(index, encoder, pending, by_doc, doc_mode, root)
            pending, pending_chunks = [], 0
            if progress:
                progress(done, total)
    done += _flush(index, encoder, pending, by_doc, doc_mode, root)
    if progress:
        progress(done, total)
    return done


def _flush(index: Index, encoder: GenerativeEncoder, docs: list[Document], by_doc: dict, doc_mode: str,
           root: str) -> int:
    if not docs:
        return 0
    flat = [c for d in docs for c in by_doc.get(d.doc_id, [])]
    vectors = (encoder.encode_documents([embed_text(c) for c in flat], mode=doc_mode) if flat
               else np.zeros((0, encoder.config.embed_dim), np.float32))
    items, start = [], 0
    for d in docs:
        own = by_doc.get(d.doc_id, [])
        rows = [{"chunk_id": c.chunk_id, "n": c.n, "text": c.text, "title": c.title, "source": c.source,
                 "metadata": c.metadata} for c in own]
        items.append((d.doc_id, d.content_hash, d.source, rows, vectors[start : start + len(own)]))
        start += len(own)
    index.upsert_documents(items, root=root)
    return len(flat)
