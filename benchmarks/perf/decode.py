"""Stage 6: reading a query embedding back as text. The soft prompt, as the decoder reads it
(``encoder.recon_inputs``: wrapped in the chat template for a chat-format adapter), is continued greedily for 64
tokens with the KV cache (what `--explain` runs: transformers' generate; at batch 1 on a bf16 CPU with int8 one-row
steps and a 4-bit shortlisting head, models/int8_decode.py, and the KV cache alone beside it) against re-running the whole prefix at every step
(use_cache=False), at batch 1 and 16; and how many encode passes an explained search makes per query.
"""

from __future__ import annotations

import contextlib
import subprocess

from .common import Figure, check, sample_index, timed
from .data import queries as pool_queries

TOKENS = 64


def run(quick: bool, workdir, log, device: str | None = None) -> list[Figure]:
    import torch

    from retrieval_kit.models import int8_decode, load_encoder

    encoder = load_encoder(device=device, decoding=True)  # the weight type `--explain` loads (backbone.pick_dtype)
    figures = []
    qs = pool_queries(16)
    _, soft = encoder.encode(qs, with_soft_prompts=True)
    tok = encoder.tokenizer
    dtype = encoder.backbone.get_input_embeddings().weight.dtype
    weight_bytes = sum(p.numel() * p.element_size() for p in encoder.backbone.parameters())

    def prefix(batch: int):  # what GenerativeEncoder._continue feeds generate
        return encoder.recon_inputs(torch.as_tensor(soft[:batch], device=encoder.device))

    n_prefix = int(prefix(1).shape[1])

    def cached(batch: int, int8: bool = False):  # transformers' generate, KV cache on
        prompts = prefix(batch)
        mask = torch.ones(prompts.shape[:2], dtype=torch.long, device=encoder.device)
        with int8_decode.steps(encoder.backbone) if int8 else contextlib.nullcontext():
            out = encoder.backbone.generate(inputs_embeds=prompts, attention_mask=mask, max_new_tokens=TOKENS,
                                            min_new_tokens=TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.shape[1] == TOKENS, out.shape
        return out

    @torch.no_grad()
    def recomputed(batch: int):
        # the peer: every step runs the whole sequence so far (generate(use_cache=False) keeps a cache in
        # transformers 5, so the loop is written out); eos suppressed as min_new_tokens does
        x = prefix(batch)
        embed, tokens = encoder.backbone.get_input_embeddings(), []
        for _ in range(TOKENS):
            logits = encoder.backbone(inputs_embeds=x, use_cache=False).logits[:, -1].float()
            logits[:, tok.eos_token_id] = -float("inf")
            tokens.append(logits.argmax(-1, keepdim=True))
            x = torch.cat([x, embed(tokens[-1]).to(dtype)], dim=1)
        return torch.cat(tokens, dim=1)

    for batch in (1, 16):
        # what --explain runs: the KV cache, and at batch ≤ 4 on a bf16 CPU int8 one-row steps (models/int8_decode)
        int8 = batch <= int8_decode.MAX_ROWS and int8_decode.available(encoder.backbone)
        log(f"decode: batch {batch}, KV cache{' (+ int8 steps)' if int8 else ''} vs recompute")
        outputs = {}
        kv_only = timed(lambda: outputs.__setitem__("cached", cached(batch)), repeat=2 if quick else 3)
        ours = (timed(lambda: outputs.__setitem__("int8", cached(batch, True)), repeat=2 if quick else 3)
                if int8 else kv_only)
        peer = timed(lambda: outputs.__setitem__("recomputed", recomputed(batch)), repeat=1 if quick else 2)
        same = torch.equal(outputs["cached"], outputs["recomputed"])
        ratio = peer.median / ours.median
        met = check(ratio, "≥ 5")
        # a cached step multiplies one row per sequence by every weight matrix: at small batches it reads all the
        # weights from memory once per token (they are far larger than the caches), so bytes, not FLOPs, set its time
        streamed = weight_bytes / (kv_only.median / TOKENS) / 1e9  # as the loaded weights are read
        why = "" if met else (f"at batch {batch} a cached step reads all {weight_bytes / 2**20:.0f} MiB of the "
                              f"backbone's {str(dtype).removeprefix('torch.')} weights through one-row matrix products "
                              f"({streamed:.1f} GB/s achieved: memory-bound), while recomputing the "
                              f"{n_prefix}-{n_prefix + TOKENS} token prefix is compute-bound and "
                              "costs only a few cached steps more; "
                              + ("int8 steps halve the bytes (the head's in 4 bits), and the rest of a step is small "
                                 "ops (norms, rotary, attention, the cache, generate's bookkeeping: ~35-45% of a step "
                                 "in a profile) that a compiled step would fuse"
                                 if int8 else "fewer bytes per weight (int8 steps) or batching decodes (the "
                                 "server's, batch 16) are what would close it"))
        figures.append(Figure("decode", f"explanation decode, {TOKENS} tokens, batch {batch} ({encoder.device.type})",
                              round(batch * TOKENS / ours.median, 1), "tokens/s", round(batch * TOKENS / peer.median, 1),
                              "same greedy decode re-running the prefix each step", round(ratio, 2), "≥ 5", met, why,
                              {"ours_s": ours.as_dict(), "peer_s": peer.as_dict(), "identical_tokens": same,
                               "int8_steps": int8, "kv_cache_only_s": kv_only.as_dict(),
                               "kv_cache_only_ratio": round(peer.median / kv_only.median, 2),
                               "int8_identical_tokens": (torch.equal(outputs["int8"], outputs["cached"])
                                                         if int8 else None),
                               "soft_prompt_tokens": int(soft.shape[1]),
                               "prefix_tokens": n_prefix, "weight_bytes": weight_bytes,
                               "weight_gb_per_s_cached": round(streamed, 2), "ratio": "ours tokens/s / peer tokens/s"}))
    # --explain runs the backbone's encode pass once per query (the search's soft prompts are decoded)
    passes = []
    real = encoder.compress_states
    encoder.compress_states = lambda *a, **k: passes.append(len(a[0])) or real(*a, **k)
    try:
        from retrieval_kit.search import Retriever

        with Retriever.attach(sample_index(workdir), encoder) as retriever:
            retriever.search(qs[:4], k=3, query_mode="fused", explain=True, explain_tokens=4)
    except (ImportError, OSError, subprocess.CalledProcessError) as exc:
        # the GPU job's bare machine has no rkit install nor index stack (faiss, bm25s): the decode rows only
        log(f"decode: passes per explained search skipped ({exc})")
        return figures
    finally:
        del encoder.compress_states
    per_query = sum(passes) / 4
    figures.append(Figure("decode", "encode passes per query, explained fused search", per_query, "passes", 2.0,
                          "before (encode, then decode re-encoding)", per_query, "≤ 1",
                          check(per_query, "≤ 1"), "", {"queries": 4, "ratio": "passes per query (the target's figure)"}))
    return figures
