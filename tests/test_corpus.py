"""Corpus ingestion on real files in tmp_path: formats, ids, errors, skipping, chunking, the sample corpus."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from retrieval_kit.corpus import (SUPPORTED_SUFFIXES, Chunk, CorpusWarning, Document, chunk_document, load_corpus,
                                  read_corpus)
from retrieval_kit.errors import CorpusError, InputError
from retrieval_kit.paths import SAMPLE_CORPUS

FIXTURES = Path(__file__).parent / "fixtures" / "corpus"
# badge-audit.pdf was made with matplotlib (pdf.fonttype=42 so the text is extractable):
#   fig.text(.05, .6, "Quarterly badge audit checklist"); fig.text(.05, .3, "Revoke badges of people who left.")
#   fig.savefig("badge-audit.pdf", metadata={"Title": "Badge audit"})
PDF_FIXTURE = FIXTURES / "badge-audit.pdf"


def write(root: Path, rel: str, content: str | bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def jsonl(*records: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def corpus_error(path, **kwargs) -> str:
    """Read everything, expect a CorpusError, check its message is one line, return it."""
    with pytest.raises(CorpusError) as info:
        list(read_corpus(path, **kwargs))
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message


# --- folders -------------------------------------------------------------------------------------------------

@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    write(tmp_path, "b.txt", "plain text file")
    write(tmp_path, "a/guide.md", "intro line\n\n# The Guide\n\nSome **markdown** body.\n")
    write(tmp_path, "a/page.html", "<html><head><title>Page Title</title><style>p{}</style></head><body>"
                                   "<nav>Home Menu</nav><p>Hello</p><p>world</p><script>var x=1;</script></body></html>")
    write(tmp_path, "a/sub/notes.markdown", "no heading here")
    write(tmp_path, "c.HTM", "<p>upper case suffix</p>")
    write(tmp_path, "records.jsonl", jsonl({"_id": "r1", "title": "R", "text": "record one", "lang": "en"}))
    write(tmp_path, "skip.docx", "unsupported")
    write(tmp_path, "image.png", b"\x89PNG\0\0")
    write(tmp_path, ".hidden.txt", "hidden file")
    write(tmp_path, ".git/config.txt", "hidden folder")
    write(tmp_path, "a/.cache/x.md", "hidden nested folder")
    return tmp_path


def test_folder_walk_mixed_types(mixed: Path):
    docs = {d.doc_id: d for d in read_corpus(mixed)}
    assert list(docs) == ["a/guide.md", "a/page.html", "a/sub/notes.markdown", "b.txt", "c.HTM", "r1"]
    assert docs["b.txt"] == Document("b.txt", "plain text file", "b", "b.txt")
    assert docs["a/sub/notes.markdown"].title == "notes"  # no heading: the file stem
    assert docs["r1"].source == "records.jsonl" and docs["r1"].metadata == {"lang": "en"}
    assert docs["c.HTM"].text == "upper case suffix"


def test_ids_are_relative_and_stable(mixed: Path, tmp_path_factory):
    first = [(d.doc_id, d.content_hash) for d in read_corpus(mixed)]
    assert first == [(d.doc_id, d.content_hash) for d in read_corpus(str(mixed))]
    moved = tmp_path_factory.mktemp("moved")
    for path in mixed.rglob("*"):
        if path.is_file():
            write(moved, path.relative_to(mixed).as_posix(), path.read_bytes())
    assert first == [(d.doc_id, d.content_hash) for d in read_corpus(moved)]


def test_markdown_title_is_first_heading(tmp_path: Path):
    write(tmp_path, "g.md", "\ufeffintro\n\n# The Guide ##\n\nbody\n\n# Second\n")
    (doc,) = read_corpus(tmp_path)
    assert doc.title == "The Guide"
    # the title heading's line (line break included) leaves the text, so it is not embedded twice; BOM gone
    assert doc.text == "intro\n\n\nbody\n\n# Second"


def test_html_title_and_dropped_tags(mixed: Path):
    (doc,) = read_corpus(mixed / "a" / "page.html")
    assert doc.title == "Page Title"
    assert doc.text == "Hello world"  # no nav, script, style or <title>; block tags do not glue words


def test_single_file_ids(tmp_path: Path):
    path = write(tmp_path, "deep/note.txt", "x y z")
    (doc,) = read_corpus(path)
    assert doc.doc_id == "note.txt" and doc.source == str(path)


def test_pdf_text_is_extracted():
    (doc,) = read_corpus(PDF_FIXTURE)
    assert doc.title == "Badge audit"
    assert "Quarterly badge audit checklist" in doc.text and "Revoke badges" in doc.text


def test_pdf_without_text_is_an_error(tmp_path: Path):
    from pypdf import PdfWriter

    writer = PdfWriter()
    writer.add_blank_page(200, 200)
    path = tmp_path / "scan.pdf"
    writer.write(path)
    assert "scan.pdf: PDF has no extractable text" in corpus_error(path)


def test_damaged_pdf_is_an_error(tmp_path: Path):
    path = write(tmp_path, "broken.pdf", b"%PDF-1.4\nthis is not really a pdf\n")
    assert "broken.pdf: cannot read PDF" in corpus_error(path)


# --- BEIR and jsonl ------------------------------------------------------------------------------------------

def test_beir_folder_reads_only_corpus_jsonl(tmp_path: Path):
    write(tmp_path, "corpus.jsonl", jsonl({"_id": "d1", "title": "T", "text": "one"}, {"_id": "d2", "text": "two"}))
    write(tmp_path, "queries.jsonl", jsonl({"_id": "q1", "text": "a query"}))
    write(tmp_path, "qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    write(tmp_path, "extra.txt", "not part of a BEIR corpus")
    docs = list(read_corpus(tmp_path))
    assert [(d.doc_id, d.title, d.text, d.source) for d in docs] == [
        ("d1", "T", "one", "corpus.jsonl"), ("d2", "", "two", "corpus.jsonl")]


def test_jsonl_field_variants(tmp_path: Path):
    path = write(tmp_path, "c.jsonl", "\ufeff" + jsonl(
        {"_id": "a", "text": "t"}, {"id": "b", "contents": "c"}, {"id": 7, "body": "b", "title": None},
        {"_id": "e", "text": "", "title": "title only", "url": "http://x", "tags": ["k"]}) + "\n  \n")
    docs = list(read_corpus(path))
    assert [(d.doc_id, d.text, d.title) for d in docs] == [
        ("a", "t", ""), ("b", "c", ""), ("7", "b", ""), ("e", "", "title only")]
    assert docs[3].metadata == {"url": "http://x", "tags": ["k"]}
    assert all(d.source == str(path) for d in docs)


@pytest.mark.parametrize("line, problem", [
    ('{"_id": "a", "text": "x",}', "line 2: invalid JSON ("),
    ('["a", "x"]', "line 2: expected a JSON object, got array"),
    ('{"title": "t", "text": "x"}', 'line 2: record has no "_id" (or "id") field'),
    ('{"_id": "b", "title": "t"}', 'line 2: record has no "text" (or "contents"/"body") field'),
    ('{"_id": "", "text": "x"}', 'line 2: "_id" must be a non-empty string'),
    ('{"_id": "b", "text": 3}', 'line 2: "text" must be a string, got number'),
    ('{"_id": "a", "text": "again"}', 'line 2: duplicate document id "a"'),
])
def test_jsonl_bad_line(tmp_path: Path, line: str, problem: str):
    path = write(tmp_path, "corpus.jsonl", jsonl({"_id": "a", "text": "fine"}) + line + "\n")
    assert corpus_error(path).startswith(f"{path} {problem}")


def test_jsonl_bad_utf8_names_line_and_byte_offset(tmp_path: Path):
    first = jsonl({"_id": "a", "text": "fine"}).encode()
    path = write(tmp_path, "c.jsonl", first + b'{"_id": "b", "text": "caf\xe9"}\n')
    assert corpus_error(path) == f"{path} line 2: not valid UTF-8 (byte offset {len(first) + 25})"


def test_duplicate_ids_across_files(tmp_path: Path):
    write(tmp_path, "a.jsonl", jsonl({"_id": "x", "text": "one"}))
    write(tmp_path, "b.jsonl", jsonl({"_id": "x", "text": "two"}))
    assert "b.jsonl line 1: duplicate document id" in corpus_error(tmp_path)


# --- bad input -----------------------------------------------------------------------------------------------

def test_missing_path(tmp_path: Path):
    missing = tmp_path / "nope"
    with pytest.raises(CorpusError, match="path does not exist"):
        read_corpus(missing)  # checked at once, before iterating
    assert corpus_error(missing) == f"{missing}: path does not exist"


def test_empty_folder_and_unsupported_only(tmp_path: Path):
    assert str(tmp_path) in corpus_error(tmp_path) and "no documents found" in corpus_error(tmp_path)
    write(tmp_path, "a.docx", "x")
    write(tmp_path, ".b.txt", "hidden")
    assert "no supported files" in corpus_error(tmp_path)


def test_unsupported_single_file(tmp_path: Path):
    path = write(tmp_path, "a.docx", "x")
    assert corpus_error(path).startswith(f"{path}: unsupported file type '.docx'")


def test_binary_file(tmp_path: Path):
    path = write(tmp_path, "blob.txt", b"abc\0def")
    assert corpus_error(path) == f"{path}: looks like a binary file (NUL byte at offset 3)"
    path = write(tmp_path, "blob.jsonl", b'{"_id": "a", "text": "\0"}\n')
    assert "blob.jsonl: looks like a binary file" in corpus_error(path)


def garbage(n: int = 300, seed: int = 0) -> bytes:
    """Random bytes with no NUL: not UTF-8, and no text encoding reads them without chaos."""
    import random

    rng = random.Random(seed)
    return b"ok \xff" + bytes(rng.randrange(1, 256) for _ in range(n))  # 0xFF: never in UTF-8


def test_undecodable_text_names_byte_offset(tmp_path: Path):
    path = write(tmp_path, "garbage.md", garbage())
    assert corpus_error(path) == f"{path}: not valid UTF-8 (byte offset 3) and no other text encoding fits"


def test_file_too_large(tmp_path: Path):
    path = write(tmp_path, "big.txt", "word " * 100)
    message = corpus_error(path, max_file_bytes=100)
    assert message == f"{path}: file is too large (500 bytes > max_file_bytes=100)"
    assert "big.jsonl line 1: record is too large" in corpus_error(
        write(tmp_path, "big.jsonl", jsonl({"_id": "a", "text": "word " * 100})), max_file_bytes=100)


def test_empty_files_give_no_documents(tmp_path: Path):
    write(tmp_path, "empty.txt", "")
    write(tmp_path, "blank.md", "  \n\n")
    write(tmp_path, "empty.pdf", b"")
    write(tmp_path, "empty.jsonl", "\n")
    assert list(read_corpus(tmp_path)) == []
    with pytest.raises(CorpusError, match=r"^no documents found in .* \(looked for \.txt \.md \.html \.pdf \.jsonl\)$"):
        load_corpus(tmp_path)
    write(tmp_path, "real.txt", "content")
    docs, chunks = load_corpus(tmp_path)
    assert [d.doc_id for d in docs] == ["real.txt"] and len(chunks) == 1


def test_bad_on_error_value(tmp_path: Path):
    with pytest.raises(InputError, match="on_error"):
        read_corpus(tmp_path, on_error="ignore")


# --- on_error="skip" -----------------------------------------------------------------------------------------

def test_skip_bad_files_with_one_line_warnings(tmp_path: Path):
    write(tmp_path, "good.txt", "good text")
    write(tmp_path, "binary.txt", b"\0\0\0")
    write(tmp_path, "garbage.txt", garbage())
    write(tmp_path, "latin1.txt", b"caf\xe9")  # not UTF-8, but clearly windows-1252: a document, not a warning
    write(tmp_path, "huge.md", "x" * 500)
    write(tmp_path, "c.jsonl", jsonl({"_id": "a", "text": "ok"}) + "{broken\n" + jsonl({"_id": "b", "text": "ok"}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        docs = list(read_corpus(tmp_path, on_error="skip", max_file_bytes=400))
    assert [d.doc_id for d in docs] == ["a", "b", "good.txt", "latin1.txt"]
    assert docs[-1].text == "café"
    messages = sorted(str(w.message) for w in caught if issubclass(w.category, CorpusWarning))
    assert len(messages) == 4 and all("\n" not in m for m in messages)
    assert [m.split(tmp_path.as_posix() + "/")[1].split(":")[0] for m in messages] == [
        "binary.txt", "c.jsonl line 2", "garbage.txt", "huge.md"]


def test_skip_everything_bad_leaves_no_documents(tmp_path: Path):
    write(tmp_path, "binary.txt", b"\0")
    with pytest.warns(CorpusWarning, match="binary.txt"):
        with pytest.raises(CorpusError, match="no documents found"):
            load_corpus(tmp_path, on_error="skip")


# --- documents and chunks ------------------------------------------------------------------------------------

def test_content_hash_stable_and_sensitive():
    doc = Document("d", "some text", "Title")
    assert doc.content_hash == Document("other-id", "some text", "Title", "src", {"k": 1}).content_hash
    assert len(doc.content_hash) == 64
    assert doc.content_hash != Document("d", "some text!", "Title").content_hash
    assert doc.content_hash != Document("d", "some text", "Other").content_hash
    assert hash(doc) == hash(Document("d", "some text", "Title"))  # hashable despite the metadata dict


def test_content_hash_is_pinned():
    # every index stores these hashes: a change to how they are made re-embeds every document of every index,
    # so it must be deliberate (a literal, not the formula again: a process-dependent hash would fail here too)
    assert Document("d", "body", "T").content_hash == "40859c45b65f3a71696f07526e0f2c39ca1320645151731b45b933a9fc3fea02"


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def test_chunking_counts_overlap_and_ids():
    doc = Document("dir/doc.md", words(10), "Title", "dir/doc.md", {"k": "v"})
    chunks = chunk_document(doc, chunk_words=4, overlap=1)
    assert [c.text for c in chunks] == ["w0 w1 w2 w3", "w3 w4 w5 w6", "w6 w7 w8 w9"]
    assert [c.chunk_id for c in chunks] == ["dir/doc.md#0", "dir/doc.md#1", "dir/doc.md#2"]
    assert all(c.title == "Title" and c.source == "dir/doc.md" and c.metadata == {"k": "v"} for c in chunks)
    assert chunks[0] == Chunk("dir/doc.md#0", "dir/doc.md", 0, "w0 w1 w2 w3", "Title", "dir/doc.md", {"k": "v"})
    # the last window ends at the last word; no tail made only of overlap words
    assert [c.text for c in chunk_document(doc, chunk_words=5, overlap=2)] == [
        "w0 w1 w2 w3 w4", "w3 w4 w5 w6 w7", "w6 w7 w8 w9"]
    # a chunk is the original text from its first to its last word: runs of spaces and line breaks survive
    spaced = Document("d", "  a  b\n\nc\td  e ")
    assert [c.text for c in chunk_document(spaced, chunk_words=3, overlap=1)] == ["a  b\n\nc", "c\td  e"]


def test_chunking_default_sizes():
    chunks = chunk_document(Document("d", words(500)))
    assert [len(c.text.split()) for c in chunks] == [200, 200, 180]
    assert chunks[1].text.split()[:40] == chunks[0].text.split()[-40:]


def test_short_and_empty_documents():
    assert [c.text for c in chunk_document(Document("d", "  just a few\nwords  "))] == ["just a few\nwords"]
    assert [c.text for c in chunk_document(Document("d", words(200)))] == [words(200)]  # exactly one window
    # a title-only record (half of CACM's documents) is found by its title: one chunk holding it
    (only,) = chunk_document(Document("d", "   \n ", "Title only"))
    assert (only.chunk_id, only.text, only.title) == ("d#0", "Title only", "")
    assert chunk_document(Document("d", "   \n ", "  ")) == []


@pytest.mark.parametrize("chunk_words, overlap", [(10, 10), (10, 11), (0, 0), (10, -1)])
def test_bad_chunking_parameters(chunk_words: int, overlap: int, tmp_path: Path):
    with pytest.raises(CorpusError) as info:
        chunk_document(Document("d", "x"), chunk_words=chunk_words, overlap=overlap)
    assert "\n" not in str(info.value)
    with pytest.raises(CorpusError):  # before reading anything
        load_corpus(tmp_path / "missing-is-not-reached", chunk_words=chunk_words, overlap=overlap)


def test_load_corpus_chunks_every_document(mixed: Path):
    docs, chunks = load_corpus(mixed, chunk_words=2, overlap=0)
    assert {c.doc_id for c in chunks} == {d.doc_id for d in docs}
    assert [c.chunk_id for c in chunks if c.doc_id == "a/guide.md"] == ["a/guide.md#0", "a/guide.md#1",
                                                                         "a/guide.md#2"]


def test_every_supported_suffix_is_read(tmp_path: Path):
    """Each advertised suffix (in upper case too) yields its document; nothing advertised lacks a reader."""
    content = {".jsonl": jsonl({"_id": "rec", "text": "from jsonl"}), ".pdf": PDF_FIXTURE.read_bytes()}
    for i, suffix in enumerate(SUPPORTED_SUFFIXES):
        name = f"f{i}{suffix.upper() if i % 2 else suffix}"
        write(tmp_path, name, content.get(suffix, f"from {suffix}"))
    docs = list(read_corpus(tmp_path))
    assert len(docs) == len(SUPPORTED_SUFFIXES) == 7
    assert all(d.text for d in docs)


# --- the bundled sample corpus -------------------------------------------------------------------------------

def test_sample_corpus_loads_and_has_the_api_key_doc():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shipped corpus must be clean
        docs, chunks = load_corpus(SAMPLE_CORPUS)
    by_id = {d.doc_id: d for d in docs}
    # every file is a document (none silently dropped), and each line of the .jsonl is one
    files = sorted(p for p in SAMPLE_CORPUS.rglob("*") if p.is_file() and p.suffix != ".jsonl")
    assert sorted(SAMPLE_CORPUS / d.source for d in docs if not d.source.endswith(".jsonl")) == files
    records = [line for p in SAMPLE_CORPUS.rglob("*.jsonl") for line in p.read_text().splitlines() if line.strip()]
    assert len(docs) == len(files) + len(records) and len(records) >= 1
    assert {Path(d.source).suffix for d in docs} >= {".md", ".txt", ".html", ".jsonl"}
    keys = by_id["security/rotating-api-keys.md"]
    assert keys.title == "Rotating API keys" and "revoke" in keys.text.lower()
    assert not keys.text.startswith("#") and keys.title not in keys.text.splitlines()[0]  # the heading left the text
    for d in docs:
        if d.source.endswith(".jsonl"):
            assert json.loads(json.dumps(d.metadata)) == d.metadata
        else:
            assert 80 <= len(d.text.split()) <= 400, d.doc_id
    assert {c.doc_id for c in chunks} == set(by_id)
