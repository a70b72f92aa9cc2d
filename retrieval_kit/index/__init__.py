"""Vector indexes: a FAISS or Qdrant backend, a SQLite doc store and a manifest per folder.

This package knows nothing of models: float32 vectors (L2-normalised by the caller) go in,
chunk ids and inner-product scores come out. See ``indexes/README.md`` for the folder format.

    with Index.create("indexes/kb", dim=768, encoder={"doc_fingerprint": fp}) as index:   # the one writer
        index.upsert_documents([(doc_id, content_hash, source, chunks, vectors), ...])
    with Index.open("indexes/kb", writable=True) as index:                                # a later writer
        index.delete_documents([doc_id])
    with Index.open("indexes/kb") as index:                                               # any number of readers
        index.check_document_space(fp, 768)
        hits = index.search(query_vectors, k=10)
"""

from .base import ChunkFilter, Hit, VectorBackend
from .core import FORMAT_VERSION, DocumentUpdate, Index, list_indexes, read_manifest
from .faiss_backend import FaissBackend

__all__ = [
    "ChunkFilter",
    "FORMAT_VERSION",
    "DocumentUpdate",
    "FaissBackend",
    "Hit",
    "Index",
    "QdrantBackend",
    "VectorBackend",
    "list_indexes",
    "read_manifest",
]


def __getattr__(name: str):
    # qdrant-client costs ~1 s to import: loaded when a Qdrant index is opened, or this name is asked for
    if name == "QdrantBackend":
        from .qdrant_backend import QdrantBackend

        return QdrantBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
