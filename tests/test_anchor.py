"""The query anchor: closed-form fits (ridge.py) and how fused query vectors use it (real default models)."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retrieval_kit.train.loop import LoopData
from retrieval_kit.train.ridge import choose_ridge, fit_query_anchor, solve_ridge


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_solve_ridge_recovers_a_linear_map():
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(0)).double()
    true_w = torch.randn(8, 3, generator=torch.Generator().manual_seed(1)).double()
    w, b = solve_ridge(x, x @ true_w + 0.5, alpha=1e-6)
    assert torch.allclose(w, true_w, atol=1e-4) and torch.allclose(b, torch.full((3,), 0.5, dtype=torch.double), atol=1e-4)


def test_choose_ridge_picks_lambda_on_the_tune_rows_only():
    x, x_tune = _unit(300, 16, 0), _unit(40, 16, 1)
    shift = torch.randn(16, 16, generator=torch.Generator().manual_seed(2)) * 0.3
    y, y_tune = F.normalize(x + x @ shift, dim=-1), F.normalize(x_tune + x_tune @ shift, dim=-1)
    fit = choose_ridge(x, y, x_tune, y_tune, residual=True)
    assert round(fit["tune_cos"], 4) == max(fit["grid"].values()) and fit["tune_cos"] > 0.95
    # the tune rows decide: shuffled tune targets make every λ score near zero
    noise = choose_ridge(x, y, x_tune, y_tune[torch.randperm(40, generator=torch.Generator().manual_seed(3))], residual=True)
    assert noise["tune_cos"] < 0.5


def _fake_encoder(dim: int):
    anchor = torch.nn.Linear(dim, dim)
    return types.SimpleNamespace(anchor_proj=anchor, config=types.SimpleNamespace(fuse_weight=0.5, query_mode=None))


def _anchor_data(n_train=400, n_tune=60, dim=16, seed=0):
    """teacher(response) = a fixed shift of teacher(query) plus a per-query part only the 'student' can see."""
    shift = torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed)) * 0.4
    q = _unit(n_train + n_tune, dim, seed + 1)
    private = _unit(n_train + n_tune, dim, seed + 2)
    r = F.normalize(F.normalize(q + q @ shift, dim=-1) + 0.8 * private, dim=-1)
    names = [f"q{i}" for i in range(n_train + n_tune)]
    data = LoopData(train_queries=names[:n_train], train_responses=[""] * n_train, train_targets=r[:n_train],
                    val_queries=[], val_responses=[], val_targets=torch.zeros(0, dim),
                    train_query_vecs=q[:n_train], train_response_vecs=r[:n_train],
                    tune_queries=names[n_train:], tune_targets=r[n_train:], tune_query_vecs=q[n_train:])
    lookup = dict(zip(names, private))
    return data, lambda queries: torch.stack([lookup[x] for x in queries])  # the "student" sees the private part


def test_fit_query_anchor_learns_the_shift_and_picks_fused():
    data, student = _anchor_data()
    enc = _fake_encoder(16)
    result = fit_query_anchor(enc, data, student)
    q, r = data.tune_query_vecs, data.tune_targets
    anchored = F.normalize(q + enc.anchor_proj(q), dim=-1)
    assert (anchored * r).sum(-1).mean() > (q * r).sum(-1).mean() + 0.05  # the anchor beats teacher(query)
    assert result["query_mode"] == "fused" == enc.config.query_mode
    assert 0 < enc.config.fuse_weight < 1 and result["fuse_weight"] == enc.config.fuse_weight
    assert result["tune_cos"]["fused"] > max(result["tune_cos"]["teacher"], result["tune_cos"]["generative"])


def test_fit_query_anchor_prefers_teacher_when_nothing_helps():
    dim = 16
    q = _unit(300, dim, 5)
    data = LoopData(train_queries=[f"q{i}" for i in range(260)], train_responses=[""] * 260, train_targets=q[:260],
                    val_queries=[], val_responses=[], val_targets=torch.zeros(0, dim),
                    train_query_vecs=q[:260], train_response_vecs=q[:260],
                    tune_queries=[f"q{i}" for i in range(260, 300)], tune_targets=q[260:], tune_query_vecs=q[260:])
    enc = _fake_encoder(dim)
    result = fit_query_anchor(enc, data, lambda queries: _unit(len(queries), dim, 9))  # a useless student
    assert result["fuse_weight"] == 0.0 and result["tune_cos"]["generative"] < 0.3


# ---- the encoder side (real backbone + teacher) -----------------------------------------------------------


@pytest.fixture(scope="module")
def anchored_encoder():
    from retrieval_kit.models import EncoderConfig, build_encoder

    enc = build_encoder(EncoderConfig(anchor=True), device="cpu")
    with torch.no_grad():  # a recognisable anchor: a sign flip of the first coordinate
        enc.anchor_proj.weight.zero_()
        enc.anchor_proj.weight[0, 0] = -2.0
    enc.config.fuse_weight = 0.25
    return enc


def test_anchor_is_fitted_not_trained_and_travels_with_the_adapter(anchored_encoder, tmp_path):
    from retrieval_kit.models import load_adapter

    enc = anchored_encoder
    names = {n for n, p in enc.named_parameters() if any(p is t for t in enc.trainable_parameters())}
    assert not any(n.startswith("anchor_proj.") for n in names) and "special" in names
    assert {"anchor_proj.weight", "anchor_proj.bias"} <= set(enc.adapter_state())
    enc.save(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "config.json").read_text())["fuse_weight"] == 0.25
    again = load_adapter(tmp_path / "a", device="cpu")
    assert again.fingerprint == enc.fingerprint
    again.config.fuse_weight = 0.3  # the weight changes fused vectors, so it is part of the fingerprint
    assert again.fingerprint != enc.fingerprint


def test_fused_queries_use_the_anchor_and_the_fitted_weight(anchored_encoder):
    enc = anchored_encoder
    texts = ["how do I rotate the API keys?", "what is a spider?"]
    teacher = enc.encode_queries(texts, mode="teacher")
    anchored = enc.anchor_queries(teacher)
    flipped = teacher.copy()
    flipped[:, 0] *= -1
    np.testing.assert_allclose(anchored, flipped / np.linalg.norm(flipped, axis=1, keepdims=True), atol=1e-6)
    gen = enc.encode_queries(texts, mode="generative")
    expected = 0.25 * gen + 0.75 * anchored
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(enc.encode_queries(texts, mode="fused"), expected, atol=1e-5)
    # an explicit weight overrides the fitted one; 0 is the anchor alone
    np.testing.assert_allclose(enc.encode_queries(texts, mode="fused", fuse_weight=0.0), anchored, atol=1e-5)
