"""Chunking by the document encoder's tokenizer: every embedded chunk fits the window, no word is lost."""

from __future__ import annotations

import base64
import json
import random
import re
from pathlib import Path

import pytest

from retrieval_kit.corpus import Chunk, Document, chunk_document, embed_text, load_corpus, read_corpus
from retrieval_kit.errors import CorpusError
from retrieval_kit.models.teacher import resolve_teacher
from retrieval_kit.paths import SAMPLE_CORPUS


@pytest.fixture(scope="module")
def minilm():
    """The teacher's own tokenizer and window (max_seq_length), from the packaged model folder."""
    from transformers import AutoTokenizer

    folder = Path(resolve_teacher(None))
    window = json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"]
    return AutoTokenizer.from_pretrained(folder), window


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])


def assert_covers(doc: Document, chunks: list[Chunk]) -> None:
    """Chunks are slices of the text, in order, and together hold every non-space character."""
    covered = [False] * len(doc.text)
    start = -1
    for c in chunks:
        start = doc.text.index(c.text, start + 1)
        covered[start:start + len(c.text)] = [True] * len(c.text)
    assert all(covered[i] for i, ch in enumerate(doc.text) if not ch.isspace())


def test_embed_text_is_title_line_then_text():
    chunk = Chunk("d#0", "d", 0, "body words", "Title", "src", {})
    assert embed_text(chunk) == "Title\nbody words"
    assert embed_text(Chunk("d#0", "d", 0, "Title and more", "Title", "", {})) == "Title and more"  # no repeat
    assert embed_text(Chunk("d#0", "d", 0, "body", "", "", {})) == "body"


def test_sample_corpus_chunks_fit_the_minilm_window(minilm):
    tokenizer, window = minilm
    assert window == 256
    _, by_words = load_corpus(SAMPLE_CORPUS)
    assert sum(n_tokens(tokenizer, embed_text(c)) > window for c in by_words) >= 5  # the bug this guards against
    docs, chunks = load_corpus(SAMPLE_CORPUS, tokenizer=tokenizer, max_tokens=window)
    assert max(n_tokens(tokenizer, embed_text(c)) for c in chunks) <= window
    for doc in docs:
        mine = [c for c in chunks if c.doc_id == doc.doc_id]
        assert [c.chunk_id for c in mine] == [f"{doc.doc_id}#{n}" for n in range(len(mine))]
        assert all(len(c.text.split()) <= 200 and c.title == doc.title for c in mine)
        assert_covers(doc, mine)


