"""Find the files of a corpus and read them into Documents, in a deterministic order."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import NamedTuple

from ..errors import CorpusError, InputError
from .document import Chunk, Document, check_chunking, chunk_document
from .readers import EXTRACTORS, CorpusNotice, CorpusWarning, EmptyFileNotice, read_jsonl

SUPPORTED_SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".jsonl")
BEIR_CORPUS = "corpus.jsonl"
_LOOKED_FOR = "looked for .txt .md .html .pdf .jsonl"
LISTED_ERRORS = 5  # problems quoted in the one-line message; the rest are counted
KEPT_ERRORS = 10_000  # problems kept in CorpusError.errors: a broken 10 GB .jsonl must not fill memory


class _File(NamedTuple):
    path: Path
    doc_id: str  # root-relative '/' path
    source: str  # recorded on the Document
    shown: str  # named in error messages: the path as the user would find it


def read_corpus(path, *, on_error: str = "raise", max_file_bytes: int = 50_000_000) -> Iterator[Document]:
    """Documents of a folder (recursive), a BEIR folder (its corpus.jsonl) or one supported file.

    The path is checked now, files are read lazily as the iterator is consumed. A bad file (or jsonl line)
    never stops the reading: with on_error="raise" every problem is collected and ONE CorpusError, listing
    them all, is raised when the iterator is exhausted (so one run shows everything to fix; see
    `corpus_error`); with on_error="skip" each is a CorpusWarning instead.
    """
    if on_error not in ("raise", "skip"):
        raise InputError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    return _documents(_find_files(Path(path)), on_error == "skip", max_file_bytes)


def read_documents(path, *, on_error: str = "raise", max_file_bytes: int = 50_000_000) -> list[Document]:
    """Every document of a corpus (see `read_corpus`); raises CorpusError when it holds none at all."""
    docs = list(read_corpus(path, on_error=on_error, max_file_bytes=max_file_bytes))
    if not docs:
        raise CorpusError(f"no documents found in {path} ({_LOOKED_FOR})")
    return docs


def load_corpus(path, *, chunk_words: int = 200, overlap: int = 40, on_error: str = "raise",
                max_file_bytes: int = 50_000_000, tokenizer=None,
                max_tokens: int | None = None) -> tuple[list[Document], list[Chunk]]:
    """Read and chunk a whole corpus; raises CorpusError when it holds no document at all.

    `tokenizer` and `max_tokens` go to `chunk_document`: give both to keep every chunk's `embed_text`
    within the document encoder's window.
    """
    # before reading: a bad flag should not wait for a large corpus
    check_chunking(chunk_words, overlap, tokenizer, max_tokens)
    docs = read_documents(path, on_error=on_error, max_file_bytes=max_file_bytes)
    chunks = [c for d in docs for c in chunk_document(d, chunk_words=chunk_words, overlap=overlap,
                                                      tokenizer=tokenizer, max_tokens=max_tokens)]
    return docs, chunks


def corpus_error(messages: list[str], files: int, total: int | None = None) -> CorpusError:
    """One CorpusError for all the problems of a run: a one-line summary, and the list as `.errors`.

    A single problem keeps its own message; more are counted and the first few quoted, e.g.
    "3 bad files: a.txt: ...; b.md: ...; c.html: ...". `files` is how many files the problems are in
    (a .jsonl may hold many bad records); `total` counts problems beyond the `messages` kept.
    """
    total = len(messages) if total is None else total
    if total == 1:
        error = CorpusError(messages[0])
    else:
        head = "; ".join(messages[:LISTED_ERRORS])
        more = f"; … and {total - LISTED_ERRORS} more" if total > LISTED_ERRORS else ""
        what = f"{files} bad files" if files == total else f"{total} problems in {files} " + (
            "file" if files == 1 else "files")
        error = CorpusError(f"{what}: {head}{more}")
    error.errors = list(messages)  # for a caller (the CLI) that prints them all, one per line
    return error


def _find_files(root: Path) -> list[_File]:
    if not root.exists():
        raise CorpusError(f"{root}: path does not exist")
    if root.is_file():
        if root.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise CorpusError(f"{root}: unsupported file type '{root.suffix}' ({_LOOKED_FOR})")
        return [_File(root, root.name, str(root), str(root))]
    if (root / BEIR_CORPUS).is_file():  # BEIR folder: queries.jsonl and qrels/ beside it are not documents
        return [_File(root / BEIR_CORPUS, BEIR_CORPUS, BEIR_CORPUS, str(root / BEIR_CORPUS))]
    other: dict[str, int] = {}  # files of types rkit does not read, by suffix: one notice, not one per file
    found = sorted((p.relative_to(root).as_posix(), p) for p in _walk(root, other))
    if not found:
        raise CorpusError(f"no documents found in {root}: no supported files ({_LOOKED_FOR})")
    if other:
        kinds = ", ".join(f"{suffix or 'no suffix'} ×{n}" for suffix, n in sorted(other.items(), key=lambda i: -i[1]))
        total = sum(other.values())
        warnings.warn(f"{total} file{'s' if total > 1 else ''} of other types ({kinds})", CorpusNotice, stacklevel=2)
    return [_File(p, rel, rel, str(p)) for rel, p in found]


def _walk(root: Path, other: dict[str, int]) -> Iterator[Path]:
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]  # .git, .venv, .cache ...
        for name in names:
            if name.startswith("."):
                continue
            suffix = os.path.splitext(name)[1].lower()
            if suffix in SUPPORTED_SUFFIXES:
                yield Path(folder, name)
            else:
                other[suffix] = other.get(suffix, 0) + 1


class _Problems:
    """Bad files and records of one run: warned about at once (skip), or kept for one CorpusError at the end."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.messages: list[str] = []  # the first KEPT_ERRORS
        self.count = 0
        self.files: set[str] = set()

    def report(self, error: CorpusError, shown: str) -> None:
        if self.skip:
            warnings.warn(str(error), CorpusWarning, stacklevel=3)
            return
        self.count += 1
        self.files.add(shown)
        if len(self.messages) < KEPT_ERRORS:
            self.messages.append(str(error))

    def raise_if_any(self) -> None:
        if self.count:
            raise corpus_error(self.messages, len(self.files), self.count)


