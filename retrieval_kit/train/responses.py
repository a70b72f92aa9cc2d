"""Stage 1 of training: the frozen backbone answers each training query; answers are cached on disk.

The cache is the one store of `<cache_dir>/cache.sqlite3` (retrieval_kit/cache_store.py), in the namespace of
(backbone identity, full generation config): the packaged backbone is identified by its GGUF's digest, another
by its resolved files. Answers are committed after every batch, so a killed run loses at most one batch, and a
rerun (or another training run with the same backbone and config, or one running at the same time) generates
only what is missing. Identical query texts are generated once.

Response caches written by earlier rkit versions (`<cache_dir>/responses/*.jsonl`) are ignored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..cache_store import CacheStore, TextNamespace, backbone_identity
from ..errors import TrainError
from ..models.generation import generate_batch, length_sorted_batches


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    system_prompt: str | None = None  # None: the backbone template's default
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    max_query_tokens: int = 256


def response_cache(cache_dir: Path, backbone: str, config: GenerationConfig) -> TextNamespace:
    """query text -> the backbone's answer under `config`."""
    store = CacheStore.in_folder(cache_dir, TrainError)
    return store.texts("train-responses", {"backbone": backbone_identity(backbone), "generation": asdict(config)})


def generate_responses(
    model,
    tokenizer,
    queries: Sequence[str],
    *,
    backbone_name: str,
    config: GenerationConfig,
    cache_dir: Path,
    batch_size: int = 32,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, str]:
    """Answer every distinct query not yet in the cache; return query -> response for all of `queries`."""
    cache = response_cache(cache_dir, backbone_name, config)
    done = cache.lookup(queries)
    todo = sorted({q for q in queries if q not in done})
    if on_batch:
        on_batch(len(queries) - len(todo))  # report what the cache already had
    for idx in length_sorted_batches(todo, batch_size):
        batch = [todo[i] for i in idx]
        answers = generate_batch(model, tokenizer, batch, max_new_tokens=config.max_new_tokens,
                                 system_prompt=config.system_prompt, max_query_tokens=config.max_query_tokens,
                                 do_sample=config.do_sample, temperature=config.temperature, top_p=config.top_p)
        done.update(zip(batch, cache.put(batch, answers)))  # one transaction per batch
        if on_batch:
            on_batch(len(batch))
    cache.store.close()
    return {q: done[q] for q in queries}


def encoder_answers(encoder, queries: Sequence[str], max_new_tokens: int, cache_dir: Path, batch_size: int = 32,
                    on_batch: Callable[[int], None] | None = None) -> dict[str, str]:
    """The backbone's own answers as an encoder's training asks for them (its system prompt and query cap), cached:
    the training targets, an answer bank and the faithfulness benchmark all read the same cache entries."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, system_prompt=encoder.config.system_prompt,
                              max_query_tokens=encoder.config.max_query_tokens)
    return generate_responses(encoder.backbone, encoder.tokenizer, queries, backbone_name=encoder.config.backbone,
                              config=config, cache_dir=cache_dir, batch_size=batch_size, on_batch=on_batch)
