"""What used to go wrong for a new user: names that were paths, a user's folder overwritten, two corpus roots, changed
settings ignored, stuck indexes, silent skips. Each test failed on the code before the fix."""

from __future__ import annotations

import json
import shutil

from test_cli import KEYS_DOC, corpus, fails, ok, reuse_loaded_models, rkit, search_json  # noqa: F401 (fixtures)


def write(folder, files: dict):
    for rel, text in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return folder


def test_name_is_a_name_and_a_users_folder_is_never_touched(index_home, corpus, tmp_path):
    for bad in ("../..", "../escape", str(tmp_path / "abs"), "a/b", ".hidden", ""):
        fails("index", corpus, "--name", bad, needle="bad index name")
    assert not (tmp_path / "abs").exists() and not (tmp_path / "escape").exists()
    # a folder of the user's where the index would go: refused, and every file of theirs is still there
    mine = index_home / "kb"
    write(mine, {"docs.sqlite": "my own database", "qdrant/notes.txt": "keep me", "faiss.index": "mine"})
    fails("index", corpus, "--name", "kb", needle="not an rkit index")
    fails("index", corpus, "--name", "kb", "--rebuild", needle="not an rkit index")
    assert (mine / "docs.sqlite").read_text() == "my own database" and (mine / "qdrant" / "notes.txt").is_file()
    assert (mine / "faiss.index").read_text() == "mine"


