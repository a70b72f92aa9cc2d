"""Benchmarks with the real packaged models (session `encoder` fixture): a handful of queries, tiny corpus.

Kept small (< 2 min on 2 CPU cores incl. the model load shared with the other model tests);
deselect with `-k "not real"` when iterating on the harness alone.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from retrieval_kit.bench import datasets as D
from retrieval_kit.bench import methods as M
from retrieval_kit.bench.runner import run_benchmark

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
    for method in M.METHODS:  # 10 documents, top 100 kept: every method must rank all of them
        assert res["summary"][method]["recall@100"] == 1.0, (method, res["summary"][method])
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
    assert res["summary"]["teacher"]["ndcg@10"] > 0.8
    # mteb scores the same vectors the same way our harness does (documents: teacher; queries: rkit)
    ours = run_benchmark("beir", [D.load_beir(BEIR_TINY)], ["teacher", "rkit"], cfg=M.MethodConfig(), limit=2,
                         encoder_loader=lambda: real, cache_root=tmp_path / "cache", label="beir_tiny").results
    for method in ("teacher", "rkit"):
        assert res["summary"][method]["ndcg@10"] == pytest.approx(ours["summary"][method]["ndcg@10"], abs=1e-4)


def test_real_cli_prints_only_rkit_progress(tmp_path):
    """A real `rkit bench` process (models loaded in it): no tqdm bar from transformers, sentence-transformers,
    bm25s or the hub in its stderr, only rkit's status lines."""
    cmd = [sys.executable, "-m", "rkit_cli.main", "bench", "beir", str(BEIR_TINY), "--limit", "1",
           "--methods", "bm25,teacher,rkit", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
           "--no-plot"]
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    # the product path: the corpus is indexed by rkit index's indexer, then searched
    assert "loading the encoder" in done.stderr and re.search(r"index \S+: 10 documents", done.stderr)
    assert not re.search(r"it/s\]|\|█|examples/s\]", done.stderr), done.stderr[-2000:]
