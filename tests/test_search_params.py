"""`rkit index --search-params` (FAISS efSearch / nprobe: recorded, applied at open, kept) and `rkit bench perf`.

Real FAISS and the real CLI; the session's encoder stands in for every model load.
"""

from __future__ import annotations

import json

import faiss
import pytest
from typer.testing import CliRunner

import retrieval_kit.models as models
from retrieval_kit.index import Index
from retrieval_kit.indexer import IndexSettings, index_corpus
from rkit_cli.main import app

RUNNER = CliRunner()
DOCS = {"keys": "Rotate API keys every ninety days and revoke the old key at once.",
        "deploy": "Deploys run every weekday at noon; a failed deploy is rolled back automatically.",
        "coffee": "The coffee machine on the third floor is descaled on Mondays."}


@pytest.fixture()
def corpus(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / f"{name}.md").write_text(f"# {name}\n\n{text}\n")
    return folder


@pytest.fixture()
def loaded(encoder, monkeypatch):
    """Every model load in the CLI gets the session's encoder (loaded once)."""
    monkeypatch.setattr(models, "load_encoder", lambda *a, **k: encoder)
    return encoder


@pytest.fixture()
def no_models(monkeypatch):
    """Bad input must fail before any model loads."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(models, "load_encoder", refuse)


def rkit(*args):
    return RUNNER.invoke(app, [str(a) for a in args])


def one_line_error(result, needle: str) -> None:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert needle in lines[0], result.output


def ef_search(folder) -> int:
    with Index.open(folder) as index:  # a reader: what a search opens
        return int(faiss.downcast_index(index.backend.index.index).hnsw.efSearch)


def manifest_params(folder) -> dict:
    return json.loads((folder / "manifest.json").read_text())["faiss_params"]


def test_hnsw_search_params_recorded_applied_and_kept(corpus, tmp_path, loaded):
    home = tmp_path / "indexes"
    r = rkit("index", corpus, "--index-dir", home, "--factory", "HNSW32", "--search-params", "efSearch=200")
    assert r.exit_code == 0, r.output
    folder = home / "docs"
    assert manifest_params(folder) == {"efSearch": 200}
    assert ef_search(folder) == 200

    (corpus / "keys.md").write_text("# keys\n\nRotate API keys every thirty days.\n")
    r = rkit("index", corpus, "--index-dir", home)  # no flag: what the index records stays
    assert r.exit_code == 0, r.output
    assert "search params" not in r.output
    assert manifest_params(folder) == {"efSearch": 200} and ef_search(folder) == 200

    r = rkit("index", corpus, "--index-dir", home, "--search-params", "efsearch=96")  # names case-insensitive
    assert r.exit_code == 0, r.output
    assert "search params changed from efSearch=200 to efSearch=96" in r.output
    assert manifest_params(folder) == {"efSearch": 96} and ef_search(folder) == 96


def test_ivf_defaults_and_merge(corpus, tmp_path, encoder):
    folder = tmp_path / "ivf"
    settings = IndexSettings(factory="IVF2,Flat", search_params={"nprobe": 2})
    index_corpus(corpus, folder, lambda: encoder, "default", settings)
    assert manifest_params(folder) == {"nprobe": 2}
    index_corpus(corpus, folder, lambda: encoder, "default", IndexSettings(factory="IVF2,Flat"))
    assert manifest_params(folder) == {"nprobe": 2}


@pytest.mark.parametrize("args, needle", [
    (["--factory", "HNSW32", "--search-params", "foo=3"], "unknown 'foo=3'"),
    (["--factory", "HNSW32", "--search-params", "efSearch=0"], "efSearch must be a positive integer"),
    (["--factory", "HNSW32", "--search-params", "efSearch=lots"], "efSearch must be a positive integer, got 'lots'"),
    (["--factory", "HNSW32", "--search-params", "efSearch"], "'efSearch' is not name=value"),
    (["--factory", "HNSW32", "--search-params", ","], "--search-params is empty"),
    (["--factory", "HNSW32", "--search-params", "nprobe=8"], "nprobe needs an IVF factory, not 'HNSW32'"),
    (["--search-params", "efSearch=64"], "efSearch needs an HNSW factory, not 'Flat'"),
    (["--backend", "qdrant", "--search-params", "efSearch=64"], "--search-params is for the faiss backend"),
])
def test_bad_search_params_fail_in_one_line_before_any_model(corpus, tmp_path, no_models, args, needle):
    one_line_error(rkit("index", corpus, "--index-dir", tmp_path / "indexes", *args), needle)
    assert not (tmp_path / "indexes" / "docs" / "manifest.json").exists()


def test_existing_indexes_refuse_what_they_cannot_take(corpus, tmp_path, encoder, monkeypatch):
    home = tmp_path / "indexes"
    index_corpus(corpus, home / "docs", lambda: encoder, "default", IndexSettings(backend="qdrant"))
    index_corpus(corpus, home / "flat", lambda: encoder, "default", IndexSettings())
    monkeypatch.setattr(models, "load_encoder", lambda *a, **k: pytest.fail("model loaded"))
    one_line_error(rkit("index", corpus, "--index-dir", home, "--search-params", "efSearch=64"),
                   "uses the qdrant backend; --search-params is for faiss indexes")
    one_line_error(rkit("index", corpus, "--index-dir", home, "--name", "flat", "--search-params", "nprobe=4"),
                   "nprobe needs an IVF factory, not 'Flat'")
    assert manifest_params(home / "flat") == {}


def test_bench_perf_help_and_outside_a_checkout(tmp_path, monkeypatch):
    r = rkit("bench", "perf", "--help")
    assert r.exit_code == 0, r.output
    assert "performance suite" in r.output and "--quick" in r.output
    assert "perf" in rkit("bench", "--help").output

    monkeypatch.chdir(tmp_path)
    r = rkit("bench", "perf", "--quick")
    assert r.exit_code == 2, r.output
    one_line_error(r, "rkit bench perf runs from a source checkout of rkit: benchmarks/perf is not in")


def test_a_rebuild_with_knobs_the_new_index_cannot_take_deletes_nothing(corpus, tmp_path, encoder, monkeypatch):
    """--rebuild removes the index before building a new one: a flag the new (default Flat) factory refuses must
    be refused first, so nothing already indexed is lost."""
    home = tmp_path / "indexes"
    index_corpus(corpus, home / "flat", lambda: encoder, "default", IndexSettings())
    monkeypatch.setattr(models, "load_encoder", lambda *a, **k: pytest.fail("model loaded"))
    one_line_error(rkit("index", corpus, "--index-dir", home, "--name", "flat", "--rebuild", "--search-params",
                        "efSearch=64"), "efSearch needs an HNSW factory, not 'Flat'")
    with Index.open(home / "flat") as index:
        assert index.count_documents() == len(DOCS)
