"""The SQLite doc store (``docs.sqlite``): documents, chunks and their vectors.

It is the source of truth of an index: the vector backend can always be rebuilt from it,
which is what makes deletes on HNSW, re-training IVF, and crash recovery possible.
Writes happen inside explicit transactions (``begin``/``commit``/``rollback``) driven by ``Index``, by the
one process that holds the index's writer lock. Readers open the file read-only and pin one snapshot
(``pin``), so everything they read (chunks, the row checksum) belongs to the same committed state.

``meta`` keeps, besides ``next_row``: ``generation`` (+1 per committed change) and ``rows_sum``, a checksum
of the set of live rows maintained in the same transaction as the change. Rows are never reused and a
row's vector never changes, so the row set identifies the stored content: a backend whose ids give the
same checksum holds exactly these vectors (see ``row_checksum``).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .base import Batch, chunked
from .lexical import analyse, chunk_text

SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    doc_id TEXT PRIMARY KEY,
    content_hash TEXT NOT NULL,
    source TEXT NOT NULL DEFAULT '',
    n_chunks INTEGER NOT NULL,
    updated TEXT NOT NULL,
    root TEXT NOT NULL DEFAULT ''        -- the corpus root the document was read from ('' for a library caller)
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
# added with the lexical side: a writer creates it in an older store (``migrate``)
_TERMS_TABLE = """CREATE TABLE IF NOT EXISTS terms (
    row INTEGER PRIMARY KEY,            -- the chunk's row
    terms TEXT NOT NULL                 -- its BM25 terms (lexical.analyse), space-separated, in order
)"""
SCHEMA += _TERMS_TABLE + ";"

# SQLite limits the number of '?' in one statement (999 in older builds).
_IN_BATCH = 500
_CHUNK_COLUMNS = "row, chunk_id, doc_id, n, text, title, source, metadata"


_MASK = (1 << 64) - 1


def row_checksum(rows) -> int:
    """Order-free checksum of a set of row ids: the sum (mod 2^64) of a 64-bit mix (splitmix64) of each.

    Additive, so a change updates it in O(rows changed); mixed, so two different row sets practically
    never collide (a count check alone cannot tell a replaced document from the old one).
    """
    x = np.asarray(rows, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
        return int(x.sum(dtype=np.uint64)) & _MASK


class DocStore:
    def __init__(self, path: Path, *, create: bool = False, readonly: bool = False, timeout: float = 30):
        self.path = Path(path)
        # isolation_level=None: no implicit transactions, we BEGIN/COMMIT ourselves.
        # check_same_thread=False: a server may search from worker threads (writes stay single-threaded).
        # timeout: a reader may wait briefly while the writer checkpoints the WAL.
        if readonly:  # a reader never writes to the index folder's content (SQLite may still keep its -shm)
            self.db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None,
                                      check_same_thread=False, timeout=timeout)
        else:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=timeout)
            # WAL: readers keep reading their snapshot while the writer commits. synchronous=NORMAL: a commit
            # costs no fsync, a crashed process loses nothing committed, a power cut at worst the last commits.
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.OperationalError:  # read-only folder: stay in the default mode, reads still work
                pass
        if create:
            self.db.executescript(SCHEMA)
        self.db.execute("SELECT count(*) FROM documents, meta WHERE 0").fetchone()  # fails fast on a broken file
        self.db.execute(f"SELECT {_CHUNK_COLUMNS}, vector FROM chunks LIMIT 0").fetchone()
        self.has_roots = "root" in {r[1] for r in self.db.execute("PRAGMA table_info(documents)")}
        self.has_terms = self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'terms'").fetchone() is not None

    def migrate(self) -> None:
        """Bring a store written by an older rkit up to date (writer only; readers cope without it)."""
        if not self.has_roots:
            self.db.execute("ALTER TABLE documents ADD COLUMN root TEXT NOT NULL DEFAULT ''")
            self.has_roots = True
        if self.get_meta("rows_sum") is None:
            self.set_meta("rows_sum", str(row_checksum(self.all_rows())))
        if not self.has_terms:  # an index from before the lexical side: analyse its stored chunks once
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(_TERMS_TABLE)
            for rows, terms in self.iter_terms():  # has_terms is still False: the texts are analysed
                self._insert_terms(rows, terms)
            self.db.execute("COMMIT")
            self.has_terms = True

    # -- snapshots (readers) ------------------------------------------------------------------
    def pin(self) -> None:
        """Start a read transaction: every later read sees this one committed state until the next ``pin``."""
        self.rollback()
        self.db.execute("BEGIN")
        self.db.execute("SELECT 1 FROM meta LIMIT 1").fetchone()  # the snapshot starts at the first read

    def state(self) -> tuple[int, int, int]:
        """(generation, chunk count, row checksum) of what this connection sees."""
        count = self.count_chunks()
        stored = self.get_meta("rows_sum")
        # an older store, opened read-only: compute what the writer would have stored
        checksum = row_checksum(self.all_rows()) if stored is None else int(stored)
        return int(self.get_meta("generation", "0")), count, checksum

    # -- transactions -----------------------------------------------------------------------
    def begin(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        self._sum = int(self.get_meta("rows_sum", "0"))

    def commit(self) -> None:
        """Commit with the row checksum and a new generation: the change, its checksum and its number at once."""
        self.set_meta("rows_sum", str(self._sum))
        self.set_meta("generation", str(int(self.get_meta("generation", "0")) + 1))
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

    def doc_roots(self) -> dict[str, str]:
        """doc_id -> the corpus root it was read from ('' when unknown: written by an older rkit or a library call)."""
        if not self.has_roots:
            return {d: "" for (d,) in self.db.execute("SELECT doc_id FROM documents")}
        return dict(self.db.execute("SELECT doc_id, root FROM documents"))

    def set_root(self, old: str, new: str) -> int:
        """Re-home documents after their corpus folder moved (call inside begin/commit)."""
        return self.db.execute("UPDATE documents SET root = ? WHERE root = ?", (new, old)).rowcount

    def all_rows(self) -> np.ndarray:
        return np.fromiter((r for (r,) in self.db.execute("SELECT row FROM chunks ORDER BY row")), dtype=np.int64)

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

    def chunk(self, chunk_id: str) -> dict | None:
        """One chunk's fields by its id (None when this snapshot has no such chunk)."""
        rec = self.db.execute(f"SELECT {_CHUNK_COLUMNS} FROM chunks WHERE chunk_id = ?", (chunk_id,)).fetchone()
        return _chunk_dict(rec) if rec else None

    def rows_where(self, source_prefix: str | None = None, file_type: str | None = None) -> np.ndarray:
        """Rows whose source starts with ``source_prefix`` and/or ends in '.<file_type>' (case-insensitive)."""
        sql, args = "SELECT row FROM chunks WHERE 1", []
        if source_prefix:  # substr, not LIKE: a '%' or '_' in the prefix is a plain character
            sql += " AND substr(source, 1, length(?)) = ?"
            args += [source_prefix, source_prefix]
        if file_type:
            suffix = "." + file_type.lower().lstrip(".")
            sql += " AND lower(substr(source, -length(?))) = ?"
            args += [suffix, suffix]
        return np.fromiter((r for (r,) in self.db.execute(sql + " ORDER BY row", args)), dtype=np.int64)

    def iter_batches(self, size: int = 1024) -> Iterator[Batch]:
        """Every stored chunk as (rows, vectors, payloads, terms) batches, in row order: what a backend rebuild eats."""
        terms = "terms.terms" if self.has_terms else "NULL"
        cur = self.db.execute(f"SELECT {_CHUNK_COLUMNS}, vector, {terms} FROM chunks "
                              f"{'LEFT JOIN terms USING(row)' if self.has_terms else ''} ORDER BY row")
        while recs := cur.fetchmany(size):
            rows = np.array([r[0] for r in recs], dtype=np.int64)
            vectors = np.stack([np.frombuffer(r[-2], dtype="<f4") for r in recs]).astype(np.float32)
            chunks = [_chunk_dict(r[:-2]) for r in recs]
            stored = [r[-1] for r in recs]
            missing = [i for i, t in enumerate(stored) if t is None]  # a store from before the lexical side
            analysed = dict(zip(missing, analyse([chunk_text(chunks[i]) for i in missing])))
            yield (rows, vectors, [payload(c) for c in chunks],
                   [t.split() if t is not None else analysed[i] for i, t in enumerate(stored)])

    def average_terms(self) -> float | None:
        """Mean number of BM25 terms per live chunk (None without the terms table or chunks); counted in SQL."""
        if not self.has_terms:
            return None
        total, count = self.db.execute(
            "SELECT sum(CASE WHEN terms = '' THEN 0 ELSE length(terms) - length(replace(terms, ' ', '')) + 1 END), "
            "count(*) FROM terms").fetchone()
        return float(total) / count if count else None

    def iter_terms(self, size: int = 4096) -> Iterator[tuple[np.ndarray, list[list[str]]]]:
        """Every stored chunk's BM25 terms as (rows, terms) batches in row order: what a lexical rebuild eats.
        A store from before the lexical side has its chunk texts analysed instead."""
        if self.has_terms:
            cur = self.db.execute("SELECT row, terms FROM terms ORDER BY row")
            while recs := cur.fetchmany(size):
                yield np.array([r[0] for r in recs], dtype=np.int64), [r[1].split() for r in recs]
            return
        cur = self.db.execute("SELECT row, title, text FROM chunks ORDER BY row")
        while recs := cur.fetchmany(size):
            yield (np.array([r[0] for r in recs], dtype=np.int64),
                   analyse([chunk_text({"title": r[1], "text": r[2]}) for r in recs]))

    # -- writes (call inside begin/commit) ----------------------------------------------------
    def delete_documents(self, doc_ids: list[str]) -> tuple[int, np.ndarray]:
        """Remove documents and their chunks: (documents removed, the rows their chunks had)."""
        rows = self.rows_of(doc_ids)
        self._sum = (self._sum - row_checksum(rows)) & _MASK
        deleted = 0
        for part in chunked([int(r) for r in rows], _IN_BATCH):
            self.db.execute(f"DELETE FROM terms WHERE row IN ({','.join('?' * len(part))})", part)
        for part in chunked(doc_ids, _IN_BATCH):
            marks = ",".join("?" * len(part))
            self.db.execute(f"DELETE FROM chunks WHERE doc_id IN ({marks})", part)
            deleted += self.db.execute(f"DELETE FROM documents WHERE doc_id IN ({marks})", part).rowcount
        return deleted, rows

    def insert_document(self, doc_id: str, content_hash: str, source: str, n_chunks: int, updated: str,
                        root: str = "") -> None:
        self.db.execute(
            "INSERT INTO documents(doc_id, content_hash, source, n_chunks, updated, root) VALUES (?, ?, ?, ?, ?, ?)",
            (doc_id, content_hash, source, n_chunks, updated, root),
        )

    def insert_chunks(self, rows: np.ndarray, chunks: list[dict], vectors: np.ndarray,
                      terms: list[list[str]]) -> None:
        """Insert chunks already passed through ``normalise_chunks``, with their BM25 terms."""
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        self._sum = (self._sum + row_checksum(rows)) & _MASK
        self.db.executemany(
            f"INSERT INTO chunks({_CHUNK_COLUMNS}, vector) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                (int(row), c["chunk_id"], c["doc_id"], c["n"], c["text"], c["title"], c["source"],
                 json.dumps(c["metadata"], ensure_ascii=False), vectors[i].tobytes())
                for i, (row, c) in enumerate(zip(rows, chunks))
            ),
        )
        self._insert_terms(rows, terms)

    def _insert_terms(self, rows: np.ndarray, terms: list[list[str]]) -> None:
        self.db.executemany("INSERT INTO terms(row, terms) VALUES (?, ?)",
                            ((int(r), " ".join(t)) for r, t in zip(rows, terms)))


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
