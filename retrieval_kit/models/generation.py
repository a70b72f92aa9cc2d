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