def test_cut_windows_share_overlap_words(minilm):
    tokenizer, _ = minilm
    doc = next(d for d in read_corpus(SAMPLE_CORPUS) if len(d.text.split()) > 150)
    chunks = chunk_document(doc, chunk_words=60, overlap=10, tokenizer=tokenizer, max_tokens=48)
    assert len(chunks) >= 4
    for a, b in zip(chunks, chunks[1:]):
        a_words, b_words = a.text.split(), b.text.split()
        shared = min(10, len(a_words) // 2)
        assert b_words[:shared] == a_words[-shared:]
        assert n_tokens(tokenizer, embed_text(b)) <= 48
    assert_covers(doc, chunks)


def test_a_cap_that_never_binds_gives_the_word_windows(minilm):
    tokenizer, _ = minilm
    doc = Document("d", " ".join(f"w{i}" for i in range(500)), "Title")
    for words, overlap in ((200, 40), (4, 3), (7, 0)):
        assert chunk_document(doc, chunk_words=words, overlap=overlap, tokenizer=tokenizer, max_tokens=100_000) == \
            chunk_document(doc, chunk_words=words, overlap=overlap)


def test_a_base64_blob_is_split_and_nothing_loops(minilm):
    tokenizer, window = minilm
    blob = base64.b64encode(random.Random(0).randbytes(3750)).decode()  # one 5,000-character "word"
    doc = Document("d", f"see the attached key {blob} and rotate it", "Keys")
    chunks = chunk_document(doc, tokenizer=tokenizer, max_tokens=window)
    assert max(n_tokens(tokenizer, embed_text(c)) for c in chunks) <= window
    pieces = [c.text for c in chunks if c.text in blob]
    assert "".join(pieces) == blob and len(pieces) >= 2
    assert chunks[0].text == "see the attached key" and chunks[-1].text == "and rotate it"
    assert_covers(doc, chunks)


def test_a_huge_title_is_cut_on_the_chunks_only(minilm):
    tokenizer, _ = minilm
    doc = Document("d", "short body text", "very long title " * 200)
    (chunk,) = chunk_document(doc, tokenizer=tokenizer, max_tokens=64)
    assert doc.title.startswith(chunk.title) and 10 < len(chunk.title) < len(doc.title)
    assert n_tokens(tokenizer, embed_text(chunk)) <= 64 and chunk.text == "short body text"


class CountingTokenizer:
    """Wraps a tokenizer and counts calls: a document must be tokenized once, not once per candidate window."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def test_one_megabyte_chunks_fast_with_a_few_tokenizer_calls(minilm):
    tokenizer, window = minilm
    base = "\n\n".join(d.text for d in read_corpus(SAMPLE_CORPUS))
    text = (base * (1_000_000 // len(base) + 1))[:1_000_000]
    counting = CountingTokenizer(tokenizer)
    chunks = chunk_document(Document("big", text, "Big"), tokenizer=counting, max_tokens=window)
    # speed is shown by the call count (one tokenisation of the document, not one per window); its wall time
    # (about 1.5 s on one busy core) is a benchmark figure, not an assert
    assert counting.calls <= 6 and len(chunks) > 1000
    sample = chunks[:: len(chunks) // 50]
    assert max(n_tokens(tokenizer, embed_text(c)) for c in sample) <= window


class MarkerTokenizer:
    """A toy tokenizer that is not additive: one token per character, plus a marker token at the start of
    every text (as SentencePiece's '▁' does), so a window tokenized alone costs one more than its share
    of the whole document. Special tokens: 2."""

    is_fast = True

    def _encode(self, text: str, special: bool):
        spans = [m.span() for m in re.finditer(r"\S", text)]
        spans = ([(0, 0)] if spans else []) + spans  # the marker
        return ([(0, 0)] if special else []) + spans + ([(0, 0)] if special else [])

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False, **_):
        if isinstance(text, list):
            return {"input_ids": [[0] * len(self._encode(t, add_special_tokens)) for t in text]}
        spans = self._encode(text, add_special_tokens)
        out = {"input_ids": [0] * len(spans)}
        if return_offsets_mapping:
            # a marker token owns no character (offset 0, 0): the document's one marker is counted for
            # its first word, and every other window is one token under what it costs alone
            out["offset_mapping"] = spans
        return out


def test_a_tokenizer_that_is_not_additive_still_fits():
    tok = MarkerTokenizer()
    # 4-token words (distinct, so chunks can be found) and a cap that 9 of them fill exactly by the estimate:
    # alone, each window costs its marker more, so the budget must shrink and the windows be rebuilt
    doc = Document("d", " ".join(f"w{i:03}" for i in range(300)))
    chunks = chunk_document(doc, chunk_words=100, overlap=5, tokenizer=tok, max_tokens=2 + 9 * 4)
    assert max(len(tok(embed_text(c))["input_ids"]) for c in chunks) <= 38
    assert_covers(doc, chunks)


@pytest.mark.parametrize("kwargs, needle", [
    ({"max_tokens": 256}, "both a tokenizer and max_tokens"),
    ({"tokenizer": "tok"}, "both a tokenizer and max_tokens"),
    ({"tokenizer": "tok", "max_tokens": 4}, "max_tokens must be an integer of at least 8"),
    ({"tokenizer": "tok", "max_tokens": 256.0}, "max_tokens must be an integer"),
])
def test_bad_token_parameters_fail_before_reading(kwargs: dict, needle: str, tmp_path: Path):
    with pytest.raises(CorpusError, match=needle):
        chunk_document(Document("d", "x"), **kwargs)
    with pytest.raises(CorpusError, match=needle):
        load_corpus(tmp_path / "missing-is-not-reached", **kwargs)


def test_slow_tokenizer_is_refused():
    class Slow:
        is_fast = False

    with pytest.raises(CorpusError, match="fast tokenizer"):
        chunk_document(Document("d", "x"), tokenizer=Slow(), max_tokens=256)
