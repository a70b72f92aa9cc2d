"""Retriever: the encoder an index was built with + the index → ranked hits, optionally explained.

An index remembers its encoder (adapter, fingerprint, modes). Opening it loads that same encoder, and a
different one is refused, so a query is never compared with vectors from another embedding space.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import IndexError_, InputError
from .index import Hit, Index
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

    def as_dict(self) -> dict:
        return {"query": self.query, "query_mode": self.query_mode, "explanation": self.explanation,
                "timings": self.timings, "hits": [hit_dict(h) for h in self.hits]}


def hit_dict(hit: Hit) -> dict:
    data = asdict(hit)
    data["snippet"] = snippet(hit.text)
    return data


def snippet(text: str, limit: int = SNIPPET_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rsplit(" ", 1)[0] + "…"


def index_folder(name_or_path: str | Path) -> Path:
    """A name is looked up under the index home (./indexes); a path is used as given."""
    path = Path(name_or_path)
    if path.is_dir() or len(path.parts) > 1:
        return path
    return index_home() / str(name_or_path)


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
    def open(cls, name_or_path: str | Path, adapter: str | Path | None = None, device=None) -> "Retriever":
        index = Index.open(index_folder(name_or_path))
        try:
            stored = index.manifest["encoder"]
            folder, _ = adapter_path(adapter if adapter is not None else stored.get("adapter"))
            encoder = load_encoder(folder, backbone=None if folder else stored.get("backbone"),
                                   teacher=None if folder else stored.get("teacher"), device=device)
            index.check_encoder(encoder.fingerprint, encoder.config.embed_dim)
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
        return [SearchResult(q, mode, hits, e, timings) for q, hits, e in zip(queries, ranked, explanations)]


def open_index_info(name_or_path: str | Path) -> dict:
    folder = index_folder(name_or_path)
    if not folder.exists():
        raise IndexError_(f"no index at {folder}")
    with Index.open(folder) as index:
        return index.info()
