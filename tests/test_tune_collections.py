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


def test_man_collection_reads_roff_and_gives_no_answer_away(tmp_path):
    """Built on a small man tree written here (roff as Debian ships it, gzipped), so it runs on any machine."""
    import gzip

    from benchmarks.tune_collections import manpages

    (tmp_path / "man1").mkdir()
    body = ("The \\fBfrobnicate\\fR utility rewrites \\fIevery\\fP block of a device in place, keeping a journal "
            "under \\-\\-journal so that an interrupted run resumes where it stopped; see below for what each "
            "option does and how the journal is laid out on disk, block by block.")
    pages = {"frob.1": ("frob \\- rewrite the blocks of a storage device", body),
             "dup.1": ("dup \\- rewrite the blocks of a storage device", body),  # a recurring description
             "leak.1": ("leak \\- print the journal of a device", "Use it to print the journal of a device. " + body),
             "gcloud_x.1": ("gcloud x \\- list the many things in a cloud project", body)}
    for name, (line, text) in pages.items():
        with gzip.open(tmp_path / "man1" / f"{name}.gz", "wt") as fh:
            fh.write(f'.\\" comment\n.TH X 1\n.SH NAME\n{line}\n.SH SYNOPSIS\n.B x\n.SH DESCRIPTION\n.PP\n{text}\n.SH SEE ALSO\ncat(1)\n')
    (tmp_path / "man1" / "alias.1.gz").symlink_to(tmp_path / "man1" / "frob.1.gz")
    ds = manpages(n_queries=5, root=tmp_path)
    # dup and frob share a description (either could be meant), leak's is inside its text, gcloud's is skipped,
    # the symlink is frob again: nothing is left to ask, and only one page would be
    assert ds.queries == {}
    pages["dup.1"] = ("dup \\- copy one device's blocks to another", body)
    with gzip.open(tmp_path / "man1" / "dup.1.gz", "wt") as fh:
        fh.write(f".TH X 1\n.SH NAME\n{pages['dup.1'][0]}\n.SH DESCRIPTION\n{body}\n")
    ds = manpages(n_queries=5, root=tmp_path)
    assert sorted(ds.queries) == ["man1/dup.1", "man1/frob.1"] == sorted(ds.corpus)
    assert ds.queries["man1/frob.1"] == "rewrite the blocks of a storage device"
    text = ds.corpus["man1/frob.1"]["text"]
    assert text.startswith("The frobnicate utility rewrites every block") and "--journal" in text
    assert "\\f" not in text and "SEE ALSO" not in text and "cat(1)" not in text
