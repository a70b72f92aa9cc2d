"""The answer bank an adapter carries for its latent lens (models/lens.py): training-pool queries, the backbone's
answers and teacher(answer), size-capped. ``rkit train`` writes one into every adapter it makes; for an adapter
made before that:

    python -m retrieval_kit.train.bank --adapter retrieval_kit/data/adapters/default \
        --queries ../shared/data/train_queries/mixed.jsonl --limit 1200

takes the training split of the first ``--limit`` pool queries (the ``--val-size`` held-out queries never enter a
bank), their answers from the trainer's response cache (generating the missing ones with the adapter's own
generation settings) and writes the bank into the adapter folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..models.lens import BANK_CAP, save_answer_bank
from ..paths import rkit_home
from .data import load_split
from .responses import encoder_answers


def bank_for_adapter(adapter: str | Path, queries: str | Path, limit: int | None, val_size: int = 200,
                     cap: int = BANK_CAP, cache_dir: str | Path | None = None, max_new_tokens: int | None = None) -> int:
    from ..models import load_adapter

    encoder = load_adapter(adapter)
    hyper = (encoder.config.training or {}).get("hyperparameters", {})
    pool = load_split(queries, val_size, limit).train
    answers = encoder_answers(encoder, pool, max_new_tokens or hyper.get("max_new_tokens", 128),
                              Path(cache_dir or rkit_home() / "cache"))
    kept = [q for q in pool if answers[q].strip()]
    vectors = encoder.encode_teacher([answers[q] for q in kept], role="document")
    return save_answer_bank(adapter, kept, [answers[q] for q in kept], vectors, cap)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write an answer bank (latent lens) into an existing adapter folder.")
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--queries", required=True, help="the training query pool (never an evaluation set)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--val-size", type=int, default=200, help="held-out queries kept out of the bank")
    ap.add_argument("--cap", type=int, default=BANK_CAP)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="answer length (default: the adapter's training setting)")
    args = ap.parse_args(argv)
    n = bank_for_adapter(args.adapter, args.queries, args.limit, args.val_size, args.cap, args.cache_dir,
                         args.max_new_tokens)
    print(f"answer bank: {n} answers written into {args.adapter}")


if __name__ == "__main__":
    main()
