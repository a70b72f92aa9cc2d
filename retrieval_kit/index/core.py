"""``Index``: a vector backend, the SQLite doc store and the manifest of one index folder, kept in step.

Durability rules ("nothing already indexed is lost"):
* every change is one SQLite transaction; the backend is changed inside it and the transaction is
  rolled back if anything fails;
* before the first change after a save, ``meta.backend_synced`` is set to 0 (committed); ``save``
  writes the backend (temp file + rename) and only then sets it back to 1;
* ``open`` rebuilds the backend from the vectors in SQLite when that flag is 0, when the backend
  file is missing or unreadable, or when its count differs from SQLite's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import IndexError_, IndexMismatchError, InputError
from .base import Hit, VectorBackend, one_line
from .faiss_backend import FILENAME as FAISS_FILE
from .faiss_backend import FaissBackend, default_params, new_faiss_index
from .qdrant_backend import DIRNAME as QDRANT_DIR
from .qdrant_backend import QdrantBackend
from .store import DocStore, normalise_chunks

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DOCS = "docs.sqlite"
BACKENDS = ("faiss", "qdrant")
_REQUIRED = ("format_version", "name", "backend", "dim", "encoder")

# (doc_id, content_hash, source, chunks, vectors): one document for ``upsert_documents``.
DocumentUpdate = tuple[str, str, str, Sequence[dict], np.ndarray]


class Index:
    """One index folder. Use ``Index.create`` / ``Index.open``, ideally as a context manager."""

    def __init__(self, folder: Path, manifest: dict, store: DocStore, backend: VectorBackend):
        self.folder, self.manifest, self.store, self.backend = Path(folder), manifest, store, backend
        self._stale = False    # backend may disagree with the store (a change failed half-way): rebuild before use
        self._dirty = False    # meta.backend_synced is 0 on disk
        self._changed = False  # something changed since open: bump manifest "updated" on save
        self._closed = False

    # -- creating and opening ---------------------------------------------------------------
    @classmethod
    def create(cls, folder, *, dim: int, backend: str = "faiss", factory: str = "Flat",
               qdrant_url: str | None = None, collection: str | None = None, encoder: dict,
               chunking: dict | None = None, name: str | None = None,
               faiss_params: dict | None = None, timeout: float = 10) -> "Index":
        """A new empty index in ``folder`` (created if needed). IndexError_ if it already holds one."""
        folder = Path(folder)
        name = name or folder.resolve().name
        label = _label(name, folder)
        if (folder / MANIFEST).exists():
            raise IndexError_(f"{label} already exists; open it, or delete the folder to build it again")
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise InputError(f"{label}: vector dimension must be a positive integer, got {dim!r}")
        if backend not in BACKENDS:
            raise InputError(f"{label}: unknown backend '{backend}' (choose faiss or qdrant)")
        manifest = _new_manifest(name, int(dim), backend, factory, qdrant_url, collection,
                                 encoder, chunking, faiss_params)
        if backend == "faiss":
            new_faiss_index(int(dim), factory)  # a bad factory string fails here, before anything is written

        made_folder = not folder.exists()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"{label}: cannot create the index folder: {one_line(exc)}") from None
        _remove_leftovers(folder)
        try:
            store = DocStore(folder / DOCS, create=True)
            try:
                index = cls(folder, manifest, store, _open_backend(folder, manifest, label, True, timeout))
            except BaseException:
                store.close()
                raise
            try:
                index.save()  # manifest last: a folder without one is never mistaken for an index
            except BaseException:
                index.close()
                raise
        except BaseException:
            if made_folder:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        return index

    @classmethod
    def open(cls, folder, *, timeout: float = 10) -> "Index":
        """The index in ``folder``; IndexError_ one-liners when it is missing or broken."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        label = _label(manifest["name"], folder)
        if not (folder / DOCS).is_file():
            raise IndexError_(f"{label} is missing {DOCS} (its documents and vectors); rebuild the index")
        try:
            store = DocStore(folder / DOCS)
        except sqlite3.DatabaseError as exc:
            raise IndexError_(f"{label}: {DOCS} is unreadable ({one_line(exc)}); rebuild the index") from None
        try:
            index = cls(folder, manifest, store, _open_backend(folder, manifest, label, False, timeout))
        except BaseException:
            store.close()
            raise
        try:
            index._repair_if_needed()
        except BaseException:
            index.close()
            raise
        return index

    def _repair_if_needed(self) -> None:
        synced = self.store.get_meta("backend_synced") == "1"
        if synced and not self.backend.needs_rebuild and self.backend.count() == self.store.count_chunks():
            return
        log.warning("%s: vector backend out of step with %s; rebuilding it from the stored vectors", self.label, DOCS)
        self._stale = True
        try:
            self.save()
        except (IndexError_, OSError, sqlite3.OperationalError) as exc:
            # Read-only folder, or an IVF index still too small to train: open anyway so documents can
            # be added or read; the next search or save retries the rebuild (and says why it fails).
            log.warning("%s: rebuild postponed: %s", self.label, exc)

    # -- properties ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def label(self) -> str:
        return _label(self.name, self.folder)

    # -- checks and reads ---------------------------------------------------------------------
    def check_encoder(self, fingerprint: str, dim: int) -> None:
        """IndexMismatchError unless the index was built with this encoder and dimension."""
        enc = self.manifest.get("encoder") or {}
        built = str(enc.get("fingerprint") or "")
        if built and built != fingerprint:
            raise IndexMismatchError(
                f"{self.label} was built with encoder {built[:12]} ({_describe_encoder(enc)}) "
                f"but {str(fingerprint)[:12]} was given; re-index or pass the matching --adapter"
            )
        if int(dim) != self.dim:
            raise IndexMismatchError(
                f"{self.label} holds {self.dim}-d vectors but the encoder gives {dim}-d; "
                "re-index or pass the matching --adapter"
            )

    def doc_hashes(self) -> dict[str, str]:
        """doc_id -> content_hash, so an incremental re-index can skip unchanged documents."""
        return self.store.doc_hashes()

    def count_documents(self) -> int:
        return self.store.count_documents()

    def count_chunks(self) -> int:
        return self.store.count_chunks()

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """Top-k hits per query (one list per row of ``queries``; a 1-D query gives one list)."""
        queries = self._check_vectors(queries, "query vectors", ndim_one_ok=True)
        if int(k) < 1:
            raise InputError(f"{self.label}: k must be at least 1, got {k}")
        self._check_open()
        self._ensure_synced()
        scores, rows = self.backend.search(queries, int(k))
        chunks = self.store.fetch(rows[rows >= 0])
        return [
            [_hit(chunks[r], s) for s, r in zip(score_row, row_row) if r in chunks]
            for score_row, row_row in zip(scores, rows.tolist())
        ]

    def info(self) -> dict:
        """Manifest plus live counts and size on disk, for ``rkit info``.

        ``vectors`` is what the backend holds (None while a rebuild is pending); it equals ``chunks`` when healthy.
        """
        pending = self._stale or self.backend.needs_rebuild
        return {**self.manifest, "folder": str(self.folder),
                "counts": {"documents": self.count_documents(), "chunks": self.count_chunks()},
                "vectors": None if pending else self.backend.count(), "size_bytes": _folder_size(self.folder)}

    # -- changes ------------------------------------------------------------------------------
    def upsert_document(self, doc_id: str, content_hash: str, source: str, chunks: Sequence[dict],
                        vectors: np.ndarray) -> None:
        """Add a document, or replace all chunks of an existing one, atomically."""
        self.upsert_documents([(doc_id, content_hash, source, chunks, vectors)])

    def upsert_documents(self, items: Iterable[DocumentUpdate]) -> None:
        """Many documents in one transaction and one backend call: the fast path for indexing a corpus."""
        docs = [self._check_document(*item) for item in items]
        if not docs:
            return
        doc_ids = [d[0] for d in docs]
        self._check_chunk_ids(docs)
        now = _now()
        with self._mutation():
            old_rows = self.store.rows_of(doc_ids)
            self.store.delete_documents(doc_ids)
            self.backend.delete(old_rows)
            rows = self.store.allocate_rows(sum(len(d[3]) for d in docs))
            start = 0
            for doc_id, content_hash, source, chunks, vectors in docs:
                self.store.insert_document(doc_id, content_hash, source, len(chunks), now)
                self.store.insert_chunks(rows[start : start + len(chunks)], chunks, vectors)
                start += len(chunks)
            payloads = [c for d in docs for c in d[3]]  # normalised chunks are exactly the Qdrant payload
            self.backend.upsert(rows, np.concatenate([d[4] for d in docs]), payloads)

    def delete_documents(self, doc_ids: Iterable[str]) -> int:
        """Remove documents and their chunks; unknown ids are ignored. Returns how many were removed."""
        doc_ids = list(dict.fromkeys(str(d) for d in doc_ids))
        if not doc_ids:
            return 0
        with self._mutation():
            rows = self.store.rows_of(doc_ids)
            removed = self.store.delete_documents(doc_ids)
            self.backend.delete(rows)
        return removed

    @contextmanager
    def _mutation(self):
        """One SQLite transaction around a change; on failure roll back and rebuild the backend before next use."""
        self._check_open()
        if not self._dirty:  # committed on its own, so a crash from here on is seen at the next open
            self.store.set_meta("backend_synced", "0")
            self._dirty = True
        self.store.begin()
        try:
            yield
            self.store.commit()
            self._changed = True
        except BaseException:
            self.store.rollback()
            self._stale = True
            raise

    def _ensure_synced(self) -> None:
        if self._stale or self.backend.needs_rebuild:
            self.backend.rebuild(self.store.iter_batches())
            self._stale = False

    # -- persisting ---------------------------------------------------------------------------
    def save(self) -> None:
        """Write the backend (atomically), mark it in step with SQLite, then rewrite the manifest."""
        self._check_open()
        self._ensure_synced()
        self.backend.save()
        self.store.set_meta("backend_synced", "1")
        self._dirty = False
        self.manifest["counts"] = {"documents": self.count_documents(), "chunks": self.count_chunks()}
        if self._changed:
            self.manifest["updated"] = _now()
            self._changed = False
        write_manifest(self.folder, self.manifest)

    def close(self) -> None:
        """Release the backend (Qdrant local mode allows one client per folder) and the database. Does not save."""
        if self._closed:
            return
        self._closed = True
        try:
            self.backend.close()
        finally:
            self.store.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.save()
        finally:
            self.close()

    def __repr__(self) -> str:
        return f"Index({str(self.folder)!r}, backend={self.manifest['backend']!r}, dim={self.dim})"

    # -- input validation ---------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise IndexError_(f"{self.label} is closed")

    def _check_vectors(self, vectors, what: str, ndim_one_ok: bool = False) -> np.ndarray:
        arr = np.asarray(vectors, dtype=np.float32)
        if ndim_one_ok and arr.ndim == 1:
            arr = arr.reshape(1, -1)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise InputError(f"{self.label}: {what} have shape {arr.shape}, expected (n, {self.dim})")
        if not np.isfinite(arr).all():
            raise InputError(f"{self.label}: {what} contain NaN or infinite values")
        return np.ascontiguousarray(arr)

    def _check_document(self, doc_id, content_hash, source, chunks, vectors) -> tuple:
        if not doc_id or not isinstance(doc_id, str):
            raise InputError(f"{self.label}: document id must be a non-empty string, got {doc_id!r}")
        chunks = list(chunks)
        if any("chunk_id" not in c for c in chunks):
            raise InputError(f"{self.label}: a chunk of document '{doc_id}' has no chunk_id")
        if not chunks and np.asarray(vectors).size == 0:
            vectors = np.zeros((0, self.dim), np.float32)  # an empty document is kept so its hash is known
        vectors = self._check_vectors(vectors, f"vectors of document '{doc_id}'")
        if len(vectors) != len(chunks):
            raise InputError(f"{self.label}: document '{doc_id}' has {len(chunks)} chunks but {len(vectors)} vectors")
        return doc_id, str(content_hash), source or "", normalise_chunks(doc_id, chunks), vectors

    def _check_chunk_ids(self, docs: list[tuple]) -> None:
        """Reject duplicates before touching anything (a failed transaction forces a backend rebuild)."""
        doc_ids, owner = set(), {}
        for doc_id, _, _, chunks, _ in docs:
            if doc_id in doc_ids:
                raise InputError(f"{self.label}: document '{doc_id}' appears twice in one update")
            doc_ids.add(doc_id)
            for c in chunks:
                if c["chunk_id"] in owner:
                    raise InputError(f"{self.label}: chunk id '{c['chunk_id']}' appears twice "
                                     f"(documents '{owner[c['chunk_id']]}' and '{doc_id}')")
                owner[c["chunk_id"]] = doc_id
        for chunk_id, stored_doc in self.store.chunk_owners(list(owner)).items():
            if stored_doc not in doc_ids:
                raise InputError(f"{self.label}: chunk id '{chunk_id}' of document '{owner[chunk_id]}' "
                                 f"already belongs to document '{stored_doc}'")


