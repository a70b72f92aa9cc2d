"""Stage 7: one optimiser step of the default training config (batch 16), as ``train_loop`` runs it, against a
per-sample loop computing the same step (each example alone, its losses weighted so that the summed gradient is
the batch's), with a profile of where the step's time goes. With ``RKIT_PERF_BASELINE=DIR`` (an older checkout,
e.g. ``git worktree add DIR c1bed8b``) the same step is also timed on that checkout's ``retrieval_kit``, in a
subprocess, for the "faster than before" target.

Responses are real texts (CACM documents of 40-100 words, cut at the config's 128 target tokens) standing in for
the backbone's answers: the step's cost depends on their lengths, not on their words. Targets are the teacher's
embeddings of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .common import Figure, check, timed
from .data import corpus_texts, queries as pool_queries

REPO = Path(__file__).resolve().parents[2]


def measure(quick: bool, device: str | None = None, peer: bool = True) -> dict:
    """Seconds per step (batched, and per-sample when ``peer``), tokens, gradient agreement, profile."""
    import torch

    from retrieval_kit.models import load_encoder
    from retrieval_kit.train.loop import TrainConfig, compute_losses, make_batch, param_groups

    encoder = load_encoder(device=device)
    cfg = TrainConfig()
    bs = cfg.batch_size
    # answer-length texts (40-100 words ≈ 55-130 tokens; the shipped adapter's answers were capped at 96 tokens)
    qs, responses = pool_queries(bs), [t for t in corpus_texts(3000) if 40 <= len(t.split()) <= 100][:bs]
    targets = torch.from_numpy(encoder.encode_teacher(responses))
    encoder.train()
    params = encoder.trainable_parameters()
    optimizer = torch.optim.AdamW(param_groups(encoder, cfg), lr=1e-9)  # a step that barely moves the weights

    def batched_grads():
        optimizer.zero_grad(set_to_none=True)
        batch = make_batch(encoder, qs, responses, targets, cfg)
        compute_losses(encoder, encoder, batch, cfg)["loss"].backward()

    def per_sample_grads():
        optimizer.zero_grad(set_to_none=True)
        full = make_batch(encoder, qs, responses, targets, cfg)
        n_target = float(full["target_mask"].sum())
        for i in range(bs):
            one = make_batch(encoder, qs[i : i + 1], responses[i : i + 1], targets[i : i + 1], cfg)
            losses = compute_losses(encoder, encoder, one, cfg)
            # recon is a mean over this example's tokens, the batch's over all tokens: weight by token share
            share = float(one["target_mask"].sum()) / n_target
            (cfg.w_recon * losses["recon"] * share + cfg.w_align * losses["align"] / bs).backward()

    def step(grads):
        grads()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()

    batch = make_batch(encoder, qs, responses, targets, cfg)
    losses = compute_losses(encoder, encoder, batch, cfg)  # the step's losses: a faster step must compute the same
    result = {"losses": {k: round(float(v), 5) for k, v in losses.items()}, "backbone_dtype": str(encoder.backbone.dtype),
              "tokens_per_step": int(batch["attention_mask"].sum()) + bs * encoder.special.shape[0]
              + int(batch["target_mask"].sum()), "target_tokens": int(batch["target_mask"].sum()),
              "query_tokens": int(batch["attention_mask"].sum()), "threads": torch.get_num_threads()}
    if peer:
        batched_grads()
        reference = [p.grad.clone() for p in params]
        per_sample_grads()
        result["gradient_max_rel_diff"] = max(float((p.grad - r).abs().max() / r.abs().max().clamp(min=1e-12))
                                              for p, r in zip(params, reference))
    result["ours"] = timed(lambda: step(batched_grads), repeat=2 if quick else 4, warmup=1).as_dict()
    if peer:
        result["peer"] = timed(lambda: step(per_sample_grads), repeat=1 if quick else 2).as_dict()
        result["profile_top_ops"] = _profile(lambda: step(batched_grads))
    encoder.eval()
    return result


def run(quick: bool, workdir, log, device: str | None = None) -> list[Figure]:
    log("training: timing the batched step and the per-sample loop")
    m = measure(quick, device)
    ours, peer = m["ours"]["median"], m["peer"]["median"]
    where = device or "cpu"
    figures = [Figure("training", f"train step, batch 16 ({where})", round(ours, 3), "s/step", round(peer, 3),
                      "per-sample loop, same step", round(peer / ours, 2), None, None, "",
                      {**m, "tokens_per_s": round(m["tokens_per_step"] / ours, 1),
                       "ratio": "per-sample s/step / batched s/step"})]
    baseline = os.environ.get("RKIT_PERF_BASELINE")
    if baseline:
        log(f"training: the same step on {baseline}")
        out = subprocess.run([sys.executable, "-m", "benchmarks.perf.training", "--under", baseline]
                             + (["--quick"] if quick else []), cwd=REPO, capture_output=True, text=True, check=True)
        before = json.loads(out.stdout.strip().splitlines()[-1])
        commit = subprocess.run(["git", "-C", baseline, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or baseline
        ratio = before["ours"]["median"] / ours
        met = check(ratio, "≥ 2")
        why = "" if met else (
            "the step is compute-bound: ~1 TFLOP (forward + input-gradient backward over ~1,600 response positions, "
            "the encode of the queries); what was waste (padding, the LM head over soft-prompt and pad positions, "
            "the template's shared opening) is gone. bf16 on an AMX CPU speeds the matmuls but not the CPU "
            "flash-attention backward or the elementwise ops, which hold the rest of the step (detail.profile_top_ops "
            "of the figure above); the losses agree with the fp32 step (detail.losses vs detail.before.losses). "
            "Closing it needs fewer FLOPs than the objective asks for (shorter targets) or a GPU")
        figures.append(Figure("training", f"train step vs before this work ({commit}), batch 16 ({where})",
                              round(ours, 3), "s/step", round(before["ours"]["median"], 3),
                              f"the same step at {commit}", round(ratio, 2), "≥ 2", met, why,
                              {"before": before, "ratio": "before s/step / ours s/step"}))
    return figures


def _profile(fn, top: int = 8) -> list[dict]:
    """The step's most expensive operators by self CPU time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) or 1
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1000, 1),
             "share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in rows]


if __name__ == "__main__":  # python -m benchmarks.perf.training --under DIR: this step on DIR's retrieval_kit
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--under", required=True, help="checkout whose retrieval_kit is timed")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.under).resolve()))
    print(json.dumps(measure(args.quick, peer=False)))
