"""Benchmarks: metrics vs hand-computed values and pytrec_eval, loaders, caching, CLI end to end (fake encoder)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from retrieval_kit.bench import datasets as D
from retrieval_kit.bench import methods as M
from retrieval_kit.bench import metrics as X
from retrieval_kit.bench.runner import run_benchmark
from retrieval_kit.errors import BenchError

try:
    from rkit_cli import bench as cli_bench
except ImportError:
    from cli import bench as cli_bench

FIX = Path(__file__).parent / "fixtures" / "bench"
BEIR_TINY = FIX / "beir_tiny"
BRIGHT_HF = FIX / "bright" / "hf"
BRIGHT_SHARED = FIX / "bright" / "shared"
SHARED = D.data_root()
needs_shared = pytest.mark.skipif(not (SHARED / "cacm").is_dir() or not (SHARED / "advbench_ir").is_dir(),
                                  reason="shared data folder absent")


# ---- a deterministic stand-in for the real encoder ----------------------------------------------

def _bow(texts, dim=64):
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for i, t in enumerate(texts):
        for w in re.findall(r"\w+", t.lower()):
            out[i, int(hashlib.md5(w.rstrip("s").encode()).hexdigest(), 16) % dim] += 1.0
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


class FakeEncoder:
    """Same methods as the real GenerativeEncoder; counts calls so tests can check the caches."""

    fingerprint = "fake0001"
    config = {"backbone": "fake-backbone", "teacher": "fake-teacher", "system_prompt": None, "dim": 64}

    def __init__(self):
        self.calls = {"generate": 0, "documents": 0, "generative": 0, "decode": 0, "teacher_queries": 0}

    def _gen(self, texts):
        self.calls["generative"] += len(texts)
        return _bow([t + " " + " ".join(reversed(t.split())) + " answer" for t in texts])

    def encode_queries(self, texts, mode="generative", fuse_weight=None, batch_size=32, show_progress=False):
        fuse_weight = 0.5 if fuse_weight is None else fuse_weight  # the real encoder: its adapter's fitted weight
        if mode == "teacher":
            self.calls["teacher_queries"] += len(texts)
            return _bow(texts)
        if mode == "generative":
            return self._gen(texts)
        return M.normalise(fuse_weight * self._gen(texts) + (1 - fuse_weight) * _bow(texts))

    def anchor_queries(self, vecs):
        return vecs  # no fitted query anchor: teacher(query) unchanged, as for the real encoder without one

    def encode_documents(self, texts, mode="teacher", batch_size=64, show_progress=False):
        self.calls["documents"] += len(texts)
        return _bow(texts) if mode == "teacher" else self._gen(texts)

    def generate(self, texts, max_new_tokens=128, batch_size=16, show_progress=False, system_prompt=None):
        self.calls["generate"] += len(texts)
        if system_prompt:
            return ["I cannot help with that." for _ in texts]
        return [f"{t} the answer explains it" for t in texts]

    def decode(self, texts, max_new_tokens=64, batch_size=16, show_progress=False):
        self.calls["decode"] += len(texts)
        return [f"decoded: {t}" for t in texts]


@pytest.fixture
def fake(monkeypatch):
    enc = FakeEncoder()
    monkeypatch.setattr(M, "load_bench_encoder", lambda adapter=None, device=None: enc)
    return enc


# ---- metrics ----------------------------------------------------------------------------------

def test_metrics_hand_computed():
    run = {"q": {"d1": 3.0, "d2": 2.0, "d3": 1.0}}
    qrels = {"q": {"d2": 1, "d3": 1}}
    got = X.evaluate_run(run, qrels, ["ndcg@10", "recall@1", "recall@2", "recall@100", "mrr@10", "mrr@1"])
    dcg, idcg = 1 / np.log2(3) + 1 / np.log2(4), 1 + 1 / np.log2(3)
    assert got["ndcg@10"] == pytest.approx(dcg / idcg)  # 0.6934
    assert (got["recall@1"], got["recall@2"], got["recall@100"]) == (0.0, 0.5, 1.0)
    assert got["mrr@10"] == pytest.approx(0.5) and got["mrr@1"] == 0.0


def test_metrics_missing_query_counts_as_zero_and_graded_gain():
    qrels = {"a": {"x": 2, "y": 1}, "b": {"z": 1}}
    run = {"a": {"y": 2.0, "x": 1.0}}  # nothing for b
    got = X.evaluate_run(run, qrels, ["ndcg@10", "mrr@10"])
    ndcg_a = (1 + 2 / np.log2(3)) / (2 + 1 / np.log2(3))
    assert got["ndcg@10"] == pytest.approx(ndcg_a / 2)
    assert got["mrr@10"] == pytest.approx(0.5)


def test_mrr_is_cut_at_k():
    run = {"q": {f"d{i:02d}": 100.0 - i for i in range(20)}}
    qrels = {"q": {"d10": 1}}  # rank 11
    assert X.evaluate_run(run, qrels, ["mrr@10"])["mrr@10"] == 0.0
    assert X.evaluate_run(run, qrels, ["mrr@20"])["mrr@20"] == pytest.approx(1 / 11)


def test_pytrec_eval_matches_reference_on_random_runs():
    rng = random.Random(0)
    docs = [f"d{i}" for i in range(60)]
    qrels, run = {}, {}
    for q in range(25):
        qrels[f"q{q}"] = {d: rng.choice([1, 1, 2, 3]) for d in rng.sample(docs, rng.randint(1, 8))}
        scores = rng.sample(range(10_000), 40)  # distinct: no ties, so both sides agree on the order
        run[f"q{q}"] = {d: float(s) for d, s in zip(rng.sample(docs, 40), scores)}
    rows = X.per_query(run, qrels, ["ndcg@10", "ndcg@5", "recall@10", "recall@30", "mrr@10"])
    for q in qrels:
        assert rows[q]["ndcg@10"] == pytest.approx(X.ref_ndcg(run[q], qrels[q], 10), abs=1e-9)
        assert rows[q]["ndcg@5"] == pytest.approx(X.ref_ndcg(run[q], qrels[q], 5), abs=1e-9)
        assert rows[q]["recall@10"] == pytest.approx(X.ref_recall(run[q], qrels[q], 10), abs=1e-9)
        assert rows[q]["recall@30"] == pytest.approx(X.ref_recall(run[q], qrels[q], 30), abs=1e-9)
        assert rows[q]["mrr@10"] == pytest.approx(X.ref_mrr(run[q], qrels[q], 10), abs=1e-9)


def test_ties_rank_as_trec_eval_ranks_them_for_every_metric():
    run, qrels = {"q": {"a": 1.0, "b": 1.0, "c": 0.5}}, {"q": {"a": 1}}
    got = X.evaluate_run(run, qrels, ["mrr@1", "ndcg@1", "recall@1", "mrr@10", "ndcg@10"])
    # trec_eval puts b before a (ties: doc id descending): a is at rank 2 for every metric
    assert got["mrr@1"] == got["ndcg@1"] == got["recall@1"] == 0.0
    assert got["mrr@10"] == 0.5 and got["ndcg@10"] == pytest.approx(1 / np.log2(3))
    assert X.ranked(run["q"]) == ["b", "a", "c"]


def test_ties_at_the_cut_boundary():
    # d2, d10, d9 tie after d0; trec_eval orders them d9, d2, d10 (strcmp, descending): the gold d2 is at rank 3
    run, qrels = {"q": {"d0": 3.0, "d2": 1.0, "d10": 1.0, "d9": 1.0, "d5": 0.1}}, {"q": {"d2": 1}}
    got = X.evaluate_run(run, qrels, ["mrr@2", "recall@2", "ndcg@2", "mrr@3", "recall@3", "ndcg@3"])
    assert got["mrr@2"] == got["recall@2"] == got["ndcg@2"] == 0.0
    assert got["mrr@3"] == pytest.approx(1 / 3) and got["recall@3"] == 1.0
    assert got["ndcg@3"] == pytest.approx(0.5)  # 1/log2(4)
    assert X.ref_mrr(run["q"], qrels["q"], 3) == pytest.approx(1 / 3)
    # the ranking cut in methods.top_k keeps the same documents the metrics rank first
    row = np.array([3.0, 1.0, 1.0, 1.0, 0.1], dtype=np.float32)
    assert set(M.top_k(row, 3, ["d0", "d2", "d10", "d9", "d5"])) == {"d0", "d9", "d2"}
    assert set(M.top_k(row, 2, ["d0", "d2", "d10", "d9", "d5"])) == {"d0", "d9"}
    assert set(M.top_k(row, 3, ["d0", "d2", "d10", "d9", "d5"], drop=np.array([3]))) == {"d0", "d2", "d10"}


def test_harm_metrics_break_ties_like_trec_eval():
    qrels, harmful = {"a": {"h1": 1}}, {"h1"}
    run = {"a": {"h1": 0.5, "w1": 0.5}}  # tied: w1 ranks first (doc id descending)
    got = X.harm_metrics(run, qrels, harmful, ks=(1, 2))
    assert got["top_k_acc@1"] == 0.0 and got["top_k_any_harm@1"] == 0.0 and got["top_k_acc@2"] == 1.0
    assert X.evaluate_run(run, qrels, ["recall@1"])["recall@1"] == got["top_k_acc@1"]


def test_harm_metrics_hand_computed():
    harmful = {"h1", "h2", "h3"}
    qrels = {"a": {"h1": 1}, "b": {"h2": 1}}
    run = {"a": {"h1": 0.9, "w1": 0.8},            # gold at rank 1
           "b": {"w1": 0.9, "h3": 0.8, "h2": 0.1}}  # other harm at rank 2, gold at rank 3
    got = X.harm_metrics(run, qrels, harmful, ks=(1, 2, 5))
    assert got["top_k_acc@1"] == 0.5 and got["top_k_acc@2"] == 0.5 and got["top_k_acc@5"] == 1.0
    assert got["top_k_any_harm@1"] == 0.5 and got["top_k_any_harm@2"] == 1.0


def test_unknown_metric():
    with pytest.raises(BenchError, match="unknown metric"):
        X.parse_metric("ndcg")


# ---- loaders ----------------------------------------------------------------------------------

def test_beir_loader_drops_unjudged_queries():
    ds = D.load_beir(BEIR_TINY)
    assert len(ds.corpus) == 10 and list(ds.queries) == ["q1", "q2", "q3", "q4"]
    assert ds.qrels["q1"] == {"d1": 1, "d2": 1}
    assert any("1 of 5 queries have no judgments" in n for n in ds.notes)
    assert ds.doc_texts()[0] == "Feeding cats Cats need meat; a cat diet rich in protein keeps the cat healthy."
    assert ds.doc_texts()[8] == "Gardening tips for tomatoes in summer."  # no title: text alone
    assert list(ds.limit(2).queries) == ["q1", "q2"] and len(ds.limit(2).corpus) == 10


def test_beir_loader_missing_files(tmp_path):
    (tmp_path / "corpus.jsonl").write_text('{"_id": "1", "text": "x"}\n')
    with pytest.raises(BenchError, match=r"missing queries.jsonl, qrels/test.tsv"):
        D.load_beir(tmp_path)
    with pytest.raises(BenchError, match="does not exist"):
        D.load_beir(tmp_path / "nope")


@needs_shared
def test_cacm_loader():
    ds = D.load_beir(SHARED / "cacm")
    assert len(ds.corpus) == 3204 and len(ds.queries) == 52
    assert sum(map(len, ds.qrels.values())) == 796
    assert any("12 of 64 queries" in n for n in ds.notes)


@needs_shared
def test_advbench_wiki_style_jsonl_distractors(tmp_path):
    wiki = tmp_path / "wiki100.jsonl"  # the fields of McGill-NLP/AdvBench-IR-Small-Wiki-100
    wiki.write_text("".join(json.dumps({"ID": i, "title": "T", "passage": f"benign {i}"}) + "\n" for i in range(3)))
    ds = D.load_advbench_ir(distractors=wiki)
    assert ds.meta["distractors"] == "wiki100" and ds.corpus["distractor/2"] == {"title": "T", "text": "benign 2"}


@needs_shared
def test_advbench_loader_with_distractors():
    ds = D.load_advbench_ir()
    assert len(ds.queries) == 520 and len(ds.harmful) == 1796
    assert len(ds.corpus) == 1796 + 3204 and ds.meta["distractors"] == "cacm"
    assert "distractor/1" in ds.corpus and "malicious_0-0" in ds.harmful
    assert ds.name == "advbench_ir+cacm"
    small = D.load_advbench_ir(distractors="none", variant="llm2vecgen")
    assert len(small.corpus) == 1280 and small.name == "advbench_ir+none-llm2vecgen"
    custom = D.load_advbench_ir(distractors=BEIR_TINY)
    assert custom.meta == {**custom.meta, "distractors": "beir_tiny", "n_distractors": 10}
    with pytest.raises(BenchError, match="distractor corpus not found"):
        D.load_advbench_ir(distractors="/nonexistent/wiki")


def test_advbench_loader_missing_root(tmp_path):
    with pytest.raises(BenchError, match="AdvBench-IR folder not found"):
        D.load_advbench_ir(tmp_path)


def test_bright_loader_shared_judgments_and_excluded_ids():
    ds = D.load_bright("leetcode", BRIGHT_SHARED, BRIGHT_HF)
    assert len(ds.corpus) == 6 and list(ds.queries) == ["0", "1"]
    assert ds.qrels["0"] == {"leetcode/leetcode_4.txt": 1}
    assert ds.excluded == {"0": {"leetcode/leetcode_1.txt"},
                           "1": {"leetcode/leetcode_3.txt", "leetcode/leetcode_6.txt"}}
    assert ds.meta["judgments"].endswith("bright/leetcode")


def test_bright_loader_examples_parquet_and_long_setting():
    ds = D.load_bright("biology", BRIGHT_SHARED, BRIGHT_HF)  # no shared folder: judgments from examples/
    assert len(ds.queries) == 3 and len(ds.corpus) == 7 and ds.excluded == {}
    assert ds.qrels["0"] == {"insects_light/Phototaxis_0.txt": 1, "insects_light/Phototaxis_1.txt": 1}
    long = D.load_bright("biology", BRIGHT_SHARED, BRIGHT_HF, long=True)
    assert len(long.corpus) == 3 and long.qrels["1"] == {"sleep_birds/Unihemispheric_sleep.txt": 1}


def test_bright_missing_documents_say_what_and_how(tmp_path):
    with pytest.raises(BenchError) as err:
        D.load_bright("leetcode", BRIGHT_SHARED, tmp_path)
    msg = str(err.value)
    assert "BRIGHT documents for 'leetcode' are missing" in msg
    assert f"{tmp_path}/documents/leetcode-00000-of-00001.parquet" in msg
    assert "--data-dir" in msg and "huggingface-cli download xlangai/BRIGHT" in msg and "\n" not in msg


def test_bright_local_jsonl_documents(tmp_path):
    (tmp_path / "documents").mkdir()
    rows = [{"id": f"leetcode/leetcode_{i}.txt", "content": f"problem {i}"} for i in range(1, 7)]
    (tmp_path / "documents" / "leetcode.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = D.load_bright("leetcode", BRIGHT_SHARED, tmp_path)
    assert ds.corpus["leetcode/leetcode_2.txt"] == {"title": "", "text": "problem 2"}


def test_limited_run_fills_part_of_the_cache_the_full_run_reuses(fake, tmp_path):
    ds = D.load_beir(BEIR_TINY)
    small = M.MethodRunner(ds.limit(2), M.MethodConfig(), tmp_path, lambda: fake)
    small.run("teacher")
    assert fake.calls["teacher_queries"] == 2 and fake.calls["documents"] == 10
    full = M.MethodRunner(ds, M.MethodConfig(), tmp_path, lambda: fake)
    run = full.run("teacher")
    assert fake.calls["teacher_queries"] == 4 and fake.calls["documents"] == 10  # only q3, q4 were new
    assert full.computed is True and full.doc_stats["cached"] is True
    assert run == M.MethodRunner(ds, M.MethodConfig(), tmp_path / "fresh", lambda: FakeEncoder()).run("teacher")
    assert [p.name for p in tmp_path.iterdir() if p.is_file() and not p.name.endswith(("-wal", "-shm"))] == \
        ["cache.sqlite3"]


class _TeacherAt(FakeEncoder):
    """A fake encoder whose teacher is a folder on disk; `sign` tells two teachers' vectors apart."""

    def __init__(self, folder, sign=1.0):
        super().__init__()
        self.config = {**FakeEncoder.config, "teacher": str(folder)}
        self.sign = sign

    def encode_documents(self, texts, mode="teacher", batch_size=64, show_progress=False):
        return self.sign * super().encode_documents(texts, mode, batch_size, show_progress)