# -- manifest ---------------------------------------------------------------------------------
def _new_manifest(name, dim, backend, factory, qdrant_url, collection, encoder, chunking, faiss_params) -> dict:
    now = _now()
    manifest = {"format_version": FORMAT_VERSION, "name": name, "backend": backend}
    if backend == "faiss":
        manifest["factory"] = factory
        manifest["faiss_params"] = default_params(factory) if faiss_params is None else dict(faiss_params)
    else:
        manifest["qdrant"] = {"url": qdrant_url, "collection": collection or name}
    manifest.update({"dim": dim, "metric": "ip", "encoder": dict(encoder or {}), "chunking": dict(chunking or {}),
                     "counts": {"documents": 0, "chunks": 0}, "created": now, "updated": now})
    return manifest


def read_manifest(folder: Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise IndexError_(f"no index at {folder}{_available_hint(folder)}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexError_(f"index manifest {path} is unreadable ({one_line(exc)}); rebuild the index") from None
    missing = [k for k in _REQUIRED if k not in manifest] if isinstance(manifest, dict) else list(_REQUIRED)
    if not missing and manifest["backend"] not in BACKENDS:
        missing = ["a known backend"]
    if not missing:
        missing = ["factory"] if manifest["backend"] == "faiss" and "factory" not in manifest else []
    if missing:
        raise IndexError_(f"index manifest {path} is corrupt (missing {', '.join(missing)}); rebuild the index")
    if not isinstance(manifest["format_version"], int) or manifest["format_version"] > FORMAT_VERSION:
        raise IndexError_(f"index manifest {path} has format version {manifest['format_version']!r}; "
                          f"this rkit reads up to {FORMAT_VERSION}, upgrade rkit")
    return manifest


def write_manifest(folder: Path, manifest: dict) -> None:
    """Temp file + fsync + rename: readers see the old manifest or the new one, never half of one."""
    path = Path(folder) / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def list_indexes(home) -> list[dict]:
    """A short description of every index folder directly under ``home`` (broken ones carry ``error``)."""
    home = Path(home)
    if not home.is_dir():
        return []
    found = []
    for folder in sorted(p for p in home.iterdir() if (p / MANIFEST).is_file()):
        try:
            m = read_manifest(folder)
        except IndexError_ as exc:
            found.append({"name": folder.name, "folder": str(folder), "error": str(exc)})
            continue
        enc = m.get("encoder") or {}
        found.append({
            "name": m["name"], "folder": str(folder), "backend": m["backend"],
            "factory": m.get("factory"), "qdrant_url": (m.get("qdrant") or {}).get("url"), "dim": m["dim"],
            "documents": (m.get("counts") or {}).get("documents"), "chunks": (m.get("counts") or {}).get("chunks"),
            "encoder": str(enc.get("fingerprint") or "")[:12], "backbone": enc.get("backbone"),
            "adapter": enc.get("adapter"), "updated": m.get("updated"), "size_bytes": _folder_size(folder),
        })
    return found


# -- helpers ----------------------------------------------------------------------------------
def _open_backend(folder: Path, manifest: dict, label: str, create: bool, timeout: float) -> VectorBackend:
    if manifest["backend"] == "faiss":
        return FaissBackend(folder, int(manifest["dim"]), manifest["factory"],
                            params=manifest.get("faiss_params"), label=label, create=create)
    qdrant = manifest.get("qdrant") or {}
    url = qdrant.get("url")
    return QdrantBackend(int(manifest["dim"]), qdrant.get("collection") or manifest["name"],
                         folder=None if url else folder, url=url, label=label, create=create, timeout=timeout)


def _remove_leftovers(folder: Path) -> None:
    """Files of a create that died before writing its manifest (only our own names are touched)."""
    for name in (DOCS, DOCS + "-journal", DOCS + "-wal", DOCS + "-shm", FAISS_FILE, FAISS_FILE + ".tmp", MANIFEST + ".tmp"):
        (folder / name).unlink(missing_ok=True)
    shutil.rmtree(folder / QDRANT_DIR, ignore_errors=True)


def _available_hint(folder: Path) -> str:
    names = [i["name"] for i in list_indexes(folder.parent)] if folder.parent.is_dir() else []
    return f"; indexes in {folder.parent}: {', '.join(names)}" if names else ""


def _describe_encoder(enc: dict) -> str:
    parts = [f"{key} {enc[key]}" for key in ("backbone", "teacher", "adapter") if enc.get(key)]
    return ", ".join(parts) or "no details recorded"


def _hit(chunk: dict, score: float) -> Hit:
    return Hit(chunk_id=chunk["chunk_id"], doc_id=chunk["doc_id"], score=float(score), text=chunk["text"],
               title=chunk["title"], source=chunk["source"], metadata=chunk["metadata"])


def _label(name: str, folder: Path) -> str:
    return f"index '{name}' ({folder})"


def _folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
