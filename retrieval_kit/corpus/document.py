"""Documents and chunks: the only two shapes the rest of rkit sees of a corpus."""

from __future__ import annotations

import hashlib
import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field, replace

from ..errors import CorpusError

_WORD = re.compile(r"\S+")
MIN_MAX_TOKENS = 8  # below this a title and a word or two cannot both fit next to the special tokens


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


def embed_text(chunk: Chunk) -> str:
    """The text the document encoder embeds for a chunk: the title gives short chunks their context.

    Token caps in `chunk_document` are measured on exactly this string.
    """
    return titled(chunk.title, chunk.text)


def titled(title: str, text: str) -> str:
    """A chunk's title line and text, the title once: what the dense encoder embeds and BM25 reads."""
    if title and not text.startswith(title):
        return f"{title}\n{text}"
    return text


def check_chunking(chunk_words: int, overlap: int, tokenizer=None, max_tokens: int | None = None) -> None:
    if not isinstance(chunk_words, int) or chunk_words < 1:
        raise CorpusError(f"chunk_words must be a positive integer, got {chunk_words!r}")
    if not isinstance(overlap, int) or not 0 <= overlap < chunk_words:
        raise CorpusError(f"overlap must be an integer from 0 to chunk_words-1 ({chunk_words - 1}), got {overlap!r}")
    if (tokenizer is None) != (max_tokens is None):  # a tokenizer's own model_max_length is often not the model's
        raise CorpusError("chunking by tokens needs both a tokenizer and max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                   or max_tokens < MIN_MAX_TOKENS):
        raise CorpusError(f"max_tokens must be an integer of at least {MIN_MAX_TOKENS}, got {max_tokens!r}")
    if tokenizer is not None and getattr(tokenizer, "is_fast", True) is False:
        raise CorpusError("chunking by tokens needs a fast tokenizer (one that returns offset mappings)")


def chunk_document(doc: Document, *, chunk_words: int = 200, overlap: int = 40, tokenizer=None,
                   max_tokens: int | None = None) -> list[Chunk]:
    """Windows of at most `chunk_words` whitespace words, consecutive windows sharing `overlap` words.

    Each chunk's text is the original text between its first and last word, so line breaks survive for display.

    With a (Hugging Face fast) `tokenizer` and `max_tokens`, every chunk's `embed_text` also tokenizes to at
    most `max_tokens` tokens, special tokens included, so no word falls past the encoder's window unseen.
    A window cut short by tokens still shares `overlap` words with the next, but at most half its own words
    (dense text must not multiply the chunks); a word longer than the cap on its own (a base64 blob) is split
    at token boundaries into chunks of its own. A title longer than half the cap is cut, on the chunks only,
    to a prefix of at most that many tokens. Without a tokenizer the windows are exactly the word windows.
    """
    check_chunking(chunk_words, overlap, tokenizer, max_tokens)
    spans = [m.span() for m in _WORD.finditer(doc.text)]
    if not spans:
        if _WORD.search(doc.title or ""):  # a title-only record (a catalogue entry, many CACM documents) is found
            return chunk_document(replace(doc, text=doc.title, title=""), chunk_words=chunk_words,  # by its title
                                  overlap=overlap, tokenizer=tokenizer, max_tokens=max_tokens)
        return []
    title = doc.title
    if tokenizer is None:
        pieces = _word_windows(spans, chunk_words, overlap)
    else:
        title, pieces = _token_windows(doc, spans, chunk_words, overlap, tokenizer, max_tokens)
    return [Chunk(f"{doc.doc_id}#{n}", doc.doc_id, n, doc.text[a:b], title, doc.source, dict(doc.metadata))
            for n, (a, b) in enumerate(pieces)]


def _word_windows(spans: list[tuple[int, int]], chunk_words: int, overlap: int) -> list[tuple[int, int]]:
    """(start, end) character spans of fixed windows of words."""
    windows = []
    step = chunk_words - overlap
    for start in range(0, len(spans), step):
        end = min(start + chunk_words, len(spans))
        windows.append((spans[start][0], spans[end - 1][1]))
        if end == len(spans):  # stop here: a further window would only repeat overlap words
            break
    return windows


# --- windows that fit the encoder's tokens ---------------------------------------------------------------------

def _count(tokenizer, texts: list[str]) -> list[int]:
    """Tokens of each text as the encoder sees it, special tokens included (one batched call)."""
    encoded = tokenizer(texts, add_special_tokens=True, return_attention_mask=False, return_token_type_ids=False,
                        verbose=False)
    return [len(ids) for ids in encoded["input_ids"]]


def _offsets(tokenizer, text: str) -> list[tuple[int, int]]:
    """Character span of each token of `text`, without special tokens."""
    return tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False,
                     return_token_type_ids=False, verbose=False)["offset_mapping"]


