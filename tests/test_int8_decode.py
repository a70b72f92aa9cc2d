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


def test_float32_weights_are_left_alone():
    layer = _layer(torch.float32)
    with int8_decode.steps(layer) as on:
        assert not on
    assert not hasattr(layer, "int8_weights")


@pytest.fixture(scope="module")
def bf16_encoder():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RKIT_DTYPE", "bfloat16")
        encoder = load_encoder(device="cpu", decoding=True).load_models()  # models load on first use: now
    assert encoder.backbone.dtype == torch.bfloat16
    return encoder


def test_a_batch_1_explanation_decodes_with_int8_steps_and_the_query_vectors_do_not_move(bf16_encoder):
    encoder = bf16_encoder
    before, soft = encoder.encode(QUERIES, with_soft_prompts=True)
    full = encoder.decode(QUERIES, max_new_tokens=16, soft_prompts=soft, batch_size=1, int8=False)
    assert not getattr(encoder.backbone, "int8_ready", False)  # int8=False prepares nothing
    ours = encoder.decode(QUERIES, max_new_tokens=16, soft_prompts=soft, batch_size=1)
    assert encoder.backbone.int8_ready
    after = encoder.encode(QUERIES)
    assert np.array_equal(before, after)  # encodes run the bf16 weights, bit for bit
    # the same reading of each query: int8 moves a token here and there, not the text (benchmarks/int8_decode.py:
    # ROUGE-L to the real answers unchanged on 120 tune queries)
    overlap = [rouge_l_f1(a, b) for a, b in zip(ours, full)]
    assert np.mean(overlap) > 0.5, list(zip(ours, full))
    # a batch of more than 4 keeps the bf16 weights throughout: the same texts as without int8
    eight, soft8 = QUERIES * 2, np.concatenate([soft, soft])
    batch = encoder.decode(eight, max_new_tokens=16, soft_prompts=soft8, batch_size=8)
    assert batch == encoder.decode(eight, max_new_tokens=16, soft_prompts=soft8, batch_size=8, int8=False)
