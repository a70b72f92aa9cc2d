"""What the benchmarks cache, and under which identity, so a rerun with another method is cheap.

Under the cache root (default `$RKIT_HOME/bench`, `--cache-dir` overrides):

    cache.sqlite3                            document and query vectors, HyDE answers (retrieval_kit/cache_store.py)
    <dataset>-<corpus hash>/bm25-<params>/   the bm25s index (bm25s's own format; written aside, then renamed)

A vector is keyed by what produced it — the teacher (its name, resolved path and a digest of its files: shared by
every adapter on that teacher) or the generative encoder (adapter fingerprint + backbone identity) — by its role
(document or query), and by the sha256 of the exact text. HyDE answers are keyed by the backbone identity, the
system prompt and the generation settings. So a `--limit 5` run fills part of what a full run then reuses, an
interrupted run keeps every batch it finished, and two benches may run at once on one cache.

Folders written by earlier rkit versions (`docs-*/part-*.npy`, `queries-*/`, `answers-*.jsonl`) are ignored:
delete them to reclaim the space.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from ..cache_store import CacheStore, TextNamespace, VectorNamespace, backbone_identity, teacher_identity
from ..errors import BenchError
from ..paths import rkit_home


def default_cache_root() -> Path:
    return rkit_home() / "bench"


def slug(text: str, max_len: int = 60) -> str:
    """A readable file-name part; never the only key of anything (a hash or the full text goes with it)."""
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in str(text))
    return keep.strip("-")[:max_len] or "x"


def open_store(cache_root: Path) -> CacheStore:
    return CacheStore.in_folder(cache_root, BenchError)


def config_value(enc, key: str) -> Any:
    config = getattr(enc, "config", None)
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def vector_identity(enc, mode: str) -> dict:
    """What a vector depends on: the teacher alone (mode "teacher"), or the adapter and its backbone."""
    teacher = config_value(enc, "teacher")
    if mode == "teacher" and teacher:
        return {"encoder": "teacher", "teacher": teacher_identity(str(teacher))}
    backbone = config_value(enc, "backbone")
    return {"encoder": mode, "fingerprint": enc.fingerprint,
            "backbone": backbone_identity(str(backbone)) if backbone else None}


def vectors(store: CacheStore, enc, mode: str, role: str) -> VectorNamespace:
    """`role`: "documents" or "queries" (encoded by encode_documents / encode_queries)."""
    return store.vectors(f"bench-{role}", vector_identity(enc, mode))


def hyde_answers(store: CacheStore, enc, max_new_tokens: int, system_prompt: str | None) -> TextNamespace:
    """HyDE answers depend on the backbone, the system prompt and the generation settings, not on the adapter."""
    from ..models.generation import generate_batch  # its defaults are the settings enc.generate leaves alone

    settings = {k: p.default for k, p in inspect.signature(generate_batch).parameters.items()
                if p.kind is p.KEYWORD_ONLY}
    prompt = system_prompt if system_prompt is not None else config_value(enc, "system_prompt")
    settings.update(max_new_tokens=max_new_tokens, system_prompt=prompt)
    backbone = config_value(enc, "backbone")
    model = {"backbone": backbone_identity(str(backbone))} if backbone else {"fingerprint": enc.fingerprint}
    return store.texts("bench-hyde", {**model, "generation": settings})
