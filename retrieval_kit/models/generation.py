"""Chat formatting and batched greedy/sampled generation with the frozen backbone."""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch

FALLBACK_TEMPLATE = "Question: {query}\nAnswer:"  # for base models that ship no chat template


def format_chat(tokenizer, query: str, system_prompt: str | None = None) -> str:
    """The prompt string the backbone sees before it answers (generation header included)."""
    if not getattr(tokenizer, "chat_template", None):
        prefix = f"{system_prompt}\n\n" if system_prompt else ""
        return prefix + FALLBACK_TEMPLATE.format(query=query)
    messages = [{"role": "user", "content": query}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    # enable_thinking=False switches Qwen3-style reasoning off; other templates ignore the extra variable
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)


def truncate_tokens(tokenizer, texts: Sequence[str], max_tokens: int) -> list[str]:
    """Cut each raw text to `max_tokens` tokens *before* chat formatting, so the assistant header is never lost."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [t if len(i) <= max_tokens else tokenizer.decode(i[:max_tokens]) for t, i in zip(texts, ids)]


def tokenize_prompts(tokenizer, prompts: Sequence[str], device) -> dict:
    """Left-padded batch of already formatted prompts (the template carries its own special tokens)."""
    batch = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}


def length_sorted_batches(texts: Sequence[str], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of similar length (longest first) so padding wastes little compute."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


# What one more forward pass costs, in padded tokens' worth of compute (the weights are read once per pass, and
# every layer's small ops run, whatever the batch holds): `python -m benchmarks.perf.pass_cost` fits
# seconds = a + b · padded tokens over encodes of 1-32 queries; SmolLM2-135M, bf16, 2-core AMX Xeon, three runs:
# a / b = 126, 180, 67 tokens (a = 58-125 ms, b = 0.67-0.88 ms per token; the box is noisy, and the cuts move
# little between such values). Bigger backbones cost more per pass and per token alike, so the ratio travels.
PASS_OVERHEAD_TOKENS = 128


def cost_sorted_batches(lengths: Sequence[int], batch_size: int,
                        overhead: float = PASS_OVERHEAD_TOKENS) -> list[list[int]]:
    """Indices in batches of ≤ ``batch_size`` (longest first) that minimise the passes' padded compute,
    Σ (overhead + texts × longest length): a batch is cut where padding the shorter texts to a long one's length
    would cost more than another pass. Search-box queries next to pasted prompts (pool queries: 5-250 tokens)
    otherwise pad half the batch to the longest; one length-sorted cut every ``batch_size`` cannot see that.
    An O(n · batch_size) dynamic programme over the sorted lengths."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):  # best[j]: the cheapest batching of the j longest texts
        for i in range(max(0, j - batch_size), j):  # the last batch is order[i:j], padded to order[i]'s length
            cost = best[i] + overhead + (j - i) * lengths[order[i]]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    batches, j = [], n
    while j > 0:
        batches.append(order[cut[j] : j])
        j = cut[j]
    return batches[::-1]


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    queries: Sequence[str],
    *,
    max_new_tokens: int = 128,
    system_prompt: str | None = None,
    max_query_tokens: int = 512,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
) -> list[str]:
    """Answer one batch of queries with the backbone's chat template; returns only the new text."""
    queries = truncate_tokens(tokenizer, queries, max_query_tokens)
    prompts = [format_chat(tokenizer, q, system_prompt) for q in queries]
    batch = tokenize_prompts(tokenizer, prompts, model.device)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
    out = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )
    new_tokens = out[:, batch["input_ids"].shape[1] :]
    return [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def batched(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
