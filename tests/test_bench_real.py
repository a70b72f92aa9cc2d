"""Benchmarks with the real packaged models (session `encoder` fixture): a handful of queries, tiny corpus.

Kept small (< 2 min on 2 CPU cores incl. the model load shared with the other model tests);
deselect with `-k "not real"` when iterating on the harness alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from retrieval_kit.bench import datasets as D
from retrieval_kit.bench import methods as M

try:
    from rkit_cli import bench as cli_bench
except ImportError:
    from cli import bench as cli_bench

BEIR_TINY = Path(__file__).parent / "fixtures" / "bench" / "beir_tiny"


@pytest.fixture
def real(encoder, monkeypatch):
    monkeypatch.setattr(M, "load_bench_encoder", lambda adapter=None, device=None: encoder)
    return encoder


def _invoke(args):
    app = typer.Typer()
    app.add_typer(cli_bench.bench_app, name="bench")
    return CliRunner().invoke(app, ["bench", *args])


def test_real_beir_all_methods_through_cli(real, tmp_path):
    r = _invoke(["beir", str(BEIR_TINY), "--limit", "2", "--hyde-tokens", "6", "--explain", "--explain-tokens", "4",
                 "--json", "--quiet", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
                 "--batch-size", "8"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["encoder"]["fingerprint"] == real.fingerprint and res["encoder"]["dim"] == 384
    for method in M.METHODS:
        metrics = res["summary"][method]
        assert all(0.0 <= metrics[k] <= 1.0 for k in ("ndcg@10", "recall@100", "mrr@10")), (method, metrics)
    # the teacher ranks this toy corpus well: a wiring error (wrong doc order, ids) would show here
    assert res["summary"]["teacher"]["ndcg@10"] > 0.8
    rows = [json.loads(x) for x in Path(res["files"]["explain"]).read_text().splitlines()]
    assert len(rows) == 2 and all(r["decoded"] and r["hyde_answer"] for r in rows)


def test_real_fused_matches_encoder_and_cache_is_reused(real, tmp_path):
    ds = D.load_beir(BEIR_TINY).limit(1)
    runner = M.MethodRunner(ds, M.MethodConfig(fuse_weight=0.3), tmp_path, lambda: real)
    ours = runner.query_vectors("fused")
    np.testing.assert_allclose(ours, real.encode_queries(runner.texts, mode="fused", fuse_weight=0.3), atol=1e-4)
    docs = runner.doc_matrix()
    np.testing.assert_allclose(docs, real.encode_documents(ds.doc_texts()), atol=1e-5)
    again = M.MethodRunner(ds, M.MethodConfig(), tmp_path, lambda: real)
    again.doc_matrix()
    assert again.doc_stats["cached"] is True


def test_real_mteb_local_task(real, tmp_path):
    pytest.importorskip("mteb")
    r = _invoke(["mteb", "--task", f"beir:{BEIR_TINY}", "--methods", "teacher,rkit", "--limit", "2", "--json",
                 "--quiet", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["summary"]["teacher"]["ndcg@10"] > 0.8 and 0.0 <= res["summary"]["rkit"]["ndcg@10"] <= 1.0