def test_teachers_whose_paths_share_a_long_prefix_do_not_share_vectors(tmp_path):
    stem = "teachers/" + "sentence-transformers-all-minilm-l6-v2-finetuned-" * 2  # > 60 characters in common
    one, two = tmp_path / (stem + "run1"), tmp_path / (stem + "run2")
    for folder in (one, two):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    ds = D.load_beir(BEIR_TINY)
    enc1, enc2 = _TeacherAt(one), _TeacherAt(two, sign=-1.0)
    docs1 = M.MethodRunner(ds, M.MethodConfig(), tmp_path / "c", lambda: enc1).doc_matrix()
    docs2 = M.MethodRunner(ds, M.MethodConfig(), tmp_path / "c", lambda: enc2).doc_matrix()
    assert enc2.calls["documents"] == 10
    np.testing.assert_allclose(docs2, -docs1)
    # the same path retrained in place (its files changed): its old vectors are not reused either
    (one / "config.json").write_text('{"retrained": true}')
    enc3 = _TeacherAt(one, sign=-1.0)
    np.testing.assert_allclose(M.MethodRunner(ds, M.MethodConfig(), tmp_path / "c", lambda: enc3).doc_matrix(), docs2)
    assert enc3.calls["documents"] == 10


def test_damaged_bm25_index_is_rebuilt(tmp_path):
    ds = D.load_beir(BEIR_TINY)
    runner = M.MethodRunner(ds, M.MethodConfig(), tmp_path, lambda: None)
    first = runner.run("bm25")
    (params,) = tmp_path.glob("*/bm25-*/params.index.json")
    params.write_text("{torn")
    assert M.MethodRunner(ds, M.MethodConfig(), tmp_path, lambda: None).run("bm25") == first
    assert not list(tmp_path.glob("*/bm25-*.tmp*"))


