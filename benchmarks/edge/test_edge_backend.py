"""EdgeBackend (qdrant-edge-py, Qdrant's engine in-process): exactness, persistence, BM25, fusion, locking, crashes.

Tested directly, not through ``Index`` (core.py does not know this backend yet). Findings are written up in
benchmarks/results/edge/EVALUATION.md.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

qe = pytest.importorskip("qdrant_edge")

from retrieval_kit.errors import IndexError_  # noqa: E402
from retrieval_kit.index import fusion, lexical  # noqa: E402
from retrieval_kit.index.base import Signal  # noqa: E402
from benchmarks.edge.edge_backend import DIRNAME, EdgeBackend  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DIM = 32

WORDS = ("apple banana cherry delta engine falcon garden harbor island jungle kernel ladder marble needle "
         "orange parrot quartz river silver timber umbrella violet walrus xenon yellow zephyr anchor bridge "
         "castle desert ember forest glacier hollow ivory jasper kettle lantern meadow nectar").split()
FILLER = ("the", "and", "of", "a", "to", "is")  # stop words: dropped by the analyser


def unit(rng, n, dim=DIM):
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def exact(vectors, rows, queries, k):
    """Exact inner-product top-k (scores, rows) with numpy."""
    sims = queries @ vectors.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), rows[order]


def corpus(n=60, seed=3):
    """Texts of distinct lengths (so no two documents tie on a BM25 score) and a few stop words."""
    rng = np.random.default_rng(seed)
    texts = []
    for i in range(n):
        words = list(rng.choice(WORDS, size=4 + i)) + list(rng.choice(FILLER, size=3))
        rng.shuffle(words)
        texts.append(" ".join(words))
    return texts


QUERIES = ["apple", "river silver", "castle ember ember forest", "kernel parrot umbrella", "the and of",
           "zzzunknownword", "Apples and rivers", "glacier"]


def same_ranking(rows_a, scores_a, rows_b, scores_b, rtol=1e-5):
    """Position-wise equal scores; rows equal, except that rows of tied scores may come in any order."""
    valid = rows_a >= 0
    assert np.array_equal(valid, rows_b >= 0)
    np.testing.assert_allclose(scores_a[valid], scores_b[valid], rtol=rtol, atol=1e-7)
    sa, ra, rb = scores_a[valid], rows_a[valid], rows_b[valid]
    start = 0
    while start < len(sa):
        end = start + 1
        while end < len(sa) and np.isclose(sa[end], sa[start], rtol=rtol, atol=1e-7):
            end += 1
        if end < len(sa):  # a tie at the cut-off may pick different members: only its score is checked
            assert set(ra[start:end]) == set(rb[start:end])
        start = end


@pytest.fixture()
def filled(tmp_path):
    rng = np.random.default_rng(0)
    rows = np.arange(100, 700, dtype=np.int64)
    vectors = unit(rng, len(rows))
    backend = EdgeBackend(DIM, folder=tmp_path, create=True)
    backend.upsert(rows[:250], vectors[:250])
    backend.upsert(rows[250:], vectors[250:], [{"row": int(r)} for r in rows[250:]])
    yield backend, rows, vectors, rng
    backend.close()


def test_search_equals_exact_inner_products(filled):
    backend, rows, vectors, rng = filled
    queries = unit(rng, 25)
    scores, found = backend.search(queries, 10)
    want_scores, want_rows = exact(vectors, rows, queries, 10)
    assert np.array_equal(found, want_rows)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
    assert backend.count() == len(rows)
    # k past the end: rows -1 and scores -inf, as faiss pads
    small = EdgeBackend(DIM, memory=True)
    small.upsert(rows[:3], vectors[:3])
    s, r = small.search(queries[:2], 5)
    assert (r[:, 3:] == -1).all() and np.isneginf(s[:, 3:]).all() and (r[:, :3] >= 0).all()
    small.close()


def test_delete_and_ids(filled):
    backend, rows, vectors, rng = filled
    gone = rows[::3]
    backend.delete(gone)
    backend.delete(np.array([5, 6, 999999]))  # ids it never held: ignored
    keep = np.setdiff1d(rows, gone)
    assert np.array_equal(backend.ids(), keep) and backend.count() == len(keep)
    queries = unit(rng, 20)
    scores, found = backend.search(queries, 10)
    mask = np.isin(rows, keep)
    want_scores, want_rows = exact(vectors[mask], rows[mask], queries, 10)
    assert np.array_equal(found, want_rows)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
    # upsert of an existing row replaces its vector
    backend.upsert(keep[:1], -vectors[mask][:1])
    _, top = backend.search(-vectors[mask][:1], 1)
    assert top[0, 0] == keep[0] and backend.count() == len(keep)


def test_ids_page_past_one_scroll(tmp_path):
    backend = EdgeBackend(4, folder=tmp_path, create=True)
    rows = np.arange(0, 3 * 4096 + 17, dtype=np.int64) * 7
    backend.upsert(rows, np.tile(np.float32([1, 0, 0, 0]), (len(rows), 1)))
    assert np.array_equal(backend.ids(), rows)
    backend.close()


def test_persists_across_close_and_reopen(tmp_path):
    rng = np.random.default_rng(1)
    rows, vectors = np.arange(300, dtype=np.int64), unit(rng, 300)
    backend = EdgeBackend(DIM, folder=tmp_path, create=True)
    backend.upsert(rows, vectors)
    backend.delete(rows[:10])
    backend.save()
    queries = unit(rng, 10)
    before = backend.search(queries, 8)
    backend.upsert(rows[:5], vectors[:5])  # after the save: only in the WAL
    backend.close()
    assert (tmp_path / DIRNAME / "edge_config.json").is_file()

    again = EdgeBackend(DIM, folder=tmp_path)
    assert not again.needs_rebuild and again.lexical
    assert np.array_equal(again.ids(), np.concatenate([rows[:5], rows[10:]]))
    again.delete(rows[:5])
    after = again.search(queries, 8)
    assert np.array_equal(after[1], before[1])
    np.testing.assert_allclose(after[0], before[0], rtol=1e-6)
    again.close()


def test_reopen_with_other_dimension_or_no_lexical_side_needs_rebuild(tmp_path):
    backend = EdgeBackend(8, folder=tmp_path, create=True)
    backend.upsert(np.arange(3), np.eye(3, 8, dtype=np.float32))
    backend.close()
    other = EdgeBackend(16, folder=tmp_path)
    assert other.needs_rebuild and other.count() == 0  # an empty shard of the right size, to be rebuilt
    other.close()

    # a shard without the bm25 sparse vector (made by hand): flagged, and rebuild recreates it with one
    old_path = tmp_path / "old"
    (old_path / DIRNAME).parent.mkdir()
    old = qe.EdgeShard.create(str(old_path / DIRNAME),
                              qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=8, distance=qe.Distance.Dot)))
    old.update(qe.UpdateOperation.upsert_points([qe.Point(id=1, vector=[1.0] + [0.0] * 7)]))
    old.close()
    legacy = EdgeBackend(8, folder=old_path)
    assert legacy.needs_rebuild and not legacy.lexical and legacy.count() == 1
    terms = lexical.analyse(["apple river", "banana"])
    legacy.rebuild([(np.arange(2), np.eye(2, 8, dtype=np.float32), [{}, {}], terms)])
    assert legacy.lexical and not legacy.needs_rebuild
    assert legacy.search_lexical(["apple"], 2)[1][0, 0] == 0
    legacy.close()


def test_unreadable_shard_is_replaced_and_flagged(tmp_path):
    backend = EdgeBackend(8, folder=tmp_path, create=True)
    backend.upsert(np.arange(3), np.eye(3, 8, dtype=np.float32))
    backend.save()
    backend.close()
    for segment in (tmp_path / DIRNAME / "segments").iterdir():
        (segment / "segment.json").write_text("{not json")
    again = EdgeBackend(8, folder=tmp_path)
    assert again.needs_rebuild and again.count() == 0
    again.close()


def test_bm25_scores_equal_bm25s(tmp_path):
    import bm25s

    texts = corpus()
    terms = lexical.analyse(texts)
    rows = np.arange(1000, 1000 + len(texts), dtype=np.int64)
    backend = EdgeBackend(DIM, folder=tmp_path, create=True)
    backend.avgdl = lexical.average_length(terms)
    backend.upsert(rows, unit(np.random.default_rng(2), len(rows)), [{"text": t} for t in texts], terms)

    model = bm25s.BM25(k1=0.9, b=0.4, method="lucene", idf_method="lucene")
    model.index(terms, show_progress=False)
    scores, found = backend.search_lexical(QUERIES, len(texts))
    for i, query in enumerate(lexical.query_terms(QUERIES)):
        known = [t for t in query if t in model.vocab_dict]
        want = np.asarray(model.get_scores(known), np.float32) if known else np.zeros(len(texts), np.float32)
        hits = found[i] >= 0
        assert set(found[i][hits]) == set(rows[want > 0]), QUERIES[i]
        np.testing.assert_allclose(scores[i][hits], want[found[i][hits] - 1000], rtol=1e-5)
        assert (np.diff(scores[i][hits]) <= 0).all()
    assert (found[4] == -1).all() and (found[5] == -1).all()  # stop words only; a word no document has
    backend.close()


def _hybrid_data(seed=4):
    rng = np.random.default_rng(seed)
    texts = corpus(80, seed)
    terms = lexical.analyse(texts)
    rows = np.arange(len(texts), dtype=np.int64) * 3 + 5
    vectors = unit(rng, len(rows))
    queries = ["apple river", "castle forest ember", "parrot", "silver timber umbrella", "glacier nectar",
               "the of", "quartz xenon", "meadow"]
    signals = [Signal("dense", 1.0, vectors=unit(rng, len(queries))),
               Signal("teacher", 0.61803, vectors=unit(rng, len(queries))),
               Signal("bm25", 0.41421, texts=queries)]
    return rows, vectors, [{"i": i} for i in range(len(rows))], terms, signals


@pytest.mark.parametrize("weights", [(1.0, 0.61803, 0.41421), (1.0, 1.0, 1.0), (1.0, 0.0, 2.0)])
def test_hybrid_equals_fusion_rrf(tmp_path, weights):
    rows, vectors, payloads, terms, signals = _hybrid_data()
    for s, w in zip(signals, weights):
        s.weight = w
    backend = EdgeBackend(DIM, folder=tmp_path, create=True)
    backend.avgdl = lexical.average_length(terms)
    backend.upsert(rows, vectors, payloads, terms)
    k, depth = 10, 30
    scores, found, lists = backend.hybrid(signals, k, depth, 60)
    assert len(lists) == 3 and all(part.shape == (len(found), depth) for part in lists)
    # each signal's list is that signal's own search
    assert np.array_equal(lists[0], backend.search(signals[0].vectors, depth)[1])
    assert np.array_equal(lists[2], backend.search_lexical(signals[2].texts, depth)[1])
    for i in range(len(found)):
        fused = fusion.rrf([part[i][part[i] >= 0].tolist() for part in lists], list(weights), 60)
        want_rows = np.full(k, -1, np.int64)
        want_scores = np.full(k, -np.inf, np.float32)
        for j, (row, score) in enumerate(fused[:k]):
            want_rows[j], want_scores[j] = row, score
        same_ranking(found[i], scores[i], want_rows, want_scores)
    backend.close()


def test_hybrid_and_searches_equal_qdrant_client_local_mode(tmp_path):
    from retrieval_kit.index.qdrant_backend import QdrantBackend

    rows, vectors, payloads, terms, signals = _hybrid_data()
    avgdl = lexical.average_length(terms)
    edge = EdgeBackend(DIM, folder=tmp_path, create=True)
    client = QdrantBackend(DIM, "c", memory=True)
    for backend in (edge, client):
        backend.avgdl = avgdl
        backend.upsert(rows[:50], vectors[:50], payloads[:50], terms[:50])
        backend.upsert(rows[50:], vectors[50:], payloads[50:], terms[50:])
        backend.delete(rows[::7])
    edge.save()  # vacuums the deleted points: until then the engine's IDF still counts them (next test)
    assert np.array_equal(edge.ids(), client.ids())
    a, b = edge.search(signals[0].vectors, 10), client.search(signals[0].vectors, 10)
    same_ranking(a[1], a[0], b[1], b[0])
    a, b = edge.search_lexical(signals[2].texts, 20), client.search_lexical(signals[2].texts, 20)
    for i in range(len(a[0])):
        same_ranking(a[1][i], a[0][i], b[1][i], b[0][i])
    ea, eb = edge.hybrid(signals, 10, 30, 60), client.hybrid(signals, 10, 30, 60)
    for i in range(len(ea[0])):
        same_ranking(ea[1][i], ea[0][i], eb[1][i], eb[0][i])
        for part_a, part_b in zip(ea[2], eb[2]):
            assert set(part_a[i]) == set(part_b[i])
    edge.close()
    client.close()


def test_bm25_idf_counts_deleted_points_until_save(tmp_path):
    texts = corpus()
    terms = lexical.analyse(texts)
    rows = np.arange(len(texts), dtype=np.int64)
    vectors = unit(np.random.default_rng(6), len(rows))
    avgdl = lexical.average_length(terms)
    live = rows % 4 != 0
    backend = EdgeBackend(DIM, folder=tmp_path / "a", create=True)
    fresh = EdgeBackend(DIM, folder=tmp_path / "b", create=True)  # the live chunks only, same avgdl
    backend.avgdl = fresh.avgdl = avgdl
    backend.upsert(rows, vectors, None, terms)
    fresh.upsert(rows[live], vectors[live], None, [t for t, keep in zip(terms, live) if keep])
    k = len(texts)
    before = backend.search_lexical(QUERIES, k)
    backend.delete(rows[~live])
    drifted = backend.search_lexical(QUERIES, k)
    want = fresh.search_lexical(QUERIES, k)
    assert not np.isin(drifted[1], rows[~live]).any()  # deleted points are never returned ...
    assert not np.allclose(drifted[0][drifted[1] >= 0], want[0][want[1] >= 0])  # ... but still weigh on the idf:
    for i in range(len(QUERIES)):  # every live point keeps exactly its score from before the delete
        old = dict(zip(before[1][i].tolist(), before[0][i].tolist()))
        hits = drifted[1][i] >= 0
        np.testing.assert_allclose(drifted[0][i][hits], [old[r] for r in drifted[1][i][hits]], rtol=1e-6)
    backend.save()  # vacuum
    after = backend.search_lexical(QUERIES, k)
    for i in range(len(QUERIES)):
        same_ranking(after[1][i], after[0][i], want[1][i], want[0][i])
    backend.close()
    fresh.close()


def test_rebuild_replaces_everything(tmp_path):
    rng = np.random.default_rng(5)
    backend = EdgeBackend(DIM, folder=tmp_path, create=True)
    backend.upsert(np.arange(50), unit(rng, 50))
    new_rows, new_vectors = np.arange(500, 560), unit(rng, 60)
    batches = [(new_rows[:30], new_vectors[:30], [{}] * 30, [["apple"]] * 30),
               (new_rows[30:], new_vectors[30:], [{}] * 30, [["river"]] * 30)]
    backend.rebuild(iter(batches))
    assert np.array_equal(backend.ids(), new_rows) and not backend.needs_rebuild
    scores, found = backend.search(new_vectors[:3], 1)
    assert np.array_equal(found[:, 0], new_rows[:3])
    backend.close()


def test_memory_copy_is_private_and_removed_on_close(tmp_path):
    a, b = EdgeBackend(4, memory=True), EdgeBackend(4, memory=True)
    assert a.path != b.path
    a.upsert(np.arange(2), np.eye(2, 4, dtype=np.float32))
    assert a.count() == 2 and b.count() == 0
    folder = a.path.parent
    a.close()
    b.close()
    assert not folder.exists()
    with pytest.raises(IndexError_, match="embedded only"):
        EdgeBackend(4, url="http://localhost:6333")


# -- two openers of one folder ------------------------------------------------------------------------
def test_second_backend_in_the_same_process_is_refused_without_harm(tmp_path):
    writer = EdgeBackend(4, folder=tmp_path, create=True)
    writer.upsert(np.arange(3), np.eye(3, 4, dtype=np.float32))
    for _ in range(2):
        with pytest.raises(IndexError_, match="open in another process"):
            EdgeBackend(4, folder=tmp_path)
        with pytest.raises(IndexError_, match="open in another process"):
            EdgeBackend(4, folder=tmp_path, create=True)  # and it does not wipe the folder either
    writer.upsert(np.arange(3, 5), np.eye(2, 4, dtype=np.float32))
    writer.save()  # the writer is unaffected: the probe never calls EdgeShard.load
    assert writer.count() == 5
    writer.close()
    reader = EdgeBackend(4, folder=tmp_path)  # released by close
    assert reader.count() == 5
    reader.close()


@pytest.mark.parametrize("other_process", [False, True])
def test_a_refused_raw_load_breaks_the_holders_next_flush(tmp_path, other_process):
    """What the engine does on its own: EdgeShard.load of a folder in use loads its segments, deletes the open
    shard's tracker_journal.dat files, then fails on the WAL lock. The holder's flush fails from then on;
    close + reload recovers every point from the WAL."""
    writer = EdgeBackend(4, folder=tmp_path, create=True)
    writer.upsert(np.arange(3), np.eye(3, 4, dtype=np.float32), [{"r": i} for i in range(3)],
                  lexical.analyse(["apple", "river", "apple"]))
    writer.save()
    writer.upsert(np.arange(3, 6), np.eye(3, 4, dtype=np.float32), [{"r": i} for i in range(3, 6)],
                  lexical.analyse(["apple"] * 3))
    journals = sorted((tmp_path / DIRNAME).rglob("tracker_journal.dat"))
    assert journals
    if other_process:
        code = ("import qdrant_edge as qe, sys\ntry:\n    qe.EdgeShard.load(sys.argv[1]); print('opened')\n"
                "except Exception as e:\n    print('refused:', e)\n")
        child = subprocess.run([sys.executable, "-c", code, str(tmp_path / DIRNAME)], capture_output=True,
                               text=True, timeout=120)
        assert child.stdout.startswith("refused: ") and "Can't init WAL: Kind(WouldBlock)" in child.stdout
    else:
        with pytest.raises(Exception, match=r"failed to open WAL .*Can't init WAL: Kind\(WouldBlock\)"):
            qe.EdgeShard.load(str(tmp_path / DIRNAME))
    assert not any(j.exists() for j in journals)  # the refused opener removed them
    assert writer.count() == 6 and writer.search(np.eye(1, 4, dtype=np.float32), 1)[1][0, 0] in range(6)
    for _ in range(2):
        with pytest.raises(Exception, match="Tracker journal .* is shorter than expected"):
            writer.save()
    writer.close()
    again = EdgeBackend(4, folder=tmp_path)
    assert np.array_equal(again.ids(), np.arange(6)) and not again.needs_rebuild
    assert sorted(again.search_lexical(["apple"], 6)[1][0].tolist()) == [-1, 0, 2, 3, 4, 5]
    assert [r.payload for r in again.shard.retrieve(list(range(6)), True, False)] == [{"r": i} for i in range(6)]
    again.save()
    again.close()


def test_dropping_the_last_reference_releases_the_lock(tmp_path):
    shard = qe.EdgeShard.create(str(tmp_path / "s"), qe.EdgeConfig(vectors=qe.EdgeVectorParams(
        size=4, distance=qe.Distance.Dot)))
    del shard
    qe.EdgeShard.load(str(tmp_path / "s")).close()


def test_without_a_wal_a_second_opener_is_let_in_and_sees_only_flushed_points(tmp_path):
    """wal_enabled=False: no lock at all, and what another opener sees is the last flush (observed, not used)."""
    path = str(tmp_path / "nowal")
    config = qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=4, distance=qe.Distance.Dot), wal_enabled=False)
    writer = qe.EdgeShard.create(path, config)
    writer.update(qe.UpdateOperation.upsert_points([qe.Point(id=i, vector=[1.0, 0, 0, 0]) for i in range(3)]))
    early = qe.EdgeShard.load(path)
    assert early.count(qe.CountRequest()) == 0
    writer.flush()
    late = qe.EdgeShard.load(path)
    assert late.count(qe.CountRequest()) == 3 and early.count(qe.CountRequest()) == 0  # no live view
    for shard in (early, late, writer):
        shard.close()


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from benchmarks.edge.edge_backend import EdgeBackend
    folder, per, dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    backend = EdgeBackend(dim, folder=folder, create=True)
    i = 0
    while True:
        rows = np.arange(i * per, (i + 1) * per)
        vectors = np.random.default_rng(i).normal(size=(per, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        backend.upsert(rows, vectors, [{"row": int(r)} for r in rows], [["w%d" % (r % 13)] for r in rows])
        if i % 5 == 4:
            backend.save()
        print(i, flush=True)
        i += 1
""")


