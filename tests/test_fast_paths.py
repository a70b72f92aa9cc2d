"""The fast paths change no result (issue: performance): models load when a search needs them, not before.

A saved adapter loads its backbone and teacher on first use: a teacher-mode or BM25 search never pays for the
backbone, a bad flag or a missing path is reported before torch is even imported, and an explained search runs
the backbone's encode pass once.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from retrieval_kit.models import build_encoder, load_encoder, read_adapter_config
from retrieval_kit.paths import DEFAULT_ADAPTER, SAMPLE_CORPUS

QUERIES = ["how do I rotate the API keys?", "which license allows commercial use?"]


@pytest.fixture(scope="module")
def eager():
    """The shipped adapter built the old way: backbone and teacher loaded first, then the weights."""
    from safetensors.torch import load_file

    encoder = build_encoder(read_adapter_config(DEFAULT_ADAPTER), device="cpu")
    encoder.load_state_dict(load_file(str(DEFAULT_ADAPTER / "adapter.safetensors")), strict=False)
    return encoder


@pytest.fixture(scope="module")
def sample_index(tmp_path_factory, encoder):
    from retrieval_kit.indexer import IndexSettings, index_corpus

    folder = tmp_path_factory.mktemp("lazy") / "sample"
    index_corpus(SAMPLE_CORPUS, folder, lambda: encoder, "default", IndexSettings())
    return folder


def test_a_saved_adapter_loads_no_model_until_one_is_needed(eager):
    lazy = load_encoder(device="cpu")
    assert lazy.loaded() == {"backbone": False, "teacher": False}
    assert lazy.fingerprint == eager.fingerprint  # the adapter's identity needs no model
    assert lazy.doc_fingerprint("teacher") == eager.doc_fingerprint("teacher")
    assert lazy.describe()["dim"] == 384 and lazy.loaded()["teacher"] is False

    teacher = lazy.encode_queries(QUERIES, "teacher")
    assert lazy.loaded() == {"backbone": False, "teacher": True}
    np.testing.assert_allclose(teacher, eager.encode_queries(QUERIES, "teacher"), atol=1e-6)

    fused = lazy.encode_queries(QUERIES, "fused")
    assert lazy.loaded() == {"backbone": True, "teacher": True}
    np.testing.assert_allclose(fused, eager.encode_queries(QUERIES, "fused"), atol=1e-5)
    assert lazy.decode(QUERIES[:1], max_new_tokens=6) == eager.decode(QUERIES[:1], max_new_tokens=6)
    # what a server does before it says it is ready
    assert load_encoder(device="cpu").load_models().loaded() == {"backbone": True, "teacher": True}


def test_a_teacher_or_bm25_search_never_loads_the_backbone(sample_index):
    from retrieval_kit.search import Retriever

    with Retriever.attach(sample_index, load_encoder(device="cpu")) as retriever:
        hits = retriever.search(QUERIES, k=3, query_mode="bm25")
        assert hits[0].hits and retriever.encoder.loaded() == {"backbone": False, "teacher": False}
        retriever.search(QUERIES, k=3, query_mode="teacher")
        assert retriever.encoder.loaded() == {"backbone": False, "teacher": True}
        retriever.search(QUERIES, k=3, query_mode="hybrid", hybrid=_lexical_hybrid())
        assert retriever.encoder.loaded()["backbone"] is False
        retriever.search(QUERIES, k=3, query_mode="hybrid")  # the default recipe carries the generative vector
        assert retriever.encoder.loaded()["backbone"] is True


def _lexical_hybrid():
    from retrieval_kit.search import HybridRecipe

    return HybridRecipe.parse("bm25=1,teacher=1")


def test_an_explained_search_encodes_each_query_once(sample_index, monkeypatch):
    from retrieval_kit.search import Retriever

    with Retriever.attach(sample_index, load_encoder(device="cpu")) as retriever:
        encoder = retriever.encoder
        passes = []
        real = encoder.compress_states
        monkeypatch.setattr(encoder, "compress_states", lambda *a, **k: passes.append(1) or real(*a, **k))
        fused = retriever.search(QUERIES, k=3, query_mode="fused", explain=True, explain_tokens=6)
        assert len(passes) == 1  # one batch, one encode pass: the decode reads the search's soft prompts
        # same text as decoding from scratch
        assert [r.explanation for r in fused] == encoder.decode(QUERIES, max_new_tokens=6)
        passes.clear()
        retriever.search(QUERIES, k=3, query_mode="teacher", explain=True, explain_tokens=6)
        assert len(passes) == 1  # the teacher search made no soft prompt: the decode encodes once


BAD_INPUT = r"""
import json, sys
from typer.testing import CliRunner
from rkit_cli.main import app
cases = {
    "missing corpus": ["index", "/no/such/folder", "--name", "x"],
    "empty corpus": ["index", sys.argv[1], "--name", "x"],
    "bad name": ["index", sys.argv[1], "--name", "../escape"],
    "missing index": ["search", "q", "--index", "nope"],
    "bad k": ["search", "q", "--index", "nope", "-k", "0"],
    "bad mode": ["search", "q", "--index", "nope", "--query-mode", "magic"],
    "bad signals": ["search", "q", "--index", "nope", "--signals", "bm25=x"],
}
codes = {name: CliRunner().invoke(app, args).exit_code for name, args in cases.items()}
print(json.dumps({"codes": codes, "loaded": sorted(m for m in ("torch", "transformers", "sentence_transformers",
                                                               "qdrant_client") if m in sys.modules)}))
