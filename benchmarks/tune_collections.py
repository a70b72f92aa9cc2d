"""Tune collections: retrieval data that is no evaluation set, for choosing defaults (benchmarks/tune_hybrid.py).

    pool         pseudo-queries from the training pool vs the backbone's own answers (the adapter's home ground:
                 its documents are what the generative embedding was trained to predict)
    stdlib-docs  a docstring's summary line vs the rest of that docstring (prose, like knowledge-base pages)
    stdlib-code  a docstring's summary line vs the function's source with its docstring removed
                 (the CodeSearchNet recipe)
    man          a manual page's one-line NAME description vs its DESCRIPTION section (sections 1, 5, 8 of
                 /usr/share/man): technical prose full of exact names and flags, the lexical regime

Why ``man``: on the three collections above the teacher beats BM25 everywhere (0.63 vs 0.75 mean nDCG@10,
results/tune/hybrid-recipe.md), so a recipe chosen on them alone is chosen for dense-favouring data only; a
knowledge base of technical pages, where exact terms matter, is the other regime a default must serve. Added after
the first choice, for that reason (the motivation is disclosed in benchmarks/README.md); its queries and
documents are the system's own manuals, no evaluation set.

The stdlib collections are read with ``ast`` from the running Python's own standard library (nothing is imported
or downloaded; the Python version is in every result), so anyone can rebuild them exactly. Their documents are
written by people, not by the backbone, which is what the pool collection cannot offer. Every collection has one
relevant document per query. Summaries that occur more than once (overrides, "Return self==value.") are dropped,
so a query's relevant document is the only one it describes; private names (leading underscore) and test
packages are left out.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import sys
import sysconfig
import textwrap
from collections import Counter
from pathlib import Path

from retrieval_kit.bench import cache, progress
from retrieval_kit.bench.datasets import BenchDataset

COLLECTIONS = ("pool", "stdlib-docs", "stdlib-code", "man")
MAN_ROOT = Path("/usr/share/man")
MAN_SECTIONS = ("1", "5", "8")
# the Google Cloud SDK's ~16k generated pages (one per gcloud subcommand, alpha/beta/GA copies) would be most of
# the collection on machines that carry it, and one template repeated; the Debian-packaged manuals remain
MAN_SKIP = re.compile(r"^gcloud[_.]")
MAN_DOC_WORDS = 300  # the DESCRIPTION's opening: long pages (bash's is ~40k words) would dominate the index
POOL = Path("/work/shared/data/train_queries/mixed.jsonl")
ANSWER_TOKENS = 96  # the shipped adapter's training targets were this long (its config.json, training.command)
_SKIP = re.compile(r"(^|/)(test|tests|idlelib|lib2to3|site-packages|dist-packages|__pycache__|ensurepip|"
                   r"turtledemo|pydoc_data)(/|$)")
SUMMARY_WORDS = (5, 40)  # a summary shorter than this names too little; longer is a paragraph, not a query
DOC_MIN_WORDS = 25  # stdlib-docs: the rest of the docstring must say something
CODE_LINES = (3, 80)  # stdlib-code: a body of a few lines up to a screenful or so


def pool_answers(enc, store, pool: Path = POOL, skip: int = 3000, n_queries: int = 200,
                 n_corpus: int = 400) -> BenchDataset:
    """Pool records the shipped adapter never saw (it trained on the first ``skip``), each answered by the backbone
    (greedy, cached with the HyDE answers); the first ``n_queries`` are the queries, their own answer relevant."""
    records = []
    with open(pool, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i < skip:
                continue
            if len(records) >= n_corpus:
                break
            records.append(json.loads(line))
    texts = [r["text"] for r in records]
    ns = cache.hyde_answers(store, enc, ANSWER_TOKENS, None)
    answers, _ = ns.get(texts, lambda t: enc.generate(t, max_new_tokens=ANSWER_TOKENS, batch_size=16), chunk=16,
                        stage=lambda total: progress.stage("backbone answers (tune corpus)", total))
    corpus = {r["_id"]: {"title": "", "text": a} for r, a in zip(records, answers) if a.strip()}
    queries = {r["_id"]: r["text"] for r in records[:n_queries] if r["_id"] in corpus}
    return BenchDataset(name="tune-pool", corpus=corpus, queries=queries, qrels={q: {q: 1} for q in queries},
                        notes=[f"{pool.name} records {skip}..{skip + len(records) - 1}: pseudo-queries vs backbone answers"])


def _stdlib_items() -> list[dict]:
    """Every documented public function and class of the running Python's stdlib, in a fixed (sorted) order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    items = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if _SKIP.search(rel):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        module = rel[:-3].replace("/", ".").removesuffix(".__init__")
        lines = source.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            paragraphs = re.split(r"\n\s*\n", doc.strip())
            doc_node = node.body[0]
            body = lines[node.lineno - 1:doc_node.lineno - 1] + lines[doc_node.end_lineno:node.end_lineno]
            items.append({"id": f"{module}:{node.name}:{node.lineno}", "name": f"{module}.{node.name}",
                          "summary": " ".join(paragraphs[0].split()), "rest": " ".join(" ".join(paragraphs[1:]).split()),
                          "code": textwrap.dedent("\n".join(body)), "function": not isinstance(node, ast.ClassDef)})
    return items


