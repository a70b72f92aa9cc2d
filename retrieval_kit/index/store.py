"""The SQLite doc store (``docs.sqlite``): documents, chunks and their vectors.

It is the source of truth of an index: the vector backend can always be rebuilt from it,
which is what makes deletes on HNSW, re-training IVF, and crash recovery possible.
Writes happen inside explicit transactions (``begin``/``commit``/``rollback``) driven by ``Index``.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .base import Batch, chunked

SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    doc_id TEXT PRIMARY KEY,
    content_hash TEXT NOT NULL,
    source TEXT NOT NULL DEFAULT '',
    n_chunks INTEGER NOT NULL,
    updated TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    row INTEGER PRIMARY KEY,            -- the id the vector backend knows (faiss id / qdrant point id)
    chunk_id TEXT NOT NULL UNIQUE,
    doc_id TEXT NOT NULL,
    n INTEGER NOT NULL,
    text TEXT NOT NULL,
    title TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL DEFAULT '',
    metadata TEXT NOT NULL DEFAULT '{}',
    vector BLOB NOT NULL                -- float32 little-endian, dim values
);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# SQLite limits the number of '?' in one statement (999 in older builds).
_IN_BATCH = 500
_CHUNK_COLUMNS = "row, chunk_id, doc_id, n, text, title, source, metadata"


class DocStore:
    def __init__(self, path: Path, *, create: bool = False):
        self.path = Path(path)
        # isolation_level=None: no implicit transactions, we BEGIN/COMMIT ourselves.
        # check_same_thread=False: a server may search from worker threads (writes stay single-threaded).
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        # WAL + synchronous=NORMAL: a commit costs no fsync (indexing document by document stays fast),
        # a crashed process loses nothing committed, and a power cut can at worst drop the last commits.
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.OperationalError:  # read-only folder: stay in the default mode, reads still work
            pass
        if create:
            self.db.executescript(SCHEMA)
        self.db.execute("SELECT count(*) FROM documents, meta WHERE 0").fetchone()  # fails fast on a broken file
        self.db.execute(f"SELECT {_CHUNK_COLUMNS}, vector FROM chunks LIMIT 0").fetchone()

    # -- transactions -----------------------------------------------------------------------
    def begin(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.db.execute("COMMIT")

    def rollback(self) -> None:
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")

    def close(self) -> None:
        self.rollback()
        self.db.close()

    # -- meta (next row id, backend sync flag) ----------------------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def allocate_rows(self, n: int) -> np.ndarray:
        """n fresh row ids; rows are never reused, so a backend never confuses an old vector with a new one."""
        start = int(self.get_meta("next_row", "0"))
        self.set_meta("next_row", str(start + n))
        return np.arange(start, start + n, dtype=np.int64)

    # -- reads --------------------------------------------------------------------------------
    def doc_hashes(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT doc_id, content_hash FROM documents"))

    def count_documents(self) -> int:
        return self.db.execute("SELECT count(*) FROM documents").fetchone()[0]

    def count_chunks(self) -> int:
        return self.db.execute("SELECT count(*) FROM chunks").fetchone()[0]

    def rows_of(self, doc_ids: list[str]) -> np.ndarray:
        rows: list[int] = []
        for part in chunked(doc_ids, _IN_BATCH):
            sql = f"SELECT row FROM chunks WHERE doc_id IN ({','.join('?' * len(part))})"
            rows += [r for (r,) in self.db.execute(sql, part)]
        return np.asarray(rows, dtype=np.int64)

    def chunk_owners(self, chunk_ids: list[str]) -> dict[str, str]:
        """chunk_id -> doc_id for those chunk ids already stored."""
        owners: dict[str, str] = {}
        for part in chunked(chunk_ids, _IN_BATCH):
            sql = f"SELECT chunk_id, doc_id FROM chunks WHERE chunk_id IN ({','.join('?' * len(part))})"
            owners.update(self.db.execute(sql, part))
        return owners

    def fetch(self, rows: Iterable[int]) -> dict[int, dict]:
        """row -> chunk fields (no vector), for turning search results into hits."""
        found: dict[int, dict] = {}
        for part in chunked(sorted({int(r) for r in rows}), _IN_BATCH):
            sql = f"SELECT {_CHUNK_COLUMNS} FROM chunks WHERE row IN ({','.join('?' * len(part))})"
            for rec in self.db.execute(sql, part):
                found[rec[0]] = _chunk_dict(rec)
        return found

    def iter_batches(self, size: int = 1024) -> Iterator[Batch]:
        """Every stored chunk as (rows, vectors, payloads) batches, in row order: what a backend rebuild eats."""
        cur = self.db.execute(f"SELECT {_CHUNK_COLUMNS}, vector FROM chunks ORDER BY row")
        while recs := cur.fetchmany(size):
            rows = np.array([r[0] for r in recs], dtype=np.int64)
            vectors = np.stack([np.frombuffer(r[-1], dtype="<f4") for r in recs]).astype(np.float32)
            yield rows, vectors, [payload(_chunk_dict(r[:-1])) for r in recs]

    # -- writes (call inside begin/commit) ----------------------------------------------------
    def delete_documents(self, doc_ids: list[str]) -> int:
        deleted = 0
        for part in chunked(doc_ids, _IN_BATCH):
            marks = ",".join("?" * len(part))
            self.db.execute(f"DELETE FROM chunks WHERE doc_id IN ({marks})", part)
            deleted += self.db.execute(f"DELETE FROM documents WHERE doc_id IN ({marks})", part).rowcount
        return deleted

    def insert_document(self, doc_id: str, content_hash: str, source: str, n_chunks: int, updated: str) -> None:
        self.db.execute(
            "INSERT INTO documents(doc_id, content_hash, source, n_chunks, updated) VALUES (?, ?, ?, ?, ?)",
            (doc_id, content_hash, source, n_chunks, updated),
        )

    def insert_chunks(self, rows: np.ndarray, chunks: list[dict], vectors: np.ndarray) -> None:
        """Insert chunks already passed through ``normalise_chunks``."""
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        self.db.executemany(
            f"INSERT INTO chunks({_CHUNK_COLUMNS}, vector) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                (int(row), c["chunk_id"], c["doc_id"], c["n"], c["text"], c["title"], c["source"],
                 json.dumps(c["metadata"], ensure_ascii=False), vectors[i].tobytes())
                for i, (row, c) in enumerate(zip(rows, chunks))
            ),
        )


def normalise_chunks(doc_id: str, chunks: list[dict]) -> list[dict]:
    """Caller's chunk dicts with every field present and JSON-safe metadata (what the store and Qdrant keep)."""
    out = []
    for i, c in enumerate(chunks):
        metadata = json.loads(json.dumps(c.get("metadata") or {}, ensure_ascii=False, default=str))
        out.append({"chunk_id": str(c["chunk_id"]), "doc_id": doc_id, "n": int(c.get("n", i)),
                    "text": c.get("text") or "", "title": c.get("title") or "",
                    "source": c.get("source") or "", "metadata": metadata})
    return out


def _chunk_dict(rec: tuple) -> dict:
    row, chunk_id, doc_id, n, text, title, source, metadata = rec
    return {"row": row, "chunk_id": chunk_id, "doc_id": doc_id, "n": n, "text": text,
            "title": title, "source": source, "metadata": json.loads(metadata or "{}")}


def payload(chunk: dict) -> dict:
    """What a Qdrant point carries, so a server user can inspect points without the doc store."""
    return {key: chunk[key] for key in ("chunk_id", "doc_id", "n", "text", "title", "source", "metadata")}
