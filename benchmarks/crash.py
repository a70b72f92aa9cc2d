"""Crash test for rkit indexes, in the spirit of Qdrant's crasher and SQLite's crash tests.

A driver mutates a corpus (adds, changes and deletes files), runs a real ``rkit index`` subprocess on it and
kills it with SIGKILL at a random moment, round after round. After every kill the index must open (read-only,
as ``rkit search`` opens it) and every stored chunk must be found first by its own stored vector. At the end
one clean ``rkit index`` run must leave an index equal to a clean build of the same corpus: the same chunk
ids with the same texts and vectors, nothing missing, nothing extra, every chunk found top-1 by its vector.

    python -m benchmarks.crash --backend faiss --kills 100 --json --out benchmarks/results/crash
    python -m benchmarks.crash --backend qdrant --kills 100

Kill moments: half the rounds kill at a random time between half the calibration run's time to its first
commit and its end (models loading, chunks embedding: a run killed there leaves its work pending, so later
runs have more to do); the other half watch the index's commit counter (meta.generation) and kill at a random moment within the
calibration run's writing time after this run's own first commit (between commits, while the backend file
and manifest are saved). A kill that comes too late (the run had finished) is not counted. Each kill
records which phase the index was in.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "pe", "ra", "si", "to", "ve", "zo", "bri", "gan")
         for b in ("dor", "len", "mar", "pik", "sul", "tev", "wyn", "xal", "yor", "zen", "qua", "fim")]


def make_text(rng: random.Random, tag: str) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(50, 130))]
    return f"{tag} " + " ".join(words) + f" {tag}-end"  # unique tags: no two chunks share a text or a vector


class Corpus:
    """A folder of .txt files that the driver adds to, changes and deletes from."""

    def __init__(self, folder: Path, rng: random.Random, files: int):
        self.folder, self.rng, self.version = folder, rng, 0
        folder.mkdir(parents=True, exist_ok=True)
        self.next_id = 0
        for _ in range(files):
            self.add()

    def names(self) -> list[Path]:
        return sorted(self.folder.glob("*.txt"))

    def add(self) -> None:
        self.version += 1
        path = self.folder / f"doc{self.next_id:04d}.txt"
        self.next_id += 1
        path.write_text(make_text(self.rng, f"{path.stem}-v{self.version}"), encoding="utf-8")

    def mutate(self, changes: int) -> dict:
        """Add, change and delete about ``changes`` files in all."""
        counts = {"added": 0, "changed": 0, "deleted": 0}
        for _ in range(changes):
            names, roll = self.names(), self.rng.random()
            if roll < 0.25 or len(names) < 5:
                self.add()
                counts["added"] += 1
            elif roll < 0.85:
                self.version += 1
                path = self.rng.choice(names)
                path.write_text(make_text(self.rng, f"{path.stem}-v{self.version}"), encoding="utf-8")
                counts["changed"] += 1
            else:
                self.rng.choice(names).unlink()
                counts["deleted"] += 1
        return counts


def rkit_command(corpus: Path, index_dir: Path, backend: str, chunk_words: int) -> list[str]:
    exe = Path(sys.executable).with_name("rkit")
    return [str(exe), "index", str(corpus), "--name", "kb", "--index-dir", str(index_dir), "--backend", backend,
            "--chunk-words", str(chunk_words), "--overlap", "8", "--json", "--wait"]


class Generation:
    """The index's commit counter (meta.generation), read through a read-only doc store as a reader reads it."""

    def __init__(self, folder: Path):
        self.path, self.store = folder / "docs.sqlite", None

    def __call__(self) -> int:
        import sqlite3

        from retrieval_kit.index.store import DocStore

        try:
            if self.store is None:
                self.store = DocStore(self.path, readonly=True, timeout=1)
            return int(self.store.get_meta("generation", "0"))
        except sqlite3.Error:  # not there yet, or busy for a moment
            return -1

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def run_clean(cmd: list[str], env: dict, folder: Path) -> dict:
    """A run without a kill, timing its first commit and its end."""
    start, first_commit, generation = time.monotonic(), None, Generation(folder)
    g0 = generation()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:
        if first_commit is None and generation() > g0:
            first_commit = time.monotonic() - start
        time.sleep(0.01)
    generation.close()
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"clean rkit index failed ({proc.returncode}): {err.strip()[-2000:]}")
    total = time.monotonic() - start
    return {"seconds": total, "first_commit_s": first_commit if first_commit is not None else total / 2,
            "report": json.loads(out)}


