"""`rkit serve`: the HTTP API over real indexes and the real models (loaded once per test session).

The app runs in-process (FastAPI's TestClient, and a real uvicorn on a loopback port for the load smoke
test); the page is tested in a real browser in test_serve_browser.py. Schemathesis fuzzes every operation
against the app's own OpenAPI schema.
"""

from __future__ import annotations

import shutil
import subprocess
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from retrieval_kit.indexer import IndexSettings, index_corpus
from retrieval_kit.paths import SAMPLE_CORPUS
from retrieval_kit.serve import Searcher, ServeConfig, create_app
from rkit_cli.main import app as cli_app

PLANTED = "vault/zephyrine.md"
PLANTED_QUERY = "how often are the zephyrine vault credentials rotated?"
TOKEN = "t0ken-for-tests-0123456789"


def _corpus(folder: Path) -> Path:
    shutil.copytree(SAMPLE_CORPUS, folder)
    (folder / "vault").mkdir()
    (folder / PLANTED).write_text("# Zephyrine vault\n\nThe zephyrine vault credentials are rotated every 90 days "
                                  "by the platform team; the old credentials stop working a day later.\n")
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory, encoder):
    """Two indexes of the same corpus (FAISS and Qdrant local), a loaded searcher over both."""
    root = tmp_path_factory.mktemp("serve")
    corpus = _corpus(root / "docs")
    folders = {"kb": root / "indexes" / "kb", "kbq": root / "indexes" / "kbq"}
    for name, backend in (("kb", "faiss"), ("kbq", "qdrant")):
        index_corpus(corpus, folders[name], lambda: encoder, "default", IndexSettings(backend=backend))
    searcher = Searcher(folders, encoder=encoder, refresh_s=0.05)
    searcher.load()
    yield {"root": root, "corpus": corpus, "folders": folders, "searcher": searcher}
    searcher.close()


@pytest.fixture(scope="module")
def client(served):
    with TestClient(create_app(served["searcher"], load=False)) as c:
        yield c


def _search(client, **body) -> dict:
    response = client.post("/search", json=body)
    assert response.status_code == 200, response.text
    return response.json()


# -- the contract ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", ["kb", "kbq"])
def test_search_finds_the_planted_document_first(client, index):
    out = _search(client, query=PLANTED_QUERY, k=3, index=index)
    assert out["index"] == index and out["query_mode"] == "hybrid" and isinstance(out["generation"], int)
    top = out["hits"][0]
    assert top["doc_id"] == PLANTED and top["rank"] == 1 and "zephyrine" in top["snippet"]
    assert set(top["signals"]) <= {"bm25", "teacher", "fused"} and top["signals"]
    assert [h["rank"] for h in out["hits"]] == [1, 2, 3]
    assert "text" not in top  # hits carry a snippet; the whole chunk is GET /documents/{id}


def test_odd_characters_are_searched_not_crashed_on(client):
    out = _search(client, query="zephyrine\u0000 vault \U0001F512 \u202e", k=1)
    assert out["hits"][0]["doc_id"] == PLANTED


def test_modes_and_the_default_index(client):
    lexical = _search(client, query="zephyrine", k=2, query_mode="bm25")
    assert lexical["index"] == "kb" and lexical["query_mode"] == "bm25"
    assert lexical["hits"][0]["doc_id"] == PLANTED and list(lexical["hits"][0]["signals"]) == ["bm25"]
    dense = _search(client, query=PLANTED_QUERY, k=2, query_mode="teacher")
    assert list(dense["hits"][0]["signals"]) == ["teacher"]
    lexical_hybrid = _search(client, query=PLANTED_QUERY, k=3, signals={"bm25": 1, "teacher": 0.5})
    assert lexical_hybrid["hits"][0]["doc_id"] == PLANTED
    assert {name for h in lexical_hybrid["hits"] for name in h["signals"]} == {"bm25", "teacher"}
    convex = _search(client, query=PLANTED_QUERY, k=3, signals={"bm25": 1, "teacher": 0.5}, fusion="convex")
    # convex scores are weighted min-max (top of BM25 = 1, of teacher = 0.5), not RRF's ~1/61
    assert convex["hits"][0]["doc_id"] == PLANTED and 1.0 <= convex["hits"][0]["score"] <= 1.5


