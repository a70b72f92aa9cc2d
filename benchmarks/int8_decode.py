"""Int8 decode steps (models/int8_decode.py) against the full weights: speed and faithfulness of batch-1 decodes.

    python -m benchmarks.int8_decode --pool-slice 4000:4120 --json benchmarks/results/explain/int8-decode.json

What `--explain` runs for one query (a batch of 1, greedy, KV-cached) on the soft prompts of a tune slice of the
training pool (never trained on), three ways: bf16 weights with int8 one-row steps (the product), bf16 weights
only, and the whole pipeline in fp32 (its own encode too: how far the weight type alone already moves a decode).
Each against the backbone's real answers (ROUGE-L F1, teacher cosine: the faithfulness figures of the model card)
and against the bf16 decode (identical share, ROUGE-L), with seconds per query. One process, the three decodes
one after another; on a CPU without bf16 in hardware the bf16 rows are emulated, and slow.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.explain_faithfulness import POOL, answers, pool_slice
from retrieval_kit.machine import machine_info
from retrieval_kit.paths import rkit_home
from retrieval_kit.train.report import rouge_l_f1

DEFAULT_ADAPTER = Path(__file__).resolve().parents[1] / "retrieval_kit" / "data" / "adapters" / "default"


def load(adapter: str, dtype: str):
    from retrieval_kit.models import load_adapter

    os.environ["RKIT_DTYPE"] = dtype  # backbone.pick_dtype reads it at load
    return load_adapter(adapter, device="cpu", decoding=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", default=str(DEFAULT_ADAPTER))
    ap.add_argument("--queries", default=str(POOL))
    ap.add_argument("--pool-slice", default="4000:4120", metavar="LO:HI")
    ap.add_argument("--tokens", type=int, default=48, help="decoded tokens (--explain's default)")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="the real answers' length")
    ap.add_argument("--cache-dir", default=str(rkit_home() / "cache"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    queries = pool_slice(args.queries, args.pool_slice)
    bf16 = load(args.adapter, "bfloat16")
    table = answers(bf16, queries, args.max_new_tokens, Path(args.cache_dir))
    responses = [table[q] for q in queries]
    truth = bf16.encode_teacher(responses)

    def decode(encoder, int8: bool) -> dict:
        _, soft = encoder.encode(queries, with_soft_prompts=True)
        t0 = time.perf_counter()
        texts = encoder.decode(queries, max_new_tokens=args.tokens, soft_prompts=soft, batch_size=1, int8=int8)
        seconds = time.perf_counter() - t0
        return {"texts": texts, "s_per_query": round(seconds / len(queries), 3),
                "rouge_l_f1": round(float(np.mean([rouge_l_f1(d, r) for d, r in zip(texts, responses)])), 4),
                "teacher_cos": round(float((bf16.encode_teacher(texts) * truth).sum(1).mean()), 4)}

    rows = {"bf16": decode(bf16, int8=False), "bf16 + int8 steps (product)": decode(bf16, int8=True)}
    rows["fp32"] = decode(load(args.adapter, "float32"), int8=False)
    ref = rows["bf16"]["texts"]
    for row in rows.values():
        row["identical_to_bf16"] = round(float(np.mean([a == b for a, b in zip(row["texts"], ref)])), 3)
        row["rouge_l_to_bf16"] = round(float(np.mean([rouge_l_f1(a, b) for a, b in zip(row["texts"], ref)])), 4)
    print(f"{len(queries)} queries (pool lines {args.pool_slice}), batch 1, {args.tokens} tokens:")
    for name, row in rows.items():
        print(f"  {name:28s} {row['s_per_query']:.2f} s/query  ROUGE-L {row['rouge_l_f1']:.3f}  "
              f"teacher cos {row['teacher_cos']:.3f}  identical to bf16 {row['identical_to_bf16']:.0%}  "
              f"ROUGE-L to bf16 {row['rouge_l_to_bf16']:.3f}")
    if args.json:
        out = {"adapter": args.adapter, "queries": f"pool lines {args.pool_slice}", "n": len(queries),
               "tokens": args.tokens, "batch": 1, "machine": machine_info(),
               "rows": {name: {k: v for k, v in row.items() if k != "texts"} for name, row in rows.items()},
               "examples": [{"query": q, "answer": a, **{name: row["texts"][i] for name, row in rows.items()}}
                            for i, (q, a) in enumerate(zip(queries[:5], responses))]}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
