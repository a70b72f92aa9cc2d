"""Stage 1 of training: the frozen backbone answers each training query; answers are cached on disk.

Cache file: ``<cache_dir>/responses/<key>.jsonl`` where ``key`` hashes (backbone, generation config), one line
``{"query": ..., "response": ...}`` per answered query, appended after every batch and flushed, so a killed run
loses at most one batch and a rerun (or another training run with the same backbone and config) generates only
what is missing. Identical query texts are generated once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

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

    def key(self, backbone: str) -> str:
        blob = json.dumps({"backbone": backbone, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_path(cache_dir: Path, backbone: str, config: GenerationConfig) -> Path:
    return Path(cache_dir) / "responses" / f"{config.key(backbone)}.jsonl"


def read_cache(path: Path) -> dict[str, str]:
    """query text -> response; a torn last line (killed mid-write) is ignored."""
    done: dict[str, str] = {}
    if not path.is_file():
        return done
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            try:
                row = json.loads(line)
                done[row["query"]] = row["response"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return done


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
    path = cache_path(cache_dir, backbone_name, config)
    done = read_cache(path)
    todo = sorted({q for q in queries if q not in done})
    if on_batch:
        on_batch(len(queries) - len(todo))  # report what the cache already had
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:
            if todo and _ends_torn(path):
                fh.write("\n")  # a killed run's half line must not swallow the first new record
            for idx in length_sorted_batches(todo, batch_size):
                batch = [todo[i] for i in idx]
                answers = generate_batch(model, tokenizer, batch, max_new_tokens=config.max_new_tokens,
                                         system_prompt=config.system_prompt, max_query_tokens=config.max_query_tokens,
                                         do_sample=config.do_sample, temperature=config.temperature, top_p=config.top_p)
                for q, a in zip(batch, answers):
                    fh.write(json.dumps({"query": q, "response": a}, ensure_ascii=False) + "\n")
                    done[q] = a
                fh.flush()
                if on_batch:
                    on_batch(len(batch))
    except OSError as exc:
        raise TrainError(f"cannot write the response cache {path}: {exc.strerror or exc}") from exc
    return {q: done[q] for q in queries}


def _ends_torn(path: Path) -> bool:
    """True when the file's last byte is not a newline (the previous writer was killed mid-line)."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with path.open("rb") as fh:
        fh.seek(-1, 2)
        return fh.read(1) != b"\n"
