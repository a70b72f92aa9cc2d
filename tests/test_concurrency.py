"""Two writers, and readers searching while a writer re-indexes: real `rkit index` subprocesses."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.crash import Corpus, rkit_command, snapshot  # noqa: E402
from retrieval_kit.index.lock import HOLDER_FILE  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
STABLE = "The Zephyrine gateway rejects requests with error code ZX-4471 when the tenant quota is exhausted."


def setup_index(tmp_path, files=40, backend="faiss"):
    corpus = Corpus(tmp_path / "corpus", random.Random(3), files)
    (corpus.folder / "stable.txt").write_text(STABLE, encoding="utf-8")
    cmd = [*rkit_command(corpus.folder, tmp_path / "indexes", backend, 40)]
    cmd.remove("--wait")
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return corpus, cmd, tmp_path / "indexes" / "kb"


def rewrite_all(corpus: Corpus) -> None:
    for path in corpus.names():
        if path.name != "stable.txt":
            corpus.version += 1
            path.write_text(f"{path.stem}-v{corpus.version} " + " ".join(corpus.rng.choice(["alpha", "beta", "gamma", "delta", "omega"]) + str(i) for i in range(120)), encoding="utf-8")


def wait_for_holder(folder: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not (folder / HOLDER_FILE).exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < end, "the writer never took the lock"
        time.sleep(0.02)


def test_second_writer_fails_at_once_naming_the_holder_or_waits(tmp_path):
    corpus, cmd, folder = setup_index(tmp_path)
    rewrite_all(corpus)
    first = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_holder(folder, first)
        second = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
        assert second.returncode != 0 and "Traceback" not in second.stderr
        line = " ".join(second.stderr.split())
        assert f"is being written by pid {first.pid}" in line and "--wait" in line, line
        queued = subprocess.Popen([*cmd, "--wait"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert first.wait(timeout=600) == 0, first.stderr.read()
        out, err = queued.communicate(timeout=600)
        assert queued.returncode == 0, err[-2000:]
        assert json.loads(out)["chunks_embedded"] == 0  # it ran after the first, which had done the work
    finally:
        first.kill()
    state = snapshot(folder)
    assert state["wrong_top1"] == 0 and state["documents"] == len(corpus.names())


@pytest.mark.parametrize("backend", ["faiss", "qdrant"])
def test_readers_see_no_error_and_no_wrong_hit_while_a_writer_reindexes(tmp_path, encoder, monkeypatch, backend):
    """Readers open the index afresh per search (as each `rkit search` does) while `rkit index` rewrites every
    file but one: each search must work, find the stable document first for its error code, and every hit must be
    the chunk its vector belongs to (a stale backend returned other documents' chunks). On embedded Qdrant the
    writer holds the local folder, which used to make every reader fail."""
    import retrieval_kit.search as search_mod
    from retrieval_kit.search import Retriever

    monkeypatch.setattr(search_mod, "load_encoder", lambda *a, **k: encoder)  # real models, loaded once
    corpus, cmd, folder = setup_index(tmp_path, backend=backend)
    rewrite_all(corpus)
    writer = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cli_reader = None
    searches, errors, wrong, generations = 0, [], 0, set()
    try:
        while writer.poll() is None or searches < 3:
            try:
                with Retriever.open(folder) as retriever:
                    generations.add(retriever.index.generation)
                    hits = retriever.search(["which error code means the tenant quota is exhausted?"], k=3,
                                            query_mode="teacher")[0].hits
                    wrong += hits[0].doc_id != "stable.txt"
                    rows, vectors, payloads, _ = next(retriever.index.store.iter_batches(size=64))
                    for hit_list, payload in zip(retriever.index.search(vectors, k=1), payloads):
                        wrong += hit_list[0].chunk_id != payload["chunk_id"]
                searches += 1
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                errors.append(f"{type(exc).__name__}: {exc}")
            if cli_reader is None and writer.poll() is None:  # one real `rkit search` process during the write
                exe = Path(sys.executable).with_name("rkit")
                cli_reader = subprocess.Popen([str(exe), "search", "error code ZX-4471", "--index", str(folder),
                                               "--query-mode", "teacher", "--json"], env=ENV,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert writer.wait(timeout=600) == 0, writer.stderr.read()
    finally:
        writer.kill()
    out, err = cli_reader.communicate(timeout=600)
    assert cli_reader.returncode == 0, err[-2000:]
    assert json.loads(out)["results"][0]["hits"][0]["doc_id"] == "stable.txt"
    assert errors == [] and wrong == 0 and searches >= 3
    assert len(generations) >= 2  # the readers did run while the writer committed
    state = snapshot(folder)  # and the re-index is complete and consistent
    assert state["wrong_top1"] == 0 and state["documents"] == len(corpus.names())
    for path in corpus.names():  # every file's new text is what the index holds
        assert state["texts"][f"{path.name}#0"].split()[0] == path.read_text().split()[0], path.name
