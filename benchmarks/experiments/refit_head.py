"""Indication, not a result: would a closed-form refit of align_proj on the *trained* features help?

    python benchmarks/experiments/refit_head.py [--adapter DIR] [--cache-dir cache] [--limit 3000] [--n-train 1200]

Uses the training run's own split (same --limit / --val-size as the shipped adapter's command) and its cached
responses (GenerationConfig with max_new_tokens 96); fits on the first n training queries, chooses λ on the tune
split, reports held-out val cos of the refit head next to the adapter's own student.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from retrieval_kit.models import load_encoder
from retrieval_kit.train.data import load_split
from retrieval_kit.train.loop import embed_queries
from retrieval_kit.train.responses import GenerationConfig, cache_path, read_cache
from retrieval_kit.train.ridge import choose_ridge, mean_cos

p = argparse.ArgumentParser()
p.add_argument("--adapter", default=None)
p.add_argument("--queries", default="/work/shared/data/train_queries/mixed.jsonl")
p.add_argument("--cache-dir", default="cache")
p.add_argument("--limit", type=int, default=3000)
p.add_argument("--val-size", type=int, default=200)
p.add_argument("--n-train", type=int, default=1200)
args = p.parse_args()

enc = load_encoder(args.adapter)
split = load_split(args.queries, args.val_size, args.limit)
gen = GenerationConfig(max_new_tokens=96, system_prompt=enc.config.system_prompt, max_query_tokens=enc.config.max_query_tokens)
resp = read_cache(cache_path(Path(args.cache_dir), enc.config.backbone, gen))
pool = [q for q in split.train if resp.get(q, "").strip()]
val = [q for q in split.val if resp.get(q, "").strip()]
tune = pool[::10][:256]
train = [q for q in pool if q not in set(tune)][: args.n_train]
feats = lambda qs: embed_queries(enc, qs, 32, key="features")
targets = lambda qs: torch.from_numpy(enc.encode_teacher([resp[q] for q in qs]))
fit = choose_ridge(feats(train), targets(train), feats(tune), targets(tune))
val_t = targets(val)
refit = mean_cos(feats(val).double() @ fit["w"] + fit["b"], val_t)
shipped = float((torch.from_numpy(enc.encode(val)) * F.normalize(val_t, dim=-1)).sum(-1).mean())
print(json.dumps({"n_train": len(train), "n_tune": len(tune), "n_val": len(val), "alpha": fit["alpha"],
                  "val_cos_refit_head": round(refit, 4), "val_cos_adapter_student": round(shipped, 4)}))
