"""The lexical side and hybrid search: BM25 in every index, fused with the dense signals by RRF.

Real models from the wheels where a query is encoded; real FAISS and Qdrant (local mode) underneath.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_same_hits
from typer.testing import CliRunner

from retrieval_kit.index import Index
from retrieval_kit.index.base import Signal
from retrieval_kit.index.fusion import rrf
from retrieval_kit.index.lexical import analyse
from retrieval_kit.search import Retriever

# a planted corpus: one chunk holds a rare identifier (only BM25 can match it exactly), one answers a paraphrase
# that shares no word with its query (only a dense signal can find it), the rest are distractors
DOCS = {
    "errors": ("Deploy failures", "If the deploy stops with ERR-7731Q the release bundle was signed with a revoked "
               "certificate. Sign it again and retry."),
    "feline": ("Pets", "Cats sleep for most of the day and hunt small rodents at dusk."),
    "deploy": ("Deploys", "Deploys run every weekday at noon; a failed deploy is rolled back automatically."),
    "coffee": ("Kitchen", "The coffee machine on the third floor is descaled on Mondays."),
    "backup": ("Backups", "Databases are backed up nightly and the copies are kept for thirty days."),
    "vacation": ("Leave", "Request leave in the HR portal at least two weeks ahead."),
}


def _write_corpus(folder):
    folder.mkdir()
    for name, (title, text) in DOCS.items():
        (folder / f"{name}.md").write_text(f"# {title}\n\n{text}\n")
    return folder


@pytest.fixture(scope="module")
def planted(tmp_path_factory, encoder):
    from retrieval_kit.indexer import IndexSettings, index_corpus

    root = tmp_path_factory.mktemp("hybrid")
    corpus = _write_corpus(root / "docs")
    folders = {}
    for backend in ("faiss", "qdrant"):
        folders[backend] = root / f"kb-{backend}"
        index_corpus(corpus, folders[backend], lambda: encoder, "default", IndexSettings(backend=backend))
    return folders


def _top(results) -> list[str]:
    return [h.doc_id for h in results[0].hits]


@pytest.mark.parametrize("backend", ["faiss", "qdrant"])
def test_hybrid_finds_the_identifier_and_the_paraphrase(planted, encoder, backend):
    with Retriever.attach(planted[backend], encoder) as r:
        assert r.default_query_mode() == "hybrid"
        ident = r.search(["what does ERR-7731Q mean"], k=3)
        para = r.search(["when do felines nap"], k=3)
        lexical = r.search(["when do felines nap"], k=3, query_mode="bm25")
    assert _top(ident)[0] == "errors.md"
    assert "bm25" in ident[0].hits[0].signals  # the lexical side found it, and says so
    assert _top(para)[0] == "feline.md"
    assert "feline.md" not in _top(lexical)  # no shared word: BM25 alone cannot find it
    assert para[0].hits[0].signals.get("teacher") == 1


def test_faiss_and_qdrant_give_the_same_fused_top_k(planted, encoder):
    queries = ["what does ERR-7731Q mean", "when do felines nap", "rollback of a failed deploy", "backup retention"]
    tops = {}
    for backend, folder in planted.items():
        with Retriever.attach(folder, encoder) as r:
            tops[backend] = [[(h.chunk_id, h.score, h.signals) for h in res.hits] for res in r.search(queries, k=5)]
    assert_same_hits(tops["faiss"], tops["qdrant"])


def test_rrf_matches_qdrant_client_fusion():
    """Our FAISS-side fusion against qdrant-client's own implementation of the Query API's weighted RRF."""
    from qdrant_client.http import models
    from qdrant_client.hybrid.fusion import reciprocal_rank_fusion

    rng = np.random.default_rng(3)
    lists = [list(rng.permutation(40)[:25]) for _ in range(3)]
    weights = [1.0, 0.5, 2.0]
    responses = [[models.ScoredPoint(id=int(i), version=0, score=1.0) for i in part] for part in lists]
    theirs = reciprocal_rank_fusion(responses, limit=10, ranking_constant_k=60, weights=weights)
    ours = rrf(lists, weights, k=60, limit=10)
    assert [(int(p.id), pytest.approx(p.score)) for p in theirs] == [(i, pytest.approx(s)) for i, s in ours]


def test_dbsf_matches_qdrant_client_fusion():
    from qdrant_client.http import models
    from qdrant_client.hybrid.fusion import distribution_based_score_fusion

    from retrieval_kit.index.fusion import dbsf

    rng = np.random.default_rng(6)
    lists = [[(int(i), float(s)) for i, s in zip(rng.permutation(30)[:12], np.sort(rng.random(12))[::-1])]
             for _ in range(3)] + [[(7, 0.3)]]  # a one-point list scores 0.5 in both
    responses = [[models.ScoredPoint(id=i, version=0, score=s) for i, s in part] for part in lists]
    theirs = distribution_based_score_fusion(responses, limit=10)
    assert [(int(p.id), pytest.approx(p.score)) for p in theirs] == [(i, pytest.approx(s)) for i, s in dbsf(lists, limit=10)]
    # weighted (Qdrant's has no weights): each list's normalised scores times its weight; 0 drops the list
    bm25, dense = [(1, 3.0), (2, 2.0), (3, 1.0)], [(3, 0.9), (4, 0.5)]
    equal, halved = dict(dbsf([bm25, dense])), dict(dbsf([bm25, dense], [1, 0.5]))
    assert halved[1] == pytest.approx(equal[1]) and halved[4] == pytest.approx(equal[4] / 2)
    assert halved[3] == pytest.approx(dict(dbsf([bm25]))[3] + dict(dbsf([dense]))[3] / 2)
    assert dict(dbsf([bm25, dense], [1, 0])) == pytest.approx(dict(dbsf([bm25])))


def test_dbsf_fusion_same_on_faiss_and_qdrant(planted, encoder):
    from retrieval_kit.search import HybridRecipe

    for recipe in (HybridRecipe.parse("bm25,teacher", fusion="dbsf"),  # on Qdrant's server
                   HybridRecipe.parse("bm25=1,teacher=0.5", fusion="dbsf")):  # weighted: ours on both
        _same_top_on_both(planted, encoder, recipe)


def _same_top_on_both(planted, encoder, recipe):
    tops = {}
    for backend, folder in planted.items():
        with Retriever.attach(folder, encoder) as r:
            res = r.search(["what does ERR-7731Q mean", "when do felines nap"], k=4, hybrid=recipe)
            tops[backend] = [[(h.chunk_id, h.score) for h in x.hits] for x in res]
    assert_same_hits(tops["faiss"], tops["qdrant"], abs_tol=1e-5)
    assert tops["faiss"][0][0][0] == "errors.md#0" and tops["faiss"][1][0][0] == "feline.md#0"


def test_convex_fusion_worked_by_hand():
    """Min-max per list, weighted sum, a missing id adds 0; ties keep first-seen order (as RRF's do)."""
    from retrieval_kit.index.fusion import convex

    bm25 = [(1, 10.0), (2, 5.0), (3, 0.0)]  # -> 1.0, 0.5, 0.0
    dense = [(3, 0.9), (4, 0.5), (1, 0.1)]  # -> 1.0, 0.5, 0.0
    assert convex([bm25, dense], [1, 1]) == [(1, 1.0), (3, 1.0), (2, 0.5), (4, 0.5)]
    assert convex([bm25, dense], [1, 2]) == [(3, 2.0), (1, 1.0), (4, 1.0), (2, 0.5)]
    assert convex([bm25, dense], [1, 0], limit=2) == [(1, 1.0), (2, 0.5)]  # weight 0 drops the list
    assert convex([[(5, 0.2)], []], [0.5, 1]) == [(5, 0.5)]  # a one-score list counts its id fully


def test_convex_fusion_same_on_faiss_and_qdrant(planted, encoder):
    """Qdrant's Query API has no convex fusion: both backends fuse each signal's own list with the same function."""
    from retrieval_kit.search import HybridRecipe

    recipe = HybridRecipe.parse("bm25=1,teacher=0.5", fusion="convex")
    tops = {}
    for backend, folder in planted.items():
        with Retriever.attach(folder, encoder) as r:
            res = r.search(["what does ERR-7731Q mean", "when do felines nap", "rollback of a failed deploy"], k=4,
                           hybrid=recipe)
            tops[backend] = [[(h.chunk_id, h.score, h.signals) for h in x.hits] for x in res]
    assert_same_hits(tops["faiss"], tops["qdrant"], abs_tol=1e-5)
    assert tops["faiss"][0][0][0] == "errors.md#0" and tops["faiss"][1][0][0] == "feline.md#0"
    assert tops["faiss"][0][0][1] == 1.5  # top of both lists: 1·1 + 0.5·1


def _chunk(doc_id, text):
    return [{"chunk_id": f"{doc_id}#0", "text": text}]


def _unit(rng, n, dim=8):
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("backend", ["faiss", "qdrant"])
def test_updates_keep_the_lexical_side_in_step(tmp_path, backend):
    rng = np.random.default_rng(0)
    folder = tmp_path / "kb"
    with Index.create(folder, dim=8, backend=backend, encoder={"doc_fingerprint": "x"}) as index:
        index.upsert_documents([("a", "h1", "a.md", _chunk("a", "zebra crossing rules"), _unit(rng, 1)),
                                ("b", "h1", "b.md", _chunk("b", "quokka habitat"), _unit(rng, 1))])
    with Index.open(folder) as reader:
        assert [h.doc_id for h in reader.search_lexical(["zebra"])[0]] == ["a"]
    with Index.open(folder, writable=True) as index:
        index.upsert_documents([("a", "h2", "a.md", _chunk("a", "narwhal tusks"), _unit(rng, 1))])
        index.delete_documents(["b"])
    with Index.open(folder) as reader:
        assert reader.search_lexical(["zebra"])[0] == []  # the replaced text is gone from BM25 too
        assert reader.search_lexical(["quokka"])[0] == []  # and the deleted document
        assert [h.doc_id for h in reader.search_lexical(["narwhal"])[0]] == ["a"]


def test_writer_killed_before_saving_bm25_is_repaired(tmp_path):
    """Commit without save (what a kill -9 after the commit leaves): the saved bm25s side is of the old state."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "kb"
    with Index.create(folder, dim=8, encoder={"doc_fingerprint": "x"}) as index:
        index.upsert_documents([("a", "h", "a.md", _chunk("a", "alpha particle"), _unit(rng, 1))])
    before = (folder / "lexical" / "state.json").read_text()
    index = Index.open(folder, writable=True)
    index.upsert_documents([("b", "h", "b.md", _chunk("b", "beta decay"), _unit(rng, 1))])
    index.close()  # no save: the writer "dies" here
    assert (folder / "lexical" / "state.json").read_text() == before
    with Index.open(folder) as reader:  # a reader rebuilds in memory from its snapshot, writes nothing
        assert [h.doc_id for h in reader.search_lexical(["beta"])[0]] == ["b"]
    assert (folder / "lexical" / "state.json").read_text() == before
    with Index.open(folder, writable=True) as index:  # the next writer saves the repaired side
        pass
    assert json.loads((folder / "lexical" / "state.json").read_text())["count"] == 2


def test_index_from_before_the_lexical_side_is_migrated(tmp_path):
    """A store without the terms table (older rkit): readers analyse the stored texts, a writer adds the table."""
    import sqlite3

    rng = np.random.default_rng(2)
    folder = tmp_path / "kb"
    with Index.create(folder, dim=8, encoder={"doc_fingerprint": "x"}) as index:
        index.upsert_documents([("a", "h", "a.md", _chunk("a", "gamma rays"), _unit(rng, 1))])
    db = sqlite3.connect(folder / "docs.sqlite")
    db.execute("DROP TABLE terms")
    db.commit()
    db.close()
    import shutil

    shutil.rmtree(folder / "lexical")
    with Index.open(folder) as reader:
        assert [h.doc_id for h in reader.search_lexical(["gamma"])[0]] == ["a"]
    with Index.open(folder, writable=True) as index:
        assert index.store.has_terms
        assert [r[0] for r in index.store.db.execute("SELECT terms FROM terms")] == [" ".join(analyse(["gamma rays"])[0])]


def test_hybrid_needs_a_signal_and_matching_query_counts(tmp_path):
    from retrieval_kit.errors import InputError

    rng = np.random.default_rng(4)
    with Index.create(tmp_path / "kb", dim=8, encoder={"doc_fingerprint": "x"}) as index:
        index.upsert_documents([("a", "h", "a.md", _chunk("a", "delta"), _unit(rng, 1))])
        with pytest.raises(InputError, match="at least one signal"):
            index.search_hybrid([Signal("bm25", 0.0, texts=["delta"])])
        with pytest.raises(InputError, match="same number of queries"):
            index.search_hybrid([Signal("bm25", 1.0, texts=["delta", "x"]), Signal("t", 1.0, vectors=_unit(rng, 1))])


def test_cli_bm25_mode_json_and_bad_mode(planted, monkeypatch, tmp_path):
    from rkit_cli.main import app

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["search", "ERR-7731Q", "--index", str(planted["faiss"]), "--query-mode", "bm25",
                                 "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    hit = out["results"][0]["hits"][0]
    assert hit["doc_id"] == "errors.md" and hit["signals"] == {"bm25": 1}
    assert out["results"][0]["query_mode"] == "bm25"
    r = CliRunner().invoke(app, ["search", "x", "--index", str(planted["faiss"]), "--query-mode", "sparse"])
    assert r.exit_code != 0 and "unknown --query-mode 'sparse'" in r.output
    assert "Traceback" not in r.output
    for bad, said in (("bm25=1,teacher=x", "bad signal weight 'teacher=x'"), ("colbert=1", "unknown hybrid signal colbert"),
                      ("bm25=-1", "must be 0 or more"), ("bm25=0", "no signal with a weight above 0")):
        r = CliRunner().invoke(app, ["search", "x", "--index", str(planted["faiss"]), "--signals", bad])
        assert r.exit_code != 0 and said in r.output and "Traceback" not in r.output, (bad, r.output)
    for args, said in ((["--fusion", "mean"], "unknown --fusion 'mean'"),
                       (["--query-mode", "bm25", "--signals", "bm25=1"], "apply to --query-mode hybrid, not bm25")):
        r = CliRunner().invoke(app, ["search", "x", "--index", str(planted["faiss"]), *args])
        assert r.exit_code != 0 and said in r.output and "Traceback" not in r.output, (args, r.output)
    r = CliRunner().invoke(app, ["search", "ERR-7731Q deploy", "--index", str(planted["faiss"]), "--signals",
                                 "bm25,teacher=1", "--json"])
    assert r.exit_code == 0, r.output
    hits = json.loads(r.stdout)["results"][0]["hits"]
    assert hits[0]["doc_id"] == "errors.md" and set().union(*(h["signals"] for h in hits)) <= {"bm25", "teacher"}


def test_qdrant_bm25_equals_bm25s_after_a_build_in_skewed_batches(tmp_path):
    """The first batch fixes Qdrant's avgdl; a build whose first batch is short chunks (CACM's title-only
    records) must still score as bm25s does once saved."""
    rng = np.random.default_rng(5)
    words = [f"w{i}" for i in range(40)]
    short = [" ".join(rng.choice(words, 3)) for _ in range(30)]
    long = [" ".join(rng.choice(words, 60)) for _ in range(30)]
    scores = {}
    for backend in ("faiss", "qdrant"):
        with Index.create(tmp_path / backend, dim=8, backend=backend, encoder={"doc_fingerprint": "x"}) as index:
            for batch, texts in (("s", short), ("l", long)):
                index.upsert_documents([(f"{batch}{i}", "h", "x", _chunk(f"{batch}{i}", t), _unit(rng, 1))
                                        for i, t in enumerate(texts)])
        with Index.open(tmp_path / backend) as reader:
            # every chunk (k=60): the engines order tied scores each their own way, so compare in one order
            scores[backend] = [sorted((h.chunk_id, h.score) for h in hits)
                               for hits in reader.search_lexical(["w1 w2", "w7", "w3 w30 w31"], k=60)]
    assert_same_hits(scores["faiss"], scores["qdrant"], abs_tol=1e-4)
    assert len(scores["faiss"][0]) > 20


def test_info_shows_the_lexical_side(planted):
    from rkit_cli.main import app

    for backend, engine in (("faiss", "bm25s"), ("qdrant", "qdrant sparse")):
        r = CliRunner().invoke(app, ["info", str(planted[backend]), "--json"])
        assert r.exit_code == 0, r.output
        info = json.loads(r.stdout)
        assert info["lexical"]["engine"].startswith(engine)
        assert info["lexical"]["chunks"] == info["counts"]["chunks"] == len(DOCS)
        table = CliRunner().invoke(app, ["info", str(planted[backend])]).stdout
        assert f"BM25 ({engine}" in table