"""


def test_bad_input_is_reported_before_any_model_stack_is_imported(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = subprocess.run([sys.executable, "-c", BAD_INPUT, str(empty)], capture_output=True, text=True,
                         cwd=tmp_path, env={"RKIT_INDEX_HOME": str(tmp_path / "indexes"), "PATH": "/usr/bin:/bin"},
                         timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(code == 2 for code in report["codes"].values()), report
    assert report["loaded"] == [], report  # nothing heavy imported to say the input is wrong


def test_the_shared_template_opening_is_computed_once_and_changes_no_vector(encoder, monkeypatch):
    queries = QUERIES + ["a", "what is the CAP theorem and why does it matter for a database cluster under partition?"]
    fast, fast_soft = encoder.encode(queries, batch_size=4, with_soft_prompts=True)
    assert encoder._template_opening() is not None  # SmolLM2's template opens every prompt alike
    monkeypatch.setattr(encoder, "_template_opening", lambda: None)  # the whole prompt runs, as before
    full, full_soft = encoder.encode(queries, batch_size=4, with_soft_prompts=True)
    np.testing.assert_allclose(fast, full, atol=2e-5)
    np.testing.assert_allclose(fast_soft, full_soft, rtol=1e-3, atol=1e-3)


def assert_same_gradient(got, want):
    """Equal up to float32 summation order. A differently padded or grouped forward sums in another order (the
    matmul blocking follows the shapes), which moves a float32 gradient by ~1e-4 of its own scale (measured on a
    2-core AMD EPYC: 1.5e-5 on entries up to 0.23, norm error 5e-5), so the bounds are relative to the gradient's
    scale; a mis-weighted group or a position scored twice is off by percents."""
    import torch

    scale = float(want.abs().max())
    assert float((got - want).norm() / want.norm()) < 1e-3
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * scale)


def test_the_reconstruction_loss_scores_target_positions_only_and_equals_the_full_logits_loss(encoder):
    import torch
    import torch.nn.functional as F

    from retrieval_kit.train.loop import tokenize_targets

    soft = encoder(**encoder.tokenize_queries(QUERIES))["soft_prompt"]
    targets = tokenize_targets(encoder.tokenizer, ["Rotate them monthly.", "The MIT license, and it is short."], 32,
                               encoder.device)
    fast = encoder.recon_loss(soft, targets["target_ids"], targets["target_mask"])
    # reference: every position through the causal LM head, padding ignored by label -100, after what the backbone
    # reads before an answer (the soft prompt, in the chat template's user turn for a chat-format adapter)
    prefix = encoder.recon_inputs(soft)
    n = prefix.shape[1]
    inputs = torch.cat([prefix, encoder.backbone.get_input_embeddings()(targets["target_ids"])], dim=1)
    mask = torch.cat([targets["target_mask"].new_ones(2, n), targets["target_mask"]], dim=1)
    logits = encoder.backbone(inputs_embeds=inputs, attention_mask=mask).logits[:, n - 1 : -1]
    labels = targets["target_ids"].masked_fill(targets["target_mask"] == 0, -100)
    full = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    assert targets["target_mask"].sum() < targets["target_mask"].numel()  # the batch is padded: the case that matters
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    (grad_fast,) = torch.autograd.grad(fast, soft, retain_graph=True)
    (grad_full,) = torch.autograd.grad(full, soft)
    assert_same_gradient(grad_fast, grad_full)


def test_reconstruction_in_length_groups_equals_one_padded_forward(encoder):
    """A CPU reconstructs in length groups of 4, a GPU the whole batch at once (train/loop.recon_group): the
    same loss and soft-prompt gradient either way, on a batch whose responses differ in length."""
    import torch

    from retrieval_kit.train.loop import RECON_GROUP, recon_by_length, recon_group, tokenize_targets

    queries = QUERIES + ["a", "what is the CAP theorem and why does it matter for a database cluster?"] * 2
    soft = encoder(**encoder.tokenize_queries(queries))["soft_prompt"]
    answers = ["Rotate them monthly.", "The MIT license, and it is short.", "Yes.",
               "Consistency, availability and partition tolerance: a cluster keeps two when the network splits."]
    answers = (answers * 3)[: len(queries)]
    targets = tokenize_targets(encoder.tokenizer, answers, 32, encoder.device)
    assert len(queries) > RECON_GROUP and len(set(targets["target_mask"].sum(-1).tolist())) > 2
    grouped = recon_by_length(encoder, soft, targets["target_ids"], targets["target_mask"], RECON_GROUP)
    whole = recon_by_length(encoder, soft, targets["target_ids"], targets["target_mask"], len(queries))
    torch.testing.assert_close(grouped, whole, rtol=1e-5, atol=1e-5)
    (g_grouped,) = torch.autograd.grad(grouped, soft, retain_graph=True)
    (g_whole,) = torch.autograd.grad(whole, soft)
    assert_same_gradient(g_grouped, g_whole)
    assert recon_group(torch.device("cpu"), 16) == RECON_GROUP and recon_group(torch.device("cuda"), 16) == 16


def test_first_token_weight_is_a_weighted_mean_of_the_token_losses_in_any_grouping(encoder):
    """--first-token-weight W: the first --first-tokens answer tokens of every row count W times in the training
    L_recon. Reference: per-token cross-entropies from one padded forward through the causal LM head, averaged by
    hand with those weights; the length-grouped CPU path must give the same loss and gradient."""
    import torch
    import torch.nn.functional as F

    from retrieval_kit.train.loop import RECON_GROUP, TrainConfig, make_batch, recon_by_length

    queries = QUERIES + ["a", "what is the CAP theorem and why does it matter for a database cluster?"] * 2
    answers = ["Rotate them monthly.", "The MIT license, and it is short.", "Yes.",
               "Consistency, availability and partition tolerance: a cluster keeps two when the network splits."]
    answers = (answers * 3)[: len(queries)]
    cfg = TrainConfig(max_target_tokens=32, first_token_weight=3.0, first_tokens=4)
    targets = torch.nn.functional.normalize(torch.randn(len(queries), 384), dim=-1)
    batch = make_batch(encoder, queries, answers, targets, cfg, weighted=True)
    ids, mask, weights = batch["target_ids"], batch["target_mask"], batch["target_weights"]
    # weights: 3 on each row's first 4 tokens, 1 after, 0 on padding ("Yes." + eos is 3 tokens: no 1s at all)
    assert weights[:, :4][mask[:, :4].bool()].unique().tolist() == [3.0]
    assert weights[:, 4:][mask[:, 4:].bool()].unique().tolist() == [1.0]
    assert float(weights[mask == 0].abs().sum()) == 0.0
    assert "target_weights" not in make_batch(encoder, queries, answers, targets, cfg)  # validation: plain mean

    soft = encoder(**encoder.tokenize_queries(queries))["soft_prompt"]
    prefix = encoder.recon_inputs(soft)
    n = prefix.shape[1]
    inputs = torch.cat([prefix, encoder.backbone.get_input_embeddings()(ids)], dim=1)
    full_mask = torch.cat([mask.new_ones(len(ids), n), mask], dim=1)
    logits = encoder.backbone(inputs_embeds=inputs, attention_mask=full_mask).logits[:, n - 1 : -1]
    token_ce = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
    reference = (token_ce * weights).sum() / weights.sum()
    plain = (token_ce * mask).sum() / mask.sum()
    grouped = recon_by_length(encoder, soft, ids, mask, RECON_GROUP, weights)
    whole = recon_by_length(encoder, soft, ids, mask, len(queries), weights)
    # float32 sums in another order: ~2e-5 relative apart; a mis-weighting moves the loss by more than 1e-3
    torch.testing.assert_close(grouped, reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(whole, reference, rtol=1e-4, atol=1e-4)
    assert abs(float(reference - plain)) > 1e-2  # the weights changed the loss: the check can fail
    (g_grouped,) = torch.autograd.grad(grouped, soft, retain_graph=True)
    (g_reference,) = torch.autograd.grad(reference, soft)
    assert_same_gradient(g_grouped, g_reference)

