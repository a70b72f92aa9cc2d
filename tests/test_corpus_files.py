"""Real-world files: declared and legacy encodings, NUL bytes anywhere, every bad file in one error, Markdown titles."""

from __future__ import annotations

import codecs
import json
import random
import warnings
from pathlib import Path

import pytest

from retrieval_kit.corpus import CorpusWarning, load_corpus, read_corpus
from retrieval_kit.errors import CorpusError

FRENCH = "Le café crème — très « naïf » : l’été à Besançon, 15 €."  # cp1252-only characters: — ’ €


def write(root: Path, rel: str, content: str | bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def error_of(path, **kwargs) -> CorpusError:
    """Read everything, expect one CorpusError whose message is one line."""
    with pytest.raises(CorpusError) as info:
        list(read_corpus(path, **kwargs))
    assert "\n" not in str(info.value) and str(info.value).strip() == str(info.value)
    return info.value


def garbage(n: int = 300, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    return b"ok \xff" + bytes(rng.randrange(1, 256) for _ in range(n))  # no NUL; 0xFF is never UTF-8


def only_doc(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file read correctly gives no warning either
        (doc,) = read_corpus(path)
    return doc


# --- encodings -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["menu.txt", "menu.md"])
def test_windows_1252_text_keeps_its_characters(tmp_path: Path, name: str):
    doc = only_doc(write(tmp_path, name, f"{FRENCH}\n\nSecond paragraph, still {FRENCH}\n".encode("cp1252")))
    assert doc.text.startswith(FRENCH) and doc.text.endswith(FRENCH)
    assert doc.metadata == {"encoding": "cp1252"}


def test_short_latin1_word_is_cafe_not_a_guess_from_afar(tmp_path: Path):
    # charset-normalizer alone reads these 4 bytes as UTF-16-BE ('捡曩') and "café au lait" as cp1006
    assert only_doc(write(tmp_path, "a.txt", b"caf\xe9")).text == "café"
    assert only_doc(write(tmp_path, "b.md", "# Café\n\ncafé au lait".encode("latin-1"))).title == "Café"


def test_utf8_files_record_no_encoding(tmp_path: Path):
    assert only_doc(write(tmp_path, "a.txt", FRENCH)).metadata == {}
    assert only_doc(write(tmp_path, "b.txt", codecs.BOM_UTF8 + FRENCH.encode())).text == FRENCH  # BOM dropped


@pytest.mark.parametrize("codec, bom", [("utf-16-le", codecs.BOM_UTF16_LE), ("utf-16-be", codecs.BOM_UTF16_BE),
                                        ("utf-32-le", codecs.BOM_UTF32_LE), ("utf-32-be", codecs.BOM_UTF32_BE)])
def test_utf16_and_utf32_with_bom(tmp_path: Path, codec: str, bom: bytes):
    text = f"{FRENCH} ✓ 日本語"
    doc = only_doc(write(tmp_path, "wide.txt", bom + text.encode(codec)))  # full of NUL bytes, yet text
    assert doc.text == text and doc.metadata == {"encoding": codec}


@pytest.mark.parametrize("head", [
    '<meta charset="ISO-8859-1">',
    '<meta http-equiv="Content-Type" content="text/html; charset=iso-8859-1">',
    "<?xml version='1.0' encoding='ISO-8859-1'?>",
])
def test_html_declared_latin1_reads_as_browsers_do(tmp_path: Path, head: str):
    page = f"<html><head>{head}<title>Caf\xe9</title></head><body><p>{FRENCH}</p></body></html>"
    doc = only_doc(write(tmp_path, "page.html", page.encode("cp1252")))
    assert (doc.title, doc.text) == ("Café", FRENCH)  # 'Latin-1' pages use windows-1252's ’ and —, as browsers know


def test_html_declared_charset_is_honoured_where_a_guess_goes_wrong(tmp_path: Path):
    russian = "Привет, мир! Это проверка кодировки."
    body = russian.encode("koi8-r")
    # undeclared, these bytes are guessed as something else entirely ...
    assert only_doc(write(tmp_path, "a/plain.txt", body)).text != russian
    # ... declared, they are what the page says
    page = b'<html><head><meta charset="koi8-r"></head><body><p>' + body + b"</p></body></html>"
    doc = only_doc(write(tmp_path, "b/page.html", page))
    assert doc.text == russian and doc.metadata == {"encoding": "koi8-r"}


def test_html_valid_utf8_wins_over_a_stale_latin1_declaration(tmp_path: Path):
    page = f'<meta charset="iso-8859-1"><p>{FRENCH}</p>'.encode("utf-8")
    assert only_doc(write(tmp_path, "page.html", page)).text == FRENCH


def test_docs_folder_with_a_few_legacy_files_reads_whole(tmp_path: Path):
    for i in range(40):
        write(tmp_path, f"utf8/{i:02}.md", f"# Page {i}\n\n{FRENCH} {i}\n")
    for i in range(4):
        write(tmp_path, f"legacy/{i}.txt", f"{FRENCH} {i}".encode("cp1252"))
        write(tmp_path, f"legacy/{i}.md", f"# Légende {i}\n\n{FRENCH}".encode("latin-1", "replace"))
    write(tmp_path, "legacy/page.htm", f'<meta charset="windows-1252"><p>{FRENCH}</p>'.encode("cp1252"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        docs, _ = load_corpus(tmp_path)
    assert len(docs) == 49
    assert all("café" in d.text for d in docs)
    assert {d.title for d in docs if d.doc_id.endswith(".md")} >= {"Légende 0", "Page 39"}


def test_garbage_is_still_an_error(tmp_path: Path):
    path = write(tmp_path, "noise.txt", garbage())
    assert str(error_of(path)) == f"{path}: not valid UTF-8 (byte offset 3) and no other text encoding fits"
    bad_bom = write(tmp_path, "bad.txt", codecs.BOM_UTF8 + b"caf\xe9")  # a UTF-8 mark is a promise
    assert str(error_of(bad_bom)) == f"{bad_bom}: not valid UTF-8 despite its byte-order mark (byte offset 6)"


def test_jsonl_stays_utf8_only(tmp_path: Path):
    # JSON text is UTF-8 by definition: a record in another encoding is a broken record, not guessed at
    path = write(tmp_path, "c.jsonl", b'{"_id": "a", "text": "caf\xe9"}\n')
    assert str(error_of(path)) == f"{path} line 1: not valid UTF-8 (byte offset 25)"


# --- NUL bytes anywhere --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["late.txt", "late.md", "late.html"])
def test_nul_after_the_first_8kb_is_binary_too(tmp_path: Path, name: str):
    path = write(tmp_path, name, b"word " * 4000 + b"\0tail")
    assert str(error_of(path)) == f"{path}: looks like a binary file (NUL byte at offset 20000)"


def test_nul_character_in_utf16_is_binary(tmp_path: Path):
    path = write(tmp_path, "wide.txt", codecs.BOM_UTF16_LE + "ab\0c".encode("utf-16-le"))
    assert str(error_of(path)) == f"{path}: looks like a binary file (NUL byte at offset 6)"


def test_jsonl_nul_fails_its_own_line(tmp_path: Path):
    first = (json.dumps({"_id": "a", "text": "x" * 9000}) + "\n").encode()  # past the 8 KB probe
    second = b'{"_id": "b", "text": "raw\0nul"}\n'
    third = (json.dumps({"_id": "c", "text": "escaped \u0000 nul"}) + "\n").encode()
    fourth = (json.dumps({"_id": "d", "text": "fine"}) + "\n").encode()
    path = write(tmp_path, "c.jsonl", first + second + third + fourth)
    with pytest.warns(CorpusWarning) as caught:
        docs = list(read_corpus(path, on_error="skip"))
    assert [d.doc_id for d in docs] == ["a", "d"] and not any("\0" in d.text for d in docs)
    assert [str(w.message) for w in caught] == [
        f"{path} line 2: looks like binary data (NUL byte at offset {len(first) + 25})",
        f'{path} line 3: "text" contains a NUL character (\\u0000)']


# --- every bad file of a run in one error --------------------------------------------------------------------

@pytest.fixture
def many_bad(tmp_path: Path) -> Path:
    write(tmp_path, "good.txt", "good text")
    write(tmp_path, "a-binary.txt", b"x\0y")
    write(tmp_path, "b-noise.md", garbage())
    write(tmp_path, "c-huge.txt", "x" * 500)
    write(tmp_path, "d-late-nul.html", b"<p>" + b"a " * 5000 + b"\0</p>")
    write(tmp_path, "e-noise.txt", garbage(seed=1))
    write(tmp_path, "f-noise.txt", garbage(seed=2))
    write(tmp_path, "g-broken.pdf", b"%PDF-1.4\nnot really\n")
    write(tmp_path, "h-records.jsonl", '{"_id": "r1", "text": "ok"}\n{broken\n{"_id": "r2", "text": "ok"}\n')
    return tmp_path


def test_all_bad_files_in_one_error(many_bad: Path):
    seen = []
    with pytest.raises(CorpusError) as info:
        for doc in read_corpus(many_bad, max_file_bytes=400):
            seen.append(doc.doc_id)
    assert seen == ["good.txt", "r1", "r2"]  # reading went on past every bad file
    message, errors = str(info.value), info.value.errors
    assert "\n" not in message
    bad = ["a-binary.txt", "b-noise.md", "c-huge.txt", "d-late-nul.html", "e-noise.txt", "f-noise.txt",
           "g-broken.pdf", "h-records.jsonl line 2"]
    assert [e.split(many_bad.as_posix() + "/")[1].split(":")[0] for e in errors] == bad
    assert message.startswith("8 bad files: ")
    assert message.endswith("; … and 3 more")
    assert all(e in message for e in errors[:5]) and not any(e in message for e in errors[5:])


def test_problems_in_one_file_are_counted_as_records(tmp_path: Path):
    path = write(tmp_path, "c.jsonl", '{"_id": "a", "text": "ok"}\n[1]\n{"_id": "a", "text": "dup"}\n{x\n')
    error = error_of(path)
    assert str(error).startswith(f"3 problems in 1 file: {path} line 2: expected a JSON object")
    assert len(error.errors) == 3 and "… and" not in str(error)


def test_one_bad_file_keeps_its_own_message(tmp_path: Path):
    write(tmp_path, "good.txt", "fine")
    path = write(tmp_path, "bad.txt", b"\0")
    error = error_of(tmp_path)
    assert str(error) == f"{path}: looks like a binary file (NUL byte at offset 0)" and error.errors == [str(error)]


def test_skip_warns_once_per_bad_file_and_goes_on(many_bad: Path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        docs, _ = load_corpus(many_bad, on_error="skip", max_file_bytes=400)
    assert [d.doc_id for d in docs] == ["good.txt", "r1", "r2"]
    assert len([w for w in caught if issubclass(w.category, CorpusWarning)]) == 8


def test_load_corpus_raises_the_collected_error_before_chunking(many_bad: Path):
    with pytest.raises(CorpusError, match=r"^8 bad files: "):
        load_corpus(many_bad, max_file_bytes=400)


# --- Markdown titles from the parser -------------------------------------------------------------------------

def md_doc(tmp_path: Path, text: str, name: str = "guide.md"):
    return only_doc(write(tmp_path, name, text))


def test_hash_comment_in_fenced_code_is_not_the_title(tmp_path: Path):
    code = "```bash\n# install the tools\npip install rkit\n```"
    doc = md_doc(tmp_path, f"Intro paragraph.\n\n{code}\n\n# Real Title\n\nBody text.\n")
    assert doc.title == "Real Title"
    # the code block is intact; exactly the heading's line left (the blank lines around it stay)
    assert doc.text == f"Intro paragraph.\n\n{code}\n\n\nBody text."


def test_no_heading_outside_code_means_no_title(tmp_path: Path):
    text = "```\n# not a title\n```\n\n    # indented code, not a title\n\n> # a quote, not the title\n"
    doc = md_doc(tmp_path, text, "notes.md")
    assert doc.title == "notes" and doc.text == text.strip()


def test_setext_heading_is_a_title_and_both_its_lines_leave(tmp_path: Path):
    doc = md_doc(tmp_path, "The *Setext* Guide\n==================\n\nBody.\n")
    assert (doc.title, doc.text) == ("The Setext Guide", "Body.")


def test_title_is_plain_text_and_only_level_one(tmp_path: Path):
    doc = md_doc(tmp_path, "## Overview\n\nabout\n\n# Using `rkit` &amp; [FAISS](https://faiss.ai) #\n\nbody\n")
    assert doc.title == "Using rkit & FAISS"
    assert doc.text == "## Overview\n\nabout\n\n\nbody"


def test_crlf_markdown_removes_exactly_the_heading_line(tmp_path: Path):
    doc = md_doc(tmp_path, "# Title\r\nfirst line\r\n\r\nsecond\r\n")
    assert (doc.title, doc.text) == ("Title", "first line\r\n\r\nsecond")