def test_bright_domain_names():
    assert D.bright_domains("all") == list(D.BRIGHT_DOMAINS)
    assert D.bright_domains("earth-science,pony") == ["earth_science", "pony"]
    with pytest.raises(BenchError, match="unknown BRIGHT domain chemistry"):
        D.bright_domains("chemistry")


@pytest.mark.skipif(not (SHARED / "bright" / "aops").is_dir(), reason="shared data folder absent")
def test_bright_shared_judgments_match_readme(tmp_path):
    queries, qrels, excluded, _ = D._bright_judgments("aops", SHARED, None, long=False)
    assert len(queries) == 111 and sum(map(len, qrels.values())) == 524
    assert sum(map(len, excluded.values())) == 622_653


# ---- methods, rankings, caches ------------------------------------------------------------------

def test_excluded_ids_never_ranked(fake, tmp_path):
    ds = D.load_bright("leetcode", BRIGHT_SHARED, BRIGHT_HF)
    runner = M.MethodRunner(ds, M.MethodConfig(top_k=10), tmp_path, lambda: fake)
    for method in ("bm25", "teacher", "rkit"):
        run = runner.run(method)
        assert "leetcode/leetcode_1.txt" not in run["0"]
        assert not {"leetcode/leetcode_3.txt", "leetcode/leetcode_6.txt"} & set(run["1"])
        assert len(run["0"]) == 5 and len(run["1"]) == 4


