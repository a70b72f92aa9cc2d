"""Int8 weight-only products for the few-row steps of an explanation decode, on a CPU.

A KV-cached decode step at batch 1 multiplies one row by every weight matrix: it reads all the backbone's weights
from memory once per token and does little arithmetic on them, so bytes set its time (profile on the 2-core AMD
EPYC: matrix products 71% of a bf16 step, ~10 GB/s). An int8 copy of each matrix (one scale per output row)
halves those bytes against bf16 and quarters them against float32, and torch's weight-only kernel
(``torch._weight_int8pack_mm``, the one gpt-fast uses) multiplies a bf16 row by it directly. On an AVX512-BF16
EPYC (Zen 4), whose decoding process loads bf16 weights, the whole batch-1 decode ran 1.74-1.79x faster; on an
AVX2 EPYC (Zen 3), which has no bf16 in hardware and so decodes with float32 weights, the rows go in as bf16 (the
kernel's float32 rows ran 6-8x slower) and come back float32, and the decode ran 1.58x faster. Both with the same
faithfulness to the backbone's real answers (``python -m benchmarks.int8_decode``; figures in
benchmarks/results/explain/README.md and benchmarks/perf/README.md). Not measured on an AMX Xeon (float32 there).

Only products inside ``steps(model)`` on the calling thread, and of at most ``MAX_ROWS`` rows, take the int8 path:
every encode (outside it; a pass also has more rows, the query's special tokens follow its text), every other
thread using the same model (the server encodes while it explains) and every larger product (a decode's prefix, a
batch of 16) run the loaded weights unchanged, bit for bit. Above 4 rows the kernel is slower than bf16 (1536x576 at
16 rows: 226 vs 129 us), which is where the line is drawn.

Sibling products that read the same input (an attention's q/k/v, an MLP's gate/up) share one int8 matrix, so a
step runs 4 kernels per layer instead of 7: at one row a kernel's fixed cost is a large part of it (SmolLM2-135M's
gate and up: 41.7 us each, both at once 52.0 us; q, k, v: 19.7 + 8.4 + 8.4 us, at once 33.2 us; 2-core AMD EPYC).
The first sibling computes all of them and hands the others their part when they are called with the same input
tensor; called otherwise (another order, another input), each computes its own rows. Rows are quantised one by
one either way, so the products are the same numbers. Measured in the decode: 2.5% faster, the same tokens.

The output head is the largest matrix (SmolLM2-135M: 49,152 x 576, a fifth of the weights) and its product only
has to pick the next token. It scores every token with a 4-bit copy (groups of 64, ``torch._weight_int4pack_mm_
for_cpu``: 0.76 ms a row against 1.99 ms in int8) and then scores its best ``SHORTLIST`` again with the model's own
weights (bf16 or float32), so the greedy pick is its own head's whenever that token is in the shortlist, the pattern of a
cheap pass and an exact rerank. The other logits stay approximate (~9% error in 4 bits, against int8's ~1%), which
only a sampled or beam decode would read. In the decode: ~4% faster, and closer to the bf16 decode than the int8
head (mean ROUGE-L to it over 8 queries: 0.94 against 0.88).
"""

from __future__ import annotations

import contextlib
import threading
import types

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 4
STEP_DTYPE = torch.bfloat16  # the kernels' row type: a float32 model's rows go in as bf16 and come back float32
SHORTLIST = 16  # head rows scored again with the model's own weights
HEAD_GROUP = 64  # input features per 4-bit scale and zero point
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # Llama/Qwen2/Mistral/Gemma names
_LOCK = threading.Lock()
_THREAD = threading.local()  # .on: this thread is inside steps(); .shared: the last group product, by group


def available(model: nn.Module) -> bool:
    """A bf16 or float32 model on a CPU, and a torch with the weight-only kernel (a private op: missing means no)."""
    weight = next(model.parameters())
    return weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float32) \
        and hasattr(torch, "_weight_int8pack_mm")


@contextlib.contextmanager
def steps(model: nn.Module):
    """Within: this thread's products of ≤ MAX_ROWS rows through ``model``'s linear layers run int8. Yields whether
    they do (False where ``available`` says no)."""
    ready, before = prepare(model), getattr(_THREAD, "on", False)
    _THREAD.on = ready or before
    try:
        yield ready
    finally:
        _THREAD.on, _THREAD.shared = before, None


