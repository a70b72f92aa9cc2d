"""Text out of one file. Every problem is a CorpusError whose message is one line naming the file."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from ..errors import CorpusError
from ..jsonl import json_type, parse_object
from .decoding import Decoded, check_no_nul, decode_text
from .document import Document

BINARY_PROBE_BYTES = 8192  # a .jsonl with a NUL this early is no JSON Lines file at all: one error for the file
ID_KEYS = ("_id", "id")
TEXT_KEYS = ("text", "contents", "body")
_MARKDOWN: dict = {}  # markdown-it parsers, built on first use
_LINE_BREAK = re.compile(r"\r\n?|\n")  # markdown-it's own notion of a line (token.map counts these)


class CorpusWarning(UserWarning):
    """A bad file or record skipped under on_error='skip'."""


class CorpusNotice(UserWarning):
    """A file found but not indexed, and not an error: empty, or of a type rkit does not read. The indexer reports
    them in one note; silently dropping them left users wondering where a file went."""


class EmptyFileNotice(CorpusNotice):
    """An empty file (no text once read); the message is its document id."""


class Extracted(NamedTuple):
    title: str  # "" when the file has none: the caller falls back to the file stem
    text: str
    encoding: str = "utf-8"  # how the bytes were decoded (PDFs: pypdf's business, left at the default)


def one_line(message: object) -> str:
    """Third-party parsers' messages can span lines; ours must not."""
    return " ".join(str(message).split())


def read_bytes(path: Path, shown: str, max_bytes: int) -> bytes:
    size = path.stat().st_size
    if size > max_bytes:
        raise CorpusError(f"{shown}: file is too large ({size:,} bytes > max_file_bytes={max_bytes:,})")
    return path.read_bytes()


def decode_utf8(data: bytes, shown: str, offset: int = 0) -> str:
    """JSON Lines are UTF-8 by definition (RFC 8259), so a record is not guessed at like a text file."""
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{shown}: not valid UTF-8 (byte offset {offset + e.start})") from None


def read_text_file(path: Path, shown: str, max_bytes: int, *, html: bool = False) -> Decoded:
    """The whole file decoded (see decoding.py); a NUL byte anywhere is a CorpusError, never indexed."""
    return decode_text(read_bytes(path, shown, max_bytes), shown, html=html)


def extract_plain(path: Path, shown: str, max_bytes: int) -> Extracted:
    text, encoding = read_text_file(path, shown, max_bytes)
    return Extracted("", text.strip(), encoding)


def extract_markdown(path: Path, shown: str, max_bytes: int) -> Extracted:
    """The first level-1 heading (ATX or setext, outside code) is the title; its lines leave the text so
    the indexer does not embed it twice. Code blocks and every other line stay as written."""
    text, encoding = read_text_file(path, shown, max_bytes)
    heading = _first_h1(text)
    if heading is None:
        return Extracted("", text.strip(), encoding)
    (first, last), source = heading
    starts = _line_starts(text)
    title = _plain_inline(source)
    return Extracted(title, (text[:starts[first]] + text[starts[last]:]).strip(), encoding)


def _markdown(blocks_only: bool = True):
    """Block structure only by default: inline parsing of every paragraph is not needed to find one heading."""
    if blocks_only not in _MARKDOWN:
        from markdown_it import MarkdownIt  # imported here: only corpora with Markdown pay for it

        parser = MarkdownIt("commonmark")
        _MARKDOWN[blocks_only] = parser.disable("inline") if blocks_only else parser
    return _MARKDOWN[blocks_only]


def _first_h1(text: str) -> tuple[tuple[int, int], str] | None:
    """((first line, line after the heading), inline source) of the first top-level <h1>.

    Top level only: a `# x` quoted or in a list item is part of the body, not the document's title.
    """
    tokens = _markdown().parse(text)
    for opening, inline in zip(tokens, tokens[1:]):
        if opening.type == "heading_open" and opening.tag == "h1" and opening.level == 0 and opening.map:
            return (opening.map[0], opening.map[1]), inline.content
    return None


def _line_starts(text: str) -> list[int]:
    """Character offset where each line begins, plus len(text): line n is text[starts[n]:starts[n+1]]."""
    return [0, *(m.end() for m in _LINE_BREAK.finditer(text)), len(text)]


def _plain_inline(source: str) -> str:
    """Heading source (`The **Guide** &amp; `x``) as plain text (`The Guide & x`)."""
    parts = []
    for child in _markdown(blocks_only=False).parseInline(source)[0].children or []:
        if child.type in ("text", "code_inline", "image"):  # an image stands for its alt text
            parts.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            parts.append(" ")
    return " ".join("".join(parts).split())