def stdlib(kind: str, n_queries: int = 300, seed: int = 0) -> BenchDataset:
    """``kind`` 'docs' or 'code': every eligible item is a document, ``n_queries`` of them (seeded) ask for theirs."""
    items = _stdlib_items()
    said = Counter(i["summary"] for i in items)
    low, high = SUMMARY_WORDS
    items = [i for i in items if said[i["summary"]] == 1 and low <= len(i["summary"].split()) <= high]
    if kind == "docs":
        items = [i for i in items if len(i["rest"].split()) >= DOC_MIN_WORDS]
        corpus = {i["id"]: {"title": i["name"], "text": i["rest"]} for i in items}
    elif kind == "code":
        items = [i for i in items if i["function"] and CODE_LINES[0] <= len(i["code"].splitlines()) <= CODE_LINES[1]]
        seen = Counter(i["code"] for i in items)
        items = [i for i in items if seen[i["code"]] == 1]  # two identical bodies could not be told apart
        corpus = {i["id"]: {"title": "", "text": i["code"]} for i in items}
    else:
        raise ValueError(f"unknown stdlib collection '{kind}' (use docs or code)")
    asked = random.Random(seed).sample(items, min(n_queries, len(items)))
    queries = {i["id"]: i["summary"] for i in asked}
    version = ".".join(map(str, sys.version_info[:3]))
    return BenchDataset(name=f"tune-stdlib-{kind}-py{version}", corpus=corpus, queries=queries,
                        qrels={q: {q: 1} for q in queries},
                        notes=[f"Python {version} stdlib ({os.path.basename(sysconfig.get_paths()['stdlib'])}): "
                               f"{len(queries)} docstring summaries vs {len(corpus)} "
                               + ("docstring bodies" if kind == "docs" else "function bodies without docstrings")])


_ESCAPES = [(re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""), (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),
            (re.compile(r"\\s[+-]?\d+"), ""), (re.compile(r"\\\((em|en|mi|hy)"), "-"),
            (re.compile(r"\\\((aq|cq|oq|lq|rq|dq)"), "'"), (re.compile(r"\\\(.."), ""), (re.compile(r"\\-"), "-"),
            (re.compile(r"\\e"), "\\\\"), (re.compile(r"\\[&|^c%]"), ""), (re.compile(r"\\ "), " ")]
_TEXT_MACROS = re.compile(r"^[.'](B|I|BR|RB|IR|RI|BI|IB|SM|SB|IP|TP|UR|MT|Nm|Nd|Ar|Fl|Cm|Pa)\b\s*(.*)$")


