"""The tune collections the hybrid default is chosen on (benchmarks/tune_collections.py): built from the running
Python's stdlib with ast, one relevant document per query, nothing that gives the answer away."""

from __future__ import annotations

import pytest

from benchmarks.tune_collections import stdlib


@pytest.mark.parametrize("kind", ["docs", "code"])
def test_stdlib_collections_are_well_formed_and_reproducible(kind):
    ds = stdlib(kind, n_queries=50)
    assert len(ds.queries) == 50 and len(ds.corpus) > 500
    assert all(ds.qrels[q] == {q: 1} and q in ds.corpus for q in ds.queries)
    assert len(set(ds.queries.values())) == 50  # a summary describes one document only
    for qid, summary in ds.queries.items():
        doc = ds.corpus[qid]["text"]
        assert summary not in " ".join(doc.split())  # the query's own words are not inside its document
        if kind == "code":
            assert doc.lstrip().startswith(("def ", "async def ", "@"))  # dedented source of a function
    if kind == "docs":  # a rebuild is the same collection (sorted walk, seeded sample); one kind is enough
        again = stdlib(kind, n_queries=50)
        assert again.queries == ds.queries and again.corpus_hash() == ds.corpus_hash()