def extract_html(path: Path, shown: str, max_bytes: int) -> Extracted:
    from bs4 import BeautifulSoup, MarkupResemblesLocatorWarning  # imported here: only HTML pays for it

    # decoded here, not by bs4, so HTML follows the same BOM / UTF-8 / NUL rules as every text file
    text, encoding = read_text_file(path, shown, max_bytes, html=True)
    with warnings.catch_warnings():  # a page whose whole text is "see notes.html" is a page, not a mistake
        warnings.simplefilter("ignore", MarkupResemblesLocatorWarning)
        soup = BeautifulSoup(text, "html.parser")
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    for tag in soup(["head", "script", "style", "nav", "noscript", "template"]):
        tag.decompose()
    # a space between every text node: minified HTML (<p>a</p><p>b</p>) must not glue words together
    return Extracted(title, " ".join(soup.get_text(" ").split()), encoding)


def extract_pdf(path: Path, shown: str, max_bytes: int) -> Extracted:
    from pypdf import PdfReader  # imported here: only corpora with PDFs pay for it

    if read_bytes(path, shown, max_bytes) == b"":
        return Extracted("", "")
    try:
        reader = PdfReader(path)
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
        title = (reader.metadata.title if reader.metadata else None) or ""
    except Exception as e:  # pypdf raises many kinds on damaged or encrypted files; all mean "cannot read it"
        raise CorpusError(f"{shown}: cannot read PDF ({type(e).__name__}: {one_line(e)})") from None
    text = "\n\n".join(p for p in pages if p)
    if not text:
        raise CorpusError(f"{shown}: PDF has no extractable text (scanned images? run OCR first)")
    return Extracted(str(title).strip(), text)


EXTRACTORS = {".txt": extract_plain, ".md": extract_markdown, ".markdown": extract_markdown,
              ".html": extract_html, ".htm": extract_html, ".pdf": extract_pdf}


def read_jsonl(path: Path, shown: str, source: str, *, max_line_bytes: int, seen: set[str],
               report: Callable[[CorpusError], None]) -> Iterator[Document]:
    """One Document per JSON line; each bad line goes to `report` (which raises, warns or collects) and
    reading goes on with the next line.

    Streamed line by line, so the size limit applies to each record rather than to the whole file
    (BEIR corpora of hundreds of MB are normal). A NUL byte in the first 8 KB means the file is binary
    (one error for the whole file); further in, it fails only its own line, as does a "\\u0000" escape
    in a record's id, text or title: NUL is never indexed.
    """
    with path.open("rb") as f:
        check_no_nul(f.read(BINARY_PROBE_BYTES), shown)
        f.seek(0)
        offset = 0
        for lineno, raw in enumerate(f, 1):
            try:
                doc = _parse_record(raw, f"{shown} line {lineno}", offset, source, max_line_bytes, seen)
            except CorpusError as e:
                report(e)
            else:
                if doc is not None:
                    yield doc
            offset += len(raw)


def _parse_record(raw: bytes, where: str, offset: int, source: str, max_bytes: int,
                  seen: set[str]) -> Document | None:
    if len(raw) > max_bytes:
        raise CorpusError(f"{where}: record is too large ({len(raw):,} bytes > max_file_bytes={max_bytes:,})")
    nul = raw.find(b"\0")
    if nul >= 0:
        raise CorpusError(f"{where}: looks like binary data (NUL byte at offset {offset + nul})")
    line = decode_utf8(raw, where, offset).strip()
    if not line:
        return None
    record = parse_object(line, where, CorpusError)
    id_key = _first_key(record, ID_KEYS, where, '"_id" (or "id")')
    text_key = _first_key(record, TEXT_KEYS, where, '"text" (or "contents"/"body")')
    doc_id, text, title = record[id_key], record[text_key], record.get("title") or ""
    if isinstance(doc_id, int) and not isinstance(doc_id, bool):
        doc_id = str(doc_id)  # some datasets number their documents
    if not isinstance(doc_id, str) or not doc_id:
        raise CorpusError(f'{where}: "{id_key}" must be a non-empty string, got {json.dumps(doc_id)}')
    for key, value in ((text_key, text), ("title", title)):
        if not isinstance(value, str):
            raise CorpusError(f'{where}: "{key}" must be a string, got {json_type(value)}')
    for key, value in ((id_key, doc_id), (text_key, text), ("title", title)):
        if "\0" in value:
            raise CorpusError(f'{where}: "{key}" contains a NUL character (\\u0000)')
    if doc_id in seen:
        raise CorpusError(f'{where}: duplicate document id "{doc_id}"')
    seen.add(doc_id)
    metadata = {k: v for k, v in record.items() if k not in (id_key, text_key, "title")}
    return Document(doc_id, text, title, source, metadata)


def _first_key(record: dict, keys: tuple[str, ...], where: str, wanted: str) -> str:
    for key in keys:
        if key in record:
            return key
    raise CorpusError(f"{where}: record has no {wanted} field")
