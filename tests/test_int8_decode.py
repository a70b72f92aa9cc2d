"""Int8 decode steps (models/int8_decode.py): faster one-row products for `--explain`, never for an encode."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from retrieval_kit.models import int8_decode, load_encoder
from retrieval_kit.train.report import rouge_l_f1

QUERIES = ["how do I rotate the API keys?", "what causes the northern lights",
           "error E1042 when mounting the backup volume", "best way to learn a second language as an adult"]


def _layer(dtype=torch.bfloat16) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(576, 1536, bias=True).to(dtype).requires_grad_(False)


def test_only_few_row_products_inside_steps_take_the_int8_path():
    layer = _layer()
    one, eight = torch.randn(1, 1, 576, dtype=torch.bfloat16), torch.randn(2, 4, 576, dtype=torch.bfloat16)
    full_one, full_eight = F.linear(one, layer.weight, layer.bias), F.linear(eight, layer.weight, layer.bias)
    with int8_decode.steps(layer) as on:
        assert on
        inside_one, inside_eight = layer(one), layer(eight)
    assert isinstance(layer, nn.Linear) and layer.weight.dtype == torch.bfloat16  # still the layer it was
    # one row: the int8 weights, close to the bf16 product but not it (the path really changed)
    assert not torch.equal(inside_one, full_one)
    rel = ((inside_one - full_one).float().norm() / full_one.float().norm()).item()
    assert rel < 0.02, rel
    # eight rows (a prefix, a batch of 8), and anything after the block: the bf16 weights, bit for bit
    assert torch.equal(inside_eight, full_eight)
    assert torch.equal(layer(one), full_one)


def test_another_thread_using_the_model_meanwhile_keeps_the_bf16_weights():
    """The server encodes on its request threads while its explain thread decodes with the same backbone."""
    layer = _layer()
    x = torch.randn(1, 576, dtype=torch.bfloat16)
    seen, entered, done = {}, threading.Event(), threading.Event()

    def other():
        entered.wait()
        seen["out"] = layer(x)
        done.set()

    worker = threading.Thread(target=other)
    worker.start()
    with int8_decode.steps(layer):
        entered.set()
        done.wait(60)
        mine = layer(x)
    worker.join()
    assert torch.equal(seen["out"], F.linear(x, layer.weight, layer.bias))
    assert not torch.equal(mine, seen["out"])


def test_float32_weights_step_through_int8_with_bf16_rows_and_answer_in_float32():
    """A CPU without bf16 in hardware runs a float32 backbone: its one-row steps read a quarter of the bytes (the
    kernel takes bf16 rows; float32 rows are 6-8x slower through it), and the model around them stays float32."""
    layer = _layer(torch.float32)
    one, eight = torch.randn(1, 1, 576), torch.randn(2, 4, 576)
    full_one = F.linear(one, layer.weight, layer.bias)
    with int8_decode.steps(layer) as on:
        assert on
        inside_one, inside_eight = layer(one), layer(eight)
    assert layer.weight.dtype == torch.float32 and inside_one.dtype == torch.float32
    assert not torch.equal(inside_one, full_one)
    rel = ((inside_one - full_one).norm() / full_one.norm()).item()
    assert rel < 0.02, rel
    assert torch.equal(inside_eight, F.linear(eight, layer.weight, layer.bias)) and torch.equal(layer(one), full_one)


def test_half_weights_are_left_alone():
    layer = _layer(torch.float16)
    with int8_decode.steps(layer) as on:
        assert not on
    assert not hasattr(layer, "int8_weights")


class _Block(nn.Module):
    """An attention's q/k/v and an MLP's gate/up by their Llama names, and a bias-free output head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(576, 576), nn.Linear(576, 192), nn.Linear(576, 192)
        self.gate_proj, self.up_proj = nn.Linear(576, 1536, bias=False), nn.Linear(576, 1536, bias=False)
        self.lm_head = nn.Linear(576, 4096, bias=False)
        self.to(torch.bfloat16).requires_grad_(False)

    def get_output_embeddings(self):
        return self.lm_head


def _alone(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The layer's product with its own int8 rows (what it computed before siblings shared one matrix)."""
    wq, scale = layer.int8_weights
    y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), wq.contiguous(), scale.contiguous())
    return y.reshape(*x.shape[:-1], -1) + (0 if layer.bias is None else layer.bias)


