"""Documents and chunks: the only two shapes the rest of rkit sees of a corpus."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from ..errors import CorpusError

_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Document:
    doc_id: str  # root-relative '/' path (folders) or the record's id (jsonl/BEIR): stable across runs and machines
    text: str
    title: str = ""
    source: str = ""  # the file it came from
    metadata: dict = field(default_factory=dict, hash=False)  # JSON-serialisable extras (other jsonl fields)

    @property
    def content_hash(self) -> str:
        """sha256 of title and text: the indexer re-embeds a document only when this changes."""
        return hashlib.sha256(f"{self.title}\n{self.text}".encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Chunk:
    chunk_id: str  # f"{doc_id}#{n}"
    doc_id: str
    n: int
    text: str
    title: str  # kept on every chunk so the indexer can give short chunks their document's context
    source: str
    metadata: dict = field(hash=False)


def check_chunking(chunk_words: int, overlap: int) -> None:
    if not isinstance(chunk_words, int) or chunk_words < 1:
        raise CorpusError(f"chunk_words must be a positive integer, got {chunk_words!r}")
    if not isinstance(overlap, int) or not 0 <= overlap < chunk_words:
        raise CorpusError(f"overlap must be an integer from 0 to chunk_words-1 ({chunk_words - 1}), got {overlap!r}")


def chunk_document(doc: Document, *, chunk_words: int = 200, overlap: int = 40) -> list[Chunk]:
    """Windows of `chunk_words` whitespace words, consecutive windows sharing `overlap` words.

    Each chunk's text is the original text between its first and last word, so line breaks survive for display.
    """
    check_chunking(chunk_words, overlap)
    spans = [m.span() for m in _WORD.finditer(doc.text)]
    chunks: list[Chunk] = []
    step = chunk_words - overlap
    for start in range(0, len(spans), step):
        end = min(start + chunk_words, len(spans))
        n = len(chunks)
        chunks.append(Chunk(f"{doc.doc_id}#{n}", doc.doc_id, n, doc.text[spans[start][0]:spans[end - 1][1]],
                            doc.title, doc.source, dict(doc.metadata)))
        if end == len(spans):  # stop here: a further window would only repeat overlap words
            break
    return chunks
