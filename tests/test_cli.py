"""What a user types: `rkit index`, `rkit search --explain/--json`, `rkit info`, and every bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import retrieval_kit.models as models
import retrieval_kit.search as search_mod
from retrieval_kit.paths import SAMPLE_CORPUS
from rkit_cli.main import app

RUNNER = CliRunner()
DECODING_HINTS = []  # the `decoding` each CLI command passed to load_encoder (models/backbone.pick_dtype)
KEYS_DOC = "security/rotating-api-keys.md"


@pytest.fixture(autouse=True)
def reuse_loaded_models(encoder, monkeypatch):
    """Real models, loaded once: every CLI call would otherwise spend seconds re-reading the same weights."""
    cache = {}
    real = models.load_encoder

    def cached(adapter=None, backbone=None, teacher=None, device=None, with_teacher=True, decoding=False):
        DECODING_HINTS.append(decoding)
        key = (str(adapter), backbone, teacher)
        if key not in cache:
            cache[key] = encoder if adapter is None and backbone is None and teacher is None else real(
                adapter, backbone, teacher, device="cpu")
        return cache[key]

    monkeypatch.setattr(models, "load_encoder", cached)
    monkeypatch.setattr(search_mod, "load_encoder", cached)


def rkit(*args: str):
    return RUNNER.invoke(app, [str(a) for a in args], prog_name="rkit")


def ok(*args: str):
    result = rkit(*args)
    assert result.exit_code == 0, result.output
    return result


def fails(*args: str, needle: str):
    result = rkit(*args)
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:"), result.output
    assert needle in " ".join(lines[-2:]), result.output  # rich may wrap a long line; it is one message
    return result


def search_json(*args: str) -> dict:
    return json.loads(ok("search", *args, "--json").stdout)


@pytest.fixture()
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    shutil.copytree(SAMPLE_CORPUS, folder)
    return folder


def test_index_and_search_sample_corpus(index_home, corpus, encoder):
    report = json.loads(ok("index", corpus, "--name", "kb", "--json").stdout)
    assert report["added"] >= 15 and report["total_chunks"] >= report["total_documents"]
    out = search_json("how do I rotate the API keys?", "--index", "kb", "-k", "3", "--explain")
    assert DECODING_HINTS[-1] is True  # an explained search asks for the weight type that decodes fastest
    (result,) = out["results"]
    assert result["hits"][0]["doc_id"] == KEYS_DOC
    search_json("how do I rotate the API keys?", "--index", "kb", "-k", "3")
    assert DECODING_HINTS[-1] is False
    told = result["explanation"]  # the explanation as the server sends it: text, trust note, lenses
    assert told["text"] and told["note"] and told["decoded_from"] == "generative"
    assert told["lens"]["words"] and len(told["lens"]["logit"]) == encoder.config.n_thought + encoder.config.n_compress
    # new indexes search hybrid by default; the top hit says which signals found it
    trained = encoder.config.trained
    assert result["query_mode"] == "hybrid"
    assert set(result["hits"][0]["signals"]) <= {"bm25", "teacher", "fused"} and result["hits"][0]["signals"]
    table = ok("search", "how do I rotate the API keys?", "--index", "kb", "--explain").stdout
    assert "rotating-api-keys" in table and "explanation" in table and ("UNTRAINED" in table) == (not trained)
    # an adapter whose decodes are not yet faithful says so next to the explanation (its model card's ROUGE-L)
    rouge = encoder.describe()["explain_rouge_l"]
    assert ("not yet faithful" in " ".join(table.split())) == (trained and rouge is not None and rouge < 0.2)


def test_explain_command_decodes_and_reads_the_lenses(encoder, tmp_path):
    query = "which license allows commercial use without sharing source"
    out = json.loads(ok("explain", query, "--tokens", "8", "--top-k", "3", "--answers", "2", "--json").stdout)
    (result,) = out["results"]
    told = result["explanation"]
    assert result["query"] == query and told["text"] and told["decoded_from"] == "generative"
    assert all(len(row["top"]) == 3 for row in told["lens"]["logit"])
    assert len(told["lens"]["latent"]) == 2  # the shipped adapter carries an answer bank
    table = " ".join(ok("explain", query, "--tokens", "8").stdout.split())
    assert "logit lens" in table and "c10" in table and "explanation:" in table
    fails("explain", "  ", needle="empty query")
    fails("explain", "q", "--adapter", tmp_path, needle="not an adapter folder")


def test_search_filters_by_source_prefix_and_file_type(index_home, corpus):
    ok("index", corpus, "--name", "kb")
    out = search_json("how do I rotate the API keys?", "--index", "kb", "-k", "3", "--source-prefix", "general/")
    hits = out["results"][0]["hits"]
    assert len(hits) == 3 and all(h["source"].startswith("general/") for h in hits)
    out = search_json("backups", "--index", "kb", "-k", "2", "--file-type", "txt", "--query-mode", "bm25")
    assert {h["source"] for h in out["results"][0]["hits"]} == {"operations/database-backups.txt"}  # its chunks
    fails("search", "x", "--index", "kb", "--file-type", "../etc", needle="is not a file type")
    # a filter nothing matches says so (it used to say "the index is empty")
    for mode in ("hybrid", "bm25"):
        out = ok("search", "backups", "--index", "kb", "--source-prefix", "nowhere/", "--query-mode", mode).stdout
        assert "no chunk matches --source-prefix/--file-type" in out, out


def test_a_query_longer_than_the_models_read_says_so(index_home, corpus):
    """A pasted paragraph used to lose its end silently: the teacher reads 256 word pieces, the backbone 256
    tokens. BM25 reads it whole, so a bm25 search has no note."""
    ok("index", corpus, "--name", "kb")
    long = "how do I rotate the API keys? " + "please tell me the exact steps in order " * 60
    out = search_json(long, "short question", "--index", "kb", "--query-mode", "fused", "-k", "2")
    cut, whole = out["results"]
    assert whole["notes"] == []
    (note,) = cut["notes"]
    assert "the teacher reads its first 256 of" in note and "the backbone reads its first 256 of" in note, note
    assert search_json(long, "--index", "kb", "--query-mode", "teacher")["results"][0]["notes"] == [
        note.split(", the backbone")[0]]
    assert search_json(long, "--index", "kb", "--query-mode", "bm25")["results"][0]["notes"] == []
    table = " ".join(ok("search", long, "--index", "kb", "--query-mode", "teacher").stdout.split())
    assert "note: long query: the teacher reads its first 256 of" in table, table


def test_generative_and_fused_modes_run(index_home, corpus):
    ok("index", corpus, "--name", "kb")
    for mode in ("generative", "fused"):
        out = search_json("reset my password", "--index", "kb", "--query-mode", mode, "-k", "2")
        assert len(out["results"][0]["hits"]) == 2 and out["results"][0]["query_mode"] == mode


def test_info_reports_counts_dim_backend_fingerprint(index_home, corpus, encoder):
    ok("index", corpus, "--name", "kb")
    info = json.loads(ok("info", "kb", "--json").stdout)
    assert info["backend"] == "faiss" and info["dim"] == 384
    assert info["counts"]["documents"] >= 15 and info["encoder"]["fingerprint"] == encoder.fingerprint
    assert "chunks" in ok("info", "kb").stdout


def test_incremental_reindex(index_home, corpus):
    ok("index", corpus, "--name", "kb")
    again = json.loads(ok("index", corpus, "--name", "kb", "--json").stdout)
    assert again["added"] == again["updated"] == again["deleted"] == again["chunks_embedded"] == 0
    (corpus / "general" / "photosynthesis.txt").unlink()
    (corpus / "security" / "vpn-setup.md").write_text("# VPN\nThe VPN now uses WireGuard; import the profile.\n")
    (corpus / "new.txt").write_text("The cafeteria serves ramen on Thursdays.")
    report = json.loads(ok("index", corpus, "--name", "kb", "--json").stdout)
    assert (report["added"], report["updated"], report["deleted"]) == (1, 1, 1)
    assert report["chunks_embedded"] == 2
    hits = search_json("what does the cafeteria serve on Thursday?", "--index", "kb", "-k", "1")["results"][0]["hits"]
    assert hits[0]["doc_id"] == "new.txt"
    sources = {h["doc_id"] for h in search_json("photosynthesis light energy", "--index", "kb", "-k", "20")["results"][0]["hits"]}
    assert "general/photosynthesis.txt" not in sources


def test_qdrant_and_faiss_agree(index_home, corpus):
    ok("index", corpus, "--name", "kb-f")
    ok("index", corpus, "--name", "kb-q", "--backend", "qdrant")
    assert json.loads(ok("info", "kb-q", "--json").stdout)["backend"] == "qdrant"
    for query in ("how do I rotate the API keys?", "expense report deadline", "how do vaccines work"):
        f = search_json(query, "--index", "kb-f", "-k", "5")["results"][0]["hits"]
        q = search_json(query, "--index", "kb-q", "-k", "5")["results"][0]["hits"]
        assert [h["chunk_id"] for h in f] == [h["chunk_id"] for h in q]
        np.testing.assert_allclose([h["score"] for h in f], [h["score"] for h in q], atol=1e-4)


def test_hnsw_factory(index_home, corpus):
    ok("index", corpus, "--name", "kb-h", "--factory", "HNSW32")
    hits = search_json("how do I rotate the API keys?", "--index", "kb-h")["results"][0]["hits"]
    assert hits[0]["doc_id"] == KEYS_DOC


def test_bad_inputs_are_one_line_errors(index_home, tmp_path, corpus):
    fails("index", tmp_path / "missing", "--name", "x", needle="does not exist")
    (tmp_path / "empty").mkdir()
    fails("index", tmp_path / "empty", "--name", "x", needle="no documents")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ok.txt").write_text("fine")
    (bad / "blob.txt").write_bytes(b"\x00\x01\x02binary")
    fails("index", bad, "--name", "x", needle="blob.txt")
    (bad / "blob.txt").unlink()
    (bad / "records.jsonl").write_text('{"_id": "1", "text": "a"}\n{"_id": 2, "text": \n')
    fails("index", bad, "--name", "x", needle="line 2")
    fails("search", "anything", "--index", "nope", needle="nope")
    fails("info", "nope", needle="nope")
    ok("index", corpus, "--name", "kb")
    fails("info", "nope", needle="indexes in")  # and names the ones that are there
    for device in ("bogus", "cuda:x", "gpu"):  # refused before any model loads (bm25 would load none)
        fails("search", "q", "--index", "kb", "--query-mode", "bm25", "--device", device, needle=f"'{device}'")
    fails("explain", "q", "--device", "bogus", needle="--device")
    fails("search", "q", "--index", "kb", "--explain-tokens", "0", needle="Invalid value for '--explain-tokens'")
    fails("explain", "q", "--tokens", "600", needle="Invalid value for '--tokens'")
    fails("search", "   ", "--index", "kb", needle="empty query")
    fails("search", "q", "--index", "kb", "--query-mode", "psychic", needle="psychic")
    fails("index", corpus, "--name", "kb2", "--backend", "elastic", needle="elastic")
    fails("index", corpus, "--name", "kb3", "--factory", "NotAFactory", needle="NotAFactory")
    fails("index", corpus, "--name", "kb", "--doc-encoder", "generative", needle="documents")


def test_failed_reindex_keeps_what_was_indexed(index_home, corpus):
    ok("index", corpus, "--name", "kb")
    before = json.loads(ok("info", "kb", "--json").stdout)["counts"]
    (corpus / "broken.jsonl").write_text("{not json}\n")
    fails("index", corpus, "--name", "kb", needle="broken.jsonl")
    assert json.loads(ok("info", "kb", "--json").stdout)["counts"] == before
    assert search_json("how do I rotate the API keys?", "--index", "kb")["results"][0]["hits"][0]["doc_id"] == KEYS_DOC
    report = json.loads(ok("index", corpus, "--name", "kb", "--skip-bad-files", "--json").stdout)
    assert report["unchanged"] == before["documents"]


def test_another_adapter_searches_teacher_documents_but_not_generative_ones(index_home, corpus, encoder, tmp_path):
    """Teacher-embedded documents do not depend on the adapter: a retrained adapter (same teacher) searches them
    without a re-index, and each search records its query encoder. Generative documents belong to their adapter."""
    other = tmp_path / "other-adapter"
    encoder.save(other)
    from safetensors.torch import load_file, save_file

    state = load_file(str(other / "adapter.safetensors"))
    state["align_proj.bias"] += 0.01  # a different adapter: different query vectors, same document space
    save_file(state, str(other / "adapter.safetensors"))
    ok("index", corpus, "--name", "kb")
    out = search_json("how do I rotate the API keys?", "--index", "kb", "--adapter", other, "--query-mode", "teacher")
    assert out["results"][0]["hits"][0]["doc_id"] == KEYS_DOC
    assert out["results"][0]["query_encoder"] == out["encoder"]["fingerprint"] != encoder.fingerprint
    small = tmp_path / "small"
    small.mkdir()
    (small / "a.txt").write_text("Rotate API keys every ninety days from the security console.")
    ok("index", small, "--name", "gen", "--doc-encoder", "generative")
    fails("search", "q", "--index", "gen", "--adapter", other, needle="document vectors come from encoder")
    fails("index", small, "--name", "gen", "--doc-encoder", "generative", "--adapter", other,
          needle="document vectors come from encoder")


def test_console_script_runs_offline(tmp_path):
    """The installed `rkit` entry point itself, in a subprocess (no monkeypatching)."""
    exe = Path(sys.executable).with_name("rkit")
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "search" in result.stdout and "index" in result.stdout
    result = subprocess.run([str(exe), "info", str(tmp_path / "none")], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr and "error:" in result.stderr
    result = subprocess.run([str(exe), "train", "--steps", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: Invalid value for '--steps': Input should be greater than or equal to 1 (see rkit train --help)"]


def test_usage_errors_are_one_line_naming_the_command(tmp_path):
    """typer drew a four-line box for a bad flag; rkit's own errors are one line: now both are."""
    fails("search", needle="Missing argument 'query'. (see rkit search --help)")
    fails("search", "q", "--index", "kb", "--bogus", needle="No such option: --bogus")
    fails("bench", "beir", str(tmp_path), "--limit", "0", needle="(see rkit bench beir --help)")
    fails("explain", "q", "--answers", "-1", needle="Invalid value for '--answers'")
    fails("serach", "q", needle="No such command 'serach'")
    for alone in ([], ["bench"]):  # a group alone still shows its help
        result = rkit(*alone)
        assert result.exit_code == 2 and "Usage: rkit" in result.output and "error:" not in result.output