def test_a_query_the_models_read_in_part_says_so(client):
    """1,000 characters of code can pass 256 word pieces: the response and the page say the end was not read."""
    query = "zephyrine " + "x=f(a[0],b[1]);" * 60
    assert len(query) <= 1000
    (note,) = _search(client, query=query, k=1, query_mode="teacher")["notes"]
    assert note.startswith("long query: the teacher reads its first 256 of"), note
    assert _search(client, query=PLANTED_QUERY, k=1)["notes"] == []
    assert len(_search(client, query=PLANTED_QUERY, k=2.0)["hits"]) == 2  # JSON Schema's integer: 2.0 is one


def test_batch_gives_what_single_searches_give(client):
    queries = [PLANTED_QUERY, "how do I rotate the API keys?", "what is photosynthesis?"]
    batch = client.post("/search/batch", json={"queries": queries, "k": 4})
    assert batch.status_code == 200, batch.text
    got = [[h["chunk_id"] for h in r["hits"]] for r in batch.json()["results"]]
    assert got == [[h["chunk_id"] for h in _search(client, query=q, k=4)["hits"]] for q in queries]
    assert [r["query"] for r in batch.json()["results"]] == queries


def test_concurrent_requests_are_batched_and_answered_right(served, client):
    """Requests that arrive together share one encode; each still gets its own query's hits."""
    searcher = served["searcher"]
    queries = [PLANTED_QUERY, "how do I rotate the API keys?"] * 8
    before_batches, before_queries = searcher.batches, searcher.batched_queries
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda q: _search(client, query=q, k=1), queries))
    assert [o["query"] for o in outs] == queries
    assert {o["hits"][0]["doc_id"] for o, q in zip(outs, queries) if q == PLANTED_QUERY} == {PLANTED}
    assert {o["hits"][0]["doc_id"] for o, q in zip(outs, queries) if q != PLANTED_QUERY} == {"security/rotating-api-keys.md"}
    assert searcher.batched_queries - before_queries == len(queries)
    assert searcher.batches - before_batches < len(queries)  # at least two requests shared a batch


@pytest.mark.parametrize("index", ["kb", "kbq"])
def test_filters_apply_inside_the_search(client, index):
    everything = _search(client, query="rotate the API keys", k=5, index=index)
    assert not any(h["source"].startswith("general/") for h in everything["hits"])
    general = _search(client, query="rotate the API keys", k=3, index=index, filters={"source_prefix": "general/"})
    # a filter that keeps none of the unfiltered top hits still gives k hits: it is applied inside each engine
    assert len(general["hits"]) == 3 and all(h["source"].startswith("general/") for h in general["hits"])
    for mode in ("bm25", "teacher"):
        txt = _search(client, query="backups of the database", k=2, index=index, query_mode=mode,
                      filters={"file_type": "txt"})
        assert txt["hits"] and all(h["source"].endswith(".txt") for h in txt["hits"])
    none = _search(client, query="keys", k=3, index=index, filters={"source_prefix": "no-such-folder/"})
    assert none["hits"] == []


def test_documents_by_id(client):
    hit = _search(client, query=PLANTED_QUERY, k=1)["hits"][0]
    doc = client.get(f"/documents/{hit['chunk_id']}")  # the id holds '/' and '#'
    assert doc.status_code == 404  # '#' starts a URL fragment: clients must percent-encode ids …
    from urllib.parse import quote

    doc = client.get("/documents/" + quote(hit["chunk_id"], safe=""))  # … as the page does
    assert doc.status_code == 200, doc.text
    assert doc.json()["doc_id"] == PLANTED and "every 90 days" in doc.json()["text"]
    assert client.get("/documents/" + quote(hit["chunk_id"], safe=""), params={"index": "kbq"}).json()["doc_id"] == PLANTED


