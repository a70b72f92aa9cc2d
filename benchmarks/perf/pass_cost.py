"""What one more forward pass of the generative encode costs, in padded tokens: the constant behind
``models.generation.PASS_OVERHEAD_TOKENS`` (the cost-sorted batching of ``encode``).

    python -m benchmarks.perf.pass_cost

Times the encoder's forward (model loaded, no grad) on batches of 1-32 held-out pool queries of about 10, 30, 60
and 120 tokens, fits seconds = a + b · padded tokens by least squares and prints a, b and a / b as JSON; then
``encode`` of the same held-out queries (64 at batch 32 and 64) with the cost-sorted batches against plain
length-sorted batches of ``batch_size`` (the batching before), interleaved, min of 3 each.
A benchmark, not a test; the machine is recorded.
"""

from __future__ import annotations

import json
import time


def main() -> None:
    import numpy as np
    import torch

    from retrieval_kit.machine import machine_info
    from retrieval_kit.models import load_encoder

    from .data import queries as pool_queries

    encoder = load_encoder()
    qs = pool_queries(256)
    lengths = np.array([len(ids) for ids in encoder.tokenizer(qs, add_special_tokens=False)["input_ids"]])
    encoder.encode(qs[:8])  # warm-up
    rows = []
    for n in (1, 4, 8, 16, 32):
        for target in (10, 30, 60, 120):
            batch = encoder.tokenize_queries([qs[int(i)] for i in np.argsort(np.abs(lengths - target))[:n]])
            times = []
            for _ in range(3):
                started = time.perf_counter()
                with torch.no_grad():
                    encoder(**batch)
                times.append(time.perf_counter() - started)
            rows.append({"texts": n, "padded_tokens": int(batch["attention_mask"].numel()), "s": min(times)})
    design = np.array([[1.0, r["padded_tokens"]] for r in rows])
    a, b = np.linalg.lstsq(design, np.array([r["s"] for r in rows]), rcond=None)[0]
    print(json.dumps({"pass_ms": round(1000 * a, 1), "token_ms": round(1000 * b, 3), "overhead_tokens": round(a / b),
                      "dtype": str(encoder.backbone.dtype), "machine": machine_info(), "rows": rows,
                      "batching": _compare(encoder, qs[:64])}))


def _compare(encoder, texts: list[str]) -> dict:
    """Seconds to encode ``texts`` with cost-sorted batches vs plain length-sorted ones (min of 3, interleaved)."""
    from retrieval_kit.models import encoder as module
    from retrieval_kit.models.generation import cost_sorted_batches, length_sorted_batches

    def plain(lengths, batch_size):  # the batching encode() used before: full batches of the length-sorted texts
        return list(length_sorted_batches(texts, batch_size))

    out = {}
    for batch_size in (32, 64):
        times: dict[str, list[float]] = {"plain": [], "cost": []}
        for _ in range(3):
            for name, batcher in (("plain", plain), ("cost", cost_sorted_batches)):
                module.cost_sorted_batches = batcher  # what encode() calls to cut its batches
                started = time.perf_counter()
                encoder.encode(texts, batch_size=batch_size)
                times[name].append(time.perf_counter() - started)
        module.cost_sorted_batches = cost_sorted_batches
        out[f"batch_{batch_size}"] = {"plain_s": round(min(times["plain"]), 3), "cost_s": round(min(times["cost"]), 3),
                                      "speedup": round(min(times["plain"]) / min(times["cost"]), 2)}
    return out


if __name__ == "__main__":
    main()
