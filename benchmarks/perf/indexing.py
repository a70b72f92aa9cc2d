"""Stage 4: `rkit index` end to end (a new process: start-up, models, reading, chunking, embedding, BM25, FAISS,
SQLite) on N one-chunk documents, against the bare teacher ``encode()`` of the same texts in one call (what a user
of sentence-transformers + FAISS would write; the model load is not in the peer's time, so the ratio is strict).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .common import RKIT, Figure, check, stats
from .data import corpus_texts

BARE = '''import json, sys, time
from sentence_transformers import SentenceTransformer

model = SentenceTransformer(sys.argv[1], device="cpu")
texts = [json.loads(line)["text"] for line in open(sys.argv[2], encoding="utf-8")]
t0 = time.perf_counter()
vectors = model.encode(texts, batch_size=64, normalize_embeddings=True)
print(json.dumps({"encode_s": time.perf_counter() - t0, "shape": list(vectors.shape)}))
'''


def run(quick: bool, workdir: Path, log) -> list[Figure]:
    from retrieval_kit.models.teacher import resolve_teacher

    n = 2_000 if quick else 10_000
    corpus = workdir / f"index-corpus-{n}"
    corpus.mkdir(parents=True, exist_ok=True)
    docs = corpus / "docs.jsonl"
    if not docs.is_file():
        with docs.open("w", encoding="utf-8") as out:
            for i, text in enumerate(corpus_texts(n)):
                out.write(json.dumps({"_id": f"d{i}", "text": text}) + "\n")
    script = workdir / "bare_encode.py"
    script.write_text(BARE)
    homes = workdir / "indexes"
    repeat = 1 if quick else 2
    ours_s, peer_s, peer_wall, counts = [], [], [], {}
    for r in range(repeat):
        shutil.rmtree(homes / "indexing", ignore_errors=True)
        log(f"indexing: rkit index {n:,} documents ({r + 1}/{repeat})")
        t0 = time.perf_counter()
        out = subprocess.run([str(RKIT), "index", str(corpus), "--name", "indexing", "--index-dir", str(homes), "--json"],
                             capture_output=True, text=True)
        ours_s.append(time.perf_counter() - t0)
        if out.returncode != 0:
            raise RuntimeError(f"rkit index failed: {out.stderr.strip()[-300:]}")
        report = json.loads(out.stdout)
        counts = {"documents": report["total_documents"], "chunks": report["total_chunks"],
                  "embed_s_inside_rkit": report["seconds"]}
        log(f"indexing: bare teacher encode of the same {n:,} texts")
        t0 = time.perf_counter()
        bare = subprocess.run([sys.executable, str(script), resolve_teacher("minilm"), str(docs)],
                              capture_output=True, text=True, check=True)
        peer_wall.append(time.perf_counter() - t0)
        peer_s.append(json.loads(bare.stdout.strip().splitlines()[-1])["encode_s"])
    ours, peer, wall = stats(ours_s), stats(peer_s), stats(peer_wall)
    ratio = ours.median / peer.median
    met = check(ratio, "≤ 1.2")
    why = "" if met else (f"rkit's process start-up and model load (~{wall.median - peer.median:.0f} s, in the "
                          "peer's wall time too but not in its encode time) weigh on a corpus this small")
    return [Figure("indexing", f"rkit index, {counts.get('chunks', n):,} chunks end to end", round(ours.median, 2), "s",
                   round(peer.median, 2), "teacher encode() of the same texts (model already loaded)",
                   round(ratio, 3), "≤ 1.2", met, why,
                   {"ours": ours.as_dict(), "peer_encode": peer.as_dict(), "peer_process_wall": wall.as_dict(),
                    "ratio_vs_peer_process": round(ours.median / wall.median, 3), **counts,
                    "ratio": "ours / peer encode", "chunks_per_s": round(counts.get("chunks", n) / ours.median, 1)})]
