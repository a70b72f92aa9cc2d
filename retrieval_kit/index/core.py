"""``Index``: a vector backend, the SQLite doc store and the manifest of one index folder, kept in step.

Who may do what:
* **One writer.** ``Index.create`` and ``Index.open(writable=True)`` take the folder's writer lock
  (``lock.py``: flock, released by the kernel even on kill -9) for the life of the object; a second writer
  fails at once naming the holder, or queues with ``wait``.
* **Any number of readers.** ``Index.open`` opens ``docs.sqlite`` read-only, pins one committed snapshot and
  never writes to the folder: no repair is saved, no manifest is rewritten.

How the backend is kept honest (content, not counts):
* every change is one SQLite transaction that also updates ``meta.rows_sum``, a checksum of the set of live
  rows (rows are never reused, a row's vector never changes, so the row set *is* the content);
* the backend is changed inside that transaction (new rows before the commit, replaced rows deleted after
  it), and a failure rolls SQLite back and marks the backend for repair before its next use;
* at every open the backend's own ids are checksummed and compared with the snapshot's. A mismatch (a
  writer killed before its save, a file copied from elsewhere, a half-applied server update) is repaired:
  by the writer, rebuilt from SQLite and saved; by a reader, rebuilt in memory from its snapshot (FAISS,
  local Qdrant) or, on a Qdrant server a reader cannot change, by dropping hits its snapshot does not hold.

The lexical (BM25) side follows the same rules: its terms live in ``docs.sqlite`` with the chunks (one
transaction); FAISS indexes keep a bm25s index in ``lexical/`` that records the row checksum it was built
from and is rebuilt like the vectors when that disagrees (lexical.py); Qdrant keeps it as a sparse vector
on the same points.

Folder safety: a folder is only ever written (or cleaned) if rkit can prove it made it: it was created
empty by rkit, or it holds rkit's marker file. A user's folder is never overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sqlite3
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import IndexError_, IndexMismatchError, InputError
from .base import QDRANT_DIR, ChunkFilter, Hit, Signal, VectorBackend, one_line
from .faiss_backend import FILENAME as FAISS_FILE
from .faiss_backend import FaissBackend, default_params, new_faiss_index
from .fusion import FUSIONS, RRF_K, convex, dbsf, rrf
from .lexical import BM25_B, BM25_K1, LEXICAL_DIR, Bm25Side, analyse, average_length, chunk_text, query_terms
from .lock import WriterLock
from .store import DocStore, normalise_chunks, row_checksum

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DOCS = "docs.sqlite"
MARKER = ".rkit-index"  # written first into a folder rkit creates: proof that the folder's files are rkit's
BACKENDS = ("faiss", "qdrant")
# every name rkit may create in an index folder: the only ones it ever removes
OWN_FILES = (DOCS, DOCS + "-journal", DOCS + "-wal", DOCS + "-shm", FAISS_FILE, FAISS_FILE + ".tmp",
             MANIFEST, MANIFEST + ".tmp")
AVGDL_DRIFT = 0.02  # relative drift of the BM25 average chunk length that makes a Qdrant writer rewrite its sparse values
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
SERVER_OVERFETCH = 16  # extra hits asked of a Qdrant server a reader cannot repair, to fill k after filtering

# (doc_id, content_hash, source, chunks, vectors): one document for ``upsert_documents``.
DocumentUpdate = tuple[str, str, str, Sequence[dict], np.ndarray]


def check_name(name: str) -> str:
    """An index name is a name, not a path: letters, digits, '.', '_', '-' (no '/', no '..', no leading dot)."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise InputError(f"bad index name {name!r}: use letters, digits, '.', '_' or '-' (at most 100, no '/' "
                         "or '..'); to put an index somewhere else, pass --index-dir")
    return name