def _documents(files: list[_File], skip: bool, max_bytes: int) -> Iterator[Document]:
    seen: set[str] = set()  # document ids so far: a duplicate would silently replace a document in the index
    problems = _Problems(skip)
    for f in files:
        report = partial(problems.report, shown=f.shown)
        try:
            yield from _read_file(f, max_bytes, seen, report)
        except OSError as e:
            report(CorpusError(f"{f.shown}: cannot read file ({e.strerror or e})"))
        except CorpusError as e:
            report(e)
    problems.raise_if_any()


def _read_file(f: _File, max_bytes: int, seen: set[str],
               report: Callable[[CorpusError], None]) -> Iterator[Document]:
    suffix = f.path.suffix.lower()
    if suffix == ".jsonl":
        yield from read_jsonl(f.path, f.shown, f.source, max_line_bytes=max_bytes, seen=seen, report=report)
        return
    title, text, encoding = EXTRACTORS[suffix](f.path, f.shown, max_bytes)
    if not text:  # an empty file is not an error, just not a document
        warnings.warn(f.doc_id, EmptyFileNotice, stacklevel=2)
        return
    if f.doc_id in seen:
        raise CorpusError(f'{f.shown}: duplicate document id "{f.doc_id}"')
    seen.add(f.doc_id)
    # the encoding is recorded only when it is not UTF-8: the rare file a user may want to convert
    metadata = {} if encoding == "utf-8" else {"encoding": encoding}
    yield Document(f.doc_id, text, title or f.path.stem, f.source, metadata)
