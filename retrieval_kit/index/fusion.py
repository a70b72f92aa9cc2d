"""Rank fusion: one formula for every backend, Qdrant's own.

Qdrant's Query API fuses prefetches with weighted Reciprocal Rank Fusion,
score(d) = Σ_signals 1 / ((pos + 1)/w + k − 1), pos the 0-based rank of d in that signal's list (w = 1 gives
the textbook 1/(k + rank)). A Qdrant index fuses on the server; a FAISS index calls ``rrf`` here with the same
formula and the same tie order (first seen, signals in order), so both give the same fused top-k on the
same data. k = 60 is Cormack et al.'s constant (SIGIR 2009), used unchanged.

``dbsf`` is Qdrant's other fusion, Distribution-Based Score Fusion: each list's scores are scaled by its own
mean ± 3 standard deviations (sample variance), then summed; it fuses scores, not ranks. Qdrant's takes no
weights; this one multiplies each list by its weight (all 1: Qdrant's exactly), so ``--signals bm25=1,teacher=0.5``
works with the default fusion too, and a Qdrant index fuses such a search here instead of on the server.

``convex`` is the weighted convex combination of min-max normalised scores (Bruch, Gai & Ingber, "An Analysis
of Fusion Functions for Hybrid Retrieval", TOIS 2023, found it ahead of RRF in and out of domain): each list's
scores are mapped to [0, 1] by that list's own min and max, a document missing from a list adds 0. Qdrant's
Query API has no such fusion, so every backend fuses it here, from each signal's own list.
"""

from __future__ import annotations

from typing import Sequence

RRF_K = 60
FUSIONS = ("rrf", "dbsf", "convex")


def rrf(rankings: Sequence[Sequence[int]], weights: Sequence[float], k: int = RRF_K,
        limit: int | None = None) -> list[tuple[int, float]]:
    """(id, fused score) best first, from each signal's ids best first; a weight ≤ 0 drops that signal."""
    if len(rankings) != len(weights):
        raise ValueError("one weight per ranking")
    scores: dict[int, float] = {}
    for ranking, weight in zip(rankings, weights):
        if weight <= 0:
            continue
        for pos, item in enumerate(ranking):
            scores[item] = scores.get(item, 0.0) + 1.0 / ((pos + 1.0) / weight + k - 1.0)
    fused = sorted(scores.items(), key=lambda pair: -pair[1])  # stable: ties keep first-seen order
    return fused if limit is None else fused[:limit]


def dbsf(lists: Sequence[Sequence[tuple[int, float]]], weights: Sequence[float] | None = None,
         limit: int | None = None) -> list[tuple[int, float]]:
    """(id, fused score) best first, from each signal's (id, score) pairs best first: Qdrant's DBSF, each list
    times its weight (None: all 1; a weight ≤ 0 drops the list)."""
    weights = [1.0] * len(lists) if weights is None else weights
    if len(lists) != len(weights):
        raise ValueError("one weight per list")
    fused: dict[int, float] = {}
    for pairs, weight in zip(lists, weights):
        if weight <= 0 or not pairs:
            continue
        scores = [s for _, s in pairs]
        mean = sum(scores) / len(scores)
        var = sum((s - mean) ** 2 for s in scores) / (len(scores) - 1) if len(scores) > 1 else 0.0
        low, span = mean - 3 * var ** 0.5, 6 * var ** 0.5
        for item, score in pairs:
            fused[item] = fused.get(item, 0.0) + weight * ((score - low) / span if span > 0 else 0.5)
    ranked = sorted(fused.items(), key=lambda pair: -pair[1])
    return ranked if limit is None else ranked[:limit]


def convex(lists: Sequence[Sequence[tuple[int, float]]], weights: Sequence[float],
           limit: int | None = None) -> list[tuple[int, float]]:
    """(id, fused score) best first: Σ weight · min-max-normalised score over the lists that hold the id."""
    if len(lists) != len(weights):
        raise ValueError("one weight per list")
    fused: dict[int, float] = {}
    for pairs, weight in zip(lists, weights):
        if weight <= 0 or not pairs:
            continue
        scores = [s for _, s in pairs]
        low, span = min(scores), max(scores) - min(scores)
        for item, score in pairs:  # a one-score (or all-equal) list counts each of its ids fully
            fused[item] = fused.get(item, 0.0) + weight * ((score - low) / span if span > 0 else 1.0)
    ranked = sorted(fused.items(), key=lambda pair: -pair[1])
    return ranked if limit is None else ranked[:limit]
