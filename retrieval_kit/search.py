"""Retriever: the encoder an index was built with + the index → ranked hits, optionally explained.

An index remembers its encoder (adapter, fingerprints, modes). Opening it loads that same encoder (or the
``adapter`` asked for), and one whose document space differs is refused, so a query is never compared with
vectors from another embedding space. The index is opened read-only: searching never writes to it.

Search modes: ``hybrid`` (the default: BM25 + teacher(query) + the adapter's fused query vector, which carries
the generative embedding, fused by DBSF score fusion, see ``HybridRecipe``), ``bm25`` (lexical
alone), and the encoder's dense modes ``generative``, ``teacher``, ``fused``. This is the one search path: the
CLI, a server and ``rkit bench`` all call ``Retriever.search``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import IndexError_, InputError
from .index import ChunkFilter, Hit, Index
from .index.base import Signal
from .index.core import check_name
from .index.fusion import FUSIONS, RRF_K
from .modes import QUERY_MODES
from .paths import DEFAULT_ADAPTER, index_home

if TYPE_CHECKING:
    from .models import GenerativeEncoder

SNIPPET_CHARS = 240
# an explanation is shown as the adapter's answer only when its held-out decodes reach this ROUGE-L against the
# backbone's real answers (model card); below it the decode is mostly noise and is said to be
FAITHFUL_ROUGE_L = 0.2
SEARCH_MODES = ("hybrid", "bm25") + QUERY_MODES
DEFAULT_MODE = "hybrid"  # chosen on tune data, not on an evaluation set: see benchmarks/README.md "Choosing the default"


@dataclass(frozen=True)
class HybridRecipe:
    """What ``hybrid`` fuses: a weight per signal ('bm25' or a dense query mode), the fusion rule, RRF k, depth.

    Chosen by ``python -m benchmarks.tune_hybrid`` on four tune collections that are no evaluation set
    (Python-stdlib docstring summaries against docstring bodies and against code, training-pool prompts against
    the backbone's answers, manual-page NAME lines against their DESCRIPTION), never on CACM, AdvBench-IR or
    BRIGHT qrels; k=60 (for ``rrf``) is the literature's
    constant. An untrained encoder (no adapter) drops the generative signals (generative, fused): its student
    vector is noise.
    """

    # the winner of benchmarks/results/tune/hybrid-recipe.md: DBSF (Qdrant's distribution-based score fusion) of
    # BM25, teacher and fused, mean nDCG@10 0.7815 over the four tune collections vs teacher 0.762, RRF of the same
    # three 0.755. Since queries drop question words for BM25 (index/lexical.QUERY_STOPWORDS, 2026-12-07) it leads
    # the convex min-max fusion of the same three by 0.0001 (a tie: the declared rule picks the best mean); the
    # three runs before that change chose convex, by 0.002 (0.7829 vs 0.7808 with the same adapter)
    weights: tuple[tuple[str, float], ...] = (("bm25", 1.0), ("teacher", 1.0), ("fused", 1.0))
    rrf_k: int = RRF_K
    depth: int = 100
    fusion: str = "dbsf"  # or "rrf" (Qdrant's own fusions, on its server) / "convex"; all three take weights

    @classmethod
    def of(cls, weights: dict[str, float], **kw) -> "HybridRecipe":
        unknown = [name for name in weights if name not in ("bm25",) + QUERY_MODES]
        if unknown:
            raise InputError(f"unknown hybrid signal {', '.join(unknown)} (use bm25, {', '.join(QUERY_MODES)})")
        if any(not w >= 0 for w in weights.values()):
            raise InputError(f"hybrid signal weights must be 0 or more, got {weights}")
        return cls(tuple((n, float(w)) for n, w in weights.items()), **kw)

    @classmethod
    def parse(cls, spec: str, fusion: str | None = None) -> "HybridRecipe":
        """'bm25=1,teacher=1' (a name alone weighs 1) → a recipe (default fusion: the tuned one); InputError naming
        what is wrong."""
        fusion = fusion or cls.fusion
        weights: dict[str, float] = {}
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            name, _, value = part.partition("=")
            try:
                weights[name.strip()] = float(value) if value.strip() else 1.0
            except ValueError:
                raise InputError(f"bad signal weight '{part}' (use e.g. bm25=1,teacher=0.5)") from None
        if fusion not in FUSIONS:
            raise InputError(f"unknown --fusion '{fusion}' (use {' or '.join(FUSIONS)})")
        recipe = cls.of(weights, fusion=fusion)  # names, signs and weights-for-this-fusion
        if not any(w > 0 for w in weights.values()):
            raise InputError(f"--signals '{spec}' names no signal with a weight above 0")
        return recipe

    def spec(self) -> str:
        """The --signals text of this recipe."""
        return ",".join(f"{n}={w:g}" for n, w in self.weights)

    def describe(self) -> str:
        how = {"rrf": f"RRF k={self.rrf_k}", "dbsf": "DBSF", "convex": "convex, min-max"}[self.fusion]
        return " + ".join(f"{w:g}·{n}" for n, w in self.weights if w > 0) + f" ({how})"


DEFAULT_HYBRID = HybridRecipe()


@dataclass
class SearchResult:
    query: str
    query_mode: str
    hits: list[Hit]
    explanation: str | None = None
    timings: dict = field(default_factory=dict)
    query_encoder: str = ""  # fingerprint of the query encoder that made this search's vector
    explained_mode: str | None = None  # the explanation decodes the generative vector, whatever mode searched
    generation: int | None = None  # the index state (snapshot) the hits come from
    told: dict | None = None  # the explanation as shown: text, whether it is trusted and why, lenses (explanation())
    notes: list[str] = field(default_factory=list)  # what the user should know about this search (a cut query)

    def as_dict(self) -> dict:
        return {"query": self.query, "query_mode": self.query_mode, "query_encoder": self.query_encoder,
                "explanation": self.told, "explained_vector": self.explained_mode,
                "timings": self.timings, "notes": self.notes, "hits": [hit_dict(h, self.query) for h in self.hits]}


def hit_dict(hit: Hit, query: str | None = None) -> dict:
    data = asdict(hit)
    data["snippet"] = snippet(hit.text, query=query)
    return data


def snippet(text: str, limit: int = SNIPPET_CHARS, query: str | None = None) -> str:
    """The chunk's text cut to ``limit`` characters at a word; with ``query``, a window around the first place a
    query word occurs when that lies past the plain cut (a chunk that BM25 found for one word late in it showed a
    snippet without that word)."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    at = _first_match(text, query) if query else -1
    if at + 40 > limit:  # the word would not show in the plain cut: start a quarter of the window before it
        start = text.rfind(" ", 0, max(at - limit // 4, 0)) + 1
        text = "…" + text[start:]
    return text if len(text) <= limit else text[: limit - 1].rsplit(" ", 1)[0] + "…"


def _first_match(text: str, query: str) -> int:
    """Where a query word (3+ letters, not a stop word; its stem-ish prefix, so "credential" finds "credentials")
    first occurs in ``text``, -1 for nowhere."""
    import re

    from .index.lexical import query_stopwords

    words = {w for w in re.findall(r"\w{3,}", query.lower()) if w not in query_stopwords()}
    found = [m.start() for w in words if (m := re.search(r"\b" + re.escape(w[: max(4, len(w) - 2)]), text, re.I))]
    return min(found, default=-1)


def index_folder(name_or_path: str | Path, index_dir: str | Path | None = None) -> Path:
    """A bare name is always looked up under the index home (``index_dir``, $RKIT_INDEX_HOME or ./indexes), even
    when a folder of that name sits in the current directory (often the corpus itself); a path is recognisable
    as one (``./docs``, ``../kb``, ``/srv/kb``, ``~/kb``) and used as given."""
    text = str(name_or_path)
    if "/" in text or "\\" in text or text.startswith(("~", ".")):
        return Path(text).expanduser()
    return Path(index_dir).expanduser() / check_name(text) if index_dir else index_home() / check_name(text)


def adapter_path(adapter: str | Path | None) -> tuple[Path | None, str]:
    """(folder to load, how the manifest names it). The shipped adapter is named 'default' so installs can move."""
    if adapter is None or str(adapter) == "default":
        return (DEFAULT_ADAPTER if (DEFAULT_ADAPTER / "config.json").is_file() else None), "default"
    path = Path(adapter).expanduser().resolve()
    return path, str(path)


def encoder_spec(manifest: dict, adapter: str | Path | None = None) -> tuple[Path | None, str | None, str | None]:
    """(adapter folder, backbone, teacher) to load for an index: the ``adapter`` asked for, else the one it was
    built with; backbone and teacher only for an adapter-less (untrained) encoder."""
    stored = manifest["encoder"]
    folder, _ = adapter_path(adapter if adapter is not None else stored.get("adapter"))
    return folder, None if folder else stored.get("backbone"), None if folder else stored.get("teacher")


def load_encoder(*args, **kwargs) -> "GenerativeEncoder":
    """models.load_encoder, imported on first use: torch and transformers cost seconds to import, and a search
    whose input is wrong (no such index, bad flags) should say so before paying for them."""
    from .models import load_encoder as load

    return load(*args, **kwargs)


class Retriever:
    def __init__(self, index: Index, encoder: GenerativeEncoder):
        self.index = index
        self.encoder = encoder
        # hashing the adapter's weights costs ~6 ms: once here, not per search (a retriever's encoder is frozen)
        self.fingerprint = encoder.fingerprint

    @classmethod
    def open(cls, name_or_path: str | Path, adapter: str | Path | None = None, device=None,
             index_dir: str | Path | None = None, decoding: bool = False) -> "Retriever":
        """``decoding``: searches will be explained (decoded to text): models.load_encoder picks the weight type."""
        index = Index.open(index_folder(name_or_path, index_dir))
        try:
            folder, backbone, teacher = encoder_spec(index.manifest, adapter)
            encoder = load_encoder(folder, backbone=backbone, teacher=teacher, device=device, decoding=decoding)
        except BaseException:
            index.close()
            raise
        return cls._checked(index, encoder)

    @classmethod
    def attach(cls, folder: str | Path, encoder: GenerativeEncoder) -> "Retriever":
        """The index in ``folder`` (read-only) searched with an encoder already loaded (benchmarks, a server)."""
        return cls._checked(Index.open(Path(folder)), encoder)

    @classmethod
    def _checked(cls, index: Index, encoder: GenerativeEncoder) -> "Retriever":
        retriever = cls(index, encoder)
        try:
            retriever.check_space()
        except BaseException:
            index.close()
            raise
        return retriever

    def check_space(self) -> None:
        """IndexMismatchError unless this encoder made the index's document vectors (again after a refresh)."""
        doc_mode = self.index.manifest["encoder"].get("doc_mode") or "teacher"
        self.index.check_document_space(self.encoder.doc_fingerprint(doc_mode), self.encoder.config.embed_dim)

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> "Retriever":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def default_query_mode(self) -> str:
        return self.index.manifest["encoder"].get("query_mode", "teacher")

    def signals(self, queries: list[str], mode: str, fuse_weight: float | None,
                hybrid: HybridRecipe = DEFAULT_HYBRID, soft_prompts: bool = False):
        """The ranked lists a search in ``mode`` fuses (one for every mode but hybrid), with query vectors made,
        and the queries' soft prompts when ``soft_prompts`` and a signal ran the backbone (what an explanation
        decodes, so an explained search encodes each query once), else None."""
        weights = dict(hybrid.weights) if mode == "hybrid" else {mode: 1.0}
        if not self.encoder.config.trained:  # no adapter: the student vector is noise, keep what is not
            weights = {n: w for n, w in weights.items() if n in ("bm25", "teacher")} or weights
        weights = {n: w for n, w in weights.items() if w > 0}
        dense = [n for n in weights if n != "bm25"]
        vectors = self.encoder.encode_query_modes(queries, dense, fuse_weight, soft_prompts=soft_prompts) if dense else {}
        signals = [Signal(n, w, texts=queries) if n == "bm25" else Signal(n, w, vectors=vectors[n])
                   for n, w in weights.items()]
        return signals, vectors.get("soft_prompt")

    def search(self, queries: list[str], k: int = 10, query_mode: str | None = None, fuse_weight: float | None = None,
               explain: bool = False, explain_tokens: int = 64,
               hybrid: HybridRecipe = DEFAULT_HYBRID, where: ChunkFilter | None = None) -> list[SearchResult]:
        if k < 1:
            raise InputError(f"-k must be at least 1, got {k}")
        queries = [q.strip() for q in queries]
        if not queries or not all(queries):
            raise InputError("empty query")
        mode = query_mode or self.default_query_mode()
        if mode not in SEARCH_MODES:
            raise InputError(f"unknown query mode '{mode}' (use {', '.join(SEARCH_MODES)})")
        weight = self.index.manifest["encoder"].get("fuse_weight") if fuse_weight is None else fuse_weight
        t0 = time.perf_counter()
        signals, soft = self.signals(queries, mode, weight, hybrid, soft_prompts=explain)
        t1 = time.perf_counter()
        ranked = self.index.search_hybrid(signals, k=k, depth=hybrid.depth, rrf_k=hybrid.rrf_k, fusion=hybrid.fusion,
                                          where=where)
        t2 = time.perf_counter()
        explanations, told = [None] * len(queries), [None] * len(queries)
        if explain:  # decodes the soft prompts the search made; a teacher/bm25 search has none, so encodes once here
            explanations = self.encoder.decode(queries, max_new_tokens=explain_tokens, soft_prompts=soft)
            told = explain_all(self.encoder, queries, explanations, mode)
        t3 = time.perf_counter()
        timings = {"encode_s": round(t1 - t0, 4), "search_s": round(t2 - t1, 4), "explain_s": round(t3 - t2, 4)}
        fingerprint = self.fingerprint if any(not s.lexical for s in signals) else ""
        cuts = self.encoder.query_cuts(queries, [s.name for s in signals if not s.lexical])
        return [SearchResult(q, mode, hits, e, timings, fingerprint, "generative" if explain else None,
                             self.index.generation, t, [cut] if cut else [])
                for q, hits, e, t, cut in zip(queries, ranked, explanations, told, cuts)]


def explain_all(encoder: GenerativeEncoder, queries: list[str], decoded: list[str], query_mode: str = "generative",
                top_k: int = 5, answers: int = 3) -> list[dict]:
    """explanation() for each query with its lenses (models/lens.py: one more backbone pass over the queries)."""
    from .models.lens import lenses

    lens = lenses(encoder, queries, top_k=top_k, answers=answers)
    return [explanation(encoder, text, query_mode, item) for text, item in zip(decoded, lens)]


def explanation(encoder: GenerativeEncoder, text: str, query_mode: str = "generative", lens: dict | None = None) -> dict:
    """A decoded query embedding with what a reader needs to trust it: shown only when the adapter's held-out
    decodes are faithful (ROUGE-L ≥ FAITHFUL_ROUGE_L in its model card), else a note saying why not. ``lens``: the
    query's logit and latent lenses (models/lens.py), which need no faithful decode to be read."""
    info = encoder.describe()
    rouge = info.get("explain_rouge_l")
    text = " ".join(text.split())  # one paragraph: decoded text may be mostly newlines
    if not info["trained"]:
        shown, note = False, "untrained stand-in adapter: its decodes are noise"
    elif rouge is None:
        shown, note = False, "this adapter's model card has no held-out decode score, so its decodes are unverified"
    elif rouge < FAITHFUL_ROUGE_L:
        shown, note = False, (f"this adapter's decodes are not yet faithful: held-out ROUGE-L {rouge:.2f} against "
                              f"the backbone's real answers (shown from {FAITHFUL_ROUGE_L:g}), see its model card")
    else:
        shown, note = True, f"held-out ROUGE-L {rouge:.2f} against the backbone's real answers"
    if query_mode != "generative":  # the decode reads the generative vector, not the one that searched
        note += f"; decoded from the generative embedding, the search used {query_mode}"
    return {"text": text, "shown": shown, "note": note, "rouge_l": rouge, "decoded_from": "generative", "lens": lens}


def open_index_info(name_or_path: str | Path, index_dir: str | Path | None = None) -> dict:
    folder = index_folder(name_or_path, index_dir)
    with Index.open(folder) as index:  # a missing one: IndexError_ naming the indexes that are there
        return index.info()
