"""Int8 weight-only products for the few-row steps of an explanation decode, on a CPU with a bf16 backbone.

A KV-cached decode step at batch 1 multiplies one row by every weight matrix: it reads all the backbone's weights
from memory once per token and does little arithmetic on them, so bytes set its time (profile on the 2-core AMD
EPYC: matrix products 71% of a bf16 step, ~10 GB/s). An int8 copy of each matrix (one scale per output row)
halves those bytes, and torch's weight-only kernel (``torch._weight_int8pack_mm``, the one gpt-fast uses)
multiplies a bf16 row by it directly. On that box the whole batch-1 decode ran 1.74-1.79x faster with the same
faithfulness to the backbone's real answers (``python -m benchmarks.int8_decode``; figures in
benchmarks/results/explain/README.md and benchmarks/perf/README.md).

Only products inside ``steps(model)`` on the calling thread, and of at most ``MAX_ROWS`` rows, take the int8 path:
every encode (outside it; a pass also has more rows, the query's special tokens follow its text), every other
thread using the same model (the server encodes while it explains) and every larger product (a decode's prefix, a
batch of 16) run the bf16 weights unchanged, bit for bit. Above 4 rows the kernel is slower than bf16 (1536x576 at
16 rows: 226 vs 129 us), which is where the line is drawn.
"""

from __future__ import annotations

import contextlib
import threading
import types

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 4
_LOCK = threading.Lock()
_THREAD = threading.local()  # .on: this thread is inside steps()


def available(model: nn.Module) -> bool:
    """A bf16 model on a CPU, and a torch with the weight-only kernel (a private op: missing means no)."""
    weight = next(model.parameters())
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and hasattr(torch, "_weight_int8pack_mm")


@contextlib.contextmanager
def steps(model: nn.Module):
    """Within: this thread's products of ≤ MAX_ROWS rows through ``model``'s linear layers run int8. Yields whether
    they do (False where ``available`` says no)."""
    ready, before = prepare(model), getattr(_THREAD, "on", False)
    _THREAD.on = ready or before
    try:
        yield ready
    finally:
        _THREAD.on = before


def prepare(model: nn.Module) -> bool:
    """Give every linear layer of ``model`` its int8 copy, once (~0.3 s and half the bf16 bytes for SmolLM2-135M;
    idempotent and thread-safe). The layers stay ``nn.Linear`` with their weights, so nothing else that reads them
    (the lenses' head, save) sees a change, and outside ``steps`` they compute as before."""
    if not available(model):
        return False
    if getattr(model, "int8_ready", False):
        return True
    with _LOCK:
        for layer in model.modules():
            if isinstance(layer, nn.Linear) and not hasattr(layer, "int8_weights"):
                w = layer.weight.detach().float()
                scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
                layer.int8_weights = (torch.round(w / scale[:, None]).to(torch.int8), scale.to(layer.weight.dtype))
                layer.forward = types.MethodType(_few_rows_in_int8, layer)
        model.int8_ready = True
    return True


def _few_rows_in_int8(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if not getattr(_THREAD, "on", False) or x.numel() > MAX_ROWS * x.shape[-1] or x.dtype != self.weight.dtype:
        return F.linear(x, self.weight, self.bias)
    wq, scale = self.int8_weights
    y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), wq, scale).reshape(*x.shape[:-1], -1)
    return y if self.bias is None else y + self.bias