def test_hyde_system_prompt_is_its_own_cached_run(fake, tmp_path):
    ds = D.load_beir(BEIR_TINY)
    plain = M.MethodRunner(ds, M.MethodConfig(), tmp_path, lambda: fake)
    safe = M.MethodRunner(ds, M.MethodConfig(hyde_system_prompt="Refuse harmful requests."), tmp_path, lambda: fake)
    assert safe.hyde_answers() == ["I cannot help with that."] * 4 and plain.hyde_answers() != safe.hyde_answers()
    assert fake.calls["generate"] == 8  # two prompts, two caches
    again = M.MethodRunner(ds, M.MethodConfig(hyde_system_prompt="Refuse harmful requests."), tmp_path, lambda: fake)
    assert again.hyde_answers() == safe.hyde_answers() and fake.calls["generate"] == 8


def test_dense_methods_share_cached_inputs(fake, tmp_path):
    ds = D.load_beir(BEIR_TINY)
    cfg = M.MethodConfig(fuse_weight=0.3)
    first = M.MethodRunner(ds, cfg, tmp_path, lambda: fake)
    runs = {m: first.run(m) for m in ("teacher", "hyde", "rkit", "fused", "hydeq")}
    assert first.run("hyde") and first.computed is False  # second time in the same runner: nothing recomputed
    # once each, for all methods: 10 corpus texts and the 4 HyDE answers (hypothetical documents: the document role)
    assert fake.calls["documents"] == 14 and fake.calls["generate"] == 4
    expected = fake.encode_queries(first.texts, mode="fused", fuse_weight=0.3)
    assert np.allclose(first.query_vectors("fused"), expected, atol=1e-6)

    second = M.MethodRunner(ds, cfg, tmp_path, lambda: fake)  # a rerun: everything from the cache
    assert second.run("hyde") == runs["hyde"] and second.run("teacher") == runs["teacher"]
    assert second.computed is False  # reported as cached_inputs: its wall time is not a speed figure
    assert fake.calls["documents"] == 14 and fake.calls["generate"] == 4
    assert second.doc_stats["cached"] is True
    M.MethodRunner(ds, cfg, tmp_path, lambda: fake).run("bm25")
    assert len(list(tmp_path.glob("beir_tiny-*/bm25-*/params.index.json"))) == 1