def _start_writer(folder: Path, per: int, dim: int = 16) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-c", WRITER, str(folder), str(per), str(dim)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc: subprocess.Popen, batches: int) -> int:
    """The last batch the writer acknowledged once it has acknowledged at least ``batches``."""
    last = -1
    while last + 1 < batches:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"writer died: {proc.stderr.read()}")
        last = int(line)
    return last


def _kill(proc: subprocess.Popen, last: int) -> int:
    """SIGKILL, then the last batch it acknowledged (``last`` or a line written before the kill)."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    out = proc.stdout.read()  # through the buffered reader: communicate() would skip what readline read ahead
    proc.stderr.read()
    return max([int(x) for x in out.split()] + [last])


PROBE = ("import sys\nfrom benchmarks.edge.edge_backend import EdgeBackend\ntry:\n"
         "    EdgeBackend(16, folder=sys.argv[1]); print('opened')\nexcept Exception as e:\n    print('refused:', e)\n")
RAW_LOAD = ("import qdrant_edge as qe, sys\ntry:\n    qe.EdgeShard.load(sys.argv[1]); print('opened')\n"
            "except Exception as e:\n    print('refused:', e)\n")


def test_second_process_while_a_writer_upserts(tmp_path):
    """EdgeBackend in a second process: refused at once, the writer carries on (saves included). A raw
    EdgeShard.load in a second process: refused too, and it usually (10 of 12 tries) makes the writer's next
    save raise "Failed to flush ..." so the writer dies; either way the folder reopens with every upsert."""
    proc = _start_writer(tmp_path, 50)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    last = -1
    try:
        last = _wait_for(proc, 3)
        for _ in range(3):
            started = time.monotonic()
            child = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], capture_output=True, text=True,
                                   timeout=120, cwd=REPO, env=env)
            assert child.stdout.startswith("refused: ") and "open in another process" in child.stdout, child
            assert time.monotonic() - started < 60  # never waits for the writer
        last = _wait_for(proc, last + 12)  # two more saves went through
        reader = EdgeBackend(16, memory=True)  # what a reader uses instead: unaffected by the writer
        assert reader.count() == 0
        reader.close()

        child = subprocess.run([sys.executable, "-c", RAW_LOAD, str(tmp_path / DIRNAME)], capture_output=True,
                               text=True, timeout=120)
        assert child.stdout.startswith("refused: ") and "Kind(WouldBlock)" in child.stdout, child
        try:
            proc.wait(timeout=30)  # usually the writer's next save raises, and the loop ends
        except subprocess.TimeoutExpired:  # sometimes the refused load leaves it alone
            print("writer survived the refused raw load")
        else:
            out, err = proc.stdout.read(), proc.stderr.read()
            assert proc.returncode != 0 and "Failed to flush" in err, err[-2000:]
            print("writer died:", err.strip().splitlines()[-1][:300])
            last = max([int(x) for x in out.split()] + [last])
    finally:
        if proc.poll() is None:
            last = _kill(proc, last)
    # whatever killed the writer, the folder opens again (the kernel dropped its flock) and holds every upsert
    after = EdgeBackend(16, folder=tmp_path)
    ids = after.ids()
    assert np.array_equal(ids, np.arange(len(ids))) and len(ids) >= (last + 1) * 50
    after.close()


@pytest.mark.parametrize("per", [50, 2500])
def test_kill_9_while_upserting_then_reopen(tmp_path, per):
    """A writer killed at a random moment: the shard loads; it holds a prefix of the rows, every acknowledged
    upsert, and whole update operations (BATCH points each), so an upsert of more than BATCH can be partial."""
    from benchmarks.edge.edge_backend import BATCH

    rng = np.random.default_rng(per)
    for round_ in range(2):
        folder = tmp_path / f"r{round_}"
        folder.mkdir()
        proc = _start_writer(folder, per)
        last = _wait_for(proc, 4 if per > BATCH else 12)
        time.sleep(float(rng.uniform(0, 0.2)))
        last = _kill(proc, last)
        backend = EdgeBackend(16, folder=folder)
        assert not backend.needs_rebuild
        ids = backend.ids()
        assert np.array_equal(ids, np.arange(len(ids)))  # a prefix: nothing out of order, no holes
        assert len(ids) >= (last + 1) * per  # every acknowledged upsert survived
        assert len(ids) % per in {j * BATCH for j in range(-(-per // BATCH))}  # whole operations only
        assert len(ids) <= (last + 2) * per  # at most the one in flight
        # the points are intact: vectors (a point finds itself) and payloads
        batch = (len(ids) - 1) // per
        expect = np.random.default_rng(batch).normal(size=(per, 16)).astype(np.float32)
        expect /= np.linalg.norm(expect, axis=1, keepdims=True)
        held = len(ids) - batch * per
        scores, found = backend.search(expect[:held][-3:], 1)
        assert np.array_equal(found[:, 0], ids[-3:]) and np.allclose(scores[:, 0], 1, atol=1e-5)
        records = backend.shard.retrieve([int(ids[-1])], True, False)  # with_vector is required, unlike the stub says
        assert records[0].payload == {"row": int(ids[-1])}
        backend.upsert(np.array([len(ids)]), expect[:1])  # and it takes writes again
        backend.close()
        print(f"per={per} round={round_}: acknowledged {(last + 1) * per}, held {len(ids)}")
