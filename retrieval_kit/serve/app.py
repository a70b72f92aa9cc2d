"""`rkit serve`: the HTTP API (FastAPI) and the search page over one ``Searcher``.

Every search goes through ``Retriever.search`` (the one search path), on the searcher's worker thread. Models
load in the background after the port opens: ``GET /health`` says 503 "loading" until they are in, and every
data endpoint answers 503 until then. Errors are JSON ``{"error": {"status", "message"}}``, never a traceback;
bodies, queries, k and batches are bounded; nothing a request sends is used as a file path (indexes are named
by the operator at start-up, chunks are looked up by id in SQLite).

Auth: with a token configured, every endpoint but /health and the static page needs
``Authorization: Bearer <token>`` (compared in constant time); ``cli/serve.py`` refuses to bind a non-loopback
address without one. CORS is off unless origins are given.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Path as PathParam, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException
from starlette.routing import Match

from ..errors import IndexError_, IndexLockedError, IndexMismatchError, InputError, RkitError
from ..index import ChunkFilter
from ..index.fusion import FUSIONS
from ..modes import QUERY_MODES
from ..search import DEFAULT_HYBRID, SEARCH_MODES, HybridRecipe, SearchResult, hit_dict
from .searcher import Searcher

log = logging.getLogger("rkit.serve")
WEB = Path(__file__).parent / "web"

MAX_BODY_BYTES = 64 * 1024  # a batch of 64 queries of 1,000 characters fits with room to spare
MAX_QUERY_CHARS = 1000
MAX_K = 100
MAX_BATCH_QUERIES = 64
MAX_EXPLAIN_TOKENS = 128
Mode = Literal[SEARCH_MODES]  # type: ignore[valid-type]
SignalName = Literal[("bm25",) + QUERY_MODES]  # type: ignore[valid-type]
Fusion = Literal[FUSIONS]  # type: ignore[valid-type]


# -- request and response bodies (they make /openapi.json) -----------------------------------------
# a query holds at least one character str.strip() keeps: the schema says so (\s in JSON Schema's and
# pydantic's regex misses \x1c-\x1f and \x85, which Python strips), so a fuzzer's "valid" query is one we take
QUERY_PATTERN = r"[^\s\x1c-\x1f\x85]"
QueryText = Annotated[str, Field(min_length=1, max_length=MAX_QUERY_CHARS, pattern=QUERY_PATTERN)]


def _clean(text: str) -> str:
    """A query as the encoder will see it; refuse what no tokenizer takes (lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("query is not valid Unicode text") from None
    return text.strip()


def _integral(value):
    """JSON Schema's integer is any whole number, 5.0 included: let it through strict validation as 5. (A
    field_validator, not an Annotated BeforeValidator: inside ``int | None`` that made pydantic write ge/le into
    the schema instead of minimum/maximum, and the schema stopped saying tokens ≥ 1.)"""
    return int(value) if isinstance(value, float) and value.is_integer() else value


class _Body(BaseModel):
    """A request body: unknown fields refused, and no coercion: "k": "5", "k": 5.5 or "explain": "yes" is a 422
    naming the field, not a guess (a client that sends strings for numbers has a bug worth hearing about)."""
    model_config = ConfigDict(extra="forbid", strict=True)


class Filters(_Body):
    source_prefix: str | None = Field(None, max_length=512, description="only chunks whose source starts with this")
    file_type: str | None = Field(None, pattern=r"^\.?[A-Za-z0-9]{1,10}$", description="only chunks of this file type, e.g. md")

    def chunk_filter(self) -> ChunkFilter | None:
        found = ChunkFilter(self.source_prefix or None, self.file_type or None)
        return found if found else None


class SearchOptions(_Body):
    k: int = Field(10, ge=1, le=MAX_K, description="hits per query")
    index: str | None = Field(None, max_length=128, description="an index this server serves (default: the first)")
    query_mode: Mode | None = Field(None, description="default: the index's own (hybrid unless built otherwise)")
    explain: bool = Field(False, description="also decode the query's generative embedding back into text")
    explain_tokens: int = Field(48, ge=1, le=MAX_EXPLAIN_TOKENS)
    filters: Filters | None = None
    signals: dict[SignalName, Annotated[float, Field(gt=0, le=100)]] | None = Field(
        None, min_length=1, description=f"hybrid mode only: weight per signal (default {DEFAULT_HYBRID.spec()})")
    fusion: Fusion | None = Field(None, description=f"hybrid mode only: how the signals' lists are fused: rrf, dbsf or "
                                                    f"convex (default {DEFAULT_HYBRID.fusion})")

    _whole = field_validator("k", "explain_tokens", mode="before")(_integral)

    @model_validator(mode="after")
    def _recipe_is_valid(self):
        try:  # HybridRecipe's own checks, as a 422 before the request is queued
            self.recipe()
        except InputError as exc:
            raise ValueError(str(exc)) from None
        return self

    def recipe(self) -> HybridRecipe:
        if (self.signals or self.fusion) and self.query_mode not in (None, "hybrid"):  # else silently ignored
            raise InputError(f"signals and fusion apply to hybrid mode, not {self.query_mode}")
        if not self.signals and not self.fusion:
            return DEFAULT_HYBRID
        return HybridRecipe.of(self.signals or dict(DEFAULT_HYBRID.weights), fusion=self.fusion or DEFAULT_HYBRID.fusion)


class SearchRequest(SearchOptions):
    query: QueryText

    @field_validator("query")
    @classmethod
    def _query(cls, value: str) -> str:
        return _clean(value)


class BatchRequest(SearchOptions):
    queries: list[QueryText] = Field(..., min_length=1, max_length=MAX_BATCH_QUERIES)

    @field_validator("queries")
    @classmethod
    def _queries(cls, values: list[str]) -> list[str]:
        return [_clean(v) for v in values]


class ExplainRequest(_Body):
    query: QueryText
    index: str | None = Field(None, max_length=128)
    tokens: int | None = Field(None, ge=1, le=MAX_EXPLAIN_TOKENS)
    _whole = field_validator("tokens", mode="before")(_integral)

    @field_validator("query")
    @classmethod
    def _query(cls, value: str) -> str:
        return _clean(value)


class HitOut(BaseModel):
    rank: int
    chunk_id: str
    doc_id: str
    score: float
    title: str
    source: str
    snippet: str
    signals: dict[str, int] = {}
    metadata: dict = {}


class Explanation(BaseModel):
    text: str
    shown: bool
    note: str
    rouge_l: float | None = None
    decoded_from: str = "generative"
    # logit lens (per special token: top next tokens) and its summary words, latent lens (nearest bank answers)
    lens: dict | None = None


class SearchResponse(BaseModel):
    index: str
    generation: int | None
    query: str
    query_mode: str
    took_ms: float
    hits: list[HitOut]
    notes: list[str] = Field(default_factory=list, description="what to know about this search, e.g. a query the "
                                                               "models read only in part")
    explanation: Explanation | None = None


class BatchResponse(BaseModel):
    results: list[SearchResponse]


class Document(BaseModel):
    chunk_id: str
    doc_id: str
    title: str
    source: str
    text: str
    metadata: dict = {}


class IndexSummary(BaseModel):
    name: str
    documents: int
    chunks: int
    backend: str
    generation: int
    default_query_mode: str
    trained: bool
    encoder: str = ""  # the fingerprint `rkit info` and `rkit list` show: which adapter built the index
    updated: str | None = None
    error: str | None = None


class IndexList(BaseModel):
    default: str
    auth: bool
    query_modes: list[str]
    indexes: list[IndexSummary]


class ErrorBody(BaseModel):
    status: int
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 422, 503)}