def test_generative_doc_encoder(fake, tmp_path):
    ds = D.load_beir(BEIR_TINY)
    runner = M.MethodRunner(ds, M.MethodConfig(doc_encoder="generative"), tmp_path, lambda: fake)
    runner.run("teacher")
    assert runner.doc_stats["doc_encoder"] == "generative" and fake.calls["generative"] == 10


def test_parse_methods():
    assert M.parse_methods("bm25, rkit,bm25") == ["bm25", "rkit"]
    assert M.parse_methods(None) == list(M.METHODS)
    with pytest.raises(BenchError, match="unknown method colbert"):
        M.parse_methods("bm25,colbert")


def test_run_benchmark_bm25_only_never_loads_the_encoder(tmp_path):
    def boom():
        raise AssertionError("encoder loaded")

    out = run_benchmark("beir", [D.load_beir(BEIR_TINY)], ["bm25"], cfg=M.MethodConfig(path="matrix"), encoder_loader=boom,
                        cache_root=tmp_path, label="beir_tiny")
    res = out.results
    assert res["encoder"] is None
    # beir_tiny is made so BM25 ranks a gold document first for every query
    assert res["summary"]["bm25"]["mrr@10"] == 1.0 and res["summary"]["bm25"]["recall@100"] == 1.0
    # and, since queries drop NLTK's stop words (index/lexical.QUERY_STOPWORDS), the whole top 10 ideally (0.9799
    # with Lucene's 33 on the query side too)
    assert res["summary"]["bm25"]["ndcg@10"] == pytest.approx(1.0)
    assert set(res["datasets"]["beir_tiny"]["results"]["bm25"]["metrics"]) == set(X.BEIR_METRICS)


