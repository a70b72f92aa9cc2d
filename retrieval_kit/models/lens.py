"""Lenses: what a query's generative embedding holds, read without trusting the decode (the paper's tools).

- Logit lens: the backbone's own LM head applied to each special token's final state — the tokens the frozen
  model would say next at that position. Needs no training to be meaningful: it shows what the states carry
  even when the soft prompt does not yet decode faithfully.
- Latent (response) lens: the answers nearest, in the teacher's space, to the query's generative embedding, from
  an answer bank stored with the adapter (training-pool queries with the backbone's answers and their teacher
  vectors, size-capped; never evaluation data). It says "this embedding sits where answers like these sit".

One extra backbone pass over the queries (the decode that comes with an explanation costs ~50× more).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ModelError

BANK_VECTORS = "answer_bank.safetensors"
BANK_TEXTS = "answer_bank.jsonl"
BANK_CAP = 2000  # answers kept: ~1.5 MB of fp16 vectors and ~0.8 MB of text at 384-d
BANK_CHARS = 400  # an answer is cut here in the bank (the lens shows a snippet, not the whole answer)


@dataclass
class AnswerBank:
    queries: list[str]
    answers: list[str]
    vectors: np.ndarray  # (N, D) float32, unit rows: teacher(answer)

    def nearest(self, vectors: np.ndarray, k: int) -> list[list[dict]]:
        if not len(self.answers) or k < 1:
            return [[] for _ in vectors]
        sims = vectors @ self.vectors.T
        top = np.argsort(-sims, axis=1)[:, :k]
        return [[{"query": self.queries[j], "answer": self.answers[j], "cos": round(float(row[j]), 4)} for j in idx]
                for row, idx in zip(sims, top)]


def save_answer_bank(folder: str | Path, queries: Sequence[str], answers: Sequence[str], vectors: np.ndarray,
                     cap: int = BANK_CAP, seed: int = 0) -> int:
    """Write (at most ``cap``, a seeded sample) query/answer pairs and their teacher vectors into an adapter folder.
    Returns how many were written (0 writes nothing)."""
    from safetensors.numpy import save_file

    if not (len(queries) == len(answers) == len(vectors)):
        raise ModelError(f"answer bank: {len(queries)} queries, {len(answers)} answers, {len(vectors)} vectors")
    keep = [i for i, a in enumerate(answers) if a.strip()]
    if len(keep) > cap:
        keep = sorted(np.random.default_rng(seed).choice(keep, cap, replace=False).tolist())
    if not keep:
        return 0
    folder = Path(folder)
    rows = np.asarray(vectors, dtype=np.float32)[keep]
    rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    save_file({"vectors": rows.astype(np.float16)}, str(folder / BANK_VECTORS))
    with open(folder / BANK_TEXTS, "w", encoding="utf-8") as f:
        for i in keep:
            f.write(json.dumps({"query": queries[i], "answer": " ".join(answers[i].split())[:BANK_CHARS]},
                               ensure_ascii=False) + "\n")
    shutil.copymode(folder / BANK_TEXTS, folder / BANK_VECTORS)  # safetensors' 0600: the umask's mode instead
    return len(keep)


def load_answer_bank(folder: str | Path | None) -> AnswerBank | None:
    """The adapter folder's answer bank, or None when it has none (adapters trained before banks existed)."""
    if folder is None:
        return None
    folder = Path(folder)
    if not (folder / BANK_VECTORS).is_file() or not (folder / BANK_TEXTS).is_file():
        return None
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        vectors = load_file(str(folder / BANK_VECTORS))["vectors"].astype(np.float32)
        rows = [json.loads(line) for line in (folder / BANK_TEXTS).read_text(encoding="utf-8").splitlines() if line]
    except (OSError, KeyError, ValueError, SafetensorError) as exc:
        raise ModelError(f"{folder}: unreadable answer bank ({exc})") from exc
    if len(rows) != len(vectors):
        raise ModelError(f"{folder}: answer bank has {len(rows)} texts for {len(vectors)} vectors")
    return AnswerBank([r["query"] for r in rows], [r["answer"] for r in rows], vectors)


def answer_bank(encoder) -> AnswerBank | None:
    """The encoder's adapter folder's bank, read once per encoder."""
    memo = encoder.__dict__.setdefault("_answer_bank", {})
    if "bank" not in memo:
        memo["bank"] = load_answer_bank(getattr(encoder, "folder", None))
    return memo["bank"]


@torch.no_grad()
def lenses(encoder, queries: Sequence[str], top_k: int = 5, answers: int = 3, batch_size: int = 16) -> list[dict]:
    """Per query: ``logit`` (per special token: its top-k next tokens and probabilities), ``words`` (the tokens
    with the most probability summed over the compression tokens: the lens at a glance) and ``latent`` (the
    nearest bank answers to the generative embedding; None without a bank)."""
    bank = answer_bank(encoder)
    tok = encoder.tokenizer
    names = [f"t{i + 1}" for i in range(encoder.config.n_thought)] + [f"c{i + 1}" for i in range(encoder.config.n_compress)]
    head = encoder.backbone.get_output_embeddings()
    out: list[dict] = []
    for start in range(0, len(queries), batch_size):
        batch = encoder.tokenize_queries(list(queries[start : start + batch_size]))
        states = encoder.special_states(**batch)
        weight = head.weight
        probs = F.softmax(head(states.to(weight.dtype)).float(), dim=-1)  # (B, T+C, V)
        p_top, i_top = probs.topk(top_k, dim=-1)
        # words: probability mass summed over the compression tokens; tokens without a letter or digit (",", ".")
        # and case/space variants of one word ("License", " license") counted together
        mass = probs[:, -encoder.config.n_compress :].sum(1)
        m_top, m_idx = mass.topk(20 * top_k, dim=-1)
        soft = encoder.soft_prompt(states[:, -encoder.config.n_compress :])
        emb = F.normalize(encoder.embed_states(soft).float(), dim=-1).cpu().numpy()
        near = bank.nearest(emb, answers) if bank is not None else [None] * len(emb)
        for b in range(len(states)):
            logit = [{"position": names[j],
                      "top": [[tok.decode([int(i)]), round(float(p), 4)] for p, i in zip(p_top[b, j], i_top[b, j])]}
                     for j in range(states.shape[1])]
            words: dict[str, float] = {}
            for m, i in zip(m_top[b].tolist(), m_idx[b].tolist()):
                word = tok.decode([i]).strip().lower()
                if any(ch.isalnum() for ch in word):
                    words[word] = words.get(word, 0.0) + m / encoder.config.n_compress
            words = sorted(words.items(), key=lambda kv: -kv[1])[:top_k]
            out.append({"logit": logit, "words": [[w, round(p, 4)] for w, p in words], "latent": near[b]})
    return out
