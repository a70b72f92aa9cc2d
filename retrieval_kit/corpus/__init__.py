"""Corpus ingestion: folders, BEIR folders and files (.txt .md .html .pdf .jsonl) → Documents → Chunks.

Knows nothing of models or indexes (a tokenizer, when chunking by tokens, is passed in). Bad input raises one
CorpusError for the whole run, one line naming the bad files; its `errors` attribute lists them all.
"""

from .document import Chunk, Document, chunk_document, embed_text
from .loader import SUPPORTED_SUFFIXES, load_corpus, read_corpus, read_documents
from .readers import CorpusWarning

__all__ = ["Chunk", "CorpusWarning", "Document", "SUPPORTED_SUFFIXES", "chunk_document", "embed_text",
           "load_corpus", "read_corpus", "read_documents"]