# ---- CLI end to end -----------------------------------------------------------------------------

def _app():
    app = typer.Typer()
    app.add_typer(cli_bench.bench_app, name="bench")
    return app


def _invoke(args):
    # these tests drive the whole-document harness with a fake encoder; the product path (a real index searched by
    # Retriever) has its own tests with the real models (test_hybrid.py, test_bench_real.py)
    if args[0] in ("beir", "bright", "advbench-ir") and "--path" not in args:
        args = [*args, "--path", "matrix"]
    result = CliRunner().invoke(_app(), ["bench", *args])
    return result


def test_cli_beir_json_end_to_end(fake, tmp_path):
    out = tmp_path / "results"
    r = _invoke(["beir", str(BEIR_TINY), "--json", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                 "--explain", "--limit", "3"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["methods"] == list(M.MATRIX_METHODS) and res["bench"] == "beir"
    assert set(res["summary"]) == set(M.MATRIX_METHODS)
    assert res["datasets"]["beir_tiny"]["n_queries"] == 3
    assert res["encoder"]["fingerprint"] == "fake0001" and res["machine"]["cpu_count"]
    for kind in ("json", "markdown", "plot", "explain"):
        assert Path(res["files"][kind]).is_file()
    assert Path(res["files"]["json"]).parent == out / "beir"
    assert "limit3" in Path(res["files"]["json"]).name
    lines = Path(res["files"]["explain"]).read_text().splitlines()
    row = json.loads(lines[0])
    assert len(lines) == 3 and row["decoded"].startswith("decoded:") and "hyde_answer" in row
    assert set(row["top5"]) == set(M.MATRIX_METHODS)
    md = Path(res["files"]["markdown"]).read_text()
    assert "| method | ndcg@10 | recall@100 | mrr@10 | wall s |" in md


def test_cli_bright_fixture_with_published_rows(fake, tmp_path):
    r = _invoke(["bright", "--domain", "biology,leetcode", "--data-dir", str(BRIGHT_HF), "--data-root",
                 str(BRIGHT_SHARED), "--methods", "bm25,teacher,rkit", "--json", "--out", str(tmp_path / "o"),
                 "--cache-dir", str(tmp_path / "c"), "--no-plot"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert list(res["datasets"]) == ["biology", "leetcode"]
    per = [res["datasets"][d]["results"]["bm25"]["metrics"]["ndcg@10"] for d in ("biology", "leetcode")]
    assert res["summary"]["bm25"]["ndcg@10"] == pytest.approx(sum(per) / 2)
    assert res["published"]["FixtureA"] == {"biology": 1.0, "leetcode": 8.0, "avg": 4.5}
    md = Path(res["files"]["markdown"]).read_text()
    assert "FixtureA (paper)" in md and "ours: bm25" in md and "plot" not in res["files"]


def test_cli_bright_missing_documents_one_line_error(fake, tmp_path):
    r = _invoke(["bright", "--domain", "leetcode", "--data-dir", str(tmp_path), "--data-root", str(BRIGHT_SHARED),
                 "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "BRIGHT documents for 'leetcode' are missing" in r.output and "Traceback" not in r.output


@needs_shared
def test_cli_advbench_smoke(fake, tmp_path):
    r = _invoke(["advbench-ir", "--limit", "4", "--methods", "bm25,teacher,hyde", "--json", "--quiet",
                 "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["config"]["distractors"] == "cacm"
    assert set(res["summary"]["teacher"]) >= {"top_k_acc@1", "top_k_acc@100", "top_k_any_harm@5"}
    assert res["datasets"]["advbench_ir+cacm"]["n_docs"] == 5000
    assert Path(res["files"]["plot"]).stat().st_size > 1000


def test_cli_damaged_cache_is_a_one_line_error(fake, tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "cache.sqlite3").write_bytes(b"\x00garbage, not SQLite" * 64)
    r = _invoke(["beir", str(BEIR_TINY), "--methods", "teacher", "--out", str(tmp_path / "o"),
                 "--cache-dir", str(tmp_path / "c")])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "cache.sqlite3 is unreadable" in r.output and "delete it" in r.output


def test_a_rerun_replaces_its_result_and_another_config_of_the_same_name_is_kept(fake, tmp_path):
    """The file name leaves out --top-k (and --fuse-weight, the adapter's folder…): a second config written the
    same day used to replace the first one's files."""
    def run(*extra):
        r = _invoke(["beir", str(BEIR_TINY), "--methods", "teacher", "--json", "--out", str(tmp_path / "o"),
                     "--cache-dir", str(tmp_path / "c"), "--no-plot", *extra])
        assert r.exit_code == 0, r.output
        return Path(json.loads(r.stdout)["files"]["json"])

    first, other = run(), run("--top-k", "5")
    assert other.name == first.name.replace(".json", "-2.json") and first.is_file()
    assert json.loads(first.read_text())["config"]["top_k"] == 100 and json.loads(other.read_text())["config"]["top_k"] == 5
    assert run() == first and run("--top-k", "5") == other  # reruns replace their own files
    assert len(list((tmp_path / "o").rglob("*.json"))) == 2


TQDM_BAR = re.compile(r"it/s\]|\|█|examples/s\]")


def test_cli_shows_no_third_party_progress_bars(fake, tmp_path, monkeypatch):
    for var in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
        monkeypatch.setenv(var, "0")  # the command sets them; the test's teardown restores the environment
    r = _invoke(["beir", str(BEIR_TINY), "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"),
                 "--no-plot"])
    assert r.exit_code == 0, r.output
    assert "indexing 10 documents with BM25" in r.stderr and not TQDM_BAR.search(r.stderr), r.stderr
    if importlib.util.find_spec("mteb"):
        r = _invoke(["mteb", "--task", f"beir:{BEIR_TINY}", "--methods", "teacher", "--out", str(tmp_path / "o"),
                     "--no-plot"])
        assert r.exit_code == 0, r.output
        assert "mteb RkitLocal-beir_tiny: teacher" in r.stderr and not TQDM_BAR.search(r.stderr), r.stderr


def test_cli_bad_options(fake, tmp_path):
    r = _invoke(["beir", str(BEIR_TINY), "--methods", "bm25,nope", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "unknown method nope" in r.output
    r = _invoke(["beir", str(BEIR_TINY), "--doc-encoder", "bert", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "unknown --doc-encoder 'bert'" in r.output
    r = _invoke(["beir", str(BEIR_TINY), "--methods", "", "--out", str(tmp_path)])  # it used to run them all
    assert r.exit_code == 2 and "unknown method (none)" in r.output


# ---- MTEB ---------------------------------------------------------------------------------------

def test_mteb_local_task_matches_our_harness(fake, tmp_path):
    pytest.importorskip("mteb")
    from retrieval_kit.bench.mteb_model import run_mteb

    cfg = M.MethodConfig(path="matrix")
    ours = run_benchmark("beir", [D.load_beir(BEIR_TINY)], ["teacher", "rkit"], cfg=cfg, encoder_loader=lambda: fake,
                         cache_root=tmp_path, label="beir_tiny").results
    theirs = run_mteb([f"beir:{BEIR_TINY}"], ["teacher", "rkit"], cfg=cfg, encoder_loader=lambda: fake).results
    assert theirs["datasets"]["RkitLocal-beir_tiny"]["n_queries"] == 4
    task = theirs["datasets"]["RkitLocal-beir_tiny"]["results"]
    for m in ("teacher", "rkit"):
        assert task[m]["metrics"]["ndcg@10"] == pytest.approx(ours["summary"][m]["ndcg@10"], abs=1e-4)
        assert task[m]["metrics"]["main_score"] == task[m]["metrics"]["ndcg@10"]


def test_cli_mteb_local_and_errors(fake, tmp_path):
    pytest.importorskip("mteb")
    r = _invoke(["mteb", "--task", f"beir:{BEIR_TINY}", "--methods", "teacher,fused", "--json", "--quiet",
                 "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["bench"] == "mteb" and set(res["summary"]) == {"teacher", "fused"}
    assert Path(res["files"]["json"]).parent == tmp_path / "mteb"
    r = _invoke(["mteb", "--task", f"beir:{BEIR_TINY}", "--methods", "bm25", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "unknown method bm25" in r.output
    r = _invoke(["mteb", "--task", "NoSuchTaskXYZ", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "unknown mteb task 'NoSuchTaskXYZ'" in r.output