def prepare(model: nn.Module) -> bool:
    """Give every linear layer of ``model`` its int8 copy, once (~0.3 s and half the bf16 bytes for SmolLM2-135M;
    idempotent and thread-safe). The layers stay ``nn.Linear`` with their weights, so nothing else that reads them
    (the lenses' head, save) sees a change, and outside ``steps`` they compute as before."""
    if not available(model):
        return False
    if getattr(model, "int8_ready", False):
        return True
    with _LOCK:
        for module in list(model.modules()):
            for names in SIBLINGS:
                group = [getattr(module, name, None) for name in names]
                if all(isinstance(layer, nn.Linear) and not hasattr(layer, "int8_weights") for layer in group) \
                        and len({layer.in_features for layer in group}) == 1:
                    _quantise(group)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if isinstance(head, nn.Linear) and head.bias is None and head.in_features % HEAD_GROUP == 0 \
                and hasattr(torch, "_weight_int4pack_mm_for_cpu") and not hasattr(head, "int4_weights"):
            head.int4_weights = _four_bits(head.weight.detach())
            head.forward = types.MethodType(_head_with_shortlist, head)
        for layer in model.modules():
            if isinstance(layer, nn.Linear) and not hasattr(layer, "int8_weights") and not hasattr(layer, "int4_weights"):
                _quantise([layer])
        model.int8_ready = True
    return True


def _quantise(layers: list[nn.Linear]) -> None:
    """One int8 matrix (one scale per output row) for ``layers``, which read the same input; each layer keeps
    its rows of it as a view, and ``int8_group`` = (the whole, the row counts, its place) when there are several."""
    w = torch.cat([layer.weight.detach() for layer in layers]).float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
    whole = (torch.round(w / scale[:, None]).to(torch.int8), scale.to(STEP_DTYPE))
    rows, start = [layer.out_features for layer in layers], 0
    for place, layer in enumerate(layers):
        layer.int8_weights = tuple(t[start : start + rows[place]] for t in whole)
        start += rows[place]
        if len(layers) > 1:
            layer.int8_group = (whole, rows, place)
        layer.forward = types.MethodType(_few_rows_in_int8, layer)


def _four_bits(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's packed 4-bit layout: per group of HEAD_GROUP inputs a scale and a zero point (min-max, 16 levels;
    the kernel reads w = (q - 8) · scale + zero)."""
    rows, cols = w.shape
    groups = w.float().reshape(rows, cols // HEAD_GROUP, HEAD_GROUP)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp_min(1e-8)
    q = torch.round((groups - low) / scale).clamp(0, 15).to(torch.int32).reshape(rows, cols)
    scales_and_zeros = torch.stack([scale[..., 0], (low + 8 * scale)[..., 0]], -1).transpose(0, 1).contiguous()
    return torch._convert_weight_to_int4pack_for_cpu(q, 1), scales_and_zeros.to(STEP_DTYPE)


def _head_with_shortlist(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if not getattr(_THREAD, "on", False) or x.numel() > MAX_ROWS * x.shape[-1] or x.dtype != self.weight.dtype:
        return F.linear(x, self.weight)
    # contiguous: the kernel refuses a strided view (a batch's last positions, as generate passes them)
    rows, (packed, scales_and_zeros) = x.reshape(-1, x.shape[-1]).contiguous(), self.int4_weights
    logits = torch._weight_int4pack_mm_for_cpu(rows.to(STEP_DTYPE), packed, HEAD_GROUP, scales_and_zeros).to(x.dtype)
    best = logits.topk(SHORTLIST, dim=-1).indices
    logits.scatter_(-1, best, torch.einsum("rk,rsk->rs", rows, self.weight[best]))  # the shortlist, exactly
    return logits.reshape(*x.shape[:-1], -1)


def _few_rows_in_int8(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if not getattr(_THREAD, "on", False) or x.numel() > MAX_ROWS * x.shape[-1] or x.dtype != self.weight.dtype:
        return F.linear(x, self.weight, self.bias)
    group = getattr(self, "int8_group", None)
    if group is None:
        y = _product(x, *self.int8_weights)
    else:
        whole, rows, place = group
        shared = getattr(_THREAD, "shared", None)
        if place == 0:  # the first sibling: every sibling's rows in one kernel, the others' parts kept
            parts = _product(x, *whole).split(rows, dim=-1)
            _THREAD.shared = (whole, x, parts)
            y = parts[0]
        elif shared is not None and shared[0] is whole and shared[1] is x:
            y = shared[2][place]
            if place == len(rows) - 1:
                _THREAD.shared = None
        else:
            y = _product(x, *self.int8_weights)
        y = y.contiguous()
    return y if self.bias is None else y + self.bias


def _product(x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1]).to(STEP_DTYPE)  # the kernel's float32 rows are slow (6-8x on an AVX2 EPYC)
    return torch._weight_int8pack_mm(rows, wq, scale).to(x.dtype).reshape(*x.shape[:-1], -1)
