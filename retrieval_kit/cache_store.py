"""The one on-disk cache for what rkit computes once and reuses: training responses and teacher targets,
benchmark vectors and HyDE answers. One SQLite file (stdlib) per cache folder:

    namespaces(id, name, kind, dim, identity)  name: the namespace's full sha256; what produced its values
                                               (identity as JSON), their kind and vector width
    items(ns, key, value)                      ns: namespaces.id; key: the full sha256 (32 bytes) of the exact
                                               input text; value: float32 bytes or UTF-8 text

A namespace is the full sha256 of everything the values depend on: the model's identity (its name, and for a
model on disk its resolved path and a digest of its files; for the packaged backbone the GGUF's digest; for an
adapter its fingerprint) and the settings (generation config, role). Two models never share an entry because
their names look alike, and a `--limit 5` run fills part of the namespace a full run then reuses.

Why SQLite in WAL mode: every batch is written in one short transaction, so kill -9 loses at most the batch in
progress and never what was committed; several processes read and write the same file at once (a writer waits
up to BUSY_TIMEOUT_S for another's transaction); INSERT OR IGNORE makes two processes computing the same item
harmless (the values are the same). An unreadable file is a one-line error naming the file to delete.

Caches written by rkit before this store (bench `docs-*/part-*.npy`, `answers-*.jsonl`; train
`responses/*.jsonl`, `targets/*/shard-*`) are ignored: delete those folders to reclaim the space.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Sequence

import numpy as np

from .errors import RkitError
from .paths import rkit_home

FILE_NAME = "cache.sqlite3"
SCHEMA_VERSION = 2
PAGE_SIZE = 16384  # rows are vectors of 1.5-4 KB: 4 KB pages would waste a third of the file
BUSY_TIMEOUT_S = 600  # transactions are one batch long: a wait this long means something is stuck
_IN_CHUNK = 500  # keys per SELECT ... IN (...): below every SQLite build's variable limit

Stage = Callable[[int], ContextManager[Callable[[int], None]]]  # stage(n_to_compute) -> advance(n)


def text_key(text: str) -> bytes:
    """An item's key: the full sha256 of the exact text."""
    return hashlib.sha256(text.encode("utf-8")).digest()


