"""The backbone in bf16 vs float32 on this CPU: matmul peak, generative encode, --explain decode, answer generation, one training step.

    python -m benchmarks.backbone_dtype [--rounds 3] [--out benchmarks/results/backbone-dtype-<cpu>.json]

Why: ``pick_dtype`` runs the backbone in bf16 on a CPU that multiplies bf16 in hardware (AMX tiles, or AVX512-BF16
dot products) and in float32 elsewhere. This measures what the pick buys on the machine it runs on: both types
loaded side by side in one process, each workload run in alternating rounds (the box is shared and noisy; ratios
travel, absolute times less so), medians reported. Also the cosine between the two types' generative query
vectors (the same vectors, or bf16 would be a different model). Queries are held-out pool records (line 20,000
on, as the performance suite's), never an evaluation set's. A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
from pathlib import Path

import numpy as np

EXACT_32 = {"min_new_tokens": 32}  # no early end of sequence: each type decodes exactly max_new_tokens


def _encoder(dtype: str):
    from retrieval_kit.models import load_encoder
    from retrieval_kit.models.backbone import DTYPES

    os.environ["RKIT_DTYPE"] = dtype  # the product's own switch, read when the backbone loads: an encoder loads it
    encoder = load_encoder(device="cpu")  # lazily, so load it now, while this type is the one asked for
    assert encoder.backbone.dtype == DTYPES[dtype], encoder.backbone.dtype
    return encoder


def _train_step(encoder, queries: list[str], answers: list[str]):
    """One reconstruction + alignment step of the trainer at batch 8 (forward + backward; no optimizer update)."""
    import torch

    from retrieval_kit.train.loop import TrainConfig, compute_losses, make_batch

    cfg = TrainConfig(max_target_tokens=32)
    targets = torch.nn.functional.normalize(torch.randn(len(queries), encoder.config.embed_dim), dim=-1)

    def step():
        batch = make_batch(encoder, queries, answers, targets, cfg)
        losses = compute_losses(encoder, encoder, batch, cfg)
        losses["loss"].backward()
        encoder.zero_grad(set_to_none=True)

    return step


def main() -> None:
    import torch

    from benchmarks.perf.common import timed
    from benchmarks.perf.data import queries as pool_queries
    from benchmarks.perf.encode import _matmul_peak
    from retrieval_kit.machine import machine_info
    from retrieval_kit.models.backbone import DTYPES, _cpu_probe, cpu_has_amx
    from retrieval_kit.models.generation import generate_batch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info()
    machine["avx512_bf16"] = _cpu_probe("_is_avx512_bf16_supported")
    machine["amx"] = cpu_has_amx()
    queries = pool_queries(48)
    encoders = {name: _encoder(name) for name in DTYPES}
    answers = [f"An answer of a few words to: {q}" for q in queries[:8]]
    once = lambda fn: timed(fn, repeat=1).min  # one timed call per round; the rounds give the median
    work = {
        "matmul 2048² (GFLOP/s)": lambda enc, dt: _matmul_peak(torch.device("cpu"), dt) / 1e9,
        "encode batch 1, 8 queries (s)": lambda enc, dt: once(lambda: [enc.encode([q]) for q in queries[:8]]),
        "encode batch 32 (s)": lambda enc, dt: once(lambda: enc.encode(queries[8:40], batch_size=32)),
        "generate 16 answers × 32 tokens (s)": lambda enc, dt: once(
            lambda: generate_batch(enc.backbone, enc.tokenizer, queries[:16], max_new_tokens=32)),
        # --explain's decode (KV-cached greedy continuation of the soft prompt), held at 32 new tokens so that both
        # types decode the same number of steps: batch 1 is what one `rkit search --explain` runs (its int8 steps off
        # here: the weight type alone is compared), batch 16 a batch
        "decode batch 1, 4 queries × 32 tokens (s)": lambda enc, dt: once(
            lambda: [enc.decode([q], max_new_tokens=32, generate_options=EXACT_32, int8=False) for q in queries[:4]]),
        "decode batch 16, 32 tokens (s)": lambda enc, dt: once(
            lambda: enc.decode(queries[:16], max_new_tokens=32, batch_size=16, generate_options=EXACT_32)),
        "generate 1 answer × 32 tokens, 4 queries (s)": lambda enc, dt: once(
            lambda: [generate_batch(enc.backbone, enc.tokenizer, [q], max_new_tokens=32) for q in queries[:4]]),
        "train step, batch 8, 32 target tokens (s)": lambda enc, dt: once(_train_step(enc, queries[:8], answers)),
    }
    dtypes = DTYPES
    results: dict = {name: {d: [] for d in dtypes} for name in work}
    for enc in encoders.values():  # warm-up: first calls allocate and pick kernels
        enc.encode(queries[:4])
    for r in range(args.rounds):
        for name, fn in work.items():
            for d in (dtypes if r % 2 == 0 else reversed(list(dtypes))):  # alternate which type goes first
                results[name][d].append(fn(encoders[d], dtypes[d]))
    fp32 = encoders["float32"].encode(queries[8:40])
    bf16 = encoders["bfloat16"].encode(queries[8:40])
    cos = (np.asarray(fp32) * np.asarray(bf16)).sum(-1)
    rows = {}
    for name, by in results.items():
        med = {d: statistics.median(v) for d, v in by.items()}
        speedup = med["bfloat16"] / med["float32"] if "GFLOP" in name else med["float32"] / med["bfloat16"]
        rows[name] = {"float32": round(med["float32"], 4), "bfloat16": round(med["bfloat16"], 4),
                      "bf16_speedup": round(speedup, 2), "runs": {d: [round(x, 4) for x in v] for d, v in by.items()}}
    report = {"machine": machine, "rounds": args.rounds, "rows": rows,
              "encode_cos_bf16_vs_fp32": {"min": round(float(cos.min()), 5), "mean": round(float(cos.mean()), 5)},
              "command": "python -m benchmarks.backbone_dtype" + (f" --rounds {args.rounds}" if args.rounds != 3 else "")}
    print(f"{machine['cpu']} (AVX512-BF16 {machine['avx512_bf16']}, AMX {machine['amx']}), {torch.get_num_threads()} threads")
    for name, row in rows.items():
        print(f"  {name:44s} fp32 {row['float32']:>9}   bf16 {row['bfloat16']:>9}   bf16 {row['bf16_speedup']}x")
    print(f"  generative vectors, cos bf16 vs fp32: min {report['encode_cos_bf16_vs_fp32']['min']}")
    out = args.out or Path(__file__).parent / "results" / f"backbone-dtype-{re.sub(r'[^a-z0-9]+', '-', machine['cpu'].lower()).strip('-')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"→ {out}")


if __name__ == "__main__":
    main()