def run_killed(cmd: list[str], env: dict, rng: random.Random, window: tuple[float, float], after_commit: float,
               folder: Path) -> dict:
    """Start rkit index and SIGKILL it: half the rounds at a random time in ``window`` (models loading, chunks
    embedding), half at a random time within ``after_commit`` seconds of its first commit (between commits, while
    the backend file and manifest are saved). Says what phase it was in, or that it finished first."""
    generation, backend_file = Generation(folder), folder / "faiss.index"
    before = {"generation": generation(), "faiss": backend_file.stat().st_mtime_ns if backend_file.exists() else 0}
    on_commit = rng.random() < 0.5
    delay = rng.uniform(0, after_commit) if on_commit else rng.uniform(*window)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    start = time.monotonic()
    end = None if on_commit else start + delay
    while proc.poll() is None:
        now = time.monotonic()
        if end is None and generation() > before["generation"]:
            end = now + delay  # this run has made its first commit
        if end is not None and now >= end:
            break
        time.sleep(0.005)
    if proc.poll() is not None:
        generation.close()
        err = proc.stderr.read()
        if proc.returncode != 0:
            raise RuntimeError(f"rkit index failed before its kill ({proc.returncode}): {err.strip()[-2000:]}")
        return {"killed": False}
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    committed = generation() > before["generation"]
    generation.close()
    saved = backend_file.exists() and backend_file.stat().st_mtime_ns != before["faiss"]
    phase = ("after faiss.index was rewritten" if saved else "after a commit") if committed or saved else \
        "before any commit"
    return {"killed": True, "delay_s": round(time.monotonic() - start, 3), "phase": phase}


LEXICAL_SAMPLE = 50  # chunks per check whose own text must find them through BM25 (all of them: slow on local Qdrant)


def snapshot(folder: Path) -> dict:
    """Open the index as a reader does and check it: every chunk top-1 for its own stored vector, and a sample of
    chunks found (top 10) by BM25 for their own text (the lexical side is in step with the store)."""
    from retrieval_kit.index import Index

    with Index.open(folder) as index:
        rows, vectors, payloads = [], [], []
        for r, v, p, _ in index.store.iter_batches():
            rows.append(r)
            vectors.append(v)
            payloads += p
        vectors = np.concatenate(vectors) if vectors else np.zeros((0, index.dim), np.float32)
        chunk_ids = [p["chunk_id"] for p in payloads]
        wrong = 0
        for start in range(0, len(vectors), 256):
            hits = index.search(vectors[start:start + 256], k=1)
            wrong += sum(1 for i, h in enumerate(hits) if not h or h[0].chunk_id != chunk_ids[start + i])
        sample = random.Random(len(chunk_ids)).sample(range(len(chunk_ids)), min(LEXICAL_SAMPLE, len(chunk_ids)))
        found = index.search_lexical([payloads[i]["text"] for i in sample], k=10) if sample else []
        lexical_missing = sum(chunk_ids[i] not in {h.chunk_id for h in hits} for i, hits in zip(sample, found))
        return {"chunks": len(chunk_ids), "documents": index.count_documents(), "wrong_top1": wrong,
                "lexical_missing": lexical_missing,
                "chunk_ids": chunk_ids, "texts": {p["chunk_id"]: p["text"] for p in payloads},
                "vectors": {c: vectors[i] for i, c in enumerate(chunk_ids)}}


def compare(crashed: dict, clean: dict) -> dict:
    a, b = set(crashed["chunk_ids"]), set(clean["chunk_ids"])
    same_text = sum(crashed["texts"][c] == clean["texts"][c] for c in a & b)
    max_diff = max((float(np.abs(crashed["vectors"][c] - clean["vectors"][c]).max()) for c in a & b), default=0.0)
    return {"missing": len(b - a), "phantom": len(a - b), "duplicates": len(crashed["chunk_ids"]) - len(a),
            "text_mismatch": len(a & b) - same_text, "max_vector_diff": max_diff,
            "wrong_top1": crashed["wrong_top1"], "lexical_missing": crashed["lexical_missing"]}


