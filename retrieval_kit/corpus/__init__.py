"""Corpus ingestion: folders, BEIR folders and files (.txt .md .html .pdf .jsonl) → Documents → Chunks.

Knows nothing of models or indexes. Bad input raises CorpusError with a one-line message naming the file.
"""

from .document import Chunk, Document, chunk_document
from .loader import SUPPORTED_SUFFIXES, load_corpus, read_corpus
from .readers import CorpusWarning

__all__ = ["Chunk", "CorpusWarning", "Document", "SUPPORTED_SUFFIXES", "chunk_document", "load_corpus",
           "read_corpus"]
