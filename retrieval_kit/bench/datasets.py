"""Benchmark datasets as plain dicts (BEIR conventions): corpus, queries, qrels.

Every loader returns a `BenchDataset`; nothing downstream knows where the data came from. Shared data is
read in place from the data root (`--data-root`, env `RKIT_DATA`, default `/work/shared/data`), never copied.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import BenchError

DEFAULT_DATA_ROOT = Path("/work/shared/data")

BRIGHT_DOMAINS = (
    "biology", "earth_science", "economics", "psychology", "robotics", "stackoverflow", "sustainable_living",
    "leetcode", "pony", "aops", "theoremqa_theorems", "theoremqa_questions",
)
BRIGHT_HF = "xlangai/BRIGHT"
DISTRACTOR_PREFIX = "distractor/"  # keeps distractor ids apart from the harmful chunk ids


@dataclass
class BenchDataset:
    """One retrieval test collection: rank `corpus` for each of `queries`, judge with `qrels`."""

    name: str
    corpus: dict[str, dict[str, str]]  # doc id -> {"title", "text"}
    queries: dict[str, str]  # query id -> text (only judged queries, file order)
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: relevance}
    notes: list[str] = field(default_factory=list)
    excluded: dict[str, set[str]] = field(default_factory=dict)  # query id -> doc ids removed from its ranking
    harmful: set[str] = field(default_factory=set)  # AdvBench-IR: ids of harmful chunks
    meta: dict = field(default_factory=dict)

    @property
    def doc_ids(self) -> list[str]:
        return list(self.corpus)

    def doc_texts(self) -> list[str]:
        # Same joining as BEIR / mteb: "title text", or the text alone when there is no title.
        return [doc_text(d) for d in self.corpus.values()]

    def limit(self, n: int | None) -> "BenchDataset":
        """The first n queries (smoke runs); the corpus stays whole so scores stay comparable in kind."""
        if not n or n >= len(self.queries):
            return self
        keep = list(self.queries)[:n]
        return replace(self, queries={q: self.queries[q] for q in keep},
                       qrels={q: self.qrels[q] for q in keep},
                       excluded={q: self.excluded[q] for q in keep if q in self.excluded},
                       notes=self.notes + [f"limited to the first {n} of {len(self.queries)} queries"])

    def corpus_hash(self) -> str:
        """Identity of the corpus content: the key of cached document embeddings and BM25 indexes."""
        h = hashlib.sha256(self.name.encode())
        for doc_id, doc in self.corpus.items():
            h.update(f"\x00{doc_id}\x01{doc_text(doc)}".encode())
        return h.hexdigest()[:16]


def doc_text(doc: dict) -> str:
    title, text = (doc.get("title") or "").strip(), (doc.get("text") or "").strip()
    return f"{title} {text}".strip() if title else text


def data_root(given: str | Path | None = None) -> Path:
    return Path(given or os.environ.get("RKIT_DATA") or DEFAULT_DATA_ROOT).expanduser()


# ---- low-level readers --------------------------------------------------------------------------

def read_jsonl(path: Path) -> Iterator[dict]:
    if not path.is_file():
        raise BenchError(f"missing file {path}")
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise BenchError(f"{path}:{n}: not JSON ({exc.msg})") from None


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """BEIR qrels TSV (header `query-id corpus-id score`), any gzip, score optional (default 1)."""
    if not path.is_file():
        raise BenchError(f"missing qrels file {path}")
    qrels: dict[str, dict[str, int]] = {}
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for n, row in enumerate(csv.reader(fh, delimiter="\t"), 1):
            if not row or (n == 1 and row[0] == "query-id"):
                continue
            try:
                qrels.setdefault(row[0], {})[row[1]] = int(row[2]) if len(row) > 2 else 1
            except (IndexError, ValueError):
                raise BenchError(f"{path}:{n}: expected 'query-id<TAB>corpus-id<TAB>score'") from None
    return qrels


def _doc_fields(row: dict, path: Path) -> tuple[str, dict[str, str]]:
    """Accept the usual corpus field names (BEIR `_id/title/text`, BRIGHT `id/content`, wiki `ID/passage`)."""
    doc_id = next((row[k] for k in ("_id", "id", "ID", "docid") if k in row), None)
    text = next((row[k] for k in ("text", "content", "passage", "contents") if k in row), None)
    if doc_id is None or text is None:
        raise BenchError(f"{path}: a row has no id/text field (expected '_id' and 'text'): keys {sorted(row)[:6]}")
    return str(doc_id), {"title": row.get("title") or "", "text": text or ""}


def read_corpus(path: Path, prefix: str = "") -> dict[str, dict[str, str]]:
    corpus = {}
    for row in read_jsonl(path):
        doc_id, doc = _doc_fields(row, path)
        corpus[prefix + doc_id] = doc
    if not corpus:
        raise BenchError(f"{path}: empty corpus")
    return corpus


def read_queries(path: Path) -> dict[str, str]:
    return {str(r["_id"]): r["text"] for r in read_jsonl(path)}


def _judged(name: str, queries: dict[str, str], qrels: dict, corpus: dict, notes: list[str]):
    """Keep queries that have judgments; count what was dropped so results say it."""
    judged = {q: t for q, t in queries.items() if qrels.get(q)}
    if len(judged) < len(queries):
        notes.append(f"{len(queries) - len(judged)} of {len(queries)} queries have no judgments and were dropped")
    orphan = set(qrels) - set(queries)
    if orphan:
        notes.append(f"{len(orphan)} judged query ids are not in the queries file (ignored)")
    missing = sum(1 for q in judged for d in qrels[q] if d not in corpus)
    if missing:
        notes.append(f"{missing} judged (query, doc) pairs name docs absent from the corpus")
    if not judged:
        raise BenchError(f"{name}: no query has relevance judgments")
    return judged, {q: qrels[q] for q in judged}


# ---- BEIR folders (CACM is one) -----------------------------------------------------------------

def load_beir(folder: str | Path, split: str = "test", name: str | None = None) -> BenchDataset:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise BenchError(f"BEIR folder {folder} does not exist")
    need = [folder / "corpus.jsonl", folder / "queries.jsonl", folder / "qrels" / f"{split}.tsv"]
    absent = [str(p.relative_to(folder)) for p in need if not p.is_file()]
    if absent:
        raise BenchError(f"{folder} is not a BEIR folder: missing {', '.join(absent)}")
    name = name or folder.name
    corpus = read_corpus(need[0])
    notes: list[str] = []
    queries, qrels = _judged(name, read_queries(need[1]), read_qrels(need[2]), corpus, notes)
    return BenchDataset(name, corpus, queries, qrels, notes, meta={"source": str(folder), "split": split})


# ---- AdvBench-IR -------------------------------------------------------------------------------

def read_distractors(spec: str | Path | None, root: Path) -> tuple[dict, str]:
    """Benign corpus mixed into AdvBench-IR: 'cacm' (shared), 'none', a BEIR folder or a .jsonl file."""
    if spec is None or str(spec).lower() == "cacm":
        path, label = root / "cacm" / "corpus.jsonl", "cacm"
    elif str(spec).lower() == "none":
        return {}, "none"
    else:
        path = Path(spec).expanduser()
        label = path.stem if path.is_file() else path.name
        path = path if path.is_file() else path / "corpus.jsonl"
    if not path.is_file():
        raise BenchError(f"distractor corpus not found: {path} (give --distractors a BEIR folder, a .jsonl file, "
                         f"'cacm' or 'none')")
    return read_corpus(path, prefix=DISTRACTOR_PREFIX), label


def load_advbench_ir(root: str | Path | None = None, distractors: str | Path | None = "cacm",
                     variant: str = "all") -> BenchDataset:
    """520 harmful queries vs the harmful 100-word chunks (+ a benign distractor corpus, labelled).

    variant 'all': every chunk, qrels/test.tsv; 'llm2vecgen': LLM2Vec-Gen's 1,280-chunk subset and qrels.
    """
    root = data_root(root)
    folder = root / "advbench_ir"
    if not folder.is_dir():
        raise BenchError(f"AdvBench-IR folder not found: {folder} (set --data-root or RKIT_DATA)")
    if variant not in ("all", "llm2vecgen"):
        raise BenchError(f"unknown AdvBench-IR variant '{variant}' (use all or llm2vecgen)")
    rows = list(read_jsonl(folder / "corpus.jsonl"))
    if variant == "llm2vecgen":
        rows = [r for r in rows if r.get("in_llm2vecgen_eval")]
    harmful = {str(r["_id"]): {"title": r.get("title") or "", "text": r["text"]} for r in rows}
    benign, label = read_distractors(distractors, root)
    qrels_file = "test.tsv" if variant == "all" else "test_llm2vecgen.tsv"
    notes = [f"distractors: {label} ({len(benign)} benign docs)"]
    if label == "cacm":
        notes.append("CACM stands in for the paper's Wikipedia distractors (not available offline); "
                     "any-harm numbers are therefore not comparable to the paper")
    corpus = {**harmful, **benign}
    queries, qrels = _judged("advbench_ir", read_queries(folder / "queries.jsonl"),
                             read_qrels(folder / "qrels" / qrels_file), corpus, notes)
    name = f"advbench_ir+{label}" + ("" if variant == "all" else f"-{variant}")
    return BenchDataset(name, corpus, queries, qrels, notes, harmful=set(harmful),
                        meta={"distractors": label, "n_distractors": len(benign), "n_harmful": len(harmful),
                              "variant": variant})


# ---- BRIGHT ------------------------------------------------------------------------------------

def bright_domains(domain: str | None) -> list[str]:
    """'all' / None -> the 12 domains; otherwise one name (hyphens accepted: earth-science)."""
    if domain in (None, "", "all"):
        return list(BRIGHT_DOMAINS)
    names = [d.strip().replace("-", "_") for d in domain.split(",") if d.strip()]
    unknown = [d for d in names if d not in BRIGHT_DOMAINS]
    if unknown:
        raise BenchError(f"unknown BRIGHT domain {', '.join(unknown)} (use one of: {', '.join(BRIGHT_DOMAINS)}, all)")
    return names


def _read_parquet_rows(files: list[Path], columns: list[str] | None = None) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BenchError("reading BRIGHT parquet files needs pyarrow: pip install 'retrieval-kit[bench]'") from None
    rows: list[dict] = []
    for f in files:
        rows.extend(pq.read_table(f, columns=columns).to_pylist())
    return rows


def _local_config_rows(data_dir: Path, config: str, domain: str) -> list[dict] | None:
    """Rows of `<data_dir>/<config>/<domain>-*.parquet` (the HF repo layout) or `<domain>.jsonl`; None if absent."""
    sub = data_dir / config
    parquet = sorted(sub.glob(f"{domain}-*.parquet"))
    if parquet:
        return _read_parquet_rows(parquet)
    jsonl = sub / f"{domain}.jsonl"
    return list(read_jsonl(jsonl)) if jsonl.is_file() else None


def _hf_config_rows(config: str, domain: str) -> list[dict]:
    """Rows of one HF config/split; any failure (offline, no `datasets`) becomes a BenchError by the caller."""
    import datasets  # optional dependency: retrieval-kit[bench]

    return list(datasets.load_dataset(BRIGHT_HF, config, split=domain))


def _missing_docs_message(domain: str, config: str, data_dir: Path | None, why: str) -> str:
    where = f"{data_dir}/{config}/{domain}-00000-of-00001.parquet" if data_dir else f"HF {BRIGHT_HF} ({why})"
    return (f"BRIGHT documents for '{domain}' are missing: not found at {where}. Provide them with "
            f"`huggingface-cli download {BRIGHT_HF} --repo-type dataset --include '{config}/{domain}-*' "
            f"--local-dir DIR` and pass --data-dir DIR (config '{config}', split '{domain}', fields id, content)")


def _bright_documents(domain: str, config: str, data_dir: Path | None) -> dict[str, dict[str, str]]:
    if data_dir is not None:
        rows = _local_config_rows(data_dir, config, domain)
        if rows is None:
            raise BenchError(_missing_docs_message(domain, config, data_dir, ""))
    else:
        try:
            rows = _hf_config_rows(config, domain)
        except Exception as exc:  # offline, missing package, hub error: all mean "no documents here"
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}" if str(exc) else type(exc).__name__
            raise BenchError(_missing_docs_message(domain, config, None, why)) from None
    return {str(r["id"]): {"title": "", "text": r["content"]} for r in rows}


def _bright_examples(domain: str, data_dir: Path | None) -> list[dict] | None:
    if data_dir is not None:
        return _local_config_rows(data_dir, "examples", domain)
    try:
        return _hf_config_rows("examples", domain)
    except Exception:
        return None


def _bright_judgments(domain: str, root: Path, data_dir: Path | None, long: bool):
    """Queries, gold ids and excluded ids: the shared folder first, else the `examples` config."""
    folder = root / "bright" / domain
    if (folder / "queries.jsonl").is_file():
        qrels_file = folder / "qrels" / ("test_long.tsv" if long else "test.tsv")
        if not qrels_file.is_file():
            raise BenchError(f"BRIGHT '{domain}' has no long-document gold ids ({qrels_file} absent)")
        excluded: dict[str, set[str]] = {}
        if (folder / "excluded_ids.tsv.gz").is_file():
            for q, docs in read_qrels(folder / "excluded_ids.tsv.gz").items():
                excluded[q] = set(docs)
        return read_queries(folder / "queries.jsonl"), read_qrels(qrels_file), excluded, str(folder)
    rows = _bright_examples(domain, data_dir)
    if rows is None:
        raise BenchError(f"BRIGHT queries for '{domain}' not found: neither {folder}/queries.jsonl nor "
                         f"{data_dir or 'HF ' + BRIGHT_HF}/examples/{domain}-*.parquet")
    gold_key = "gold_ids_long" if long else "gold_ids"
    queries = {str(r["id"]): r["query"] for r in rows}
    qrels = {str(r["id"]): {g: 1 for g in r[gold_key] if g != "N/A"} for r in rows}
    excluded = {str(r["id"]): {d for d in r.get("excluded_ids") or [] if d != "N/A"} for r in rows}
    return queries, qrels, {q: e for q, e in excluded.items() if e}, f"{data_dir or BRIGHT_HF}/examples"


def load_bright(domain: str, root: str | Path | None = None, data_dir: str | Path | None = None,
                long: bool = False) -> BenchDataset:
    """One BRIGHT domain: documents from `data_dir` (HF layout) or the HF hub; gold ids as in the paper."""
    (domain,) = bright_domains(domain)
    root = data_root(root)
    data_dir = Path(data_dir).expanduser() if data_dir else None
    if data_dir is not None and not data_dir.is_dir():
        raise BenchError(f"--data-dir {data_dir} does not exist")
    queries, qrels, excluded, source = _bright_judgments(domain, root, data_dir, long)
    config = "long_documents" if long else "documents"
    corpus = _bright_documents(domain, config, data_dir)
    notes: list[str] = []
    queries, qrels = _judged(f"bright/{domain}", queries, qrels, corpus, notes)
    for q in queries:  # BRIGHT asserts gold and excluded never overlap; a clash means broken data
        if excluded.get(q, set()) & set(qrels[q]):
            raise BenchError(f"BRIGHT '{domain}' query {q}: a gold id is also excluded")
    excluded = {q: e for q, e in excluded.items() if q in queries}
    if excluded:
        notes.append(f"{sum(map(len, excluded.values()))} excluded (query, doc) pairs removed from rankings")
    return BenchDataset(domain, corpus, queries, qrels, notes, excluded=excluded,
                        meta={"bench": "bright", "setting": "long" if long else "short", "judgments": source,
                              "documents": str(data_dir or f"HF {BRIGHT_HF}")})


def iter_bright(domains: Iterable[str], root=None, data_dir=None, long: bool = False) -> Iterator[BenchDataset]:
    """Domains one at a time: a BRIGHT corpus can be 400k documents; never hold two."""
    for d in domains:
        yield load_bright(d, root, data_dir, long)


def load_published_bright(root: str | Path | None = None) -> list[dict]:
    """The BRIGHT paper's nDCG@10 table (×100) from the shared folder; [] when absent."""
    path = data_root(root) / "bright" / "published_ndcg10.csv"
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as fh:
        return list(csv.DictReader(fh))
