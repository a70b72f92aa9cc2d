"""The lexical (BM25) side of an index: what finds the rare identifier a dense vector blurs away.

One analyser for every backend and for queries: bm25s's tokenizer (lower case, words of 2+ word characters,
English stop words removed: Lucene's 33 from documents, NLTK's 179 from queries, QUERY_STOPWORDS) with Snowball
English stemming (PyStemmer). One scoring: BM25 with Lucene's
idf, ln(1 + (N - df + 0.5)/(df + 0.5)), and tf/(tf + k1·(1 - b + b·dl/avgdl)), k1=0.9 and b=0.4 (the
Pyserini/BRIGHT defaults). Both backends compute exactly this:

- FAISS indexes: a bm25s index of every live chunk, saved in ``lexical/`` beside ``faiss.index``. The chunks'
  analysed terms are kept in ``docs.sqlite`` (written in the same transaction as the chunk), so keeping BM25
  up to date after a change re-counts stored terms and never re-reads or re-tokenises the corpus. Like the
  vectors, the saved side records the row checksum it was built from and is rebuilt when that disagrees with
  the store (a writer killed between commit and save, a reader during a write).
- Qdrant: a sparse vector ``bm25`` in the same collection, with Qdrant's IDF modifier (idf at query time
  from the collection) and the tf part as the stored value. Qdrant cannot apply length normalisation at query
  time, so avgdl is baked into the values; the writer rewrites them when the true average drifts by more than
  2 % (Index.save), so a build scores exactly as bm25s does.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..corpus.document import titled

BM25_K1, BM25_B = 0.9, 0.4
LEXICAL_DIR = "lexical"
_STATE = "state.json"


@lru_cache(maxsize=1)
def _stemmer():
    import Stemmer  # PyStemmer: a real dependency, so the analyser is the same on every install

    return Stemmer.Stemmer("english").stemWords


# Queries drop NLTK's English stop words (bm25s "en_plus", 179 words), documents only Lucene's 33 ("en"). The
# extra words are question words and pronouns ("how", "do", "my", "what", "which") that queries are full of and
# that no document is about; in a small index their idf is high, so a chunk sharing only "how" with the query
# ranked second in a hybrid search (new-user walkthrough, 2026-12-07). Query side only: documents are analysed
# as before, so an index built earlier needs nothing.
QUERY_STOPWORDS = "en_plus"


@lru_cache(maxsize=1)
def query_stopwords() -> frozenset[str]:
    """The words QUERY_STOPWORDS names (search snippets skip them too when they look for the query's words)."""
    from bm25s.stopwords import STOPWORDS_EN_PLUS

    return frozenset(STOPWORDS_EN_PLUS)


def analyse(texts: Sequence[str], stopwords: str = "en") -> list[list[str]]:
    """Each text as its BM25 terms (stemmed, stop words removed, in order, repeats kept)."""
    import bm25s

    if not texts:
        return []
    return bm25s.tokenize(list(texts), stopwords=stopwords, stemmer=_stemmer(), return_ids=False,
                          show_progress=False)


def chunk_text(chunk: dict) -> str:
    """What BM25 reads of a stored chunk: the same title + text the dense encoder embedded (corpus.titled)."""
    return titled(chunk.get("title") or "", chunk.get("text") or "")


def query_terms(queries: Sequence[str]) -> list[list[str]]:
    """Each query's distinct terms: a repeated query word counts once (as in Qdrant's sparse query)."""
    return [list(dict.fromkeys(t)) for t in analyse(queries, QUERY_STOPWORDS)]


def term_id(term: str) -> int:
    """A stable 32-bit id for a term (Qdrant sparse indices are uint32; the same id on every machine)."""
    return int.from_bytes(hashlib.blake2b(term.encode("utf-8"), digest_size=4).digest(), "little")


def sparse_document(terms: list[str], avgdl: float) -> tuple[list[int], list[float]]:
    """BM25's tf part of one chunk as a sparse vector (Qdrant multiplies in the idf at query time)."""
    counts: dict[int, int] = {}
    for term in terms:
        tid = term_id(term)
        counts[tid] = counts.get(tid, 0) + 1
    norm = BM25_K1 * (1 - BM25_B + BM25_B * len(terms) / max(avgdl, 1e-9))
    return list(counts), [tf / (tf + norm) for tf in counts.values()]


def sparse_query(terms: list[str]) -> tuple[list[int], list[float]]:
    ids = list(dict.fromkeys(term_id(t) for t in terms))
    return ids, [1.0] * len(ids)


def average_length(term_lists: Iterable[list[str]]) -> float:
    lengths = [len(t) for t in term_lists]
    return float(np.mean(lengths)) if lengths else 1.0


class Bm25Side:
    """bm25s over a FAISS index's live chunks. ``rows[i]`` is the store row of bm25s document i."""

    def __init__(self, folder: Path):
        self.folder = Path(folder) / LEXICAL_DIR
        self.model = None
        self.rows = np.zeros(0, dtype=np.int64)
        self.state: tuple[int, int] | None = None  # (count, row checksum) it was built from

    def load(self) -> "Bm25Side":
        """The saved side, if there is a readable one (anything odd: left empty, to be rebuilt)."""
        import bm25s

        try:
            state = json.loads((self.folder / _STATE).read_text())
            rows = np.load(self.folder / "rows.npy")
            model = bm25s.BM25.load(str(self.folder), mmap=True, show_progress=False) if len(rows) else None
            self.model, self.rows, self.state = model, rows, (int(state["count"]), int(state["checksum"]))
        except (OSError, ValueError, KeyError, TypeError, EOFError):
            self.model, self.rows, self.state = None, np.zeros(0, dtype=np.int64), None
        return self

    def matches(self, count: int, checksum: int) -> bool:
        return self.state == (int(count), int(checksum))

    def rebuild(self, batches: Iterable[tuple[np.ndarray, list[list[str]]]], count: int, checksum: int) -> None:
        """Index these (rows, terms) batches: every live chunk of one store state."""
        import bm25s

        rows, terms = [], []
        for part_rows, part_terms in batches:
            rows.append(np.asarray(part_rows, dtype=np.int64))
            terms += part_terms
        self.rows = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        self.model = None
        if len(self.rows):
            self.model = bm25s.BM25(k1=BM25_K1, b=BM25_B, method="lucene", idf_method="lucene")
            self.model.index(terms, show_progress=False)
        self.state = (int(count), int(checksum))

    def search(self, terms: list[list[str]], k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) per query, best first; rows -1 and scores -inf past what matched any term.
        ``allowed``: only these rows may be returned."""
        scores = np.full((len(terms), k), -np.inf, dtype=np.float32)
        rows = np.full((len(terms), k), -1, dtype=np.int64)
        if self.model is None:
            return scores, rows
        vocab = self.model.vocab_dict
        excluded = None if allowed is None else ~np.isin(self.rows, allowed)
        for i, query in enumerate(terms):
            known = [t for t in query if t in vocab and t]
            if not known:
                continue
            all_scores = np.asarray(self.model.get_scores(known), dtype=np.float32)
            if excluded is not None:
                all_scores[excluded] = 0
            hit = np.flatnonzero(all_scores > 0)
            # best first; ties by row (insertion order), so the ranking is the same on every run
            order = hit[np.lexsort((self.rows[hit], -all_scores[hit]))][:k]
            scores[i, : len(order)] = all_scores[order]
            rows[i, : len(order)] = self.rows[order]
        return scores, rows

    def save(self) -> None:
        """Write aside and swap in: a reader or a kill never sees a half-written side."""
        for left in self.folder.parent.glob(f"{LEXICAL_DIR}.[to][ml][pd]*"):  # what a killed save left behind
            shutil.rmtree(left, ignore_errors=True)
        tmp = self.folder.with_name(f"{LEXICAL_DIR}.tmp{os.getpid()}")
        tmp.mkdir(parents=True)
        if self.model is not None:
            self.model.save(str(tmp), show_progress=False)
        np.save(tmp / "rows.npy", self.rows)
        count, checksum = self.state or (0, 0)
        (tmp / _STATE).write_text(json.dumps({"count": count, "checksum": checksum,
                                              "k1": BM25_K1, "b": BM25_B}))
        old = self.folder.with_name(f"{LEXICAL_DIR}.old{os.getpid()}")
        if self.folder.exists():
            os.replace(self.folder, old)
        os.replace(tmp, self.folder)
        shutil.rmtree(old, ignore_errors=True)
