"""Lenses (models/lens.py): the logit lens reads the query's topic off the special tokens' states, the latent
lens finds the nearest bank answer; both reach `rkit explain`, `rkit search --explain --json` and the answer
bank round-trips through an adapter folder."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from retrieval_kit.errors import ModelError
from retrieval_kit.models import load_adapter
from retrieval_kit.models.lens import BANK_TEXTS, BANK_VECTORS, lenses, load_answer_bank, save_answer_bank
from retrieval_kit.paths import DEFAULT_ADAPTER

LICENSE_Q = "which license allows commercial use without sharing source"
BANK = [  # (query, answer): one answer per topic, the license one is what the license query must land near
    ("What is the capital of France?", "The capital of France is Paris, a city on the Seine."),
    ("How do I bake bread?", "Mix flour, water, yeast and salt, let the dough rise, then bake it at 220 °C."),
    ("Which open-source licenses are permissive?",
     "Permissive licenses such as MIT, BSD and Apache 2.0 allow commercial use and do not require you to "
     "release your source code."),
    ("Who won the 2010 football World Cup?", "Spain won the 2010 FIFA World Cup, beating the Netherlands 1-0."),
    ("How does photosynthesis work?", "Plants turn light, water and carbon dioxide into sugar and oxygen."),
]


@pytest.fixture(scope="module")
def banked(tmp_path_factory, encoder):
    """A copy of the shipped adapter with a small answer bank written into it."""
    folder = tmp_path_factory.mktemp("adapter") / "banked"
    shutil.copytree(DEFAULT_ADAPTER, folder, ignore=shutil.ignore_patterns(BANK_TEXTS, BANK_VECTORS))
    vectors = encoder.encode_teacher([a for _, a in BANK])
    assert save_answer_bank(folder, [q for q, _ in BANK], [a for _, a in BANK], vectors) == len(BANK)
    return load_adapter(folder, device="cpu")


def test_logit_lens_reads_the_query_topic(encoder):
    (lens,) = lenses(encoder, [LICENSE_Q], top_k=5)
    n = encoder.config.n_thought + encoder.config.n_compress
    names = [f"t{i + 1}" for i in range(encoder.config.n_thought)] + [f"c{i + 1}" for i in range(encoder.config.n_compress)]
    assert [row["position"] for row in lens["logit"]] == names and len(names) == n
    for row in lens["logit"]:
        probs = [p for _, p in row["top"]]
        assert probs == sorted(probs, reverse=True) and len(probs) == 5
    words = [w for w, _ in lens["words"]]
    # the compression tokens' states carry the query's topic: its content words lead the lens
    assert {"commercial", "license"} & set(words), words
    assert all(any(ch.isalnum() for ch in w) for w in words)  # punctuation-only tokens are filtered out
    other = lenses(encoder, ["what is the capital of france"])[0]
    assert [w for w, _ in other["words"]] != words  # a different query, a different reading


def test_latent_lens_finds_the_nearest_bank_answer(banked):
    lens, = lenses(banked, [LICENSE_Q], answers=3)
    top = lens["latent"]
    assert len(top) == 3 and top[0]["query"] == BANK[2][0], top
    cos = [t["cos"] for t in top]
    assert cos == sorted(cos, reverse=True) and cos[0] > cos[-1]
    # without a bank the latent lens says so (None); the logit lens still works
    bare = banked.folder.parent / "bare"
    shutil.copytree(DEFAULT_ADAPTER, bare, ignore=shutil.ignore_patterns(BANK_TEXTS, BANK_VECTORS))
    plain, = lenses(load_adapter(bare, device="cpu"), [LICENSE_Q])
    assert plain["latent"] is None and plain["logit"]


def test_answer_bank_round_trip_and_bad_banks(tmp_path):
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(50, 8)).astype(np.float32)
    answers = [f"answer {i}" if i % 10 else "  " for i in range(50)]  # blank answers are never banked
    n = save_answer_bank(tmp_path, [f"q{i}" for i in range(50)], answers, vecs, cap=20, seed=1)
    bank = load_answer_bank(tmp_path)
    assert n == 20 and len(bank.answers) == 20 and all(a.strip() for a in bank.answers)
    idx = [int(q[1:]) for q in bank.queries]
    assert idx == sorted(idx)  # a seeded sample, kept in pool order
    np.testing.assert_allclose(np.linalg.norm(bank.vectors, axis=1), 1.0, atol=1e-3)
    expected = vecs[idx] / np.linalg.norm(vecs[idx], axis=1, keepdims=True)
    np.testing.assert_allclose(bank.vectors, expected, atol=2e-3)  # stored as fp16
    assert load_answer_bank(tmp_path / "none") is None
    with pytest.raises(ModelError, match="queries"):
        save_answer_bank(tmp_path, ["q"], ["a", "b"], vecs[:2])
    (tmp_path / BANK_TEXTS).write_text(json.dumps({"query": "q", "answer": "a"}) + "\n")
    with pytest.raises(ModelError, match="1 texts for 20 vectors"):
        load_answer_bank(tmp_path)
    (tmp_path / BANK_VECTORS).write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match="unreadable answer bank"):
        load_answer_bank(tmp_path)