@pytest.mark.parametrize("path", ["/documents/..%2F..%2Fetc%2Fpasswd", "/documents/../../etc/passwd",
                                  "/documents/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/documents/nope",
                                  "/static/..%2F..%2Fapp.py", "/static/../app.py", "/static/searcher.py"])
def test_ids_and_paths_never_reach_the_file_system(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert "root:" not in response.text and "import" not in response.text
    assert response.json()["error"]["status"] == 404


def test_indexes_health_metrics_and_schema(served, client):
    listing = client.get("/indexes").json()
    assert listing["default"] == "kb" and listing["auth"] is False and "hybrid" in listing["query_modes"]
    kb = {i["name"]: i for i in listing["indexes"]}["kb"]
    assert kb["documents"] == 21 and kb["chunks"] >= 21 and kb["backend"] == "faiss" and kb["default_query_mode"] == "hybrid"
    assert len(kb["encoder"]) == 16 and kb["encoder"] == served["searcher"].served["kb"].retriever.index.manifest["encoder"]["fingerprint"]
    assert client.get("/health").json() == {"status": "ready", "indexes": ["kb", "kbq"]}
    _search(client, query="zephyrine", k=1, query_mode="bm25")
    assert client.post("/search", content=b'{"query": "' + b"a" * 70000 + b'"}').status_code == 413
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert 'rkit_requests_total{method="POST",path="/search",status="200"}' in metrics.text
    assert 'rkit_request_seconds_bucket{le="0.005",path="/search"}' in metrics.text
    # the body limit answers before the router: counted under the route it was meant for
    assert 'rkit_requests_total{method="POST",path="/search",status="413"}' in metrics.text
    assert 'rkit_index_generation{index="kb"}' in metrics.text
    schema = client.get("/openapi.json").json()
    assert client.get("/documents/nope").status_code == 404 and client.get("/nowhere").status_code == 404
    assert client.get("/search").status_code == 405
    metrics = client.get("/metrics").text
    for label in ('path="/openapi.json",status="200"', 'path="/documents/{chunk_id:path}",status="404"',
                  'path="unmatched",status="404"', 'method="GET",path="/search",status="405"'):
        assert label in metrics, label
    assert {"/search", "/search/batch", "/explain", "/documents/{chunk_id}", "/indexes", "/health",
            "/metrics"} <= set(schema["paths"])
    # the limits are in the schema as JSON Schema words (a fuzzer and a client generator read them); a validator
    # in the wrong place once made pydantic write ge/le there, and tokens: 0 looked valid
    tokens = schema["components"]["schemas"]["ExplainRequest"]["properties"]["tokens"]["anyOf"][0]
    assert (tokens["minimum"], tokens["maximum"]) == (1, 128) and "ge" not in tokens
    page = client.get("/")
    assert page.status_code == 200 and "<html" in page.text.lower()


def test_explanation_says_how_faithful_it_is(client, encoder):
    out = client.post("/explain", json={"query": "how do I rotate the API keys?", "tokens": 8})
    assert out.status_code == 200, out.text
    told = out.json()
    rouge = encoder.describe()["explain_rouge_l"]
    assert told["decoded_from"] == "generative" and told["rouge_l"] == rouge
    assert told["shown"] == (encoder.config.trained and rouge is not None and rouge >= 0.2)
    assert told["note"] and (told["shown"] or "not yet faithful" in told["note"] or "untrained" in told["note"])
    with_search = _search(client, query="how do I rotate the API keys?", k=1, explain=True, explain_tokens=8,
                          query_mode="teacher")
    assert with_search["explanation"]["text"] == told["text"]  # greedy decode: the same text
    assert "the search used teacher" in with_search["explanation"]["note"]
    # the lenses come with it: the logit lens per special token and its summary words (the page's "Logit lens")
    lens = told["lens"]
    assert len(lens["logit"]) == encoder.config.n_thought + encoder.config.n_compress and lens["words"]
    assert with_search["explanation"]["lens"]["words"] == lens["words"]


# -- bad input: 4xx with a JSON error, never a 5xx --------------------------------------------------------
BAD_BODIES = [
    ({"query": ""}, 422), ({"query": "   "}, 422), ({"query": "x" * 1001}, 422), ({"query": "ok", "k": 0}, 422),
    ({"query": "ok", "k": -3}, 422), ({"query": "ok", "k": 101}, 422), ({"query": "ok", "k": "ten"}, 422),
    ({"query": "ok", "k": 10**30}, 422), ({"query": 7}, 422), ({}, 422), ({"query": "ok", "what": 1}, 422),
    ({"query": "ok", "query_mode": "psychic"}, 422), ({"query": "ok", "index": "nope"}, 404),
    ({"query": "ok", "index": "../kb"}, 404), ({"query": "\x1c\x85\u3000"}, 422),
    ({"query": "ok", "filters": {"file_type": "../../x"}}, 422), ({"query": "ok", "signals": {}}, 422),
    ({"query": "ok", "signals": {"bm25": 0}}, 422), ({"query": "ok", "signals": {"telepathy": 1}}, 422), ({"query": "ok", "explain_tokens": 10**6}, 422),
    ({"query": "ok", "fusion": "mean"}, 422), ({"query": "ok", "query_mode": "bm25", "signals": {"bm25": 1}}, 422),
    ({"query": "ok", "query_mode": "teacher", "fusion": "rrf"}, 422),
    ([1, 2], 422), ("just a string", 422),
    ({"query": "ok", "k": "5"}, 422), ({"query": "ok", "k": 5.5}, 422), ({"query": "ok", "explain": "yes"}, 422),
    ({"query": "ok", "explain": 1}, 422), ({"query": "ok", "signals": {"bm25": "1"}}, 422),
]


@pytest.mark.parametrize("body,status", BAD_BODIES)
def test_bad_search_bodies_get_4xx_json(client, body, status):
    response = client.post("/search", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["status"] == status and error["message"] and "Traceback" not in error["message"]


def test_a_blank_query_is_called_blank(client):
    """It used to answer with the regular expression the query failed."""
    for path, body in (("/search", {"query": " \t "}), ("/search/batch", {"queries": ["ok", "  "]})):
        message = client.post(path, json=body).json()["error"]["message"]
        assert "is blank" in message and "pattern" not in message, message


@pytest.mark.parametrize("raw,status", [(b"{not json", 422), (b'{"query": "\\ud800"}', 422),
                                        (b"\xff\xfe\x00garbage", 422), (b'{"query": "' + b"a" * 70000 + b'"}', 413)])
def test_raw_bodies(client, raw, status):
    response = client.post("/search", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert response.json()["error"]["status"] == status


def test_a_chunked_body_over_the_limit_is_413(client):
    def chunks():
        yield b'{"query": "'
        for _ in range(100):
            yield b"a" * 1000
        yield b'"}'

    response = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["status"] == 413
    small = client.post("/search", content=iter([b'{"query": "zeph', b'yrine", "k": 1, "query_mode": "bm25"}']),
                        headers={"content-type": "application/json"})
    assert small.status_code == 200 and small.json()["hits"][0]["doc_id"] == PLANTED


def test_batch_limits(client):
    assert client.post("/search/batch", json={"queries": []}).status_code == 422
    assert client.post("/search/batch", json={"queries": ["q"] * 65}).status_code == 422
    assert client.post("/search/batch", json={"queries": ["ok", " "]}).status_code == 422
    assert client.post("/explain", json={"query": "ok", "tokens": 0}).status_code == 422


# -- auth, readiness ----------------------------------------------------------------------------------------
def test_token_is_required_when_configured(served):
    with TestClient(create_app(served["searcher"], ServeConfig(token=TOKEN), load=False)) as c:
        body = {"query": "zephyrine", "k": 1, "query_mode": "bm25"}
        assert c.get("/health").status_code == 200  # probes need no token
        assert c.get("/").status_code == 200  # the page holds no data; it asks for the token
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                        {"Authorization": "Basic " + TOKEN}, {"Authorization": f"Bearer {TOKEN}x"}):
            response = c.post("/search", json=body, headers=headers)
            assert response.status_code == 401, headers
            assert response.headers["www-authenticate"] == "Bearer" and response.json()["error"]["status"] == 401
        for path in ("/indexes", "/metrics", "/documents/x"):
            assert c.get(path).status_code == 401
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert c.post("/search", json=body, headers=good).json()["hits"][0]["doc_id"] == PLANTED
        assert c.get("/indexes", headers=good).json()["auth"] is True


def test_cors_is_off_unless_asked(served, client):
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.options("/search", headers=preflight).headers
    assert "access-control-allow-origin" not in client.post("/search", json={"query": "x", "k": 1},
                                                            headers={"Origin": "https://evil.example"}).headers
    config = ServeConfig(cors_origins=["https://kb.example.com"])
    with TestClient(create_app(served["searcher"], config, load=False)) as c:
        allowed = c.options("/search", headers={**preflight, "Origin": "https://kb.example.com"})
        assert allowed.headers["access-control-allow-origin"] == "https://kb.example.com"
        assert "access-control-allow-origin" not in c.options("/search", headers=preflight).headers


def test_health_is_503_until_models_load(served):
    waiting = Searcher(served["folders"], encoder=None)  # never loaded
    with TestClient(create_app(waiting, load=False)) as c:
        assert c.get("/health").status_code == 503 and c.get("/health").json()["status"] == "loading"
        response = c.post("/search", json={"query": "x"})
        assert response.status_code == 503 and response.headers["retry-after"] == "2"
        assert response.json()["error"]["message"] == "models are loading"


# -- an index folder moved away under the server -----------------------------------------------------------------
def test_a_moved_index_is_reported_once_and_served_from_its_last_generation(served, client, caplog):
    """The watcher polls every refresh_s; it used to log a full traceback on each poll (~80 in 20 s)."""
    folder = served["folders"]["kb"]
    moved = folder.with_name("kb-moved")
    with caplog.at_level("WARNING", logger="rkit.serve"):
        folder.rename(moved)
        try:
            deadline = time.monotonic() + 10
            while served["searcher"].served["kb"].error is None and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(20 * served["searcher"].refresh_s)  # twenty more polls
            assert served["searcher"].served["kb"].error is not None
            assert _search(client, query=PLANTED_QUERY, k=1, index="kb")["hits"][0]["doc_id"] == PLANTED
        finally:
            moved.rename(folder)
        deadline = time.monotonic() + 10
        while served["searcher"].served["kb"].error is not None and time.monotonic() < deadline:
            time.sleep(0.05)
    records = [r.getMessage() for r in caplog.records if r.name == "rkit.serve"]
    assert len([m for m in records if "refresh failed" in m or "kb:" in m and "again" not in m]) == 1, records
    assert any("refreshing again" in m for m in records), records


def test_a_refresh_error_that_changes_while_failing_logs_each_new_error_once_at_info(caplog):
    """A moved folder's SQLite fails one way, then another (CI saw 'disk I/O error' then 'unable to open
    database file'); flapping between two errors must not log on every poll either."""
    from retrieval_kit.errors import InputError
    from retrieval_kit.serve.searcher import Served

    served = Served("kb", Path("kb"))
    with caplog.at_level("INFO", logger="rkit.serve"):
        for exc in [OSError("disk I/O error"), OSError("unable to open"), OSError("disk I/O error"),
                    OSError("unable to open"), InputError("rebuilt with another encoder")]:
            Searcher._failed(served, exc)
    logged = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "rkit.serve"]
    assert logged == [("ERROR", "kb: refresh failed"), ("INFO", "kb: still failing, now: OSError: unable to open"),
                      ("INFO", "kb: still failing, now: rebuilt with another encoder")]
    assert caplog.records[0].exc_info is not None and served.error == "rebuilt with another encoder"


# -- a writer updates the index while the server serves ----------------------------------------------------------
@pytest.mark.parametrize("index", ["kb", "kbq"])
def test_a_writers_update_is_picked_up_live(served, client, encoder, index):
    corpus, folder = served["corpus"], served["folders"][index]
    settings = IndexSettings(backend="faiss" if index == "kb" else "qdrant")
    before = _search(client, query="quillwort greenhouse watering schedule", k=1, query_mode="bm25", index=index)
    assert not before["hits"] or "quillwort" not in before["hits"][0]["snippet"]
    stop, seen, errors = threading.Event(), set(), []

    def hammer():  # readers never see an error or a half-applied state while the writer commits
        while not stop.is_set():
            response = client.post("/search", json={"query": PLANTED_QUERY, "k": 3, "index": index})
            if response.status_code != 200 or response.json()["hits"][0]["doc_id"] != PLANTED:
                errors.append(response.text)
            seen.add(response.json().get("generation"))

    readers = [threading.Thread(target=hammer) for _ in range(3)]
    for t in readers:
        t.start()
    try:
        (corpus / "general" / "quillwort.md").write_text("# Quillwort\n\nThe quillwort greenhouse watering "
                                                         "schedule: twice a week, never on Sundays.\n")
        index_corpus(corpus, folder, lambda: encoder, "default", settings)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            after = _search(client, query="quillwort greenhouse watering schedule", k=1, query_mode="bm25",
                            index=index)
            if after["hits"] and after["hits"][0]["doc_id"] == "general/quillwort.md":
                break
            time.sleep(0.05)
        else:
            pytest.fail("the new document never became searchable")
    finally:
        stop.set()
        for t in readers:
            t.join()
        (corpus / "general" / "quillwort.md").unlink()
        index_corpus(corpus, folder, lambda: encoder, "default", settings)
    assert errors == []
    assert after["generation"] > before["generation"] and len(seen) >= 1


# -- a real server on a loopback port: a short load smoke test ------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_load_smoke_over_real_http(served):
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(served["searcher"], load=False), host="127.0.0.1", port=port,
                                           log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        results = []

        def client_loop(i: int) -> None:
            query = PLANTED_QUERY if i % 2 else "how do I rotate the API keys?"
            want = PLANTED if i % 2 else "security/rotating-api-keys.md"
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
                end = time.monotonic() + 3
                while time.monotonic() < end:
                    response = http.post("/search", json={"query": query, "k": 3, "query_mode": "teacher"})
                    results.append(response.status_code == 200 and response.json()["hits"][0]["doc_id"] == want)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(client_loop, range(8)))
        assert len(results) >= 8 and all(results)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# -- the command line: refusals before any model loads ---------------------------------------------------------