def namespace_id(kind: str, identity: dict) -> str:
    blob = json.dumps({"kind": kind, "identity": identity}, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class CacheStore:
    """One SQLite cache file; `vectors(...)` / `texts(...)` give its namespaces. `error` is the one-line error
    class raised for an unusable file (BenchError in the bench, TrainError in training)."""

    def __init__(self, path: str | Path, error: type[RkitError] = RkitError):
        self.path = Path(path)
        self.error = error
        self._db: sqlite3.Connection | None = None

    @classmethod
    def in_folder(cls, folder: str | Path, error: type[RkitError] = RkitError) -> "CacheStore":
        return cls(Path(folder) / FILE_NAME, error)

    def vectors(self, kind: str, identity: dict) -> "VectorNamespace":
        return VectorNamespace(self, kind, identity)

    def texts(self, kind: str, identity: dict) -> "TextNamespace":
        return TextNamespace(self, kind, identity)

    def namespaces(self, kind: str) -> list["Namespace"]:
        """Every stored namespace of `kind` (e.g. "bench-hyde"), its identity read back: for tools that look at
        what a cache holds (benchmarks/refusals.py reads the HyDE answers this way)."""
        with self._guard():
            rows = self._connect().execute("SELECT kind, identity FROM namespaces WHERE kind LIKE ? ORDER BY id",
                                           (f"{kind}:%",)).fetchall()
        types = {cls.value_type: cls for cls in (VectorNamespace, TextNamespace)}
        return [types[full.rpartition(":")[2]](self, full.rpartition(":")[0], json.loads(identity))
                for full, identity in rows]

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- connection and transactions --
    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Any SQLite failure becomes one line that says which file and what to do."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            raise self.error(f"cannot use the cache {self.path}: {exc}") from None
        except sqlite3.DatabaseError as exc:  # not a database, malformed image: not something a rerun fixes
            raise self.error(f"the cache {self.path} is unreadable ({exc}): delete it (it is rebuilt) "
                             "or choose another cache folder") from None
        except OSError as exc:
            raise self.error(f"cannot use the cache {self.path}: {exc.strerror or exc}") from None

    def _connect(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        with self._guard():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we open our own transactions (BEGIN IMMEDIATE), one per batch
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            try:
                db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
                db.execute(f"PRAGMA page_size={PAGE_SIZE}")  # takes effect on a new file only
                db.execute("PRAGMA journal_mode=WAL")  # persistent: readers and a writer never block each other
                db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a killed process loses no commit, never corrupts
                if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                    self._create(db)
            except BaseException:
                db.close()
                raise
            self._db = db
        return db

    def _create(self, db: sqlite3.Connection) -> None:
        with _transaction(db):  # a new file (or one another process is creating right now)
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise self.error(f"the cache {self.path} was written by another rkit version (schema "
                                 f"{version}): delete it or choose another cache folder")
            db.execute("CREATE TABLE IF NOT EXISTS namespaces (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,"
                       " kind TEXT NOT NULL, dim INTEGER, identity TEXT NOT NULL)")
            # a rowid table: values are too large for WITHOUT ROWID (they would spill into overflow pages)
            db.execute("CREATE TABLE IF NOT EXISTS items (ns INTEGER NOT NULL, key BLOB NOT NULL, value BLOB NOT NULL,"
                       " PRIMARY KEY (ns, key))")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _lookup(self, ns: "Namespace", keys: list[bytes]) -> tuple[int | None, dict[bytes, bytes | str]]:
        """The namespace's stored width and key -> raw value, read from one snapshot (a concurrent writer's
        first batch is seen whole or not at all)."""
        found: dict[bytes, bytes | str] = {}
        with self._guard():
            db = self._connect()
            with _transaction(db, "BEGIN"):
                row = db.execute("SELECT id, dim FROM namespaces WHERE name=?", (ns.name,)).fetchone()
                for start in range(0, len(keys) if row else 0, _IN_CHUNK):
                    part = keys[start:start + _IN_CHUNK]
                    marks = ",".join("?" * len(part))
                    found.update(db.execute(f"SELECT key, value FROM items WHERE ns=? AND key IN ({marks})",
                                            (row[0], *part)))
        return (row[1] if row else None), found

    def _put(self, ns: "Namespace", dim: int | None, rows: list[tuple[bytes, bytes | str]]) -> None:
        with self._guard():
            db = self._connect()
            with _transaction(db):
                db.execute("INSERT OR IGNORE INTO namespaces (name, kind, dim, identity) VALUES (?, ?, ?, ?)",
                           (ns.name, ns.kind, dim, json.dumps(ns.identity, sort_keys=True, default=str)))
                ns_id, kind, stored_dim = db.execute("SELECT id, kind, dim FROM namespaces WHERE name=?",
                                                     (ns.name,)).fetchone()
                if (kind, stored_dim) != (ns.kind, dim):
                    raise self.error(f"the cache {self.path} holds {kind} values of width {stored_dim} where "
                                     f"{ns.kind} of width {dim} were expected: delete it")
                db.executemany("INSERT OR IGNORE INTO items VALUES (?, ?, ?)", ((ns_id, k, v) for k, v in rows))


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> Iterator[None]:
    db.execute(begin)  # IMMEDIATE for writes: take the write lock now (waiting up to the busy timeout), not mid-way
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


@contextlib.contextmanager
def _no_stage(total: int) -> Iterator[Callable[[int], None]]:
    yield lambda n=1: None


class Namespace:
    """The values one model + configuration produced, keyed by the sha256 of the exact input text."""

    value_type = "values"

    def __init__(self, store: CacheStore, kind: str, identity: dict):
        self.store, self.identity = store, identity
        self.kind = f"{kind}:{self.value_type}"  # e.g. "bench-documents:float32"
        self.name = namespace_id(self.kind, identity)
        self.dim: int | None = None  # vectors: the width stored with the namespace (None: nothing stored yet)

    def _encode(self, values) -> tuple[int | None, list]:
        raise NotImplementedError

    def _decode(self, raw):
        raise NotImplementedError

    def lookup(self, texts: Sequence[str]) -> dict:
        """text -> stored value, for the texts already stored."""
        keys = {t: text_key(t) for t in texts}
        self.dim, raw = self.store._lookup(self, list(keys.values()))
        return {t: self._decode(raw[k]) for t, k in keys.items() if k in raw}

    def put(self, texts: Sequence[str], values) -> list:
        """Store one batch in one transaction; returns the values as they were stored."""
        texts = list(texts)
        dim, encoded = self._encode(values)
        if len(encoded) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(encoded)} values")
        self.store._put(self, dim, [(text_key(t), raw) for t, raw in zip(texts, encoded)])
        return [self._decode(raw) for raw in encoded]

    def values(self) -> list:
        """Every value stored in this namespace (in no particular order)."""
        with self.store._guard():
            db = self.store._connect()
            with _transaction(db, "BEGIN"):
                row = db.execute("SELECT id, dim FROM namespaces WHERE name=?", (self.name,)).fetchone()
                raw = [v for (v,) in db.execute("SELECT value FROM items WHERE ns=?", (row[0],))] if row else []
        self.dim = row[1] if row else None
        return [self._decode(v) for v in raw]

    def fill(self, texts: Sequence[str], compute: Callable[[list[str]], object], chunk: int,
             stage: Stage | None = None) -> tuple[dict, bool]:
        """text -> value for every text, computing (in chunks of `chunk`, each stored as it is done) only the
        texts not stored yet; and whether nothing had to be computed."""
        stored = self.lookup(texts)
        todo = [t for t in dict.fromkeys(texts) if t not in stored]
        with (stage or _no_stage)(len(todo)) as advance:
            for start in range(0, len(todo), chunk):
                part = todo[start:start + chunk]
                stored.update(zip(part, self.put(part, compute(part))))
                advance(len(part))
        return stored, not todo


class VectorNamespace(Namespace):
    value_type = "float32"

    def _encode(self, values) -> tuple[int, list[bytes]]:
        matrix = np.ascontiguousarray(values, dtype="<f4")
        if matrix.ndim != 2:
            raise ValueError(f"expected a (n, dim) matrix, got shape {matrix.shape}")
        self.dim = matrix.shape[1]
        return matrix.shape[1], [row.tobytes() for row in matrix]

    def _decode(self, raw) -> np.ndarray:
        if not isinstance(raw, bytes) or len(raw) != 4 * (self.dim or -1):
            raise self.store.error(f"the cache {self.store.path} has a damaged vector: delete it (it is rebuilt)")
        return np.frombuffer(raw, dtype="<f4")

    def get(self, texts: Sequence[str], compute: Callable[[list[str]], np.ndarray], chunk: int = 512,
            stage: Stage | None = None) -> tuple[np.ndarray, bool]:
        """(len(texts), dim) float32 in the order of `texts`, and whether all came from the cache."""
        texts = list(texts)
        table, cached = self.fill(texts, compute, chunk, stage)
        if not texts:
            return np.zeros((0, self.dim or 0), dtype=np.float32), cached
        return np.stack([table[t] for t in texts]).astype(np.float32), cached


class TextNamespace(Namespace):
    value_type = "text"

    def _encode(self, values) -> tuple[None, list[str]]:
        values = list(values)
        if not all(isinstance(v, str) for v in values):
            raise ValueError("text values must be str")
        return None, values

    def _decode(self, raw) -> str:
        if not isinstance(raw, str):
            raise self.store.error(f"the cache {self.store.path} has a damaged text entry: delete it (it is rebuilt)")
        return raw

    def get(self, texts: Sequence[str], compute: Callable[[list[str]], list[str]], chunk: int = 64,
            stage: Stage | None = None) -> tuple[list[str], bool]:
        texts = list(texts)
        table, cached = self.fill(texts, compute, chunk, stage)
        return [table[t] for t in texts], cached


# ---- identities: what a model's cached values depend on ---------------------------------------------------

_digests: dict[tuple, str] = {}
_memo: dict[Path, TextNamespace] = {}


def _digest_memo() -> TextNamespace:
    path = rkit_home() / "digests.sqlite3"
    if path not in _memo:
        _memo[path] = CacheStore(path).texts("file-sha256", {"algorithm": "sha256"})
    return _memo[path]


def file_digest(path: str | Path) -> str:
    """Full sha256 of a file's bytes, computed once per (path, size, mtime) and remembered in
    `$RKIT_HOME/digests.sqlite3` (and in memory), so later calls cost a stat and a lookup."""
    path = Path(path).resolve()
    st = path.stat()
    memo_key = (str(path), st.st_size, st.st_mtime_ns)
    if memo_key not in _digests:
        key = json.dumps(memo_key)
        try:
            memo = _digest_memo()
            digest = memo.lookup([key]).get(key)
        except RkitError:  # no usable RKIT_HOME: hash every time, still correct
            memo, digest = None, None
        if digest is None:
            h = hashlib.sha256()
            with path.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            digest = h.hexdigest()
            if memo is not None:
                with contextlib.suppress(RkitError):
                    memo.put([key], [digest])
        _digests[memo_key] = digest
    return _digests[memo_key]


def path_digest(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files (relative names + contents; hidden entries skipped)."""
    path = Path(path).resolve()
    if path.is_file():
        return file_digest(path)
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            file = Path(root) / name
            h.update(f"{file.relative_to(path).as_posix()}\0{file_digest(file)}\0".encode())
    return h.hexdigest()


def _hub_snapshot(name: str) -> Path | None:
    """The local snapshot folder of a Hugging Face hub model in the hub cache, if any (offline lookup)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(name, "config.json")
    except (ImportError, ValueError, OSError):  # not a valid repo id (HFValidationError is a ValueError)
        return None
    return Path(hit).parent if isinstance(hit, str) else None


def model_identity(name: str, source: str | Path | None = None) -> dict:
    """A model given by name: its name, and where its files are local (a folder, or the hub cache's snapshot)
    their resolved path and digest. A hub name with no local copy is identified by its name alone."""
    path = Path(str(source or name)).expanduser()
    if not path.exists():
        path = _hub_snapshot(str(source or name))
    if path is None:
        return {"name": name}
    path = path.resolve()
    return {"name": name, "path": str(path), "sha256": path_digest(path)}


def teacher_identity(name: str) -> dict:
    """A teacher pack is its pinned, verified zip (its folder is derived from it): name and digest, no file read;
    others as files."""
    from .models import packs
    from .models.teacher import resolve_teacher  # finds the packaged folder without importing the model stack

    pack = packs.pack_for(name, "teacher")
    if pack is not None:
        return {"name": pack.name, "sha256": pack.sha256}
    return model_identity(name, resolve_teacher(name))


def backbone_identity(name: str) -> dict:
    """A GGUF alias (the packaged backbone, a backbone pack) is its GGUF file (the dequantised folder is derived
    from it); others as files."""
    from .models.backbone import gguf_aliases, gguf_digest

    if name and name.lower() in gguf_aliases():
        return {"name": name.lower(), "gguf_sha256": gguf_digest(name.lower())}
    return model_identity(name)
