"""Build or update an index from a corpus: files → chunks → document vectors → index.

Incremental: a document whose content hash is unchanged is skipped, a changed one is re-embedded and
replaces its old chunks, and a document that disappeared from the corpus root is removed. The whole corpus
is read and validated before the index is touched, so a bad file never costs what is already indexed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .corpus import Chunk, Document, load_corpus
from .errors import IndexError_, InputError
from .index import Index
from .models import GenerativeEncoder

EMBED_BATCH_CHUNKS = 256  # chunks embedded and written per step: bounds memory, keeps progress moving


@dataclass
class IndexSettings:
    backend: str = "faiss"
    factory: str = "Flat"
    qdrant_url: str | None = None
    doc_mode: str = "teacher"  # documents embedded input-side by the teacher (cheap) or by the generative encoder
    query_mode: str = "auto"  # what `search` uses unless told otherwise; auto: see resolve_query_mode
    fuse_weight: float | None = None  # None: the adapter's fitted weight
    chunk_words: int = 200
    overlap: int = 40
    on_error: str = "raise"
    prune: bool = True  # remove documents that vanished from this corpus root


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

    def as_dict(self) -> dict:
        return asdict(self)


def resolve_query_mode(mode: str, encoder: GenerativeEncoder) -> str:
    """auto: the mode the trainer found best on held-out queries; for adapters that predate that record, generative
    iff trained; teacher for the untrained stand-in."""
    if mode == "auto":
        if not encoder.config.trained:
            return "teacher"
        return encoder.config.query_mode or "generative"
    return mode


def encoder_record(encoder: GenerativeEncoder, adapter: str, settings: IndexSettings) -> dict:
    """What the manifest remembers about the encoder: enough to reload it and to refuse a different one."""
    return {
        **encoder.describe(),
        "adapter": adapter,
        "doc_mode": settings.doc_mode,
        "query_mode": resolve_query_mode(settings.query_mode, encoder),
        "fuse_weight": encoder.config.fuse_weight if settings.fuse_weight is None else settings.fuse_weight,
    }


def chunk_text(chunk: Chunk) -> str:
    """Text embedded for a chunk: the title gives short chunks their context."""
    if chunk.title and not chunk.text.startswith(chunk.title):
        return f"{chunk.title}\n{chunk.text}"
    return chunk.text


def index_corpus(corpus: str | Path, folder: Path, encoder: GenerativeEncoder, adapter: str,
                 settings: IndexSettings, progress=None) -> IndexReport:
    """Create `folder` if needed and bring it in step with `corpus`. `progress(done, total)` is called as chunks embed."""
    start = time.perf_counter()
    docs, chunks = load_corpus(corpus, chunk_words=settings.chunk_words, overlap=settings.overlap,
                               on_error=settings.on_error)
    root = str(Path(corpus).resolve())
    index = _open_or_create(folder, encoder, adapter, settings)
    report = IndexReport(index=index.name, encoder=index.manifest["encoder"])
    try:
        known = index.doc_hashes()
        changed = [d for d in docs if known.get(d.doc_id) != d.content_hash]
        report.updated = sum(d.doc_id in known for d in changed)
        report.added = len(changed) - report.updated
        report.unchanged = len(docs) - len(changed)
        _embed_and_write(index, encoder, changed, chunks, settings.doc_mode, progress, report)
        roots = index.manifest.setdefault("corpus_roots", [])
        if settings.prune and roots == [root]:
            # ids are root-relative, so only an index fed from this one root can tell what vanished
            present = {d.doc_id for d in docs}
            report.deleted = index.delete_documents([d for d in known if d not in present])
        if root not in roots:
            index.manifest["corpus_roots"].append(root)
        index.save()
        report.total_documents, report.total_chunks = index.count_documents(), index.count_chunks()
    finally:
        index.close()
    report.seconds = round(time.perf_counter() - start, 3)
    return report


def _open_or_create(folder: Path, encoder: GenerativeEncoder, adapter: str, settings: IndexSettings) -> Index:
    record = encoder_record(encoder, adapter, settings)
    if (folder / "manifest.json").is_file():
        index = Index.open(folder)
        try:
            index.check_encoder(encoder.fingerprint, encoder.config.embed_dim)
            stored = index.manifest["encoder"].get("doc_mode")
            if stored != settings.doc_mode:
                raise IndexError_(f"index '{index.name}' embeds documents with '{stored}', not '{settings.doc_mode}'; "
                                  "use a new --name to change it")
        except BaseException:
            index.close()
            raise
        return index
    if settings.backend not in ("faiss", "qdrant"):
        raise InputError(f"unknown backend '{settings.backend}' (use faiss or qdrant)")
    chunking = {"chunk_words": settings.chunk_words, "overlap": settings.overlap}
    return Index.create(folder, dim=encoder.config.embed_dim, backend=settings.backend, factory=settings.factory,
                        qdrant_url=settings.qdrant_url, encoder=record, chunking=chunking, name=folder.name)


def _embed_and_write(index: Index, encoder: GenerativeEncoder, changed: list[Document], chunks: list[Chunk],
                     doc_mode: str, progress, report: IndexReport) -> None:
    """Embed the chunks of changed documents in bounded batches and write whole documents at a time."""
    wanted = {d.doc_id: d for d in changed}
    by_doc: dict[str, list[Chunk]] = {}
    for c in chunks:
        if c.doc_id in wanted:
            by_doc.setdefault(c.doc_id, []).append(c)
    total = sum(len(v) for v in by_doc.values())
    done = pending_chunks = 0
    pending: list[Document] = []
    for doc in changed:
        pending.append(doc)
        pending_chunks += len(by_doc.get(doc.doc_id, []))
        if pending_chunks >= EMBED_BATCH_CHUNKS:
            done += _flush(index, encoder, pending, by_doc, doc_mode)
            pending, pending_chunks = [], 0
            if progress:
                progress(done, total)
    done += _flush(index, encoder, pending, by_doc, doc_mode)
    if progress:
        progress(done, total)
    report.chunks_embedded = done


def _flush(index: Index, encoder: GenerativeEncoder, docs: list[Document], by_doc: dict, doc_mode: str) -> int:
    if not docs:
        return 0
    flat = [c for d in docs for c in by_doc.get(d.doc_id, [])]
    vectors = encoder.encode_documents([chunk_text(c) for c in flat], mode=doc_mode) if flat else np.zeros((0, encoder.config.embed_dim), np.float32)
    items, start = [], 0
    for d in docs:
        own = by_doc.get(d.doc_id, [])
        rows = [{"chunk_id": c.chunk_id, "n": c.n, "text": c.text, "title": c.title, "source": c.source,
                 "metadata": c.metadata} for c in own]
        items.append((d.doc_id, d.content_hash, d.source, rows, vectors[start : start + len(own)]))
        start += len(own)
    index.upsert_documents(items)
    return len(flat)
