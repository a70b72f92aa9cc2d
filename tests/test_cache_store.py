"""The one cache store (retrieval_kit/cache_store.py): reuse, kill -9, concurrent writers, damaged files, identities."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from retrieval_kit.cache_store import CacheStore, file_digest, model_identity, path_digest, text_key
from retrieval_kit.errors import BenchError, TrainError

REPO = Path(__file__).resolve().parents[1]


def _vec(text: str, dim: int = 8) -> np.ndarray:
    """A value anyone can recompute from the text: what every process must find stored for it."""
    rng = np.random.default_rng(int.from_bytes(text_key(text)[:8], "big"))
    return rng.standard_normal(dim).astype(np.float32)


def test_vectors_computed_once_in_order_across_processes_and_chunks(tmp_path):
    seen = []

    def compute(texts):
        seen.extend(texts)
        return np.stack([_vec(t) for t in texts])

    ns = CacheStore.in_folder(tmp_path).vectors("test", {"model": "m"})
    a, cached = ns.get(["x", "y", "z"], compute, chunk=2)
    assert not cached and seen == ["x", "y", "z"] and a.dtype == np.float32 and a.shape == (3, 8)
    b, cached = CacheStore.in_folder(tmp_path).vectors("test", {"model": "m"}).get(["z", "w", "x", "x"], compute)
    assert not cached and seen == ["x", "y", "z", "w"]  # only the new text
    np.testing.assert_array_equal(b, np.stack([_vec(t) for t in ["z", "w", "x", "x"]]))
    assert CacheStore.in_folder(tmp_path).vectors("test", {"model": "m"}).get(["w"], compute)[1] is True
    other, cached = CacheStore.in_folder(tmp_path).vectors("test", {"model": "m2"}).get(["x"], compute)
    assert not cached and seen[-1] == "x"  # another identity: another namespace
    empty, cached = ns.get([], compute)
    assert empty.shape == (0, 8) and cached


def test_texts_and_progress_stage(tmp_path):
    totals, steps = [], []

    class stage:
        def __init__(self, total):
            totals.append(total)

        def __enter__(self):
            return steps.append

        def __exit__(self, *exc):
            return False

    ns = CacheStore.in_folder(tmp_path).texts("answers", {"model": "m", "prompt": None})
    got, cached = ns.get(["a", "b", "a", "c"], lambda ts: [t.upper() + " é" for t in ts], chunk=2, stage=stage)
    assert got == ["A é", "B é", "A é", "C é"] and not cached and totals == [3] and steps == [2, 1]
    again, cached = ns.get(["c", "a"], lambda ts: pytest.fail("recomputed"), stage=stage)
    assert again == ["C é", "A é"] and cached and totals == [3, 0]


def test_namespaces_read_back_by_kind(tmp_path):
    store = CacheStore.in_folder(tmp_path)
    store.texts("bench-hyde", {"prompt": "a"}).put(["q1", "q2"], ["A1", "A2"])
    store.texts("bench-hyde", {"prompt": "b"}).put(["q1"], ["B1"])
    store.vectors("bench-documents", {"teacher": "t"}).put(["d"], np.ones((1, 3)))
    found = CacheStore.in_folder(tmp_path).namespaces("bench-hyde")
    assert [ns.identity for ns in found] == [{"prompt": "a"}, {"prompt": "b"}]
    assert sorted(found[0].values()) == ["A1", "A2"] and found[1].values() == ["B1"]
    (docs,) = store.namespaces("bench-documents")
    np.testing.assert_array_equal(docs.values()[0], np.ones(3, dtype=np.float32))


def test_width_mismatch_in_one_namespace_is_an_error(tmp_path):
    ns = CacheStore.in_folder(tmp_path, BenchError).vectors("test", {"model": "m"})
    ns.put(["a"], np.zeros((1, 4)))
    with pytest.raises(BenchError, match="width"):
        ns.put(["b"], np.zeros((1, 5)))


@pytest.mark.parametrize("error", [BenchError, TrainError])
def test_garbage_file_is_a_one_line_error(tmp_path, error):
    (tmp_path / "cache.sqlite3").write_bytes(b"this is not a database, just a torn file" * 100)
    with pytest.raises(error) as err:
        CacheStore.in_folder(tmp_path, error).vectors("test", {}).get(["a"], lambda t: np.zeros((len(t), 2)))
    msg = str(err.value)
    assert "cache.sqlite3" in msg and "delete it" in msg and "\n" not in msg


def test_unwritable_folder_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the cache folder should be
    with pytest.raises(TrainError, match="cannot use the cache"):
        CacheStore.in_folder(blocker / "sub", TrainError).texts("t", {}).lookup(["a"])


_WRITER = textwrap.dedent("""
    import sys, time, numpy as np
    sys.path.insert(0, {tests!r})
    from test_cache_store import _vec
    from retrieval_kit.cache_store import CacheStore
    folder, start, stop, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    ns = CacheStore.in_folder(folder).vectors("test", {{"model": "shared"}})
    texts = [f"text {{i}}" for i in range(start, stop)]
    print("start", time.time(), flush=True)
    for s in range(0, len(texts), batch):
        part = texts[s:s + batch]
        ns.put(part, np.stack([_vec(t) for t in part]))
        print("committed", s + len(part), flush=True)  # the parent may count on these
    print("end", time.time(), flush=True)