def _serve(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli_app, ["serve", *map(str, args)])
    return result.exit_code, result.output


def test_serve_refuses_bad_settings(served, tmp_path):
    home = served["folders"]["kb"].parent
    code, out = _serve("--index", "kb", "--index-dir", home, "--host", "0.0.0.0")
    assert code == 2 and "without a token" in out and "Traceback" not in out
    short = tmp_path / "short"
    short.write_text("abc\n")
    code, out = _serve("--index", "kb", "--index-dir", home, "--host", "0.0.0.0", "--token-file", short)
    assert code == 2 and "at least 16 characters" in out
    code, out = _serve("--index", "kb", "--index-dir", home, "--token-file", tmp_path / "missing")
    assert code == 2 and "does not exist" in out
    code, out = _serve("--index", "nope", "--index-dir", home)
    assert code == 2 and "no index" in out
    code, out = _serve("--index", "kb", "--index", "kb", "--index-dir", home)
    assert code == 2 and "serve each index once" in out
    code, out = _serve("--index", "kb", "--index-dir", home, "--port", "0")
    assert code == 2 and "--port" in out
    code, out = _serve("--index", "kb", "--index-dir", home, "--cors-origin", "*")
    assert code == 2 and "not an origin" in out
    # a device that is not one, or that this machine lacks: refused before the port opens (it used to start and
    # answer /health 503 "failed" until killed)
    code, out = _serve("--index", "kb", "--index-dir", home, "--device", "bogus")
    assert code == 2 and "--device 'bogus'" in out and "Traceback" not in out
    if not torch.cuda.is_available():
        code, out = _serve("--index", "kb", "--index-dir", home, "--device", "cuda")
        assert code == 2 and "no CUDA GPU" in out and "Traceback" not in out
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code, out = _serve("--index", "kb", "--index-dir", home, "--port", busy.getsockname()[1])
        assert code == 2 and "cannot listen" in out


