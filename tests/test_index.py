"""retrieval_kit.index: real faiss and real Qdrant local mode, in tmp_path, small random vectors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from retrieval_kit.errors import IndexError_, IndexMismatchError, InputError
from retrieval_kit.index import Hit, Index, list_indexes

DIM = 16
ENCODER = {"fingerprint": "fp-aaaaaaaaaaaaaaaa", "backbone": "tiny-llm", "teacher": "tiny-st", "adapter": "default"}
BACKENDS = [
    pytest.param({"backend": "faiss", "factory": "Flat"}, id="faiss-flat"),
    pytest.param({"backend": "faiss", "factory": "HNSW32"}, id="faiss-hnsw"),
    pytest.param({"backend": "qdrant"}, id="qdrant-local"),
]


def unit(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def doc(doc_id: str, vectors: np.ndarray, content_hash: str = "h1") -> tuple:
    chunks = [{"chunk_id": f"{doc_id}#{i}", "n": i, "text": f"text of {doc_id} part {i}", "title": doc_id.upper(),
               "source": f"{doc_id}.txt", "metadata": {"part": i}} for i in range(len(vectors))]
    return doc_id, content_hash, f"{doc_id}.txt", chunks, vectors


def corpus(n_docs: int = 30, per_doc: int = 3, seed: int = 0) -> list[tuple]:
    vectors = unit(n_docs * per_doc, seed)
    return [doc(f"d{i}", vectors[i * per_doc : (i + 1) * per_doc]) for i in range(n_docs)]


def make(tmp_path, name="kb", **kw) -> Index:
    return Index.create(tmp_path / name, dim=DIM, encoder=ENCODER, chunking={"size": 200}, **kw)


def assert_one_line(exc_info, *needles):
    msg = str(exc_info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg


# -- create / open / manifest ----------------------------------------------------------------
def test_create_open_round_trip_and_manifest(tmp_path):
    with make(tmp_path) as index:
        index.upsert_documents(corpus(4))
    manifest = json.loads((tmp_path / "kb" / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["name"] == "kb"
    assert manifest["backend"] == "faiss" and manifest["factory"] == "Flat"
    assert manifest["dim"] == DIM and manifest["metric"] == "ip"
    assert manifest["encoder"] == ENCODER and manifest["chunking"] == {"size": 200}
    assert manifest["counts"] == {"documents": 4, "chunks": 12}
    assert manifest["created"].endswith("Z") and manifest["updated"] >= manifest["created"]
    assert {p.name for p in (tmp_path / "kb").iterdir()} == {"manifest.json", "docs.sqlite", "faiss.index",
                                                             "lexical", ".rkit-index", ".rkit-writer.lock"}

    with Index.open(tmp_path / "kb") as index:  # a reader
        assert index.manifest["encoder"] == ENCODER
        assert (index.count_documents(), index.count_chunks()) == (4, 12)
        info = index.info()
        assert info["counts"] == {"documents": 4, "chunks": 12} and info["vectors"] == 12
        assert info["size_bytes"] > 0


def test_create_refuses_existing_index(tmp_path):
    make(tmp_path).close()
    with pytest.raises(IndexError_) as exc:
        make(tmp_path)
    assert_one_line(exc, "already exists", "kb")


def test_bad_factory_string(tmp_path):
    with pytest.raises(InputError) as exc:
        make(tmp_path, factory="NotAFactory42")
    assert_one_line(exc, "NotAFactory42")
    assert not (tmp_path / "kb").exists()


def test_list_indexes(tmp_path):
    make(tmp_path, "a").close()
    make(tmp_path, "b", backend="qdrant").close()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{nope")
    found = {i["name"]: i for i in list_indexes(tmp_path)}
    assert found["a"]["backend"] == "faiss" and found["b"]["backend"] == "qdrant"
    assert found["a"]["encoder"] == ENCODER["fingerprint"] and found["a"]["chunks"] == 0
    assert "error" in found["broken"]
    assert list_indexes(tmp_path / "missing") == []


# -- search --------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", BACKENDS)
def test_planted_vector_comes_first(tmp_path, kw):
    items = corpus(30)
    with make(tmp_path, **kw) as index:
        index.upsert_documents(items)
        planted = items[7][4][2]  # third chunk of d7
        hits = index.search(planted, k=5)
        assert len(hits) == 1 and len(hits[0]) == 5
        top = hits[0][0]
        assert isinstance(top, Hit)
        assert (top.chunk_id, top.doc_id) == ("d7#2", "d7")
        assert top.score == pytest.approx(1.0, abs=1e-5)
        assert (top.text, top.title, top.source, top.metadata) == ("text of d7 part 2", "D7", "d7.txt", {"part": 2})
        assert [h.score for h in hits[0]] == sorted((h.score for h in hits[0]), reverse=True)


def test_faiss_and_qdrant_agree(tmp_path):
    items, queries = corpus(40), unit(8, seed=99)
    results = {}
    for name, kw in {"f": {"backend": "faiss"}, "q": {"backend": "qdrant"}}.items():
        with make(tmp_path, name, **kw) as index:
            index.upsert_documents(items)
            results[name] = index.search(queries, k=10)
    for fhits, qhits in zip(results["f"], results["q"]):
        assert [h.chunk_id for h in fhits] == [h.chunk_id for h in qhits]
        np.testing.assert_allclose([h.score for h in fhits], [h.score for h in qhits], atol=1e-5)


def test_search_edge_cases(tmp_path):
    with make(tmp_path) as index:
        assert index.search(unit(2), k=3) == [[], []]  # empty index
        index.upsert_documents(corpus(1, per_doc=2))
        assert len(index.search(unit(1), k=10)[0]) == 2  # fewer than k stored
        with pytest.raises(InputError) as exc:
            index.search(np.ones((1, DIM + 1), np.float32))
        assert_one_line(exc, "kb", str(DIM))
        with pytest.raises(InputError):
            index.search(unit(1), k=0)


# -- changes -------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", BACKENDS)
def test_upsert_document_replaces_old_chunks(tmp_path, kw):
    with make(tmp_path, **kw) as index:
        index.upsert_documents(corpus(5))
        old = index.search(corpus(5)[2][4][0], k=1)[0][0]
        assert old.chunk_id == "d2#0"
        new_vectors = unit(2, seed=42)
        index.upsert_document(*doc("d2", new_vectors, content_hash="h2"))
        assert (index.count_documents(), index.count_chunks()) == (5, 4 * 3 + 2)
        assert index.doc_hashes()["d2"] == "h2"
        assert index.search(new_vectors[1], k=1)[0][0].chunk_id == "d2#1"
        # the replaced chunk d2#2 is gone from the backend too
        assert all(h.chunk_id != "d2#2" for h in index.search(corpus(5)[2][4][2], k=20)[0])
        assert index.backend.count() == index.count_chunks() or index.backend.needs_rebuild


@pytest.mark.parametrize("kw", BACKENDS)
def test_delete_documents(tmp_path, kw):
    items = corpus(10)
    with make(tmp_path, **kw) as index:
        index.upsert_documents(items)
        assert index.delete_documents(["d3", "d4", "never-indexed"]) == 2
        assert (index.count_documents(), index.count_chunks()) == (8, 24)
        assert "d3" not in index.doc_hashes()
        hits = index.search(items[3][4][0], k=24)[0]
        assert len(hits) == 24 and not {h.doc_id for h in hits} & {"d3", "d4"}
    with Index.open(tmp_path / "kb", writable=True) as index:
        assert index.backend.count() == 24


def test_doc_hashes_and_empty_document(tmp_path):
    with make(tmp_path) as index:
        index.upsert_documents([doc("a", unit(2), "ha"), doc("b", unit(1, 1), "hb")])
        index.upsert_document("empty", "he", "empty.txt", [], np.zeros((0, DIM), np.float32))
        assert index.doc_hashes() == {"a": "ha", "b": "hb", "empty": "he"}
        assert index.count_chunks() == 3


def test_hnsw_delete_rebuilds_from_store(tmp_path):
    items = corpus(20)
    with make(tmp_path, factory="HNSW32") as index:
        index.upsert_documents(items)
        index.delete_documents(["d0"])
        assert index.backend.needs_rebuild  # HNSW cannot remove ids
        assert all(h.doc_id != "d0" for h in index.search(items[0][4][0], k=10)[0])
        assert not index.backend.needs_rebuild and index.backend.count() == 57
    with Index.open(tmp_path / "kb", writable=True) as index:
        assert index.backend.count() == 57
        assert index.search(items[5][4][1], k=1)[0][0].chunk_id == "d5#1"


def test_ivf_trains_on_stored_vectors(tmp_path):
    items = corpus(100, per_doc=4)  # 400 vectors for 8 lists
    with make(tmp_path, factory="IVF8,Flat") as index:
        assert index.manifest["faiss_params"] == {"nprobe": 16}
        index.upsert_documents(items)
        assert index.search(items[50][4][3], k=1)[0][0].chunk_id == "d50#3"
        index.delete_documents(["d50"])  # IVF removes ids in place
        index.upsert_document(*doc("new", unit(2, seed=7)))  # trained now: added directly
        assert not index.backend.needs_rebuild and index.backend.count() == 398
    with Index.open(tmp_path / "kb", writable=True) as index:
        assert index.backend.index.is_trained and index.count_chunks() == 398


def test_ivf_with_too_few_vectors_serves_exact_search_until_it_can_train(tmp_path):
    """IVF64 on 15 vectors cannot train: an exact stand-in serves (never a stuck index), the real factory once big enough."""
    with make(tmp_path, factory="IVF64,Flat") as index:
        index.upsert_documents(corpus(5))  # 15 vectors < 64 lists
        assert index.search(corpus(5)[3][4][1], k=1)[0][0].chunk_id == "d3#1"
    with Index.open(tmp_path / "kb") as index:  # a reader: opens, searches, reports the stand-in
        assert index.info()["exact_standin"] is True and index.info()["vectors"] == 15
        assert index.search(corpus(5)[4][4][2], k=1)[0][0].chunk_id == "d4#2"
    with Index.open(tmp_path / "kb", writable=True) as index:
        index.upsert_documents(corpus(30, seed=1)[5:])  # now 90 vectors: enough to train 64 lists
    with Index.open(tmp_path / "kb") as index:
        assert index.info()["exact_standin"] is False and index.backend.count() == 90
        assert faiss_ivf(index) is not None  # a trained IVF, not the stand-in
        assert index.search(corpus(30, seed=1)[20][4][1], k=1)[0][0].chunk_id == "d20#1"


def faiss_ivf(index):
    import faiss

    return faiss.try_extract_index_ivf(faiss.downcast_index(index.backend.index.index))


def test_bad_inputs_leave_index_unchanged(tmp_path):
    with make(tmp_path) as index:
        index.upsert_documents(corpus(3))
        with pytest.raises(InputError) as exc:
            index.upsert_document(*doc("x", unit(2)[:, :5]))
        assert_one_line(exc, "kb", "'x'")
        with pytest.raises(InputError) as exc:  # chunk id owned by another document
            index.upsert_document("x", "h", "x.txt", [{"chunk_id": "d1#0", "text": "t"}], unit(1))
        assert_one_line(exc, "d1#0", "'d1'")
        with pytest.raises(InputError):
            index.upsert_document("x", "h", "x.txt", [{"text": "no id"}], unit(1))
        assert (index.count_documents(), index.count_chunks()) == (3, 9)


# -- persistence and crash safety --------------------------------------------------------------
@pytest.mark.parametrize("kw", BACKENDS)
def test_reopen_after_save_persists_everything(tmp_path, kw):
    items = corpus(12)
    with make(tmp_path, **kw) as index:
        index.upsert_documents(items)
        index.delete_documents(["d11"])
    with Index.open(tmp_path / "kb", writable=True) as index:
        assert (index.count_documents(), index.count_chunks()) == (11, 33)
        assert index.doc_hashes()["d0"] == "h1"
        assert index.search(items[4][4][2], k=1)[0][0].chunk_id == "d4#2"
        assert index.manifest["counts"] == {"documents": 11, "chunks": 33}


@pytest.mark.parametrize("kw", BACKENDS)
def test_error_inside_upsert_keeps_old_content(tmp_path, kw, monkeypatch):
    items = corpus(6)
    with make(tmp_path, **kw) as index:
        index.upsert_documents(items)
    index = Index.open(tmp_path / "kb", writable=True)

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(index.backend, "upsert", boom)
    with pytest.raises(RuntimeError):  # old chunks of d1 are already deleted in SQLite and the backend
        index.upsert_documents([doc("d1", unit(3, seed=5), "h2"), doc("new", unit(2, seed=6))])
    monkeypatch.undo()
    # same process: rolled back, and the backend is rebuilt before the next search
    assert index.doc_hashes()["d1"] == "h1" and index.count_chunks() == 18
    assert index.search(items[1][4][0], k=1)[0][0].chunk_id == "d1#0"
    index.close()  # no save: a crashed process would not save either
    with Index.open(tmp_path / "kb", writable=True) as index:
        assert "new" not in index.doc_hashes() and index.count_chunks() == 18
        assert index.search(items[1][4][0], k=1)[0][0].chunk_id == "d1#0"


def test_exception_in_with_block_does_not_save_but_loses_nothing(tmp_path):
    items = corpus(4)
    with make(tmp_path) as index:
        index.upsert_documents(items[:2])
    with pytest.raises(KeyError):
        with Index.open(tmp_path / "kb", writable=True) as index:
            index.upsert_documents(items[2:])  # committed to SQLite, faiss.index not saved
            raise KeyError("caller bug")
    with Index.open(tmp_path / "kb", writable=True) as index:  # backend_synced=0: rebuilt from the stored vectors
        assert index.count_chunks() == 12 and index.backend.count() == 12
        assert index.search(items[3][4][0], k=1)[0][0].chunk_id == "d3#0"


def test_stale_faiss_file_is_rebuilt(tmp_path):
    items = corpus(6)
    folder = tmp_path / "kb"
    with make(tmp_path) as index:
        index.upsert_documents(items[:3])
    old_faiss = (folder / "faiss.index").read_bytes()
    with Index.open(folder, writable=True) as index:
        index.upsert_documents(items[3:])
    (folder / "faiss.index").write_bytes(old_faiss)  # faiss file older than SQLite
    with Index.open(folder, writable=True) as index:
        assert index.backend.count() == 18
    (folder / "faiss.index").write_bytes(b"garbage")
    with Index.open(folder, writable=True) as index:
        assert index.search(items[5][4][2], k=1)[0][0].chunk_id == "d5#2"
    (folder / "faiss.index").unlink()
    with Index.open(folder, writable=True) as index:
        assert index.backend.count() == 18
    assert (folder / "faiss.index").is_file()


def test_open_errors_are_one_line_and_name_a_way_out(tmp_path):
    make(tmp_path, "kb").close()
    with pytest.raises(IndexError_) as exc:
        Index.open(tmp_path / "nope")
    assert_one_line(exc, "no index at", "nope", "kb")  # lists what exists next to it

    make(tmp_path, "nodocs").close()
    (tmp_path / "nodocs" / "docs.sqlite").unlink()
    with pytest.raises(IndexError_) as exc:
        Index.open(tmp_path / "nodocs")
    assert_one_line(exc, "nodocs", "docs.sqlite", "--rebuild")

    make(tmp_path, "baddb").close()
    (tmp_path / "baddb" / "docs.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(IndexError_) as exc:
        Index.open(tmp_path / "baddb")
    assert_one_line(exc, "baddb", "docs.sqlite", "--rebuild")


@pytest.mark.parametrize("broken, needle", [("{not json", "unreadable"), ('{"name": "kb"}', "missing"),
                                            ("manifest with dim abc", "'dim' should be int")])
def test_broken_manifest_is_restored_from_the_store_copy(tmp_path, broken, needle):
    with make(tmp_path) as index:
        index.upsert_documents(corpus(3))
    path = tmp_path / "kb" / "manifest.json"
    good = json.loads(path.read_text())
    path.write_text(json.dumps({**good, "dim": "abc"}) if broken.startswith("manifest") else broken)
    with pytest.raises(IndexError_) as exc:  # the file alone: a one-line error naming what is wrong
        __import__("retrieval_kit.index", fromlist=["read_manifest"]).read_manifest(tmp_path / "kb")
    assert_one_line(exc, needle, "--rebuild")
    before = path.read_text()
    with Index.open(tmp_path / "kb") as index:  # a reader uses the copy in docs.sqlite and writes nothing
        assert index.count_chunks() == 9 and index.search(corpus(3)[2][4][0], k=1)[0][0].chunk_id == "d2#0"
    assert path.read_text() == before
    with Index.open(tmp_path / "kb", writable=True):  # the writer restores the file
        pass
    assert json.loads(path.read_text())["dim"] == DIM


def test_broken_manifest_without_a_copy_names_rebuild(tmp_path):
    make(tmp_path).close()
    import sqlite3

    with sqlite3.connect(tmp_path / "kb" / "docs.sqlite") as db:  # an index written before the copy existed
        db.execute("DELETE FROM meta WHERE key = 'manifest'")
    (tmp_path / "kb" / "manifest.json").write_text(json.dumps({"name": "kb", "dim": "abc"}))
    for writable in (False, True):
        with pytest.raises(IndexError_) as exc:
            Index.open(tmp_path / "kb", writable=writable)
        assert_one_line(exc, "corrupt", "rkit index CORPUS --name kb --rebuild")


def test_check_document_space(tmp_path):
    with make(tmp_path) as index:
        index.check_document_space(ENCODER["fingerprint"], DIM)
        with pytest.raises(IndexMismatchError) as exc:
            index.check_document_space("fp-bbbbbbbbbbbbbbbb", DIM)
        assert_one_line(exc, "'kb'", ENCODER["fingerprint"][:12], "fp-bbbbbbbbb", "tiny-llm", "tiny-st", "--adapter")
        with pytest.raises(IndexMismatchError) as exc:
            index.check_document_space(ENCODER["fingerprint"], DIM * 2)
        assert_one_line(exc, "'kb'", str(DIM), str(DIM * 2))
    spaced = {**ENCODER, "doc_fingerprint": "docs-cccccccccccc"}
    with Index.create(tmp_path / "kb2", dim=DIM, encoder=spaced) as index:  # the document space decides, not the adapter
        index.check_document_space("docs-cccccccccccc", DIM)
        with pytest.raises(IndexMismatchError):
            index.check_document_space(ENCODER["fingerprint"], DIM)


# -- qdrant specifics ------------------------------------------------------------------------
def test_qdrant_unreachable_url_fails_with_one_line(tmp_path):
    with pytest.raises(IndexError_) as exc:
        make(tmp_path, backend="qdrant", qdrant_url="http://127.0.0.1:1", timeout=2)
    assert_one_line(exc, "cannot reach Qdrant at http://127.0.0.1:1", "refused")
    assert not (tmp_path / "kb").exists()  # nothing left behind


def test_qdrant_local_one_writer_many_readers(tmp_path):
    with make(tmp_path, backend="qdrant") as index:
        index.upsert_documents(corpus(4))
    writer = Index.open(tmp_path / "kb", writable=True)
    try:
        assert writer.manifest["qdrant"] == {"url": None, "collection": "kb"}
        with pytest.raises(IndexError_) as exc:  # a second writer: at once, naming the holder
            Index.open(tmp_path / "kb", writable=True)
        assert_one_line(exc, "kb", "being written by pid", "--wait")
        writer.upsert_documents([doc("late", unit(2, seed=9))])  # committed while readers read
        with Index.open(tmp_path / "kb") as reader, Index.open(tmp_path / "kb") as other:  # readers work meanwhile
            assert reader.search(unit(2, seed=9)[1], k=1)[0][0].chunk_id == "late#1"
            assert other.search(corpus(4)[2][4][1], k=1)[0][0].chunk_id == "d2#1"
    finally:
        writer.close()
    Index.open(tmp_path / "kb", writable=True).close()  # released


def test_qdrant_payload_holds_the_chunk(tmp_path):
    with make(tmp_path, backend="qdrant") as index:
        index.upsert_documents(corpus(2))
        point = index.backend.client.scroll("kb", limit=1, with_payload=True)[0][0]
        assert set(point.payload) == {"chunk_id", "doc_id", "n", "text", "title", "source", "metadata"}


def test_killed_process_loses_nothing_committed(tmp_path):
    """A real crash: a child process indexes, then dies without saving or closing anything."""
    import subprocess
    import sys
    import textwrap

    with make(tmp_path) as index:
        index.upsert_documents(corpus(2))
    script = textwrap.dedent(f"""
        import os, numpy as np
        from retrieval_kit.index import Index
        index = Index.open({str(tmp_path / "kb")!r}, writable=True)
        v = np.eye({DIM}, dtype=np.float32)[:2]
        index.upsert_document("late", "h", "late.txt", [{{"chunk_id": "late#0"}}, {{"chunk_id": "late#1"}}], v)
        index.delete_documents(["d0"])
        os._exit(1)
    """)
    import retrieval_kit

    root = Path(retrieval_kit.__file__).resolve().parents[1]  # so the child imports this checkout
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=root)
    assert done.returncode == 1, done.stderr
    with Index.open(tmp_path / "kb", writable=True) as index:
        assert set(index.doc_hashes()) == {"d1", "late"} and index.backend.count() == 5
        assert index.search(np.eye(DIM, dtype=np.float32)[1], k=1)[0][0].chunk_id == "late#1"


def _files(folder):
    names = ("manifest.json", "docs.sqlite", "faiss.index")
    return {n: (folder / n).read_bytes() for n in names if (folder / n).exists()}


def test_reader_during_a_write_then_a_dead_writer_never_leaves_a_trusted_stale_backend(tmp_path):
    """The old bug: a reader opened during a write rebuilt and saved (marking the backend in sync); the writer then
    replaced a document with the same number of chunks and died before saving; the next open trusted equal counts
    and the new chunk's own vector found other documents."""
    items = corpus(6)
    with make(tmp_path) as index:
        index.upsert_documents(items)
    folder = tmp_path / "kb"
    writer = Index.open(folder, writable=True)
    writer.upsert_documents([doc("d2", unit(3, seed=11), "h2")])  # committed; faiss.index not saved yet
    before = _files(folder)
    with Index.open(folder) as reader:  # a search while the write is in progress
        assert reader.search(unit(3, seed=11)[1], k=1)[0][0].chunk_id == "d2#1"  # repaired in memory
    assert _files(folder) == before  # and nothing written: readers never write
    writer.upsert_documents([doc("d4", unit(3, seed=12), "h2")])  # same chunk count as before
    writer.store.close()  # the writer dies: no save, no close of the backend
    with Index.open(folder) as reader:
        assert reader.search(unit(3, seed=12)[0], k=1)[0][0].chunk_id == "d4#0"
        assert reader.search(unit(3, seed=11)[2], k=1)[0][0].chunk_id == "d2#2"
        assert reader.search(items[0][4][0], k=1)[0][0].chunk_id == "d0#0"
    writer._lock.release()
    with Index.open(folder, writable=True) as index:  # the next writer repairs and saves
        assert index.info()["vectors"] == 18
    with Index.open(folder) as reader:
        assert reader._stale is False and reader.search(unit(3, seed=12)[2], k=1)[0][0].chunk_id == "d4#2"


def test_reader_refresh_moves_to_the_new_generation(tmp_path):
    with make(tmp_path) as index:
        index.upsert_documents(corpus(2))
    reader = Index.open(tmp_path / "kb")
    try:
        with Index.open(tmp_path / "kb", writable=True) as writer:
            writer.upsert_documents([doc("late", unit(1, seed=5))])
        assert reader.search(unit(1, seed=5)[0], k=1)[0][0].chunk_id != "late#0"  # its snapshot is older
        generation = reader.generation
        assert reader.refresh() is True and reader.generation == generation + 1
        assert reader.search(unit(1, seed=5)[0], k=1)[0][0].chunk_id == "late#0"
        assert reader.refresh() is False
    finally:
        reader.close()