def test_search_by_name_from_the_corpus_folder_and_index_dir(tmp_path, corpus, monkeypatch):
    """The README flow: run from the folder holding the corpus `docs/`; `--index docs` is the index, not ./docs."""
    monkeypatch.delenv("RKIT_INDEX_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    shutil.move(str(corpus), tmp_path / "docs")
    ok("index", "docs")  # name defaults to the folder's name, under ./indexes
    assert search_json("how do I rotate the API keys?", "--index", "docs")["results"][0]["hits"][0]["doc_id"] == KEYS_DOC
    elsewhere = tmp_path / "elsewhere"
    ok("index", "docs", "--name", "kb", "--index-dir", elsewhere)
    out = search_json("how do I rotate the API keys?", "--index", "kb", "--index-dir", elsewhere)
    assert out["results"][0]["hits"][0]["doc_id"] == KEYS_DOC
    assert json.loads(ok("info", "kb", "--index-dir", elsewhere, "--json").stdout)["folder"] == str(elsewhere / "kb")
    assert json.loads(ok("info", "./indexes/docs", "--json").stdout)["name"] == "docs"  # a path is a path


def test_two_corpus_roots_in_one_index(index_home, tmp_path):
    a = write(tmp_path / "a", {"alpha.md": "# Alpha\nThe alpha team owns the billing service.",
                               "README.md": "Alpha readme: deploy with make deploy."})
    b = write(tmp_path / "b", {"beta.md": "# Beta\nThe beta team owns the search cluster."})
    ok("index", a, "--name", "kb")
    ok("index", b, "--name", "kb")
    # re-indexing a/ must not prune b/'s documents (they are not a/'s), and both stay findable
    report = json.loads(ok("index", a, "--name", "kb", "--json").stdout)
    assert report["deleted"] == 0 and report["total_documents"] == 3
    hit = search_json("who owns the search cluster?", "--index", "kb", "-k", "1")["results"][0]["hits"][0]
    assert hit["doc_id"] == "beta.md"
    # a clash of document ids between roots is refused, naming both, instead of overwriting a/README.md
    write(b, {"README.md": "Beta readme."})
    fails("index", b, "--name", "kb", needle="already indexed from")
    (b / "README.md").unlink()
    (b / "beta.md").unlink()
    write(b, {"gamma.md": "Gamma notes."})
    report = json.loads(ok("index", b, "--name", "kb", "--json").stdout)
    assert report["deleted"] == 1 and report["added"] == 1 and report["total_documents"] == 3


def test_moved_corpus_root_is_adopted_and_pruned(index_home, tmp_path):
    old = write(tmp_path / "old", {"one.txt": "first file", "two.txt": "second file"})
    ok("index", old, "--name", "kb")
    new = tmp_path / "new"
    shutil.move(str(old), new)
    (new / "two.txt").unlink()
    report = json.loads(ok("index", new, "--name", "kb", "--json").stdout)
    assert report["deleted"] == 1 and report["unchanged"] == 1
    assert any("no longer exists" in n for n in report["notes"])


def test_changed_settings_are_applied_or_refused(index_home, corpus):
    ok("index", corpus, "--name", "kb")
    first = json.loads(ok("info", "kb", "--json").stdout)
    report = json.loads(ok("index", corpus, "--name", "kb", "--chunk-words", "60", "--overlap", "10", "--json").stdout)
    assert report["updated"] == first["counts"]["documents"] and any("chunking changed" in n for n in report["notes"])
    info = json.loads(ok("info", "kb", "--json").stdout)
    assert info["chunking"]["chunk_words"] == 60 and info["counts"]["chunks"] > first["counts"]["chunks"]
    again = json.loads(ok("index", corpus, "--name", "kb", "--json").stdout)  # no flags: keep the index's recipe
    assert again["chunks_embedded"] == 0
    report = json.loads(ok("index", corpus, "--name", "kb", "--factory", "HNSW32", "--json").stdout)
    assert report["chunks_embedded"] == 0 and json.loads(ok("info", "kb", "--json").stdout)["factory"] == "HNSW32"
    assert search_json("how do I rotate the API keys?", "--index", "kb")["results"][0]["hits"][0]["doc_id"] == KEYS_DOC
    fails("index", corpus, "--name", "kb", "--backend", "qdrant", needle="uses the faiss backend")
    ok("index", corpus, "--name", "kb", "--query-mode", "teacher")
    assert json.loads(ok("info", "kb", "--json").stdout)["encoder"]["query_mode"] == "teacher"


def test_small_ivf_index_is_never_stuck(index_home, tmp_path):
    small = write(tmp_path / "small", {f"f{i}.txt": f"note {i} about topic {i}" for i in range(5)})
    report = json.loads(ok("index", small, "--name", "kb", "--factory", "IVF256,Flat", "--json").stdout)
    assert any("exact search" in n for n in report["notes"])
    assert "exact search" in ok("info", "kb").stdout
    assert search_json("topic 3", "--index", "kb", "-k", "1")["results"][0]["hits"][0]["doc_id"] == "f3.txt"
    ok("index", small, "--name", "kb")  # re-index works too


def test_corrupt_index_has_a_way_out(index_home, corpus):
    ok("index", corpus, "--name", "kb")
    (index_home / "kb" / "docs.sqlite").write_bytes(b"garbage" * 100)
    fails("search", "q", "--index", "kb", needle="--rebuild")
    fails("index", corpus, "--name", "kb", needle="--rebuild")
    ok("index", corpus, "--name", "kb", "--rebuild")
    assert search_json("how do I rotate the API keys?", "--index", "kb")["results"][0]["hits"][0]["doc_id"] == KEYS_DOC


def test_skip_bad_files_warns_and_all_bad_files_are_listed_at_once(index_home, tmp_path):
    docs = write(tmp_path / "docs", {"good.txt": "a good file"})
    (docs / "one.txt").write_bytes(b"\x00\x01 binary")
    (docs / "two.md").write_bytes(b"ok\x00 binary later")
    result = rkit("index", docs, "--name", "kb")
    assert result.exit_code != 0 and "one.txt" in result.output and "two.md" in result.output
    result = rkit("index", docs, "--name", "kb", "--skip-bad-files")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "one.txt" in warnings[0] + warnings[1]


def test_files_found_but_not_indexed_are_named_in_a_note(index_home, tmp_path):
    """Empty files and files of other types used to vanish without a word."""
    docs = write(tmp_path / "docs", {"good.txt": "a good file", "empty.txt": "", "blank.md": "  \n\n",
                                     "notes.rst": "not read", "data.csv": "a,b", "more.csv": "c,d"})
    (docs / "blob.bin").write_bytes(b"\x00\x01")
    report = json.loads(ok("index", docs, "--name", "kb", "--json").stdout)
    assert report["added"] == 1
    (note,) = [n for n in report["notes"] if n.startswith("not indexed:")]
    assert "4 files of other types (.csv ×2" in note and ".bin ×1" in note and ".rst ×1" in note, note
    assert "2 empty files (blank.md, empty.txt)" in note, note
    assert "not indexed: 4 files" in ok("index", docs, "--name", "kb").stdout  # said on every run, as text too


def test_a_question_word_alone_finds_nothing_lexically(index_home, tmp_path):
    """A chunk that shared only "how" with the query ranked second in a hybrid search of a small index: question
    words and pronouns are query stop words now (index/lexical.QUERY_STOPWORDS)."""
    docs = write(tmp_path / "docs", {"cooking.txt": "How to bake sourdough bread at home.",
                                     "keys.md": "Rotate credentials: create a new access key, then revoke the old one.",
                                     "vpn.md": "The VPN uses WireGuard profiles."})
    ok("index", docs, "--name", "kb")
    hits = search_json("how do I change my access credentials?", "--index", "kb", "--query-mode", "bm25")
    assert [h["doc_id"] for h in hits["results"][0]["hits"]] == ["keys.md"]
    hybrid = search_json("how do I change my access credentials?", "--index", "kb")["results"][0]["hits"]
    assert hybrid[0]["doc_id"] == "keys.md"
    assert all("bm25" not in h["signals"] for h in hybrid if h["doc_id"] != "keys.md"), hybrid
    out = ok("search", "what is it?", "--index", "kb", "--query-mode", "bm25").stdout  # nothing but stop words
    assert "no chunk shares a word with the query" in out


def test_cli_output_paper_cuts(index_home, corpus):
    fails("search", "q", "--index", "kb", "-k", "0", needle="Invalid value for '-k'")
    assert "no indexes under" in ok("list").stdout
    ok("index", corpus, "--name", "kb")
    listing = ok("list").stdout
    assert "kb" in listing and "{" not in listing  # a table, not dict reprs
    out = ok("search", "how do I rotate the API keys?", "--index", "kb", "--query-mode", "teacher", "--explain").stdout
    assert "decoded from the generative embedding" in " ".join(out.split())
    wide = ok("search", "how do I rotate the API keys?", "--index", "kb", "-k", "3").stdout
    assert f"{KEYS_DOC}#0" in wide  # ids are never folded across lines when piped


def test_every_indexed_chunk_fits_the_teachers_window(index_home, corpus, encoder):
    """200 words + title used to overflow all-MiniLM-L6-v2's 256 tokens in 9 of 29 sample chunks (the tail was never
    embedded); chunks are now measured with the teacher's own tokenizer, title line included."""
    from retrieval_kit.corpus import Chunk, embed_text
    from retrieval_kit.index import Index

    ok("index", corpus, "--name", "kb")
    tokenizer, cap = encoder.teacher.tokenizer, encoder.teacher.max_seq_length
    with Index.open(index_home / "kb") as index:
        assert index.manifest["chunking"]["max_tokens"] == cap == 256
        chunks = [p for _, _, payloads, _ in index.store.iter_batches() for p in payloads]
    texts = [embed_text(Chunk(p["chunk_id"], p["doc_id"], p["n"], p["text"], p["title"], p["source"], {}))
             for p in chunks]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    assert len(chunks) > 29 and max(lengths) <= cap


def test_rebuild_keeps_the_settings_the_index_recorded_unless_flags_say_otherwise(index_home, corpus):
    """--rebuild used to come back as Flat with the default chunking: README's "flags left out keep what the index
    records" held for every run but this one."""
    ok("index", corpus, "--name", "kb", "--factory", "HNSW32", "--search-params", "efSearch=256",
       "--chunk-words", "50", "--overlap", "10")
    report = json.loads(ok("index", corpus, "--name", "kb", "--rebuild", "--json").stdout)
    assert any("rebuilt with the settings the old index recorded" in note and "HNSW32" in note
               for note in report["notes"]), report["notes"]
    info = json.loads(ok("info", "kb", "--json").stdout)
    assert info["factory"] == "HNSW32" and info["faiss_params"]["efSearch"] == 256
    assert (info["chunking"]["chunk_words"], info["chunking"]["overlap"]) == (50, 10)
    # a flag given with --rebuild wins over the record; the rest is still kept
    ok("index", corpus, "--name", "kb", "--rebuild", "--factory", "Flat")
    info = json.loads(ok("info", "kb", "--json").stdout)
    assert info["factory"] == "Flat" and info["chunking"]["chunk_words"] == 50
    assert search_json("how do I rotate the API keys?", "--index", "kb")["results"][0]["hits"][0]["doc_id"] == KEYS_DOC


def test_an_unfaithful_decode_is_not_printed(capsys):
    """The CLI printed the decode of a 2-step adapter (ROUGE-L 0.00) beside the note saying it is not shown; --json
    and the server already honoured ``shown``."""
    from rkit_cli.main import _print_explanation

    note = "this adapter's decodes are not yet faithful: held-out ROUGE-L 0.00"
    _print_explanation({"text": "n...n.n.n noise", "shown": False, "note": note, "lens": {}})
    out = " ".join(capsys.readouterr().out.split())
    assert "not shown" in out and "not yet faithful" in out and "noise" not in out, out
    _print_explanation({"text": "The API keys are rotated", "shown": True, "note": "held-out ROUGE-L 0.27", "lens": {}})
    assert "The API keys are rotated" in capsys.readouterr().out


def test_a_snippet_shows_the_query_word_a_long_chunk_was_found_by():
    """A chunk BM25 ranked first for a word late in it showed a snippet cut off before that word."""
    from retrieval_kit.search import SNIPPET_CHARS, snippet

    text = "Intro words here. " * 40 + "Rotate credentials with ZQXWALKTWO, then revoke the old key. " + "Tail. " * 40
    plain = snippet(text)
    assert "ZQXWALKTWO" not in plain and plain.startswith("Intro")
    shown = snippet(text, query="how do I rotate my ZQXWALKTWO credential?")
    assert "ZQXWALKTWO" in shown and "credentials" in shown and shown.startswith("…") and shown.endswith("…")
    assert len(shown) <= SNIPPET_CHARS
    # a word the plain cut already shows, or none at all (stop words only): the plain cut
    assert snippet(text, query="intro") == plain == snippet(text, query="what is it")