class Index:
    """One index folder. Use ``Index.create`` / ``Index.open``, ideally as a context manager."""

    def __init__(self, folder: Path, manifest: dict, store: DocStore, backend: VectorBackend, *,
                 writable: bool, lock: WriterLock | None = None):
        self.folder, self.manifest, self.store, self.backend = Path(folder), manifest, store, backend
        self.writable, self._lock = writable, lock
        self._stale = False    # backend may disagree with the store: rebuild before use
        self._filter = False   # reader of a server collection (it cannot repair it): drop hits outside the snapshot
        self._changed = False  # something changed since open: bump manifest "updated" on save
        self._closed = False
        self._state = store.state()
        self._bm25: Bm25Side | None = None  # FAISS: the saved BM25 side, loaded on first use (dense searches skip it)
        self._set_avgdl()

    def _set_avgdl(self) -> None:
        """Qdrant: the BM25 average chunk length its sparse values are written with (recorded with the first
        chunks; an index from before the lexical side takes its stored chunks' average)."""
        if self.backend.kind == "qdrant":
            stored = self.store.get_meta("bm25_avgdl")
            avgdl = float(stored) if stored is not None else self.store.average_terms()
            self.backend.avgdl = (avgdl if avgdl is not None  # a store without the terms table: analyse its texts
                                  else average_length(t for _, terms in self.store.iter_terms() for t in terms))

    # -- creating and opening ---------------------------------------------------------------
    @classmethod
    def create(cls, folder, *, dim: int, backend: str = "faiss", factory: str = "Flat",
               qdrant_url: str | None = None, collection: str | None = None, encoder: dict,
               chunking: dict | None = None, name: str | None = None,
               faiss_params: dict | None = None, timeout: float = 10, wait: float | bool = False) -> "Index":
        """A new empty index in ``folder``, opened for writing. IndexError_ if it already holds one."""
        folder = Path(folder)
        name = name or folder.resolve().name
        label = _label(name, folder)
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise InputError(f"{label}: vector dimension must be a positive integer, got {dim!r}")
        if backend not in BACKENDS:
            raise InputError(f"{label}: unknown backend '{backend}' (choose faiss or qdrant)")
        manifest = _new_manifest(name, int(dim), backend, factory, qdrant_url, collection,
                                 encoder, chunking, faiss_params)
        if backend == "faiss":
            new_faiss_index(int(dim), factory)  # a bad factory string fails here, before anything is written
        made_folder = _claim_folder(folder, label)
        lock = None
        try:
            lock = WriterLock(folder, label).acquire(wait)
            if (folder / MANIFEST).exists() or _store_manifest(folder) is not None:
                raise IndexError_(f"{label} already exists; open it, or pass --rebuild to build it again")
            _remove_own_files(folder)  # what a create that died before its first save left (the marker proves it)
            store = DocStore(folder / DOCS, create=True)
            try:
                index = cls(folder, manifest, store, _open_backend(folder, manifest, label, timeout, create=True),
                            writable=True, lock=lock)
            except BaseException:
                store.close()
                raise
            try:
                index.save()  # manifest last: a folder without one is never mistaken for an index
            except BaseException:
                index.close()
                raise
        except BaseException:
            if lock is not None:
                lock.release()
            if made_folder:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        return index

    @classmethod
    def open(cls, folder, *, writable: bool = False, wait: float | bool = False, timeout: float = 10) -> "Index":
        """The index in ``folder``: a read-only snapshot by default, the (one) writer with ``writable=True``."""
        folder = Path(folder)
        if not (folder / MANIFEST).is_file() and not (folder / DOCS).is_file():
            raise IndexError_(f"no index at {folder}{_available_hint(folder)}")
        if writable and not is_index_folder(folder):  # never take a lock (write a file) in a user's folder
            raise InputError(f"folder {folder} is not an rkit index (no {MARKER} or valid {MANIFEST}); "
                             "choose another --name or --index-dir")
        lock = WriterLock(folder, _label(folder.name, folder)).acquire(wait) if writable else None
        store = backend = None
        try:
            store = _open_store(folder, writable)
            manifest = _load_manifest(folder, store, writable)
            label = _label(manifest["name"], folder)
            if writable:
                store.migrate()
                _write_marker(folder)
            else:
                store.pin()
            backend = _open_backend(folder, manifest, label, timeout, reader=not writable)
            index = cls(folder, manifest, store, backend, writable=writable, lock=lock)
        except BaseException:
            for part in (backend, store):
                if part is not None:
                    part.close()
            if lock is not None:
                lock.release()
            raise
        try:
            index._check_backend()
        except BaseException:
            index.close()
            raise
        return index

    def _check_backend(self) -> None:
        """Compare the backend's ids with the snapshot by checksum; repair (writer) or work around (reader)."""
        _, count, checksum = self._state
        if not self.writable and self.backend.kind == "qdrant" and not self.backend.local:
            # listing a server collection's ids costs a full scroll per search; a reader cannot repair it anyway,
            # so it trusts nothing it cannot see in its own snapshot (rows are never reused: a row it holds is
            # exactly the chunk the server's point was made from)
            self._filter = True
            return
        if not self.backend.needs_rebuild:
            ids = self.backend.ids()
            if len(ids) == count and row_checksum(ids) == checksum:
                return
        if self.writable:
            log.warning("%s: vector backend out of step with %s; rebuilding it from the stored vectors", self.label, DOCS)
            self._stale = True
            self.save()
        else:
            self._stale = True  # rebuilt in memory from this reader's snapshot before the first search

    def _reweight_bm25(self) -> None:
        """Qdrant writer: when the true average chunk length has drifted more than AVGDL_DRIFT from the one the
        sparse values were written with (a build's first batch often differs: CACM's first 256 chunks average
        12 terms, the collection 35), rewrite them. So a fresh build scores exactly as bm25s does."""
        if self.backend.kind != "qdrant" or not self.backend.lexical:
            return
        recorded, true = self.backend.avgdl, self.store.average_terms()
        if true is None or (recorded and abs(true - recorded) <= AVGDL_DRIFT * recorded):
            return
        with self._mutation():  # a new generation: readers rebuild their copies with the new figure
            self.backend.reweight(self.store.iter_terms(), true)
            self.store.set_meta("bm25_avgdl", repr(true))

    def _saved_bm25(self) -> Bm25Side:
        """FAISS: the BM25 side as saved in ``lexical/`` (loaded once)."""
        if self._bm25 is None:
            self._bm25 = Bm25Side(self.folder).load()
        return self._bm25

    def _lexical(self) -> Bm25Side:
        """FAISS: the bm25s side of this state (rebuilt from the stored terms if it was saved from another)."""
        side = self._saved_bm25()
        _, count, checksum = self._state if not self.writable else self.store.state()
        if not side.matches(count, checksum):
            side.rebuild(self.store.iter_terms(), count, checksum)
        return side

    def refresh(self) -> bool:
        """Reader: move to the newest committed state if a writer changed the index. True when it moved."""
        self._check_open()
        if self.writable:
            return False
        self.store.pin()
        state = self.store.state()
        if state == self._state:
            return False
        self.manifest = _load_manifest(self.folder, self.store, False)
        backend = _open_backend(self.folder, self.manifest, self.label, 10, reader=True)
        self.backend.close()
        self.backend, self._state, self._stale, self._filter = backend, state, False, False
        self._bm25 = None  # the writer may have saved a newer one
        self._set_avgdl()
        self._check_backend()
        return True

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

    @property
    def generation(self) -> int:
        """+1 per committed change: a server compares it to know when to ``refresh``."""
        return self._state[0] if not self.writable else self.store.state()[0]

    # -- checks and reads ---------------------------------------------------------------------
    def check_document_space(self, doc_fingerprint: str, dim: int) -> None:
        """IndexMismatchError unless the stored vectors came from this document encoder (fingerprint, dimension).

        Only what produced the *document* vectors matters: with teacher-embedded documents, any adapter trained
        for the same teacher can search the index, and an adapter retrain needs no re-index.
        """
        enc = self.manifest.get("encoder") or {}
        built = str(enc.get("doc_fingerprint") or enc.get("fingerprint") or "")
        if built and built != doc_fingerprint:
            raise IndexMismatchError(
                f"{self.label}: its document vectors come from encoder {built[:12]} ({_describe_encoder(enc)}) "
                f"but this one gives {str(doc_fingerprint)[:12]}; re-index with a new --name or pass the matching --adapter"
            )
        if int(dim) != self.dim:
            raise IndexMismatchError(
                f"{self.label} holds {self.dim}-d vectors but the encoder gives {dim}-d; "
                "re-index with a new --name or pass the matching --adapter"
            )

    def doc_hashes(self) -> dict[str, str]:
        """doc_id -> content_hash, so an incremental re-index can skip unchanged documents."""
        return self.store.doc_hashes()

    def doc_roots(self) -> dict[str, str]:
        """doc_id -> corpus root it came from ('' when not recorded)."""
        return self.store.doc_roots()

    def count_documents(self) -> int:
        return self.store.count_documents()

    def count_chunks(self) -> int:
        return self.store.count_chunks()

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """Top-k hits per query vector (one list per row of ``queries``; a 1-D query gives one list)."""
        vectors = self._check_vectors(queries, "query vectors", ndim_one_ok=True)
        return self.search_hybrid([Signal("dense", 1.0, vectors=vectors)], k=k)

    def search_lexical(self, texts: Sequence[str], k: int = 10) -> list[list[Hit]]:
        """Top-k chunks per query text by BM25 alone."""
        return self.search_hybrid([Signal("bm25", 1.0, texts=list(texts))], k=k)

    def search_hybrid(self, signals: Sequence[Signal], k: int = 10, depth: int = 100,
                      rrf_k: int = RRF_K, fusion: str = "rrf", where: ChunkFilter | None = None) -> list[list[Hit]]:
        """Fuse several ranked lists per query (dense vectors and/or BM25) by weighted RRF, DBSF or a convex
        combination of min-max scores (fusion.py).

        Each signal ranks its best ``depth`` chunks (at least k). FAISS fuses here; Qdrant on the server
        (Query API prefetch + RRF/DBSF), with the same formula; convex and weighted DBSF, which the Query API
        lacks, are fused here for every backend from each signal's own list. A hit's ``signals`` gives its rank
        in each list that found it; with a single signal its score is that signal's own (cosine or BM25), else
        the fused one.
        ``where`` keeps only matching chunks, inside each engine's search (FAISS IDSelector, a mask on the
        BM25 scores, a Qdrant id filter), so a filtered search still returns k hits when k match.
        """
        signals = [s for s in signals if s.weight > 0]
        if not signals:
            raise InputError(f"{self.label}: a search needs at least one signal with a weight above 0")
        signals = [s if s.lexical else replace(s, vectors=self._check_vectors(s.vectors, "query vectors"))
                   for s in signals]
        if len({len(s.texts) if s.lexical else len(s.vectors) for s in signals}) != 1:
            raise InputError(f"{self.label}: every signal needs the same number of queries")
        if int(k) < 1:
            raise InputError(f"{self.label}: k must be at least 1, got {k}")
        if fusion not in FUSIONS:
            raise InputError(f"unknown fusion '{fusion}' (use {' or '.join(FUSIONS)})")
        self._check_open()
        self._ensure_synced()
        nq = len(signals[0].texts) if signals[0].lexical else len(signals[0].vectors)
        allowed = self.store.rows_where(where.source_prefix, where.file_type) if where else None
        if allowed is not None and not len(allowed):
            return [[] for _ in range(nq)]
        asked = int(k) + (SERVER_OVERFETCH if self._filter else 0)
        depth = max(int(depth), asked)
        qdrant = self.backend.kind == "qdrant"
        if qdrant and not self.backend.lexical and any(s.lexical for s in signals):
            raise IndexError_(f"{self.label}: its Qdrant collection was made before rkit kept a lexical side "
                              f"(BM25); {_way_out(self.folder)}")
        if len(signals) == 1:
            scores, rows = self._search_one(signals[0], asked, allowed)
            lists = [rows]
        elif qdrant and (fusion == "rrf" or fusion == "dbsf" and all(s.weight == 1 for s in signals)):
            # fused on the server, one Query API request per query (its DBSF takes no weights: weighted, it is ours)
            scores, rows, lists = self.backend.hybrid(signals, asked, depth, rrf_k, fusion, allowed)
        else:
            parts = [self._search_one(s, depth, allowed) for s in signals]
            scores, rows = _fuse(parts, [s.weight for s in signals], asked, rrf_k, fusion)
            lists = [part_rows for _, part_rows in parts]
        return self._hits(signals, scores, rows, lists, int(k))

    def _search_one(self, signal: Signal, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        if not signal.lexical:
            return self.backend.search(signal.vectors, k, allowed)
        if self.backend.kind == "qdrant":
            return self.backend.search_lexical(signal.texts, k, allowed)
        return self._lexical().search(query_terms(signal.texts), k, allowed)

    def _hits(self, signals: list[Signal], scores: np.ndarray, rows: np.ndarray, lists: list[np.ndarray],
              k: int) -> list[list[Hit]]:
        chunks = self.store.fetch(rows[rows >= 0])  # rows outside this snapshot are simply not found
        out = []
        for i, (score_row, row_row) in enumerate(zip(scores, rows.tolist())):
            ranks = [{int(r): pos + 1 for pos, r in enumerate(part[i].tolist()) if r >= 0} for part in lists]
            hits = []
            for score, row in zip(score_row, row_row):
                if row in chunks:
                    hit = _hit(chunks[row], score)
                    hit.signals = {sig.name: rank[row] for sig, rank in zip(signals, ranks) if row in rank}
                    hits.append(hit)
            out.append(hits[:k])
        return out

    def chunk(self, chunk_id: str) -> Hit | None:
        """One stored chunk by id, as a hit without a score (None when this snapshot has none)."""
        self._check_open()
        found = self.store.chunk(chunk_id)
        return _hit(found, float("nan")) if found else None

    def info(self) -> dict:
        """Manifest plus live counts and size on disk, for ``rkit info``.

        ``vectors`` is what the backend holds (None while a rebuild is pending); it equals ``chunks`` when healthy.
        """
        self._check_open()
        self._ensure_synced()  # a reader's in-memory copy, so the figures are the ones a search would see
        pending = self._stale or self.backend.needs_rebuild
        return {**self.manifest, "folder": str(self.folder),
                "counts": {"documents": self.count_documents(), "chunks": self.count_chunks()},
                "vectors": None if pending else self.backend.count(), "generation": self.generation,
                "lexical": self._lexical_info(),
                "exact_standin": self.backend.standin,
                "size_bytes": _folder_size(self.folder)}

    def _lexical_info(self) -> dict:
        """What the BM25 side is and holds (``chunks`` equals the chunk count when it is in step)."""
        if self.backend.kind != "qdrant":
            side = self._lexical()
            return {"engine": "bm25s", "chunks": int(len(side.rows)), "k1": BM25_K1, "b": BM25_B}
        if not self.backend.lexical:
            return {"engine": None, "note": "collection made before the lexical side: rebuild it"}
        return {"engine": "qdrant sparse (idf modifier)", "chunks": self.count_chunks(), "k1": BM25_K1,
                "b": BM25_B, "avgdl": round(float(self.backend.avgdl or 0), 2)}

    # -- changes (writer only) ---------------------------------------------------------------
    def upsert_document(self, doc_id: str, content_hash: str, source: str, chunks: Sequence[dict],
                        vectors: np.ndarray, root: str = "") -> None:
        """Add a document, or replace all chunks of an existing one, atomically."""
        self.upsert_documents([(doc_id, content_hash, source, chunks, vectors)], root=root)

    def upsert_documents(self, items: Iterable[DocumentUpdate], root: str = "") -> None:
        """Many documents in one transaction and one backend call: the fast path for indexing a corpus.

        New points go to the backend before the commit and replaced ones leave it after, so a backend that
        applies changes at once (Qdrant) never lacks a committed chunk; leftovers are repaired by checksum.
        """
        self._check_writable()
        docs = [self._check_document(*item) for item in items]
        if not docs:
            return
        doc_ids = [d[0] for d in docs]
        self._check_chunk_ids(docs)
        now = _now()
        with self._mutation():
            _, old_rows = self.store.delete_documents(doc_ids)
            rows = self.store.allocate_rows(sum(len(d[3]) for d in docs))
            payloads = [c for d in docs for c in d[3]]  # normalised chunks are exactly the Qdrant payload
            terms = analyse([chunk_text(c) for c in payloads])
            if self.store.get_meta("bm25_avgdl") is None:
                self.store.set_meta("bm25_avgdl", repr(average_length(terms)))
                self._set_avgdl()
            start = 0
            for doc_id, content_hash, source, chunks, vectors in docs:
                self.store.insert_document(doc_id, content_hash, source, len(chunks), now, root)
                self.store.insert_chunks(rows[start : start + len(chunks)], chunks, vectors,
                                         terms[start : start + len(chunks)])
                start += len(chunks)
            self.backend.upsert(rows, np.concatenate([d[4] for d in docs]), payloads, terms)
        self._delete_from_backend(old_rows)

    def delete_documents(self, doc_ids: Iterable[str]) -> int:
        """Remove documents and their chunks; unknown ids are ignored. Returns how many were removed."""
        self._check_writable()
        doc_ids = list(dict.fromkeys(str(d) for d in doc_ids))
        if not doc_ids:
            return 0
        with self._mutation():
            removed, rows = self.store.delete_documents(doc_ids)
        self._delete_from_backend(rows)
        return removed

    def move_root(self, old: str, new: str) -> int:
        """Documents read from corpus root ``old`` now come from ``new`` (the folder was moved)."""
        self._check_writable()
        with self._mutation():
            moved = self.store.set_root(old, new)
        return moved

    def _delete_from_backend(self, rows: np.ndarray) -> None:
        try:
            self.backend.delete(rows)
        except Exception as exc:  # committed already: stray points are harmless (never in the store) and repaired
            log.warning("%s: could not remove %d replaced vectors yet (%s); repairing before the next use",
                        self.label, len(rows), one_line(exc))
            self._stale = True

    @contextmanager
    def _mutation(self):
        """One SQLite transaction around a change; on failure roll back and rebuild the backend before next use."""
        self._check_open()
        self.store.begin()
        try:
            yield
            self.store.commit()
            self._changed = True
        except BaseException:
            self.store.rollback()
            self._stale = True
            raise

    def prepare(self) -> None:
        """Reader: make this snapshot ready to search now (vectors rebuilt in memory if the saved file is from
        another state, the BM25 side loaded), so a server can do it off its serving thread before swapping in."""
        self._check_open()
        self._ensure_synced()
        if self.backend.kind != "qdrant":
            self._lexical()

    def _ensure_synced(self) -> None:
        if self._stale or self.backend.needs_rebuild:
            self.backend.rebuild(self.store.iter_batches())
            self._stale = False

    def set_factory(self, factory: str, params: dict | None = None) -> None:
        """Writer: serve this FAISS index with another index_factory string (rebuilt from the stored vectors),
        searched with ``params`` (default: the factory's defaults)."""
        self._check_writable()
        if self.manifest["backend"] != "faiss":
            raise InputError(f"{self.label} uses the qdrant backend; --factory is for faiss indexes")
        new_faiss_index(self.dim, factory)  # a bad string fails before anything changes
        params = default_params(factory) if params is None else dict(params)
        self.backend = FaissBackend(self.folder, self.dim, factory, params=params, label=self.label, create=True)
        self.manifest.update({"factory": factory, "faiss_params": params})
        self._stale = self._changed = True

    def set_search_params(self, params: dict) -> None:
        """Writer: FAISS search-time knobs (efSearch, nprobe), recorded in the manifest and used by every open."""
        self._check_writable()
        if self.manifest["backend"] != "faiss":
            raise InputError(f"{self.label} uses the qdrant backend; --search-params is for faiss indexes")
        self.backend.set_params(params)
        self.manifest["faiss_params"] = dict(params)
        self._changed = True

    # -- persisting ---------------------------------------------------------------------------
    def save(self) -> None:
        """Writer: write the backend (atomically), then the manifest (file, and a copy inside docs.sqlite)."""
        self._check_writable()
        self._ensure_synced()
        self._reweight_bm25()
        self.backend.save()
        if self.backend.kind != "qdrant":
            before = self._saved_bm25().state
            if self._lexical().state != before or not (self.folder / LEXICAL_DIR).is_dir():  # rebuilt: changed
                self._bm25.save()
        self.manifest["counts"] = {"documents": self.count_documents(), "chunks": self.count_chunks()}
        if self._changed:
            self.manifest["updated"] = _now()
            self._changed = False
        write_manifest(self.folder, self.manifest)
        self.store.set_meta("manifest", json.dumps(self.manifest, ensure_ascii=False))

    def close(self) -> None:
        """Release the backend, the database and (writer) the lock. Does not save."""
        if self._closed:
            return
        self._closed = True
        try:
            self.backend.close()
        finally:
            try:
                self.store.close()
            finally:
                if self._lock is not None:
                    self._lock.release()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and self.writable and not self._closed:
                self.save()
        finally:
            self.close()

    def __repr__(self) -> str:
        mode = "writer" if self.writable else "reader"
        return f"Index({str(self.folder)!r}, backend={self.manifest['backend']!r}, dim={self.dim}, {mode})"

    # -- input validation ---------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise IndexError_(f"{self.label} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if not self.writable:
            raise IndexError_(f"{self.label} is open read-only; open it with writable=True (one writer at a time)")

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


def committed_generation(folder: Path) -> int:
    """The newest committed generation of the index in ``folder`` (a fresh read-only look: cheap, no snapshot)."""
    store = DocStore(Path(folder) / DOCS, readonly=True, timeout=5)
    try:
        return int(store.get_meta("generation", "0"))
    finally:
        store.close()


def read_manifest(folder: Path) -> dict:
    """The manifest file of ``folder``, validated; IndexError_ one-liners that name the way out."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise IndexError_(f"no index at {folder}{_available_hint(folder)}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexError_(f"index manifest {path} is unreadable ({one_line(exc)}); {_way_out(folder)}") from None
    problem = manifest_problem(manifest)
    if problem:
        raise IndexError_(f"index manifest {path} is corrupt ({problem}); {_way_out(folder)}")
    if manifest["format_version"] > FORMAT_VERSION:
        raise IndexError_(f"index manifest {path} has format version {manifest['format_version']!r}; "
                          f"this rkit reads up to {FORMAT_VERSION}, upgrade rkit")
    return manifest


def manifest_problem(manifest) -> str | None:
    """What is wrong with a parsed manifest (missing keys, wrong types), or None."""
    if not isinstance(manifest, dict):
        return "not a JSON object"
    checks = [("format_version", int), ("name", str), ("backend", str), ("dim", int), ("encoder", dict)]
    missing = [key for key, _ in checks if key not in manifest]
    if missing:
        return f"missing {', '.join(missing)}"
    for key, kind in checks:
        if not isinstance(manifest[key], kind) or isinstance(manifest[key], bool):
            return f"'{key}' should be {kind.__name__}, got {json.dumps(manifest[key])[:40]}"
    if manifest["backend"] not in BACKENDS:
        return f"unknown backend {manifest['backend']!r}"
    if manifest["dim"] < 1:
        return f"'dim' must be positive, got {manifest['dim']}"
    if manifest["backend"] == "faiss" and not isinstance(manifest.get("factory"), str):
        return "missing factory"
    for key in ("chunking", "counts", "faiss_params", "qdrant"):
        if key in manifest and manifest[key] is not None and not isinstance(manifest[key], dict):
            return f"'{key}' should be an object"
    return None


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


def _load_manifest(folder: Path, store: DocStore, writable: bool) -> dict:
    """The manifest file, or, when it is missing or broken, the copy kept in docs.sqlite (the writer restores it)."""
    try:
        return read_manifest(folder)
    except IndexError_ as exc:
        copy = _parse_copy(store.get_meta("manifest"))
        if copy is None:
            raise
        if writable:
            log.warning("%s; restored it from the copy in %s", exc, DOCS)
            write_manifest(folder, copy)
        return copy


def _parse_copy(text: str | None) -> dict | None:
    try:
        manifest = json.loads(text) if text else None
    except json.JSONDecodeError:
        return None
    return manifest if manifest is not None and manifest_problem(manifest) is None else None


def _store_manifest(folder: Path) -> dict | None:
    """The manifest copy inside an existing docs.sqlite (an intact index whose manifest.json is gone), or None."""
    if not (folder / DOCS).is_file():
        return None
    try:
        store = DocStore(folder / DOCS, readonly=True)
    except sqlite3.DatabaseError:
        return None
    try:
        return _parse_copy(store.get_meta("manifest"))
    finally:
        store.close()


def list_indexes(home) -> list[dict]:
    """A short description of every index folder directly under ``home`` (broken ones carry ``error``)."""
    home = Path(home)
    if not home.is_dir():
        return []
    found = []
    for folder in sorted(p for p in home.iterdir() if (p / MANIFEST).is_file() or (p / MARKER).is_file()):
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
            "encoder": str(enc.get("fingerprint") or ""), "backbone": enc.get("backbone"),
            "adapter": enc.get("adapter"), "updated": m.get("updated"), "size_bytes": _folder_size(folder),
        })
    return found


def remove_index(folder: Path, wait: float | bool = False) -> None:
    """Delete an index's own files (``--rebuild``): only in a folder provably rkit's, only rkit's names.

    Anything else in the folder stays. A Qdrant server collection is never dropped from here.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    if not is_index_folder(folder):
        raise InputError(f"{folder} is not an rkit index folder (no {MARKER} or {MANIFEST}); nothing was removed")
    lock = WriterLock(folder, _label(folder.name, folder)).acquire(wait)
    try:
        _remove_own_files(folder)
    finally:
        lock.release()


# -- helpers ----------------------------------------------------------------------------------
def existing_index(folder: Path) -> bool:
    """Whether ``folder`` holds an rkit index (False: absent or empty). InputError for anything else there, so a
    user's folder is refused before any work (rkit never writes into a folder it did not make)."""
    if not folder.exists():
        return False
    if not folder.is_dir():
        raise InputError(f"{folder} exists and is not a folder; choose another --name or --index-dir")
    if is_index_folder(folder):
        return True
    if any(folder.iterdir()):
        raise InputError(f"folder {folder} already exists and is not an rkit index; choose another --name or "
                         "--index-dir (rkit never writes into a folder it did not make)")
    return False


def _claim_folder(folder: Path, label: str) -> bool:
    """Make ``folder`` an index folder, or refuse: True if this call created it. Never touches a user's folder."""
    if existing_index(folder):
        return False
    if folder.is_dir():  # empty
        _write_marker(folder)
        return False
    try:
        folder.mkdir(parents=True)
        _write_marker(folder)
    except OSError as exc:
        raise InputError(f"{label}: cannot create the index folder: {one_line(exc)}") from None
    return True


def is_index_folder(folder: Path) -> bool:
    """The marker, or (indexes made before the marker existed) a manifest that parses as an rkit manifest."""
    if (folder / MARKER).is_file():
        return True
    try:
        return manifest_problem(json.loads((folder / MANIFEST).read_text(encoding="utf-8"))) is None
    except (OSError, ValueError):
        return False


def _write_marker(folder: Path) -> None:
    marker = folder / MARKER
    if not marker.exists():
        marker.write_text("This folder is an rkit index (see indexes/README.md). rkit only removes its own files here.\n",
                          encoding="utf-8")


def _remove_own_files(folder: Path) -> None:
    for name in OWN_FILES:
        (folder / name).unlink(missing_ok=True)
    for name in (QDRANT_DIR, LEXICAL_DIR):
        shutil.rmtree(folder / name, ignore_errors=True)


def _open_store(folder: Path, writable: bool) -> DocStore:
    label = _label(folder.name, folder)
    if not (folder / DOCS).is_file():
        raise IndexError_(f"{label} is missing {DOCS} (its documents and vectors); {_way_out(folder)}")
    try:
        return DocStore(folder / DOCS, readonly=not writable)
    except sqlite3.DatabaseError as exc:
        raise IndexError_(f"{label}: {DOCS} is unreadable ({one_line(exc)}); {_way_out(folder)}") from None


def _way_out(folder: Path) -> str:
    return f"rebuild it from its corpus: rkit index CORPUS --name {folder.name} --rebuild"


def _open_backend(folder: Path, manifest: dict, label: str, timeout: float, *, create: bool = False,
                  reader: bool = False) -> VectorBackend:
    """The index's backend. A reader never opens the local Qdrant folder (one process only, and that is the
    writer's): it gets an in-memory collection, filled from its snapshot by the first sync."""
    if manifest["backend"] == "faiss":
        return FaissBackend(folder, int(manifest["dim"]), manifest["factory"],
                            params=manifest.get("faiss_params"), label=label, create=create)
    qdrant = manifest.get("qdrant") or {}
    url = qdrant.get("url")
    from .qdrant_backend import QdrantBackend

    return QdrantBackend(int(manifest["dim"]), qdrant.get("collection") or manifest["name"],
                         folder=None if url else folder, url=url, label=label, create=create, timeout=timeout,
                         memory=reader and not url)


def _available_hint(folder: Path) -> str:
    names = [i["name"] for i in list_indexes(folder.parent)] if folder.parent.is_dir() else []
    return f"; indexes in {folder.parent}: {', '.join(names)}" if names else ""


def _describe_encoder(enc: dict) -> str:
    parts = [f"{key} {enc[key]}" for key in ("backbone", "teacher", "adapter") if enc.get(key)]
    return ", ".join(parts) or "no details recorded"


def _fuse(parts: list[tuple[np.ndarray, np.ndarray]], weights: list[float], k: int, rrf_k: int,
          fusion: str) -> tuple[np.ndarray, np.ndarray]:
    """Per query, RRF (DBSF, convex) of each signal's (scores, rows) (-1 = none) into the k best, like a backend's."""
    nq = len(parts[0][1])
    scores, rows = np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64)
    for i in range(nq):
        found = [(s[i][r[i] >= 0], r[i][r[i] >= 0]) for s, r in parts]
        if fusion == "rrf":  # ranks only
            fused = rrf([r.tolist() for _, r in found], weights, rrf_k, limit=k)
        else:
            pairs = [list(zip(r.tolist(), s.astype(float).tolist())) for s, r in found]
            fused = (dbsf if fusion == "dbsf" else convex)(pairs, weights, limit=k)
        for j, (row, score) in enumerate(fused):
            scores[i, j], rows[i, j] = score, row
    return scores, rows


def _hit(chunk: dict, score: float) -> Hit:
    return Hit(chunk_id=chunk["chunk_id"], doc_id=chunk["doc_id"], score=float(score), text=chunk["text"],
               title=chunk["title"], source=chunk["source"], metadata=chunk["metadata"])


def _label(name: str, folder: Path) -> str:
    return f"index '{name}' ({folder})"


def _folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
