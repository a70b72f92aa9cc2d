"""Stage 5 of the performance suite (benchmarks/perf/search_scale.py) at a toy size: its pieces, never its timings."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.perf import search_scale as ss

N, QUERIES = 2_000, 60


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Flat, HNSW32 and Qdrant embedded measured on 2,000 synthetic vectors."""
    data = ss.make_data(tmp_path_factory.mktemp("search"), N, QUERIES, lambda line: None)
    engines = [e for e in ss.engines_for(N, None, lambda line: None) if e.label in ("Flat", "HNSW32", "Qdrant embedded")]
    figures, results = ss.run_size(N, data, engines, lambda line: None)
    return data, figures, results


def test_the_engines_find_the_exact_neighbours(toy):
    _, _, results = toy
    assert set(results) == {"Flat", "HNSW32", "Qdrant embedded"}
    assert results["Flat"]["main"]["recall"] == 1.0
    assert results["Qdrant embedded"]["main"]["recall"] == 1.0  # local mode scans every vector too
    assert results["HNSW32"]["main"]["recall"] > 0.5
    assert set(results["HNSW32"]["sweep"]) == {16, 32, 64, 128, 256, 512}  # the product's 64 among them
    assert results["Flat"]["disk_mib"] >= N * ss.DIM * 4 / 2**20  # the saved float32 vectors at least


def test_every_figure_is_labelled_synthetic_and_compared_with_flat(toy):
    _, figures, _ = toy
    assert figures and all(f.detail["data"].startswith("synthetic: ") for f in figures)
    hnsw_p50 = next(f for f in figures if f.name == "HNSW32 2k p50 (batch 1)")
    assert hnsw_p50.peer_name == "FAISS Flat (exact)" and hnsw_p50.peer > 0
    assert hnsw_p50.detail["threads"]["batch_1"] == 1  # 1 × 2,000 vectors is a SMALL_SEARCH in the product


def test_the_hnsw_target_row_exists(toy):
    _, figures, _ = toy
    (row,) = [f for f in figures if f.name.startswith("HNSW32 2k p50 at recall@10 ≥ 0.95")]
    assert row.target == "≤ 2" and isinstance(row.met, bool)
    assert row.met or row.why
    assert row.detail["at_product_default"]["efSearch"] == 64


def test_exact_top_k_merges_chunks_like_one_scan(toy):
    data, _, _ = toy
    base = np.asarray(data.base()[:N])
    expected = np.argsort(-(data.queries @ base.T), axis=1)[:, :10]
    found = ss.exact_top_k(base, data.queries, chunk=300)  # 7 chunks, the last one short
    assert ss.recall_at_k(found, expected) == 1.0
    assert ss.recall_at_k(found[:, ::-1], expected) == 1.0  # recall ignores the order within the top 10
    assert ss.recall_at_k(np.full_like(found, -1), expected) == 0.0


def test_a_base_is_a_prefix_of_a_larger_one(tmp_path, toy):
    data, _, _ = toy
    larger = ss.make_data(tmp_path, 12_345, QUERIES, lambda line: None)  # crosses a generation chunk
    assert np.array_equal(larger.base()[:N], data.base())
    assert np.array_equal(larger.queries, data.queries)
    norms = np.linalg.norm(larger.base()[-100:], axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5)


def test_a_failing_engine_is_a_row_not_a_crash(toy):
    data, _, _ = toy
    broken = ss.Engine("HNSW-broken", "faiss", "NotAFactory", target=ss.HNSW_TARGET)
    figures, results = ss.run_size(N, data, [broken], lambda line: None)
    assert not results
    assert [f.unit for f in figures] == ["failed", "failed"]
    assert figures[1].met is False and "bad faiss factory" in figures[1].why
