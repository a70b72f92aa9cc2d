"""Retriever: the encoder an index was built with + the index → ranked hits, optionally explained.

An index remembers its encoder (adapter, fingerprints, modes). Opening it loads that same encoder (or the
``adapter`` asked for), and one whose document space differs is refused, so a query is never compared with
vectors from another embedding space. The index is opened read-only: searching never writes to it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import IndexError_, InputError
from .index import Hit, Index
from .index.core import check_name
from .models import QUERY_MODES, GenerativeEncoder, load_encoder
from .paths import DEFAULT_ADAPTER, index_home

SNIPPET_CHARS = 240


@dataclass
class SearchResult:
    query: str
    query_mode: str
    hits: list[Hit]
    explanation: str | None = None
    timings: dict = field(default_factory=dict)
    query_encoder: str = ""  # fingerprint of the query encoder that made this search's vector
    explained_mode: str | None = None  # the explanation decodes the generative vector, whatever mode searched

    def as_dict(self) -> dict:
        return {"query": self.query, "query_mode": self.query_mode, "query_encoder": self.query_encoder,
                "explanation": self.explanation, "explained_vector": self.explained_mode,
                "timings": self.timings, "hits": [hit_dict(h) for h in self.hits]}


def hit_dict(hit: Hit) -> dict:
    data = asdict(hit)
    data["snippet"] = snippet(hit.text)
    return data


def snippet(text: str, limit: int = SNIPPET_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rsplit(" ", 1)[0] + "…"


def index_folder(name_or_path: str | Path, index_dir: str | Path | None = None) -> Path:
    """A bare name is always looked up under the index home (``index_dir``, $RKIT_INDEX_HOME or ./indexes), even
    when a folder of that name sits in the current directory (often the corpus itself); a path is recognisable
    as one (``./docs``, ``../kb``, ``/srv/kb``, ``~/kb``) and used as given."""
    text = str(name_or_path)
    if "/" in text or "\\" in text or text.startswith(("~", ".")):
        return Path(text).expanduser()
    return Path(index_dir).expanduser() / check_name(text) if index_dir else index_home() / check_name(text)


def adapter_path(adapter: str | Path | None) -> tuple[Path | None, str]:
    """(folder to load, how the manifest names it). The shipped adapter is named 'default' so installs can move."""
    if adapter is None or str(adapter) == "default":
        return (DEFAULT_ADAPTER if (DEFAULT_ADAPTER / "config.json").is_file() else None), "default"
    path = Path(adapter).expanduser().resolve()
    return path, str(path)


class Retriever:
    def __init__(self, index: Index, encoder: GenerativeEncoder):
        self.index = index
        self.encoder = encoder

    @classmethod
    def open(cls, name_or_path: str | Path, adapter: str | Path | None = None, device=None,
             index_dir: str | Path | None = None) -> "Retriever":
        index = Index.open(index_folder(name_or_path, index_dir))
        try:
            stored = index.manifest["encoder"]
            folder, _ = adapter_path(adapter if adapter is not None else stored.get("adapter"))
            encoder = load_encoder(folder, backbone=None if folder else stored.get("backbone"),
                                   teacher=None if folder else stored.get("teacher"), device=device)
            index.check_document_space(encoder.doc_fingerprint(stored.get("doc_mode") or "teacher"),
                                       encoder.config.embed_dim)
        except BaseException:
            index.close()
            raise
        return cls(index, encoder)

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> "Retriever":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def default_query_mode(self) -> str:
        return self.index.manifest["encoder"].get("query_mode", "teacher")

    def search(self, queries: list[str], k: int = 10, query_mode: str | None = None, fuse_weight: float | None = None,
               explain: bool = False, explain_tokens: int = 64) -> list[SearchResult]:
        if k < 1:
            raise InputError(f"-k must be at least 1, got {k}")
        queries = [q.strip() for q in queries]
        if not queries or not all(queries):
            raise InputError("empty query")
        mode = query_mode or self.default_query_mode()
        if mode not in QUERY_MODES:
            raise InputError(f"unknown query mode '{mode}' (use {', '.join(QUERY_MODES)})")
        weight = self.index.manifest["encoder"].get("fuse_weight") if fuse_weight is None else fuse_weight
        t0 = time.perf_counter()
        vectors = self.encoder.encode_queries(queries, mode=mode, fuse_weight=weight)
        t1 = time.perf_counter()
        ranked = self.index.search(vectors, k=k)
        t2 = time.perf_counter()
        explanations = self.encoder.decode(queries, max_new_tokens=explain_tokens) if explain else [None] * len(queries)
        t3 = time.perf_counter()
        timings = {"encode_s": round(t1 - t0, 4), "search_s": round(t2 - t1, 4), "explain_s": round(t3 - t2, 4)}
        fingerprint = self.encoder.fingerprint
        return [SearchResult(q, mode, hits, e, timings, fingerprint, "generative" if explain else None)
                for q, hits, e in zip(queries, ranked, explanations)]


def open_index_info(name_or_path: str | Path, index_dir: str | Path | None = None) -> dict:
    folder = index_folder(name_or_path, index_dir)
    if not folder.exists():
        raise IndexError_(f"no index at {folder}")
    with Index.open(folder) as index:
        return index.info()