@dataclass
class ServeConfig:
    token: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    explain_tokens: int = 48
    request_timeout_s: float = 60.0


# -- the app ------------------------------------------------------------------------------------------
def create_app(searcher: Searcher, config: ServeConfig | None = None, *, load: bool = True) -> FastAPI:
    """The service over ``searcher``. ``load``: start loading its models in the background at start-up and
    close it at shutdown (tests pass an already loaded searcher, shared between apps, and False)."""
    config = config or ServeConfig()
    metrics = _Metrics()
    searcher.on_batch = metrics.batch_size.observe

    async def lifespan(app: FastAPI):
        if load and not searcher.ready.is_set():
            threading.Thread(target=_load, args=(searcher,), name="rkit-load", daemon=True).start()
        yield
        if load:  # a searcher handed over loaded belongs to the caller (tests share one between apps)
            searcher.close()

    # no /docs or /redoc: FastAPI's pages load Swagger UI from a CDN, which an offline machine cannot reach
    app = FastAPI(title="rkit", version="1", lifespan=lifespan, responses=ERRORS, docs_url=None, redoc_url=None,
                  description="Search rkit indexes: hybrid BM25 + teacher + generative query embeddings.")
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(_BodyLimit, limit=MAX_BODY_BYTES)
    app.add_middleware(_Count, metrics=metrics, routes=app.router.routes)  # added last, so outermost: it counts
    # the body limit's 413s too
    bearer = HTTPBearer(auto_error=False)

    # the guards are async (they never block): FastAPI runs a plain ``def`` dependency on its thread pool, two
    # thread hand-offs per request for a string compare and a flag read
    async def authorised(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if config.token is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not secrets.compare_digest(given.encode(), config.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    async def ready() -> None:
        if not searcher.ready.is_set():
            message = f"models failed to load: {searcher.load_error}" if searcher.load_error else "models are loading"
            raise HTTPException(503, message, headers={"Retry-After": "2"})

    guard = [Depends(authorised), Depends(ready)]

    # -- errors as JSON -------------------------------------------------------------------------
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return _error(422, _validation_message(exc))

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):  # a bug of ours: say so in one line, log the trace
        log.exception("unexpected error on %s", request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")

    # -- endpoints --------------------------------------------------------------------------------
    @app.get("/health", summary="ready once models and indexes are loaded (503 before)")
    async def health():
        if searcher.ready.is_set():
            return {"status": "ready", "indexes": list(searcher.served)}
        if searcher.load_error:
            return JSONResponse({"status": "failed", "error": searcher.load_error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "2"})

    @app.post("/search", response_model=SearchResponse, dependencies=guard, summary="search one query")
    async def search(body: SearchRequest) -> SearchResponse:
        results, took = await _search(body, [body.query])
        out = _response(results[0], took, body.index or searcher.default)
        if body.explain:
            out.explanation = (await _explain(body.index, [body.query], body.explain_tokens, out.query_mode))[0]
        return out

    @app.post("/search/batch", response_model=BatchResponse, dependencies=guard,
              summary=f"search up to {MAX_BATCH_QUERIES} queries in one call (encoded as one batch)")
    async def search_batch(body: BatchRequest) -> BatchResponse:
        results, took = await _search(body, body.queries)
        out = [_response(r, took, body.index or searcher.default) for r in results]
        if body.explain:
            told = await _explain(body.index, body.queries, body.explain_tokens, out[0].query_mode)
            for item, explained in zip(out, told):
                item.explanation = explained
        return BatchResponse(results=out)

    @app.post("/explain", response_model=Explanation, dependencies=guard,
              summary="decode a query's generative embedding back into text (seconds on a CPU)")
    async def explain(body: ExplainRequest) -> Explanation:
        return (await _explain(body.index, [body.query], body.tokens or config.explain_tokens, "generative"))[0]

    @app.get("/documents/{chunk_id:path}", response_model=Document, dependencies=guard, summary="one chunk by id")
    async def document(chunk_id: str = PathParam(..., max_length=1024),
                       index: str | None = Query(None, max_length=128)) -> Document:
        hit = await _await(_named(lambda: searcher.call(index, lambda served: served.retriever.index.chunk(chunk_id)),
                                  index))
        if hit is None:
            raise HTTPException(404, f"no chunk '{chunk_id[:80]}' in index '{index or searcher.default}'")
        return Document(chunk_id=hit.chunk_id, doc_id=hit.doc_id, title=hit.title, source=hit.source,
                        text=hit.text, metadata=hit.metadata)

    @app.get("/indexes", response_model=IndexList, dependencies=guard, summary="the indexes served, with counts")
    async def indexes() -> IndexList:
        summaries = [await _await(searcher.call(name, _summary)) for name in searcher.served]
        return IndexList(default=searcher.default, auth=config.token is not None,
                         query_modes=list(SEARCH_MODES), indexes=summaries)

    @app.get("/metrics", dependencies=[Depends(authorised)], summary="Prometheus text format",
             response_class=Response)
    def metrics_text():
        for name, served in searcher.served.items():
            if served.retriever is not None:
                metrics.generation.labels(name).set(served.retriever.index.generation)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(WEB / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str):
        # only the page's own files: a fixed list, so no request can name another path
        if name not in _STATIC:
            raise HTTPException(404, "no such file")
        return FileResponse(WEB / name, media_type=_STATIC[name], headers={"Cache-Control": "no-cache"})

    # -- helpers ------------------------------------------------------------------------------------
    async def _search(body: SearchOptions, queries: list[str]) -> tuple[list[SearchResult], float]:
        where = body.filters.chunk_filter() if body.filters else None
        started = time.perf_counter()
        results = await _await(_named(lambda: searcher.search(body.index, queries, body.k, body.query_mode, where,
                                                              body.recipe()), body.index))
        return results, (time.perf_counter() - started) * 1000

    async def _explain(index: str | None, queries: list[str], tokens: int, mode: str) -> list[Explanation]:
        told = await _await(_named(lambda: searcher.explain(index, queries, tokens, mode), index))
        return [Explanation(**item) for item in told]

    async def _await(future):
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout=config.request_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(503, "the search took too long; try again") from None
        except RkitError as exc:
            raise HTTPException(_status(exc), str(exc)) from None

    def _named(submit, index):
        try:
            return submit()
        except KeyError:
            raise HTTPException(404, f"no index '{str(index)[:128]}' on this server (GET /indexes lists them)") from None
        except RkitError as exc:
            raise HTTPException(_status(exc), str(exc)) from None

    return app


def _load(searcher: Searcher) -> None:
    try:
        searcher.load()
    except Exception as exc:  # health says "failed" with this one line; the process stays up to say so
        searcher.load_error = searcher.load_error or f"{type(exc).__name__}: {exc}"
        log.error("rkit serve: %s", searcher.load_error)


def _summary(served) -> IndexSummary:
    index = served.retriever.index
    manifest = index.manifest
    return IndexSummary(name=served.name, documents=index.count_documents(), chunks=index.count_chunks(),
                        backend=manifest["backend"], generation=index.generation,
                        default_query_mode=served.retriever.default_query_mode(),
                        trained=bool(served.retriever.encoder.config.trained),
                        encoder=str((manifest.get("encoder") or {}).get("fingerprint") or ""), updated=manifest.get("updated"),
                        error=served.error)


def _response(result: SearchResult, took_ms: float, index: str) -> SearchResponse:
    hits = []
    for rank, hit in enumerate(result.hits, 1):
        data = hit_dict(hit, result.query)
        data.pop("text")
        score = data["score"]
        hits.append(HitOut(rank=rank, **{**data, "score": score if math.isfinite(score) else 0.0}))
    return SearchResponse(index=index, generation=result.generation, query=result.query,
                          query_mode=result.query_mode, took_ms=round(took_ms, 2), hits=hits, notes=result.notes)


def _status(exc: RkitError) -> int:
    if isinstance(exc, IndexMismatchError):
        return 409
    if isinstance(exc, (IndexLockedError, IndexError_)):
        return 503
    if isinstance(exc, InputError):
        return 400
    return 500


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        if err.get("type") == "json_invalid":
            return "the body is not valid JSON"
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        blank = err.get("type") == "string_pattern_mismatch" and (err.get("ctx") or {}).get("pattern") == QUERY_PATTERN
        parts.append(f"{where}: {'is blank (only white space)' if blank else err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


class _Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("rkit_requests", "HTTP requests", ["path", "method", "status"], registry=self.registry)
        self.latency = Histogram("rkit_request_seconds", "HTTP request latency", ["path"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30))
        self.batch_size = Histogram("rkit_search_batch_queries", "queries encoded and searched together",
                                    registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64))
        self.generation = Gauge("rkit_index_generation", "index generation being served", ["index"],
                                registry=self.registry)


class _Count:
    """Request counts and latencies by route, as plain ASGI middleware (Starlette's ``@app.middleware("http")``
    runs every request through extra tasks and memory streams, a cost paid per request under load)."""

    def __init__(self, app, metrics: _Metrics, routes: list):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500  # 500 unless a response starts: the app raised

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            path = self._route(scope)
            self.metrics.requests.labels(path, scope["method"], str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - started)

    def _route(self, scope) -> str:
        """The route's template (``/documents/{chunk_id:path}``: one label per route, not per id). FastAPI's router
        sets it on the shared scope; a request answered before routing (the body limit's 413), by a plain
        Starlette route (``/openapi.json``) or with a 405 is matched here; no path matched (a 404) is ``unmatched``."""
        if "route" in scope:
            return scope["route"].path
        return next((r.path for r in self.routes if r.matches(scope)[0] != Match.NONE), "unmatched")


class _BodyLimit:
    """413 for a body over ``limit`` bytes, by its Content-Length or, for a chunked body, as it streams in
    (read here, up to the limit, then handed on whole: the app never sees a partial body)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_big = lambda: _error(413, f"request body over {self.limit} bytes")  # noqa: E731 (made when needed)
        if length is not None and not length.isdigit():
            return await _error(400, "bad Content-Length header")(scope, receive, send)
        if length is not None and int(length) > self.limit:
            return await too_big()(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await too_big()(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


_STATIC = {"app.js": "text/javascript", "style.css": "text/css", "index.html": "text/html"}
