"""Bytes of a text file → str: what the file declares first, then a careful guess; NUL bytes mean binary.

Order, most trustworthy first:
  1. a byte-order mark (UTF-8, UTF-16 LE/BE, UTF-32 LE/BE) decides;
  2. strict UTF-8: non-ASCII bytes that happen to form valid UTF-8 are practically never legacy text, while a
     stale ``<meta charset=iso-8859-1>`` left in a template of a page saved as UTF-8 is common;
  3. HTML only: the charset the page declares (``<meta charset>``, ``http-equiv`` Content-Type, or an XML
     declaration), read with bs4's own detector; ISO-8859-1/ASCII labels mean windows-1252, as in browsers;
  4. charset-normalizer's detection: windows-1252 first when it reads cleanly (Western legacy text, where
     charset-normalizer often cannot tell cp1252 from cp1250 or cp1257 apart and may pick the wrong one),
     then the best other encoding it is confident in.
Anything left is an error. A NUL byte anywhere (a NUL character for UTF-16/32) makes the file binary.
"""

from __future__ import annotations

import codecs
from typing import NamedTuple

from ..errors import CorpusError

# UTF-32-LE's mark begins with UTF-16-LE's, so it is tested first
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF8, "utf-8"),
         (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
# WHATWG: these labels are decoded as windows-1252 (pages labelled Latin-1 use its curly quotes and dashes)
_MEANS_CP1252 = {"iso8859-1", "ascii", "cp1252"}
# windows-1252 as browsers read it: the five bytes Python's cp1252 leaves undefined stay C1 controls
_C1_AS_CP1252 = {b: bytes([b]).decode("cp1252") for b in range(0x80, 0xA0)
                 if b not in (0x81, 0x8D, 0x8F, 0x90, 0x9D)}
# without a BOM and with no NUL byte (checked before), UTF-16/32 is implausible: never guess it
_NEVER_GUESSED = ["utf_16", "utf_16_be", "utf_16_le", "utf_32", "utf_32_be", "utf_32_le", "utf_7"]


class Decoded(NamedTuple):
    text: str
    encoding: str  # Python codec name, e.g. "utf-8", "cp1252"


def binary_error(shown: str, offset: int) -> CorpusError:
    return CorpusError(f"{shown}: looks like a binary file (NUL byte at offset {offset})")


def check_no_nul(data: bytes, shown: str) -> None:
    offset = data.find(b"\0")
    if offset >= 0:
        raise binary_error(shown, offset)


def decode_text(data: bytes, shown: str, *, html: bool = False) -> Decoded:
    """Decode a whole .txt/.md/.html file (see the module docstring for the order); CorpusError if nothing fits."""
    bom = _bom(data)
    if bom is not None:
        return _decode_with_bom(data, shown, *bom)
    check_no_nul(data, shown)
    try:
        return Decoded(data.decode("utf-8"), "utf-8")
    except UnicodeDecodeError as e:
        bad_utf8_at = e.start
    if html:
        declared = _declared_charset(data)
        if declared is not None:
            return declared
    guessed = _guess(data)
    if guessed is None:
        raise CorpusError(f"{shown}: not valid UTF-8 (byte offset {bad_utf8_at}) and no other text encoding fits")
    return guessed


def _bom(data: bytes) -> tuple[int, str] | None:
    for mark, codec in _BOMS:
        if data.startswith(mark):
            return len(mark), codec
    return None


def _decode_with_bom(data: bytes, shown: str, size: int, codec: str) -> Decoded:
    try:
        text = data[size:].decode(codec)
    except UnicodeDecodeError as e:
        raise CorpusError(f"{shown}: not valid {codec.upper()} despite its byte-order mark "
                          f"(byte offset {size + e.start})") from None
    nul = text.find("\0")
    if nul >= 0:  # NUL *bytes* are normal in UTF-16/32; a NUL *character* is not text
        raise binary_error(shown, size + len(text[:nul].encode(codec)))
    return Decoded(text, codec)


def _declared_charset(data: bytes) -> Decoded | None:
    """The page's own declaration, when it names a known codec that decodes these bytes."""
    from bs4.dammit import EncodingDetector  # imported here: only HTML that is not UTF-8 pays for it

    label = EncodingDetector.find_declared_encoding(data, is_html=True)
    try:
        codec = codecs.lookup(label).name if label else None
    except LookupError:  # an unknown label is no declaration at all
        return None
    if codec is None or codec.startswith(("utf-16", "utf-32")):  # browsers ignore these in a byte stream too
        return None
    if codec in _MEANS_CP1252:  # every byte means something: this never fails
        return Decoded(data.decode("latin-1").translate(_C1_AS_CP1252), "cp1252")
    try:
        return Decoded(data.decode(codec), codec)
    except UnicodeDecodeError:  # a wrong declaration: guess as if there were none
        return None


def _guess(data: bytes) -> Decoded | None:
    from charset_normalizer import from_bytes  # imported here: only files that are not UTF-8 pay for it

    for kwargs in ({"cp_isolation": ["cp1252"]}, {"cp_exclusion": _NEVER_GUESSED}):
        match = from_bytes(data, **kwargs).best()  # best() is None unless some encoding reads with little chaos
        if match is None or match.encoding in ("ascii", "utf_8"):  # its fallbacks: UTF-8 already failed
            continue
        try:
            return Decoded(str(match), codecs.lookup(match.encoding).name)
        except (UnicodeDecodeError, LookupError):  # it samples the file; the full payload may still not decode
            continue
    return None
