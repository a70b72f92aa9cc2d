"""The teacher in bf16 vs float32 on a CPU: CACM retrieval (both types on each side) and encode time.

    python -m benchmarks.teacher_dtype [--data ../shared/data/cacm] [--out benchmarks/results/teacher-dtype.json]

Why: ``load_teacher`` puts the teacher in bf16 where ``pick_dtype`` picks bf16 for the backbone (CPUs with AMX
tiles or AVX512-BF16). That is only right if the vectors stay in the same space: an index embedded in one type must serve
queries made in the other. So this embeds CACM's documents and queries in both types (the product's loader, rows
normalised in float32 as ``encode_teacher`` does), scores the four pairings by exact search (nDCG@10,
pytrec_eval), and times the two encodes: the whole corpus at batch 64, and search-box queries (held-out pool
records of ≤ 16 words) at batch 1 and 16 on one and on all threads. CACM is an evaluation set: nothing here is
chosen on it; the type was picked by the hardware rule before this ran. Timings are a benchmark, never a test.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from retrieval_kit.bench.datasets import load_beir
from retrieval_kit.bench.metrics import evaluate_run
from retrieval_kit.machine import machine_info
from retrieval_kit.models.encoder import _normalise

DATA = Path(os.environ.get("RKIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _teacher(dtype: str):
    from retrieval_kit.models.teacher import load_teacher

    os.environ["RKIT_DTYPE"] = dtype  # the product's own switch: load_teacher applies it
    return load_teacher(device="cpu")


def _embed(model, texts: list[str], batch: int) -> np.ndarray:
    vecs = model.encode(texts, batch_size=batch, normalize_embeddings=False, convert_to_numpy=True)
    return _normalise(vecs.astype(np.float32))  # as encode_teacher does


def _ndcg(docs, doc_ids, queries, query_ids, qrels) -> float:
    scores = queries @ docs.T
    run = {}
    for i, qid in enumerate(query_ids):
        top = np.argsort(-scores[i])[:100]
        run[qid] = {doc_ids[j]: float(scores[i, j]) for j in top}
    return round(evaluate_run(run, qrels, ["ndcg@10"])["ndcg@10"], 4)


def _time(model, texts: list[str], batch: int, rounds: int) -> float:
    _embed(model, texts[:batch], batch)  # warm
    started = time.perf_counter()
    for r in range(rounds):
        start = (r * batch) % (len(texts) - batch)
        _embed(model, texts[start:start + batch], batch)
    return round(1000 * (time.perf_counter() - started) / rounds, 1)


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA / "cacm")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/teacher-dtype.json"))
    args = ap.parse_args()
    data = load_beir(args.data)  # the judged queries, the corpus in BEIR's "title text" form
    texts, queries = data.doc_texts(), list(data.queries.values())
    pool = [json.loads(line)["text"] for line in open(DATA / "train_queries" / "mixed.jsonl", encoding="utf-8")]
    short = [q for q in pool[20_000:21_000] if len(q.split()) <= 16]  # held out, never an evaluation set

    threads = torch.get_num_threads()
    out: dict = {"machine": machine_info(), "documents": len(texts), "queries": len(queries), "types": {}}
    vectors = {}
    for dtype in ("float32", "bfloat16"):
        model = _teacher(dtype)
        started = time.perf_counter()
        vectors[dtype] = (_embed(model, texts, 64), _embed(model, queries, 32))
        row = {"corpus_s": round(time.perf_counter() - started, 1)}
        for n in sorted({1, threads}):
            torch.set_num_threads(n)
            for batch in (1, 16):
                row[f"queries_b{batch}_t{n}_ms"] = _time(model, short, batch, 40 if batch == 1 else 15)
        torch.set_num_threads(threads)
        out["types"][dtype] = row
        print(dtype, row, flush=True)
    doc_ids, query_ids, qrels = data.doc_ids, list(data.queries), data.qrels
    out["ndcg@10"] = {f"documents {d} · queries {q}": _ndcg(vectors[d][0], doc_ids, vectors[q][1], query_ids, qrels)
                      for d in vectors for q in vectors}
    cos = (vectors["float32"][0] * vectors["bfloat16"][0]).sum(1)
    out["document_cosine_bf16_vs_fp32"] = {"min": round(float(cos.min()), 5), "mean": round(float(cos.mean()), 5)}
    print(json.dumps(out["ndcg@10"], indent=1), out["document_cosine_bf16_vs_fp32"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
