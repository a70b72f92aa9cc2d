"""Closed-form (ridge) fits around the optimisation loop.

    before step 0   align_proj  ← ridge(mean soft prompt of the untrained encoder  → teacher(response))
    after the loop  align_proj  ← ridge(mean soft prompt of the *trained* encoder → teacher(response))   (refit)
                    anchor_proj ← ridge(teacher(query) → teacher(response) − teacher(query))
                    fuse_weight ← the w in normalise(w·student + (1−w)·anchored query) that fits best
                    query_mode  ← generative | fused | teacher, whichever fits best

Every choice (λ, w, mode) is made on the *tune* split: training-pool queries set aside from the loop and the fits
(see stage_targets). The held-out validation split is never used to choose anything, so the model card's figures
on it are clean.

Why a refit: the loop changes the soft prompt (L_recon) faster than the slowed head (lr ×0.01, see
loop.param_groups) follows. In the shipped adapter's run (model card) the head as the loop left it scored held-out
cos 0.551 after 300 steps; refitted on the trained features, 0.585 (the same fit on the untrained encoder: 0.523).

Why an anchor: on SmolLM2-135M the student embedding alone stays below teacher(query) as a predictor of
teacher(response) (RESEARCH.md: 0.62 vs 0.69 after 1.5k GPU steps). The anchor is the answer-shift a linear map can
read from the query's own teacher vector; the student adds what the LLM knows about the answer on top of it.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..models.encoder import apply_anchor

RIDGE_GRID = (1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0, 30.0)  # λ as a multiple of the mean feature variance
FUSE_GRID = tuple(round(0.05 * i, 2) for i in range(21))


def solve_ridge(x: torch.Tensor, y: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """w, b minimising |x·w + b − y|² + α·mean(var(x))·|w|² (float64)."""
    x, y = x.double(), y.double()
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc = x - x_mean
    gram = xc.T @ xc
    scale = float(torch.diagonal(gram).mean()) or 1.0  # λ relative to the features' own scale
    w = torch.linalg.solve(gram + alpha * scale * torch.eye(gram.shape[0], dtype=gram.dtype), xc.T @ (y - y_mean))
    return w, y_mean - x_mean @ w


def mean_cos(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float((F.normalize(pred.double(), dim=-1) * F.normalize(target.double(), dim=-1)).sum(-1).mean())


def choose_ridge(x: torch.Tensor, y: torch.Tensor, x_tune: torch.Tensor, y_tune: torch.Tensor, residual: bool = False) -> dict:
    """Fit x → y on the training rows with λ chosen by mean cosine on the tune rows.

    residual: predict y − x, so the prediction is x + x·w + b (for maps that start from the identity)."""
    off, off_tune = (x, x_tune) if residual else (0.0, 0.0)
    fits, scores = {}, {}
    for alpha in RIDGE_GRID:
        fits[alpha] = solve_ridge(x, y - off, alpha)
        w, b = fits[alpha]
        scores[alpha] = mean_cos(off_tune + x_tune.double() @ w + b, y_tune) if len(x_tune) else 0.0
    best = max(scores, key=scores.get) if len(x_tune) else 1e-1  # nothing to choose on: a middle-of-the-grid λ
    w, b = fits[best]
    return {"w": w, "b": b, "alpha": best, "tune_cos": scores[best] if len(x_tune) else None,
            "grid": {str(k): round(v, 4) for k, v in scores.items()}}


def _set_linear(layer: torch.nn.Linear, w: torch.Tensor, b: torch.Tensor) -> None:
    layer.weight.copy_(w.T.to(layer.weight.dtype))
    layer.bias.copy_(b.to(layer.bias.dtype))


@torch.no_grad()
def fit_head(encoder, data, cfg, embed: Callable, on_progress: Callable[[int], None] | None = None) -> dict:
    """Fit align_proj in closed form from mean(soft prompt) to the training targets.

    Before step 0 this gives the head the best linear readout of the untrained encoder's features instead of a
    random projection that gradient descent must first undo; after the loop, the best readout of the trained
    features. `embed(queries, key="features")` runs the encoder.
    """
    n = min(len(data.train_queries), cfg.ridge_samples)
    feats = []
    for start in range(0, n, cfg.eval_batch_size):
        feats.append(embed(data.train_queries[start : min(n, start + cfg.eval_batch_size)], key="features"))
        if on_progress:
            on_progress(min(n, start + cfg.eval_batch_size) - start)
    tune_x = embed(data.tune_queries, key="features") if data.tune_queries else torch.zeros(0, feats[0].shape[1])
    fit = choose_ridge(torch.cat(feats), data.train_targets[:n], tune_x, data.tune_targets)
    _set_linear(encoder.align_proj, fit["w"], fit["b"])
    return {"samples": n, "alpha": fit["alpha"], "tune_cos": fit["tune_cos"], "grid": fit["grid"]}


@torch.no_grad()
def fit_query_anchor(encoder, data, embed: Callable) -> dict:
    """After the loop: fit anchor_proj, then the fused weight and the default query mode (choices on the tune split)."""
    fit = choose_ridge(data.train_query_vecs, data.train_response_vecs, data.tune_query_vecs, data.tune_targets,
                       residual=True)
    _set_linear(encoder.anchor_proj, fit["w"], fit["b"])
    result = {"alpha": fit["alpha"], "anchor_tune_cos": fit["tune_cos"], "tune_n": len(data.tune_queries)}
    if not data.tune_queries:  # nothing to choose on: keep the config's weight, let `auto` mean generative
        return result
    q, r = data.tune_query_vecs.double(), data.tune_targets.double()
    anchored = apply_anchor(encoder.anchor_proj, q)
    student = F.normalize(embed(data.tune_queries).double(), dim=-1)
    fused = {w: mean_cos(w * student + (1 - w) * anchored, r) for w in FUSE_GRID}
    weight = max(fused, key=fused.get)
    scores = {"teacher": mean_cos(q, r), "generative": mean_cos(student, r), "fused": fused[weight]}
    mode = max(scores, key=scores.get)
    encoder.config.fuse_weight = float(weight)
    encoder.config.query_mode = mode
    return {**result, "fuse_weight": float(weight), "query_mode": mode,
            "tune_cos": {k: round(v, 4) for k, v in scores.items()}, "fuse_grid": {str(k): round(v, 4) for k, v in fused.items()}}
