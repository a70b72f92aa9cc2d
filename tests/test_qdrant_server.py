"""The Qdrant *server* code path (no server binary is reachable here): the same qdrant-client API, served by its
in-memory engine behind the URL code path, with the failures a live server produces injected."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from qdrant_client import QdrantClient

import retrieval_kit.index.qdrant_backend as qb
from retrieval_kit.index import Index
from conftest import assert_same_hits
from test_index import DIM, ENCODER, corpus, doc, unit

URL = "http://qdrant.test:6333"


class Server:
    """One shared in-memory 'server' that several clients (writer, readers) talk to; records calls."""

    def __init__(self):
        self.client = QdrantClient(location=":memory:")
        self.calls: list[str] = []
        self.fail: dict[str, list[BaseException]] = {}
        real_close = self.client.close
        self.client.close = lambda *a, **k: None  # clients come and go; the server stays
        self.shutdown = real_close
        for name in ("upsert", "delete", "delete_collection", "query_batch_points", "scroll", "count"):
            self._spy(name)

    def _spy(self, name):
        real = getattr(self.client, name)

        def call(*args, **kwargs):
            self.calls.append(name)
            if self.fail.get(name):
                raise self.fail[name].pop(0)
            return real(*args, **kwargs)

        setattr(self.client, name, call)


@pytest.fixture()
def server(monkeypatch):
    srv = Server()
    real_connect = qb.connect

    def connect(*, folder=None, url=None, label="index", timeout=10, memory=False):
        return srv.client if url == URL else real_connect(folder=folder, url=url, label=label, timeout=timeout,
                                                          memory=memory)

    monkeypatch.setattr(qb, "connect", connect)
    yield srv
    srv.shutdown()


def make(tmp_path):
    return Index.create(tmp_path / "kb", dim=DIM, backend="qdrant", qdrant_url=URL, encoder=ENCODER)


def test_replace_upserts_new_points_before_deleting_old_ones(tmp_path, server):
    with make(tmp_path) as index:
        index.upsert_documents(corpus(3))
        server.calls.clear()
        index.upsert_documents([doc("d1", unit(3, seed=7), "h2")])
        assert [c for c in server.calls if c in ("upsert", "delete")] == ["upsert", "delete"]
        assert index.search(unit(3, seed=7)[2], k=1)[0][0].chunk_id == "d1#2"


def test_transient_errors_are_retried(tmp_path, server):
    with make(tmp_path) as index:
        server.fail["upsert"] = [httpx.ConnectError("connection reset"), httpx.ReadTimeout("slow")]
        index.upsert_documents(corpus(4))
        assert server.fail["upsert"] == [] and index.backend.count() == 12
        server.fail["query_batch_points"] = [httpx.RemoteProtocolError("peer closed")]
        assert index.search(corpus(4)[2][4][1], k=1)[0][0].chunk_id == "d2#1"


def test_a_failed_update_never_drops_the_collection_and_is_repaired_by_diff(tmp_path, server):
    items = corpus(5)
    with make(tmp_path) as index:
        index.upsert_documents(items)
    index = Index.open(tmp_path / "kb", writable=True)
    server.calls.clear()
    boom = RuntimeError("server rejected the batch")
    server.fail["upsert"] = [boom]
    with pytest.raises(RuntimeError):
        index.upsert_documents([doc("d0", unit(3, seed=8), "h2"), doc("new", unit(2, seed=9))])
    assert index.doc_hashes()["d0"] == "h1" and "new" not in index.doc_hashes()  # SQLite rolled back
    # the old points are still on the server: they were never deleted before the commit
    assert index.search(items[0][4][1], k=1)[0][0].chunk_id == "d0#1"
    index.upsert_documents([doc("new", unit(2, seed=9))])
    index.save()
    index.close()
    assert "delete_collection" not in server.calls  # a shared, live collection is never dropped
    with Index.open(tmp_path / "kb", writable=True) as index:
        assert index.backend.count() == index.count_chunks() == 17


def test_reader_of_a_half_updated_collection_drops_points_outside_its_snapshot(tmp_path, server):
    with make(tmp_path) as index:
        index.upsert_documents(corpus(3))
    stray = unit(1, seed=42)
    server.client.upsert("kb", points=qb.models.Batch(ids=[999], vectors=stray.tolist(), payloads=[{}]))
    server.calls.clear()
    with Index.open(tmp_path / "kb") as reader:  # a writer died after its upsert: the reader cannot repair it
        hits = reader.search(stray[0], k=3)[0]
        assert len(hits) == 3 and all(h.chunk_id.startswith("d") for h in hits)  # no phantom hit, k still filled
    assert "scroll" not in server.calls  # a search never lists the whole collection
    assert server.client.count("kb").count == 10  # the reader wrote nothing
    with Index.open(tmp_path / "kb", writable=True) as writer:  # the next writer repairs by diff
        assert writer.backend.count() == 9
    assert np.isfinite(stray).all()


def _signals(text: str, vector: np.ndarray):
    from retrieval_kit.index.base import Signal

    return [Signal("bm25", 1.0, texts=[text]), Signal("teacher", 1.0, vectors=vector[None, :])]


def _tie_free_corpus() -> list[tuple]:
    """Chunks whose BM25 scores for 'alpha beta' all differ (the engines order tied scores each their own way)."""
    items = corpus(4)
    for n, (_, _, _, chunks, _) in enumerate(items):
        for i, chunk in enumerate(chunks):
            j = 3 * n + i
            chunk["text"] = " ".join(["alpha"] * (j % 4 + 1) + ["beta"] * (j // 4) + [f"filler{k}" for k in range(j)])
    return items


def test_hybrid_on_a_server_fuses_in_the_query_api_like_faiss(tmp_path, server):
    items = _tie_free_corpus()
    with Index.create(tmp_path / "local", dim=DIM, encoder=ENCODER) as faiss_index:
        faiss_index.upsert_documents(items)
    with make(tmp_path) as index:
        index.upsert_documents(items)
    probe = items[3][4][0]
    with Index.open(tmp_path / "kb") as reader, Index.open(tmp_path / "local") as local:
        server.calls.clear()
        remote = reader.search_hybrid(_signals("alpha beta", probe), k=6)[0]
        assert server.calls == ["query_batch_points", "query_batch_points"]  # fused request + each signal's list
        expected = local.search_hybrid(_signals("alpha beta", probe), k=6)[0]
    assert_same_hits([[(h.chunk_id, h.score, h.signals) for h in remote]],
                     [[(h.chunk_id, h.score, h.signals) for h in expected]])
    assert {"bm25", "teacher"} <= set().union(*(h.signals for h in remote))


def test_hybrid_reader_drops_server_points_outside_its_snapshot(tmp_path, server):
    with make(tmp_path) as index:
        index.upsert_documents(corpus(3))
    stray = unit(1, seed=43)
    server.client.upsert("kb", points=qb.models.Batch(
        ids=[998], vectors={"": stray.tolist(), "bm25": [qb.models.SparseVector(indices=[1, 2], values=[1.0, 1.0])]},
        payloads=[{}]))
    with Index.open(tmp_path / "kb") as reader:
        hits = reader.search_hybrid(_signals("text of d0", stray[0]), k=4)[0]
    assert len(hits) == 4 and all(h.chunk_id.startswith("d") for h in hits)


def test_server_collection_from_before_the_lexical_side_says_rebuild(tmp_path, server):
    from retrieval_kit.errors import IndexError_

    with make(tmp_path) as index:
        index.upsert_documents(corpus(2))
    server.client.delete_collection("kb")  # stand in for a collection made by an older rkit: dense only
    server.client.create_collection("kb", vectors_config=qb.models.VectorParams(size=DIM, distance=qb.models.Distance.DOT))
    with Index.open(tmp_path / "kb", writable=True) as writer:  # repairs the points by diff; cannot add the sparse side
        assert writer.backend.count() == 6
        with pytest.raises(IndexError_, match="before rkit kept a lexical side.*--rebuild"):
            writer.search_lexical(["text"])
        assert writer.search(unit(6)[1], k=1)[0][0].chunk_id == "d0#1"
