"""Why do explanations fail? Per-position reconstruction loss and greedy decodes of an adapter, on held-out queries.

    python -m benchmarks.explain_faithfulness --adapter retrieval_kit/data/adapters/default --limit 3000 --val-size 200
    python -m benchmarks.explain_faithfulness --adapter runs/a --adapter runs/b --json out.json

For each adapter, on the held-out split its trainer used (the ``--val-size`` smallest text hashes of the first
``--limit`` pool queries; never trained on): the backbone's real answers (the trainer's response cache, generated
when missing), then
- teacher-forced cross-entropy and top-1 accuracy at each of the first ``--positions`` answer tokens (the loss the
  trainer reports is their mean: a low mean can hide a first token the soft prompt never predicts, and greedy
  decoding starts from that token);
- greedy decodes (what ``rkit search --explain`` shows) against the real answers: ROUGE-L F1 and teacher cosine.
Results: the table on stdout, everything in ``--json``.

``--pool-slice LO:HI`` evaluates on the pool's lines LO..HI-1 instead (a tune slice: choose decode options or
training variants there, never on the held-out queries the targets are reported on); ``--decode-option
NAME=k=v[,k=v]`` (repeatable) adds decodes of the same soft prompts with more ``generate`` arguments, e.g.
``beam3=num_beams=3`` or ``rep1.2=repetition_penalty=1.2``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from retrieval_kit.models import load_adapter
from retrieval_kit.paths import rkit_home
from retrieval_kit.train.data import load_split
from retrieval_kit.train.loop import tokenize_targets
from retrieval_kit.train.report import rouge_l_f1
from retrieval_kit.train.responses import encoder_answers

POOL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "train_queries" / "mixed.jsonl"


def held_out(queries: str, limit: int, val_size: int, n: int, also: list[str]) -> list[str]:
    """The first n held-out queries of the (limit, val_size) split that are also held out of every ``also`` split
    ("LIMIT:VAL", another adapter's): two adapters trained on different slices are compared on queries neither saw."""
    val = load_split(queries, val_size, limit).val
    for spec in also:
        other_limit, other_val = (int(x) for x in spec.split(":"))
        keep = set(load_split(queries, other_val, other_limit).val)
        val = [q for q in val if q in keep]
    return val[:n]


def pool_slice(queries: str, spec: str) -> list[str]:
    """The query texts of pool lines LO..HI-1 ("LO:HI"), in file order."""
    from retrieval_kit.train.data import read_queries

    lo, hi = (int(x) for x in spec.split(":"))
    return read_queries(queries, limit=hi)[lo:]


def decode_option(spec: str) -> tuple[str, dict]:
    """ "beam3=num_beams=3,no_repeat_ngram_size=3" -> ("beam3", {"num_beams": 3, "no_repeat_ngram_size": 3})."""
    name, _, rest = spec.partition("=")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        options[key] = json.loads(value)
    return name, options


def answers(encoder, queries: list[str], max_new_tokens: int, cache_dir: Path) -> dict[str, str]:
    return encoder_answers(encoder, queries, max_new_tokens, cache_dir, batch_size=16)


@torch.no_grad()
def per_position(encoder, queries: list[str], responses: list[str], positions: int, batch_size: int = 16) -> dict:
    """Mean CE and top-1 accuracy at each of the first ``positions`` answer tokens, teacher-forced after what the
    backbone reads before an answer (encoder.recon_inputs); rows shorter than a position do not count there."""
    losses, hits, counts = np.zeros(positions), np.zeros(positions), np.zeros(positions)
    for start in range(0, len(queries), batch_size):
        soft = encoder(**encoder.tokenize_queries(queries[start : start + batch_size]))["soft_prompt"]
        t = tokenize_targets(encoder.tokenizer, responses[start : start + batch_size], positions, encoder.device)
        ids, mask = t["target_ids"], t["target_mask"]
        logits = encoder.recon_logits(soft, ids, mask)  # one row per scored token, row-major
        labels = ids[mask.bool()]
        column = mask.bool().nonzero()[:, 1].cpu().numpy()  # each row's answer position
        np.add.at(losses, column, torch.nn.functional.cross_entropy(logits, labels, reduction="none").cpu().numpy())
        np.add.at(hits, column, (logits.argmax(-1) == labels).cpu().numpy())
        np.add.at(counts, column, 1)
    counts = np.maximum(counts, 1)
    return {"ce": (losses / counts).round(3).tolist(), "top1": (hits / counts).round(3).tolist(),
            "rows": counts.astype(int).tolist()}


def evaluate(adapter: str, args) -> dict:
    encoder = load_adapter(adapter, device="cpu")
    hyper = (encoder.config.training or {}).get("hyperparameters", {})
    max_new = args.max_new_tokens or hyper.get("max_new_tokens", 128)
    if args.pool_slice:
        queries = pool_slice(args.queries, args.pool_slice)
    else:
        queries = held_out(args.queries, args.limit, args.val_size, args.n, args.also_held_out)
    table = answers(encoder, queries, max_new, Path(args.cache_dir))
    responses = [table[q] for q in queries]
    t0 = time.perf_counter()
    pos = per_position(encoder, queries, responses, args.positions)
    _, soft = encoder.encode(queries, with_soft_prompts=True)
    vec_r = encoder.encode_teacher(responses)

    def scored(options: dict) -> tuple[dict, list[str]]:
        decoded = encoder.decode(queries, max_new_tokens=args.decode_tokens, soft_prompts=soft, generate_options=options,
                                 int8=False)
        vec_d = encoder.encode_teacher(decoded)
        return {"tokens": args.decode_tokens, "options": options,
                "rouge_l_f1": float(np.mean([rouge_l_f1(d, r) for d, r in zip(decoded, responses)])),
                "teacher_cos": float((vec_d * vec_r).sum(1).mean()),
                "distinct_first_words": len({(d.split() or [""])[0] for d in decoded})}, decoded

    greedy, decoded = scored({})
    return {
        "adapter": adapter, "recon_format": encoder.config.recon_format,
        "steps": (encoder.config.training or {}).get("steps"), "n": len(queries), "max_new_tokens": max_new,
        "queries": f"pool lines {args.pool_slice}" if args.pool_slice else "held out",
        "per_position": pos,
        "decode": greedy,
        "decode_options": {name: scored(options)[0] for name, options in map(decode_option, args.decode_option)},
        "examples": [{"query": q, "response": r, "decoded": d} for q, r, d in zip(queries[:6], responses, decoded)],
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", action="append", required=True)
    ap.add_argument("--queries", default=str(POOL))
    ap.add_argument("--limit", type=int, default=3000, help="the trainer's --limit (the split depends on it)")
    ap.add_argument("--val-size", type=int, default=200, help="the trainer's --val-size")
    ap.add_argument("--also-held-out", action="append", default=[], metavar="LIMIT:VAL",
                    help="keep only queries also held out of this split (another adapter's --limit:--val-size)")
    ap.add_argument("-n", type=int, default=64, help="held-out queries evaluated")
    ap.add_argument("--pool-slice", default=None, metavar="LO:HI",
                    help="evaluate on the pool's lines LO..HI-1 instead of the held-out split (a tune slice)")
    ap.add_argument("--decode-option", action="append", default=[], metavar="NAME=k=v[,k=v]",
                    help="also decode with these generate() arguments, e.g. beam3=num_beams=3 (repeatable)")
    ap.add_argument("--positions", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="response length (default: the adapter's)")
    ap.add_argument("--cache-dir", default=str(rkit_home() / "cache"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    results = [evaluate(a, args) for a in args.adapter]
    for r in results:
        ce, top1 = r["per_position"]["ce"], r["per_position"]["top1"]
        print(f"{r['adapter']} ({r['recon_format']}, {r['steps']} steps, n={r['n']}): decode ROUGE-L "
              f"{r['decode']['rouge_l_f1']:.3f}, teacher cos {r['decode']['teacher_cos']:.3f}; "
              f"CE at answer tokens 1-4 {ce[:4]} (top-1 {top1[:4]}), mean over {len(ce)} {np.mean(ce):.2f}")
        for name, d in r["decode_options"].items():
            print(f"  decode {name} {d['options']}: ROUGE-L {d['rouge_l_f1']:.3f}, teacher cos {d['teacher_cos']:.3f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
