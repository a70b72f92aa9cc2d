"""Find the files of a corpus and read them into Documents, in a deterministic order."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from ..errors import CorpusError, InputError
from .document import Chunk, Document, check_chunking, chunk_document
from .readers import EXTRACTORS, CorpusWarning, read_jsonl

SUPPORTED_SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".jsonl")
BEIR_CORPUS = "corpus.jsonl"
_LOOKED_FOR = "looked for .txt .md .html .pdf .jsonl"


class _File(NamedTuple):
    path: Path
    doc_id: str  # root-relative '/' path
    source: str  # recorded on the Document
    shown: str  # named in error messages: the path as the user would find it


def read_corpus(path, *, on_error: str = "raise", max_file_bytes: int = 50_000_000) -> Iterator[Document]:
    """Documents of a folder (recursive), a BEIR folder (its corpus.jsonl) or one supported file.

    The path is checked now, files are read lazily as the iterator is consumed. With on_error="skip"
    a bad file (or jsonl line) is passed over with a CorpusWarning instead of raising CorpusError.
    """
    if on_error not in ("raise", "skip"):
        raise InputError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    return _documents(_find_files(Path(path)), on_error == "skip", max_file_bytes)


def load_corpus(path, *, chunk_words: int = 200, overlap: int = 40, on_error: str = "raise",
                max_file_bytes: int = 50_000_000) -> tuple[list[Document], list[Chunk]]:
    """Read and chunk a whole corpus; raises CorpusError when it holds no document at all."""
    check_chunking(chunk_words, overlap)  # before reading: a bad flag should not wait for a large corpus
    docs = list(read_corpus(path, on_error=on_error, max_file_bytes=max_file_bytes))
    if not docs:
        raise CorpusError(f"no documents found in {path} ({_LOOKED_FOR})")
    chunks = [c for d in docs for c in chunk_document(d, chunk_words=chunk_words, overlap=overlap)]
    return docs, chunks


def _find_files(root: Path) -> list[_File]:
    if not root.exists():
        raise CorpusError(f"{root}: path does not exist")
    if root.is_file():
        if root.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise CorpusError(f"{root}: unsupported file type '{root.suffix}' ({_LOOKED_FOR})")
        return [_File(root, root.name, str(root), str(root))]
    if (root / BEIR_CORPUS).is_file():  # BEIR folder: queries.jsonl and qrels/ beside it are not documents
        return [_File(root / BEIR_CORPUS, BEIR_CORPUS, BEIR_CORPUS, str(root / BEIR_CORPUS))]
    found = sorted((p.relative_to(root).as_posix(), p) for p in _walk(root))
    if not found:
        raise CorpusError(f"no documents found in {root}: no supported files ({_LOOKED_FOR})")
    return [_File(p, rel, rel, str(p)) for rel, p in found]


def _walk(root: Path) -> Iterator[Path]:
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]  # .git, .venv, .cache ...
        for name in names:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in SUPPORTED_SUFFIXES:
                yield Path(folder, name)


def _documents(files: list[_File], skip: bool, max_bytes: int) -> Iterator[Document]:
    seen: set[str] = set()  # document ids so far: a duplicate would silently replace a document in the index
    for f in files:
        try:
            yield from _read_file(f, skip, max_bytes, seen)
        except OSError as e:
            _fail(CorpusError(f"{f.shown}: cannot read file ({e.strerror or e})"), skip)
        except CorpusError as e:
            _fail(e, skip)


def _read_file(f: _File, skip: bool, max_bytes: int, seen: set[str]) -> Iterator[Document]:
    suffix = f.path.suffix.lower()
    if suffix == ".jsonl":
        yield from read_jsonl(f.path, f.shown, f.source, max_line_bytes=max_bytes, seen=seen, skip=skip)
        return
    title, text = EXTRACTORS[suffix](f.path, f.shown, max_bytes)
    if not text:
        return  # an empty file is not an error, just not a document
    if f.doc_id in seen:
        raise CorpusError(f'{f.shown}: duplicate document id "{f.doc_id}"')
    seen.add(f.doc_id)
    yield Document(f.doc_id, text, title or f.path.stem, f.source)


def _fail(error: CorpusError, skip: bool) -> None:
    if not skip:
        raise error
    warnings.warn(str(error), CorpusWarning, stacklevel=3)