def crash_test(workdir: Path, *, backend: str = "faiss", kills: int = 10, files: int = 40, changes: int = 10,
               chunk_words: int = 40, seed: int = 0, log=print) -> dict:
    """Run the crash test in ``workdir`` (made empty); the result dict is what the benchmark commits."""
    rng = random.Random(seed)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    corpus = Corpus(workdir / "corpus", rng, files)
    index_dir = workdir / "indexes"
    folder = index_dir / "kb"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = rkit_command(corpus.folder, index_dir, backend, chunk_words)
    start = time.monotonic()
    calibration = run_clean(cmd, env, folder)  # the first build, never killed
    corpus.mutate(changes)
    calibration = run_clean(cmd, env, folder)  # an update: what the killed rounds are
    writing = max(calibration["seconds"] - calibration["first_commit_s"], 0.5)
    low, high = 0.5 * calibration["first_commit_s"], calibration["first_commit_s"] + writing
    log(f"calibration: update run {calibration['seconds']:.1f}s, first commit at {calibration['first_commit_s']:.1f}s")
    rounds, done, finished_first, phases, bad_opens = 0, 0, 0, {}, []
    while done < kills:
        rounds += 1
        corpus.mutate(changes)
        outcome = run_killed(cmd, env, rng, (low, high), writing, folder)
        if not outcome["killed"]:
            finished_first += 1
            continue
        done += 1
        phases[outcome["phase"]] = phases.get(outcome["phase"], 0) + 1
        try:
            state = snapshot(folder)
            if state["wrong_top1"]:
                bad_opens.append(f"round {rounds}: {state['wrong_top1']} chunks not top-1 for their own vector")
            if state["lexical_missing"]:
                bad_opens.append(f"round {rounds}: {state['lexical_missing']} chunks not found by BM25 for their text")
        except Exception as exc:  # noqa: BLE001 - any failure to open is the finding
            bad_opens.append(f"round {rounds}: {type(exc).__name__}: {exc}")
        log(f"kill {done}/{kills} at {outcome['delay_s']}s ({outcome['phase']})")
    final = run_clean(cmd, env, folder)  # one clean run brings the index up to date
    crashed = snapshot(folder)
    clean_cmd = rkit_command(corpus.folder, workdir / "clean", backend, chunk_words)
    run_clean(clean_cmd, env, workdir / "clean" / "kb")
    reference = snapshot(workdir / "clean" / "kb")
    result = {
        "backend": backend, "kills": done, "rounds": rounds, "finished_before_kill": finished_first,
        "kill_phases": phases, "kill_window_s": [round(low, 2), round(high, 2)], "seed": seed,
        "corpus_files": len(corpus.names()), "chunks": reference["chunks"], "changes_per_round": changes,
        "bad_opens": bad_opens, "final_run_report": final["report"], "vs_clean_build": compare(crashed, reference),
        "seconds": round(time.monotonic() - start, 1),
    }
    v = result["vs_clean_build"]
    result["ok"] = not bad_opens and v["missing"] == v["phantom"] == v["duplicates"] == v["text_mismatch"] == \
        v["wrong_top1"] == v["lexical_missing"] == 0 and v["max_vector_diff"] < 1e-4
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("faiss", "qdrant"), default="faiss")
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--files", type=int, default=60)
    parser.add_argument("--changes", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rkit-crash"))
    parser.add_argument("--out", type=Path, default=None, help="folder for the result JSON")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from retrieval_kit.machine import machine_info

    result = crash_test(args.workdir / args.backend, backend=args.backend, kills=args.kills, files=args.files,
                        changes=args.changes, seed=args.seed, log=lambda m: print(m, file=sys.stderr, flush=True))
    result["machine"] = machine_info()
    result["command"] = " ".join(["python -m benchmarks.crash", *sys.argv[1:]])
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"{time.strftime('%Y-%m-%d')}-crash-{args.backend}-{args.kills}kills.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}", file=sys.stderr)
    print(json.dumps(result, indent=2) if args.json else
          f"{args.backend}: {result['kills']} kills in {result['rounds']} rounds, ok={result['ok']}, "
          f"vs clean build {result['vs_clean_build']}, bad opens {len(result['bad_opens'])}")
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
