"""Text out of one file. Every problem is a CorpusError whose message is one line naming the file."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

from ..errors import CorpusError
from ..jsonl import json_type, parse_object
from .document import Document

BINARY_PROBE_BYTES = 8192
ID_KEYS = ("_id", "id")
TEXT_KEYS = ("text", "contents", "body")
_MD_TITLE = re.compile(r"^#[ \t]+(.+?)[ \t#]*$", re.MULTILINE)


class CorpusWarning(UserWarning):
    """A bad file or record skipped under on_error='skip'."""


def one_line(message: object) -> str:
    """Third-party parsers' messages can span lines; ours must not."""
    return " ".join(str(message).split())


def read_bytes(path: Path, shown: str, max_bytes: int) -> bytes:
    size = path.stat().st_size
    if size > max_bytes:
        raise CorpusError(f"{shown}: file is too large ({size:,} bytes > max_file_bytes={max_bytes:,})")
    return path.read_bytes()


def check_not_binary(head: bytes, shown: str) -> None:
    if b"\0" in head[:BINARY_PROBE_BYTES]:
        raise CorpusError(f"{shown}: looks like a binary file (NUL byte in the first 8 KB)")


def decode_utf8(data: bytes, shown: str, offset: int = 0) -> str:
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{shown}: not valid UTF-8 (byte offset {offset + e.start})") from None


def read_text_file(path: Path, shown: str, max_bytes: int) -> str:
    data = read_bytes(path, shown, max_bytes)
    check_not_binary(data, shown)
    return decode_utf8(data, shown)


def extract_plain(path: Path, shown: str, max_bytes: int) -> tuple[str, str]:
    """(title, text) of a .txt file; the caller falls back to the file stem for a missing title."""
    return "", read_text_file(path, shown, max_bytes).strip()


def extract_markdown(path: Path, shown: str, max_bytes: int) -> tuple[str, str]:
    """The first `# heading` is the title; it leaves the text so the indexer does not embed it twice."""
    text = read_text_file(path, shown, max_bytes)
    heading = _MD_TITLE.search(text)
    if not heading:
        return "", text.strip()
    return heading.group(1).strip(), (text[:heading.start()] + text[heading.end():]).strip()


def extract_html(path: Path, shown: str, max_bytes: int) -> tuple[str, str]:
    from bs4 import BeautifulSoup  # imported here: only corpora with HTML pay for it

    soup = BeautifulSoup(read_text_file(path, shown, max_bytes), "html.parser")
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    for tag in soup(["head", "script", "style", "nav", "noscript", "template"]):
        tag.decompose()
    # a space between every text node: minified HTML (<p>a</p><p>b</p>) must not glue words together
    return title, " ".join(soup.get_text(" ").split())


def extract_pdf(path: Path, shown: str, max_bytes: int) -> tuple[str, str]:
    from pypdf import PdfReader  # imported here: only corpora with PDFs pay for it

    if read_bytes(path, shown, max_bytes) == b"":
        return "", ""
    try:
        reader = PdfReader(path)
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
        title = (reader.metadata.title if reader.metadata else None) or ""
    except Exception as e:  # pypdf raises many kinds on damaged or encrypted files; all mean "cannot read it"
        raise CorpusError(f"{shown}: cannot read PDF ({type(e).__name__}: {one_line(e)})") from None
    text = "\n\n".join(p for p in pages if p)
    if not text:
        raise CorpusError(f"{shown}: PDF has no extractable text (scanned images? run OCR first)")
    return str(title).strip(), text


EXTRACTORS = {".txt": extract_plain, ".md": extract_markdown, ".markdown": extract_markdown,
              ".html": extract_html, ".htm": extract_html, ".pdf": extract_pdf}


def read_jsonl(path: Path, shown: str, source: str, *, max_line_bytes: int, seen: set[str],
               skip: bool) -> Iterator[Document]:
    """One Document per JSON line; a bad line raises, or with `skip` is warned about and passed over.

    Streamed line by line, so the size limit applies to each record rather than to the whole file
    (BEIR corpora of hundreds of MB are normal).
    """
    with path.open("rb") as f:
        check_not_binary(f.read(BINARY_PROBE_BYTES), shown)
        f.seek(0)
        offset = 0
        for lineno, raw in enumerate(f, 1):
            try:
                doc = _parse_record(raw, f"{shown} line {lineno}", offset, source, max_line_bytes, seen)
            except CorpusError as e:
                if not skip:
                    raise
                warnings.warn(str(e), CorpusWarning, stacklevel=2)
            else:
                if doc is not None:
                    yield doc
            offset += len(raw)


def _parse_record(raw: bytes, where: str, offset: int, source: str, max_bytes: int,
                  seen: set[str]) -> Document | None:
    if len(raw) > max_bytes:
        raise CorpusError(f"{where}: record is too large ({len(raw):,} bytes > max_file_bytes={max_bytes:,})")
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