def _token_windows(doc: Document, spans: list[tuple[int, int]], chunk_words: int, overlap: int, tokenizer,
                   max_tokens: int) -> tuple[str, list[tuple[int, int]]]:
    """(title for the chunks, character spans of the windows) such that every embed_text fits `max_tokens`.

    The document is tokenized once; a window's size is estimated from that tokenization (words own the tokens
    that start in them), then all windows are checked exactly in one batch. Tokenizers whose counts are not
    additive (BPE merging across the title line, a leading-space marker) can exceed the estimate by a token or
    two: the text budget then shrinks and the windows are rebuilt, until all fit.
    """
    room = max_tokens - _count(tokenizer, [""])[0]  # what the special tokens leave
    title = _fit_title(doc.title, tokenizer, room // 2)
    budget = room - (len(_offsets(tokenizer, title + "\n")) if title else 0)
    # first_token[i]: index of word i's first token; first_token[len(spans)]: the number of tokens
    starts = [a for a, _ in _offsets(tokenizer, doc.text)]
    first_token = [bisect_left(starts, a) for a, _ in spans] + [len(starts)]
    for attempt in range(1, budget + 1):
        windows = _greedy_windows(spans, first_token, starts, chunk_words, overlap, budget)
        texts = [titled(title, doc.text[a:b]) for a, b in windows]
        excess = max(_count(tokenizer, texts)) - max_tokens
        if excess <= 0:
            return title, windows
        budget -= max(excess, attempt)  # at least one token more each time: a few rounds at most
        if budget < 1:
            break
    raise CorpusError(f"{doc.source or doc.doc_id}: max_tokens={max_tokens} leaves no room for the text of "
                      f"document {doc.doc_id!r} after its title")


def _fit_title(title: str, tokenizer, limit: int) -> str:
    """The title, or its longest prefix of at most `limit` tokens (its line break included)."""
    if not title:
        return title
    offsets = _offsets(tokenizer, title + "\n")
    if len(offsets) <= limit:
        return title
    return title[:offsets[max(limit - 1, 0)][1]].rstrip() if limit > 0 else ""


def _greedy_windows(spans: list[tuple[int, int]], first_token: list[int], starts: list[int], chunk_words: int,
                    overlap: int, budget: int) -> list[tuple[int, int]]:
    """Longest windows of at most `chunk_words` words and (estimated) `budget` tokens."""
    windows: list[tuple[int, int]] = []
    n, s, end = len(spans), 0, 0  # end: one past the last word covered so far
    while s < n:
        # the furthest e with first_token[e] - first_token[s] <= budget, e <= s + chunk_words
        e = bisect_right(first_token, first_token[s] + budget, s, min(s + chunk_words, n) + 1) - 1
        if e <= end and s < end:  # the overlap words leave no room for a new word: start after them instead
            s = end
            continue
        if e == s:  # one word over the budget on its own: pieces of it, no overlap around them
            windows += _split_word(spans[s], starts[first_token[s]:first_token[s + 1]], budget)
            s = end = s + 1
            continue
        windows.append((spans[s][0], spans[e - 1][1]))
        if e == n:
            break
        shared = overlap if e - s == chunk_words else min(overlap, (e - s) // 2)
        s, end = e - shared, e
    return windows


def _split_word(span: tuple[int, int], token_starts: list[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive pieces of one word, each `budget` of its tokens: together they are the whole word."""
    cuts = [a for a in token_starts[budget::budget] if span[0] < a < span[1]]
    bounds = [span[0], *cuts, span[1]]
    return list(zip(bounds, bounds[1:]))