""")


def _writer(folder: Path, start: int, stop: int, batch: int) -> subprocess.Popen:
    script = _WRITER.format(tests=str(Path(__file__).parent))
    return subprocess.Popen([sys.executable, "-c", script, str(folder), str(start), str(stop), str(batch)],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)


def test_kill_9_mid_write_keeps_every_committed_item(tmp_path):
    proc = _writer(tmp_path, 0, 1_000_000, 50)
    committed = 0
    while committed < 2_000:
        word, value = proc.stdout.readline().split()
        committed = int(value) if word == "committed" else 0
    os.kill(proc.pid, signal.SIGKILL)  # in the middle of the next transactions
    proc.wait()
    ns = CacheStore.in_folder(tmp_path).vectors("test", {"model": "shared"})
    texts = [f"text {i}" for i in range(committed + 5_000)]
    stored = ns.lookup(texts)
    assert len(stored) >= committed
    for text, vec in stored.items():  # whatever was stored is whole and right
        np.testing.assert_array_equal(vec, _vec(text))
    assert all(f"text {i}" in stored for i in range(committed))
    ns.put(["after"], _vec("after")[None])  # and the store takes writes again
    assert list(ns.lookup(["after"])) == ["after"]


def test_two_processes_writing_one_namespace_both_finish_with_right_values(tmp_path):
    procs = [_writer(tmp_path, 0, 12_000, 10), _writer(tmp_path, 6_000, 18_000, 15)]  # same texts 6,000..11,999
    spans = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0
        lines = dict(line.split(maxsplit=1) for line in out.splitlines() if not line.startswith("committed"))
        assert out.splitlines()[-2] == "committed 12000"
        spans.append((float(lines["start"]), float(lines["end"])))
    assert max(s for s, _ in spans) < min(e for _, e in spans), spans  # they did write at the same time
    stored = CacheStore.in_folder(tmp_path).vectors("test", {"model": "shared"}).lookup(
        [f"text {i}" for i in range(18_000)])
    assert len(stored) == 18_000
    for text, vec in stored.items():
        np.testing.assert_array_equal(vec, _vec(text))


# ---- identities ------------------------------------------------------------------------------------------

def test_model_identity_tells_apart_paths_with_a_long_common_prefix_and_changed_content(tmp_path):
    prefix = "teachers/" + "all-minilm-l6-v2-finetuned-on-our-support-tickets-2024-run-" * 2
    one, two = tmp_path / (prefix + "one"), tmp_path / (prefix + "two")
    for folder in (one, two):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text('{"dim": 4}')
        (folder / "model.safetensors").write_bytes(b"same weights")
    a, b = model_identity(str(one)), model_identity(str(two))
    assert a["path"] != b["path"] and a["sha256"] == b["sha256"]  # same bytes, other model: told apart by path
    before = model_identity(str(one))
    time.sleep(0.01)
    (one / "model.safetensors").write_bytes(b"new weights!")  # retrained in place
    after = model_identity(str(one))
    assert after["path"] == before["path"] and after["sha256"] != before["sha256"]
    assert model_identity("some-org/not-downloaded") == {"name": "some-org/not-downloaded"}


def test_file_digest_is_the_sha256_and_remembered(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setenv("RKIT_HOME", str(tmp_path / "home"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 3_000_000)
    assert file_digest(f) == hashlib.sha256(b"x" * 3_000_000).hexdigest()
    assert (tmp_path / "home" / "digests.sqlite3").is_file()
    with open(f, "ab") as fh:
        fh.write(b"y")
    assert file_digest(f) == hashlib.sha256(b"x" * 3_000_000 + b"y").hexdigest()
    assert path_digest(tmp_path / "home") != path_digest(f)
