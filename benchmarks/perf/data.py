"""Inputs the performance stages share: held-out training-pool queries and a corpus of real texts.

Queries come from the training pool past the part any adapter trained on (``mixed.jsonl`` from line 20,000, the
same slice the serving benchmark uses), never from an evaluation set's queries. The corpus is CACM's and
AdvBench-IR's documents, then pool texts, each cut under one 200-word chunk so that N documents are N chunks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DATA = Path(os.environ.get("RKIT_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
POOL = DATA / "train_queries" / "mixed.jsonl"
HELD_OUT_FROM = 20_000
MAX_WORDS = 150
FALLBACK = ["how do I rotate the API keys?", "which license allows commercial use without sharing source?",
            "what is the difference between a process and a thread?", "how do vaccines train the immune system?",
            "why does my python script run out of memory?", "explain the CAP theorem with an example"]


def queries(n: int, max_words: int = 32) -> list[str]:
    """n held-out pool queries of at most ``max_words`` words (search-box length); a fixed list without the data."""
    out: list[str] = []
    if POOL.is_file():
        with POOL.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f):
                if lineno < HELD_OUT_FROM:
                    continue
                text = " ".join(json.loads(line)["text"].split())
                if text and len(text.split()) <= max_words:
                    out.append(text)
                if len(out) == n:
                    return out
    return [FALLBACK[i % len(FALLBACK)] + ("" if i < len(FALLBACK) else f" ({i})") for i in range(n)]


def corpus_texts(n: int) -> list[str]:
    """n distinct texts: collection documents first (long), then training-pool texts (short)."""
    seen: dict[str, None] = {}
    for path in (DATA / "cacm" / "corpus.jsonl", DATA / "advbench_ir" / "corpus.jsonl",
                 DATA / "advbench_ir" / "documents.jsonl", POOL):
        if not path.is_file():
            continue
        with path.open(encoding="utf-8") as f:
            for line in f:
                doc = json.loads(line)
                text = " ".join(f"{doc.get('title', '')} {doc.get('text', '')}".split()[:MAX_WORDS])
                if text:
                    seen.setdefault(text, None)
                if len(seen) >= n:
                    return list(seen)
    if len(seen) < n:
        raise SystemExit(f"perf: only {len(seen)} corpus texts under {DATA} (need {n}); set RKIT_DATA")
    return list(seen)