def test_siblings_share_one_product_only_for_the_same_input_and_give_the_same_numbers():
    block, x, other = _Block(), torch.randn(1, 1, 576, dtype=torch.bfloat16), torch.randn(1, 1, 576, dtype=torch.bfloat16)
    with int8_decode.steps(block):
        assert block.k_proj.int8_group[0] is block.q_proj.int8_group[0]  # one int8 matrix for q, k and v
        calls = []
        real = torch._weight_int8pack_mm
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(a[1].shape[0]) or real(*a))
            q, k, v = block.q_proj(x), block.k_proj(x), block.v_proj(x)
            gate, up = block.gate_proj(x), block.up_proj(x)
            assert calls == [960, 3072]  # two kernels where there were five
            k_other = block.k_proj(other)  # another input: its own rows, not q's leftovers
            assert calls[-1] == 192
        for got, layer in ((q, block.q_proj), (k, block.k_proj), (v, block.v_proj), (gate, block.gate_proj),
                           (up, block.up_proj)):
            assert got.is_contiguous() and torch.equal(got, _alone(layer, x))
        assert torch.equal(k_other, _alone(block.k_proj, other))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_head_shortlists_in_four_bits_and_picks_with_the_models_own_weights(dtype):
    block = _Block().to(dtype)
    x = torch.randn(1, 1, 576, dtype=dtype)
    full = F.linear(x, block.lm_head.weight)
    with int8_decode.steps(block):
        assert not hasattr(block.lm_head, "int8_weights")  # 4 bits, not 8
        ours = block.lm_head(x)
        rows4 = torch.randn(2, 4, 576, dtype=dtype)
        assert torch.equal(block.lm_head(rows4), F.linear(rows4, block.lm_head.weight))  # > 4 rows: its weights
    assert torch.equal(block.lm_head(x), full)  # outside: its weights, bit for bit
    pick = int(ours.argmax())
    assert ours.dtype == dtype and pick == int(full.argmax())  # the pick is the model's own head's …
    exact = torch.einsum("k,k->", x[0, 0], block.lm_head.weight[pick])  # … scored with it (to float rounding)
    assert torch.isclose(ours[0, 0, pick].float(), exact.float(), rtol=1e-5, atol=0), (ours[0, 0, pick], exact)
    assert not torch.equal(ours, full)  # the rest: the 4-bit scores (the path really changed)
    rel = ((ours - full).float().norm() / full.float().norm()).item()
    assert rel < 0.15, rel


def _same_reading(ours: list[str], full: list[str]) -> bool:
    """Each int8 decode reads like the full decode of its own query (16 tokens: ROUGE-L 0.5 on average, where the
    weight type alone moves that much), and far more than like another query's."""
    own = np.mean([rouge_l_f1(a, b) for a, b in zip(ours, full)])
    other = np.mean([rouge_l_f1(a, b) for i, a in enumerate(ours) for j, b in enumerate(full) if i != j])
    return own > 0.4 and own > 2 * other


@pytest.fixture(scope="module", params=["bfloat16", "float32"])
def step_encoder(request):
    """The backbone in each weight type a decoding process loads: bf16 on a CPU that multiplies it in hardware,
    float32 elsewhere (models.backbone.pick_dtype)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RKIT_DTYPE", request.param)
        encoder = load_encoder(device="cpu", decoding=True).load_models()  # models load on first use: now
    assert encoder.backbone.dtype == getattr(torch, request.param)
    return encoder


def test_a_batch_1_explanation_decodes_with_int8_steps_and_the_query_vectors_do_not_move(step_encoder):
    encoder = step_encoder
    before, soft = encoder.encode(QUERIES, with_soft_prompts=True)
    full = encoder.decode(QUERIES, max_new_tokens=16, soft_prompts=soft, batch_size=1, int8=False)
    assert not getattr(encoder.backbone, "int8_ready", False)  # int8=False prepares nothing
    ours = encoder.decode(QUERIES, max_new_tokens=16, soft_prompts=soft, batch_size=1)
    assert encoder.backbone.int8_ready
    after = encoder.encode(QUERIES)
    assert np.array_equal(before, after)  # encodes run the loaded weights, bit for bit
    # the same reading of each query: int8 moves a token here and there, not the text (benchmarks/int8_decode.py:
    # ROUGE-L to the real answers unchanged on 120 tune queries)
    assert _same_reading(ours, full), list(zip(ours, full))
    # a batch of 4 takes the same steps: the head reads each row's last position, a strided view
    four = encoder.decode(QUERIES, max_new_tokens=16, soft_prompts=soft, batch_size=4)
    assert _same_reading(four, full), list(zip(four, full))
    # a batch of more than 4 keeps the loaded weights throughout: the same texts as without int8
    eight, soft8 = QUERIES * 2, np.concatenate([soft, soft])
    batch = encoder.decode(eight, max_new_tokens=16, soft_prompts=soft8, batch_size=8)
    assert batch == encoder.decode(eight, max_new_tokens=16, soft_prompts=soft8, batch_size=8, int8=False)
