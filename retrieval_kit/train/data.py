"""Training queries: read a query file, dedupe, and split off a held-out validation set.

Accepted files:
- ``.jsonl`` (or ``.json`` lines): one object per line with the text in ``text`` (BEIR), ``query``, ``prompt``
  or ``instruction`` (first present wins);
- anything else: plain text, one query per line.

The split is by a hash of each text: the ``val_size`` queries with the smallest hashes are held out. Growing the
pool never moves a training query into validation (a query among the k smallest hashes of a larger pool is also
among the k smallest of any sub-pool containing it), and the split does not depend on the file's order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import TrainError
from ..jsonl import parse_object

TEXT_FIELDS = ("text", "query", "prompt", "instruction")


@dataclass
class QuerySplit:
    source: str
    n_lines: int  # records read (after --limit)
    n_unique: int  # distinct non-empty texts
    train: list[str]
    val: list[str]

    def describe(self) -> dict:
        return {"file": self.source, "records": self.n_lines, "unique": self.n_unique,
                "train": len(self.train), "val": len(self.val)}


JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt",)


def read_queries(path: str | Path, limit: int | None = None) -> list[str]:
    """Texts of the first `limit` records (all when None), in file order, duplicates kept."""
    path = Path(path)
    if path.is_dir():
        raise TrainError(f"--queries {path} is a folder: give a .jsonl file (one JSON object per line) or a .txt file")
    if not path.is_file():
        raise TrainError(f"query file not found: {path}")
    if limit is not None and limit < 1:
        raise TrainError(f"--limit must be positive, got {limit}")
    suffix = path.suffix.lower()
    if suffix not in JSONL_SUFFIXES + TEXT_SUFFIXES:  # a .tsv of qrels trained as "1\t1410\t1" queries before
        raise TrainError(f"--queries {path}: a '{suffix or 'suffix-less'}' file is neither JSON lines "
                         f"({', '.join(JSONL_SUFFIXES)}) nor one query per line ({', '.join(TEXT_SUFFIXES)})")
    is_jsonl = suffix in JSONL_SUFFIXES
    texts: list[str] = []
    try:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if limit is not None and len(texts) >= limit:
                    break
                if not line.strip():
                    continue
                texts.append(_parse_line(line, path, lineno) if is_jsonl else line.strip())
    except UnicodeDecodeError as exc:
        raise TrainError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise TrainError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not texts:
        raise TrainError(f"query file is empty: {path}")
    return texts


def _parse_line(line: str, path: Path, lineno: int) -> str:
    record = parse_object(line, f"{path}:{lineno}", TrainError)
    for key in TEXT_FIELDS:
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    raise TrainError(f"{path}:{lineno}: record has no text (expected one of: {', '.join(TEXT_FIELDS)})")


def dedupe(texts: list[str]) -> list[str]:
    """First occurrence of each text, order kept."""
    return list(dict.fromkeys(texts))


def text_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def split_queries(texts: list[str], val_size: int) -> tuple[list[str], list[str]]:
    """(train, val): val = the `val_size` texts with the smallest hashes; both keep the input order."""
    if val_size < 0:
        raise TrainError(f"--val-size must be >= 0, got {val_size}")
    if len(texts) - val_size < 1:
        raise TrainError(f"{len(texts)} distinct queries leave nothing to train on with --val-size {val_size}")
    held_out = set(sorted(texts, key=text_hash)[:val_size])
    return [t for t in texts if t not in held_out], [t for t in texts if t in held_out]


def load_split(path: str | Path, val_size: int = 200, limit: int | None = None) -> QuerySplit:
    texts = read_queries(path, limit)
    unique = dedupe(texts)
    train, val = split_queries(unique, val_size)
    return QuerySplit(str(path), len(texts), len(unique), train, val)
