"""Tune collections: retrieval data that is no evaluation set, for choosing defaults (benchmarks/tune_hybrid.py).

    pool         pseudo-queries from the training pool vs the backbone's own answers (the adapter's home ground:
                 its documents are what the generative embedding was trained to predict)
    stdlib-docs  a docstring's summary line vs the rest of that docstring (prose, like knowledge-base pages)
    stdlib-code  a docstring's summary line vs the function's source with its docstring removed
                 (the CodeSearchNet recipe)

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

COLLECTIONS = ("pool", "stdlib-docs", "stdlib-code")
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


def load(name: str, enc, store, **pool_kw) -> BenchDataset:
    if name == "pool":
        return pool_answers(enc, store, **pool_kw)
    if name.startswith("stdlib-"):
        return stdlib(name.removeprefix("stdlib-"))
    raise ValueError(f"unknown tune collection '{name}' (use {', '.join(COLLECTIONS)})")