def _roff_text(lines: list[str]) -> str:
    """Plain words of roff source: font and size escapes dropped, text-carrying macros kept as their arguments,
    every other request (paragraphs, indents, spacing) dropped."""
    out = []
    for line in lines:
        if line.startswith((".\\\"", "'\\\"", '.\\"')):
            continue  # a comment
        if line.startswith((".", "'")):
            m = _TEXT_MACROS.match(line)
            if not m:
                continue
            line = m.group(2).replace('"', "")
        for pattern, repl in _ESCAPES:
            line = pattern.sub(repl, line)
        out.append(line)
    return " ".join(" ".join(out).split())


def _man_items(root: Path = MAN_ROOT) -> list[dict]:
    """English manual pages of the chosen sections, sorted: their NAME description and their DESCRIPTION text."""
    import gzip

    items = []
    for section in MAN_SECTIONS:
        for path in sorted((root / f"man{section}").glob("*")):
            if path.is_symlink() or not path.is_file() or MAN_SKIP.search(path.name):
                continue
            try:
                raw = (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")).read()
            except (OSError, UnicodeDecodeError, EOFError):
                continue
            sections, current = {}, None
            for line in raw.splitlines():
                head = re.match(r'^\.(SH|Sh)\s+"?([^"]*)"?\s*$', line)
                if head:
                    current = head.group(2).strip().upper()
                    sections.setdefault(current, [])
                elif current is not None:
                    sections[current].append(line)
            name = _roff_text(sections.get("NAME", []))
            parts = re.split(r"\s+-+\s+", name, maxsplit=1)
            if len(parts) != 2 or "DESCRIPTION" not in sections:
                continue  # a .so redirect, or a page without the two sections
            items.append({"id": f"man{section}/{path.name.removesuffix('.gz')}", "name": parts[0],
                          "summary": parts[1], "rest": _roff_text(sections["DESCRIPTION"])})
    return items


def manpages(n_queries: int = 300, seed: int = 0, root: Path = MAN_ROOT) -> BenchDataset:
    """Every eligible page is a document (its DESCRIPTION's first MAN_DOC_WORDS words); ``n_queries`` of them
    (seeded) ask for theirs by their NAME line's description. Pages whose description recurs, is out of the
    summary length range, or stands verbatim in the DESCRIPTION (an answer given away) are left out."""
    items = _man_items(root)
    said = Counter(i["summary"].lower() for i in items)
    low, high = SUMMARY_WORDS
    items = [dict(i, rest=" ".join(i["rest"].split()[:MAN_DOC_WORDS])) for i in items
             if said[i["summary"].lower()] == 1 and low <= len(i["summary"].split()) <= high
             and len(i["rest"].split()) >= DOC_MIN_WORDS]
    items = [i for i in items if i["summary"].lower() not in i["rest"].lower()]
    corpus = {i["id"]: {"title": "", "text": i["rest"]} for i in items}
    asked = random.Random(seed).sample(items, min(n_queries, len(items)))
    queries = {i["id"]: i["summary"] for i in asked}
    return BenchDataset(name="tune-man", corpus=corpus, queries=queries, qrels={q: {q: 1} for q in queries},
                        notes=[f"{root} sections {','.join(MAN_SECTIONS)} (no gcloud pages): {len(queries)} NAME "
                               f"descriptions vs {len(corpus)} DESCRIPTION sections (first {MAN_DOC_WORDS} words)"])


def load(name: str, enc, store, **pool_kw) -> BenchDataset:
    if name == "pool":
        return pool_answers(enc, store, **pool_kw)
    if name.startswith("stdlib-"):
        return stdlib(name.removeprefix("stdlib-"))
    if name == "man":
        return manpages()
    raise ValueError(f"unknown tune collection '{name}' (use {', '.join(COLLECTIONS)})")