# -- schemathesis: every operation fuzzed against the app's own schema ------------------------------------------
def test_schemathesis_finds_no_server_error_or_schema_violation(served):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable

    app = create_app(served["searcher"], ServeConfig(token=TOKEN), load=False)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures = []
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation, mode in [(op, mode) for op in operations for mode in schemathesis.GenerationMode]:
        examples = 2 if operation.path == "/explain" else 8  # a decode takes seconds on a CPU

        @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case):
            if isinstance(case.body, dict):  # decoding is slow on a CPU: short explanations only
                for key in ("tokens", "explain_tokens"):  # numbers only: a string stays (and is a 422)
                    value = case.body.get(key)
                    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 4:
                        case.body[key] = 4
                if case.body.get("explain") and "explain_tokens" not in case.body:
                    case.body["explain_tokens"] = 4
                if case.path == "/explain" and "tokens" not in case.body:
                    case.body["tokens"] = 4
                if mode is schemathesis.GenerationMode.POSITIVE and (case.body.get("signals") or case.body.get(
                        "fusion")) and case.body.get("query_mode") not in (None, "hybrid"):
                    # the one cross-field rule a JSON schema does not state (the fields' descriptions do): signals
                    # and fusion shape a hybrid search only; with another mode they are a 422 (BAD_BODIES)
                    case.body["query_mode"] = "hybrid"
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {TOKEN}"}
            response = case.call(timeout=120)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.path} {case.body!r} -> {response.status_code} {response.text[:200]}")
            if mode is schemathesis.GenerationMode.POSITIVE:  # schema-valid requests: responses match the schema
                case.validate_response(response)
            elif response.status_code < 500:  # invalid ones: a JSON error (or a page/metrics text), never a 5xx
                assert response.status_code < 400 or response.json()["error"]["status"] == response.status_code

        try:
            check()
        except Unsatisfiable:  # an operation with no inputs (GET /health) has no invalid request to make
            assert mode is schemathesis.GenerationMode.NEGATIVE and not operation.body and not operation.path_parameters
    assert failures == []


def test_writer_active_reads_the_holder_note_without_touching_the_lock(tmp_path):
    import json
    import os
    import socket as sock

    from retrieval_kit.index.lock import HOLDER_FILE, LOCK_FILE, writer_active

    assert not writer_active(tmp_path)  # no note: no writer
    note = tmp_path / HOLDER_FILE
    note.write_text(json.dumps({"pid": os.getpid(), "host": sock.gethostname()}))
    assert writer_active(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    note.write_text(json.dumps({"pid": dead.pid, "host": sock.gethostname()}))
    assert not writer_active(tmp_path)  # a killed writer's note is stale
    note.write_text("{not json")
    assert not writer_active(tmp_path)
    assert not (tmp_path / LOCK_FILE).exists()  # looking never created (or took) the lock
