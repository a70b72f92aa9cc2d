"""benchmarks/gpu_train: parts round-trip and fail loudly; the whole job runs at toy size on CPU and its $OUT is
what a run call brings back (≤ 8 files, ≤ 2 folders deep, plain names) with a loadable adapter and its card."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_train import pack
from benchmarks.gpu_train.parts import MANIFEST, PartsError, assemble, sha256_file, stash

REPO = Path(__file__).resolve().parents[1]
RUN_SH = REPO / "benchmarks" / "gpu_train" / "run.sh"
QUERIES = ["What is the capital of France?", "Who wrote Hamlet?", "Name a primary color.",
           "How many legs does a spider have?", "What is two plus two?", "Define gravity."]


def query_file(folder: Path) -> Path:
    path = folder / "mixed.jsonl"  # the name the job looks for in the bundle
    path.write_text("".join(json.dumps({"_id": str(i), "text": q}) + "\n" for i, q in enumerate(QUERIES)))
    return path


def stash_all(parts_out: Path, parts_dir: Path, manifest: dict) -> None:
    for k in range(1, manifest["calls"] + 1):
        stash(parts_out / f"call{k}", parts_dir)


# ---- parts: no models, fast ----------------------------------------------------------------------------------


@pytest.fixture()
def small_pack(tmp_path):
    """A bundle without the models (fallback packages + queries + one extra file), cut into several parts."""
    extra = tmp_path / "blob.bin"
    extra.write_bytes(os.urandom(300_000))
    out = tmp_path / "parts-out"
    manifest = pack.build(out, query_file(tmp_path), [(extra, "data/blob.bin")], part_mb=0.4, with_models=False)
    return {"out": out, "manifest": manifest, "extra": extra, "tmp": tmp_path}


def test_parts_round_trip(small_pack):
    out, manifest, tmp = small_pack["out"], small_pack["manifest"], small_pack["tmp"]
    assert manifest["calls"] >= 3  # the fallback packages alone are > 1 MB
    for row in manifest["parts"]:  # one part per call folder, each with the manifest
        folder = out / f"call{row['call']}"
        assert sorted(p.name for p in folder.iterdir()) == sorted([row["name"], MANIFEST])
        assert row["size"] <= 400_000 and sha256_file(folder / row["name"]) == row["sha256"]
    stash_all(out, tmp / "parts", manifest)
    assemble(tmp / "parts", tmp / "stage")
    assert (tmp / "stage" / "data" / "blob.bin").read_bytes() == small_pack["extra"].read_bytes()
    assert (tmp / "stage" / "data" / "train_queries" / "mixed.jsonl").read_text().count("\n") == len(QUERIES)
    assert (tmp / "stage" / "fallback" / "gguf" / "__init__.py").is_file()
    assert len(manifest["files"]) == sum(1 for p in (tmp / "stage").rglob("*") if p.is_file() and p.name != ".verified")


def test_a_corrupt_part_fails_in_one_line(small_pack):
    out, manifest, tmp = small_pack["out"], small_pack["manifest"], small_pack["tmp"]
    stash_all(out, tmp / "parts", manifest)
    victim = tmp / "parts" / manifest["parts"][1]["name"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    victim.write_bytes(bytes(data))
    with pytest.raises(PartsError, match="sha256") as err:
        assemble(tmp / "parts", tmp / "stage")
    assert "\n" not in str(err.value) and manifest["parts"][1]["name"] in str(err.value)
    assert not (tmp / "stage" / "data").exists()  # nothing extracted from a bad bundle

    # the command line: one line on stderr, exit status 2, no traceback
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_train.run", "assemble", "--parts", str(tmp / "parts"),
                           "--stage", str(tmp / "stage")], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("gpu_train: error: part ") and len(done.stderr.strip().splitlines()) == 1

    # a part that never arrived (the machine went back between calls) is named, with what to do
    victim.unlink()
    with pytest.raises(PartsError, match="missing.*start again from call 1"):
        assemble(tmp / "parts", tmp / "stage")
    # a corrupt copy is caught in the call that carried it, before the next part travels
    carried = out / f"call{manifest['parts'][0]['call']}" / manifest["parts"][0]["name"]
    carried.write_bytes(carried.read_bytes()[:-1])
    with pytest.raises(PartsError, match="truncated"):
        stash(carried.parent, tmp / "parts2")


def test_half_safetensors_keeps_integer_buffers(tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(4, 3), "position_ids": torch.arange(5)}, str(src), metadata={"format": "pt"})
    half = load_file(str(pack.half_safetensors(src, tmp_path / "half.safetensors")))
    assert half["w"].dtype == torch.float16 and half["position_ids"].dtype == torch.int64
    assert torch.equal(half["w"], load_file(str(src))["w"].half())


def test_printed_calls_fit_the_device_limits(small_pack):
    rows = pack.calls(small_pack["manifest"], REPO / ".gpu_parts", "--max-steps 100")
    assert [r["command"].split()[2] for r in rows] == ["stash"] * (len(rows) - 1) + ["train"]
    assert rows[-1]["command"].endswith("--max-steps 100") and "--max-steps" not in rows[0]["command"]
    for row in rows:
        assert len(row["command"]) <= 2000 and len(row["carry"]) <= 8 and row["timeout_s"] <= 600
    manifest = small_pack["manifest"]
    assert max(p["size"] for p in manifest["parts"]) + manifest["tree_bytes"] <= pack.CALL_LIMIT


# ---- the job at toy size, real models, CPU --------------------------------------------------------------------


TOY = ["--device", "cpu", "--val-size", "1", "--tune-size", "0", "--max-new-tokens", "4", "--max-target-tokens", "4",
       "--batch-size", "2", "--gen-batch-size", "8", "--eval-batch-size", "8", "--calib-steps", "1",
       "--decode-samples", "0", "--set", "val_decode=0",
       # two steps planned, the guard set to fire at once: the loop stops after one and the adapter is still written
       "--min-steps", "2", "--max-steps", "2", "--guard-at-s", "0"]


def test_job_end_to_end_on_cpu(tmp_path):
    out_parts, root, out = tmp_path / "parts-out", tmp_path / "root", tmp_path / "OUT"
    # float32 teacher here: fp16 matmuls are ~5× slower on CPU; the fp16 file is what a GPU run carries
    manifest = pack.build(out_parts, query_file(tmp_path), teacher_dtype="float32")
    env = {**os.environ, "OUT": str(out), "GPU_TRAIN_ROOT": str(root), "PYTHON": sys.executable,
           "RKIT_HOME": os.environ["RKIT_HOME"]}  # conftest's: the dequantised backbone is reused, not remade
    done = subprocess.run(["bash", str(RUN_SH), "stash", str(out_parts / "call1")], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "verified and kept" in done.stdout, done.stdout + done.stderr
    assert '"torch": "' in done.stdout  # call 1 prints the machine's packages before the big parts travel
    for k in range(2, manifest["calls"]):  # the same step through the function: each CLI call imports torch
        stash(out_parts / f"call{k}", root / "parts")
    done = subprocess.run(["bash", str(RUN_SH), "train", str(out_parts / f"call{manifest['calls']}"), *TOY],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # what comes back from a run call: ≤ 8 files, ≤ 2 folders below $OUT, names of letters, digits, . _ -
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} == {"adapter.tar", "README.md", "training_log.jsonl", "summary.json",
                                       "responses.jsonl.gz", "job.log"}
    for path in files:
        rel = path.relative_to(out)
        assert len(rel.parts) <= 3 and all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.parts), rel
        assert path.stat().st_size <= 16 * 2**20
    assert "plan: 2 steps" in (out / "job.log").read_text()

    from retrieval_kit.models import load_adapter

    with tarfile.open(out / "adapter.tar") as tar:  # back here: tar xf adapter.tar
        tar.extractall(tmp_path / "back", filter="data")
    folder = tmp_path / "back" / "adapter"
    adapter = load_adapter(folder, device="cpu")
    config = json.loads((folder / "config.json").read_text())
    assert config["trained"] and config["training"]["steps"] == 1
    assert config["training"]["gpu_job"]["planned_steps"] == 2 and config["training"]["gpu_job"]["stopped_by_guard"]
    vec = adapter.encode(["Who wrote Hamlet?"])
    assert vec.shape == (1, config["embed_dim"]) and abs(float((vec ** 2).sum()) - 1) < 1e-3
    card = (folder / "README.md").read_text()
    assert card == (out / "README.md").read_text()
    assert "## GPU job" in card and "stopped by the wall-clock guard after step 1 of 2" in card
    summary = json.loads((out / "summary.json").read_text())
    assert summary["job"]["responses"]["records"] == len(QUERIES) and summary["trainer"]["data"]["val"] == 1

    # back here: the held-out figure recomputed from the files that came back matches the card's
    from benchmarks.gpu_train.job import compare

    result = compare(folder, [], out / "responses.jsonl.gz", tmp_path / "mixed.jsonl")
    assert result["n"] == 1 and result["adapters"][0]["student_cos"] == pytest.approx(config["training"]["val"]["student_cos"], abs=2e-3)

    # back here: the job's responses go into a response cache under the trainer's own key
    cache = tmp_path / "cache"
    imported = subprocess.run([sys.executable, "-m", "benchmarks.gpu_train.run", "import-responses",
                               str(out / "responses.jsonl.gz"), "--cache-dir", str(cache)],
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr
    from retrieval_kit.train.responses import GenerationConfig, response_cache

    answers = response_cache(cache, "smollm2-135m-instruct", GenerationConfig(max_new_tokens=4)).lookup(QUERIES)
    assert set(answers) == set(QUERIES)


def test_a_run_that_fails_after_its_loop_still_brings_back_its_responses_and_log(tmp_path):
    """The first H200 run failed in the query-anchor fit after its loop and brought back only job.log: the answers
    (92 s of GPU time) and the loop's log were lost. The same failure point, forced here (a CUDA device mismatch
    cannot happen on a CPU): the responses, the log and the job's figures with the error still come back."""
    out_parts, root, out = tmp_path / "parts-out", tmp_path / "root", tmp_path / "OUT"
    manifest = pack.build(out_parts, query_file(tmp_path), teacher_dtype="float32")
    for k in range(1, manifest["calls"] + 1):
        stash(out_parts / f"call{k}", root / "parts")
    failing = ("import sys, retrieval_kit.train as t\n"
               "def boom(*a, **k): raise RuntimeError('Expected all tensors to be on the same device')\n"
               "t.fit_query_anchor = boom\n"
               "from benchmarks.gpu_train.run import main\n"
               "sys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", failing, "train", "--parts", str(root / "parts"), "--stage", str(root / "stage"),
                           "--work", str(root / "work"), "--out", str(out), *TOY],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert done.returncode != 0 and "same device" in done.stderr, done.stdout[-2000:] + done.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == {"responses.jsonl.gz", "training_log.jsonl", "summary.json"}
    job = json.loads((out / "summary.json").read_text())["job"]
    assert job["error"].startswith("RuntimeError") and job["plan"]["steps"] == 2
    assert any(json.loads(line).get("step") == 1 for line in (out / "training_log.jsonl").read_text().splitlines())
    cache = tmp_path / "cache"
    from benchmarks.gpu_train.job import import_responses

    assert import_responses(out / "responses.jsonl.gz", cache) == len(QUERIES)


def test_perf_call_without_an_assembled_bundle_says_so_in_one_line(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "OUT"), "GPU_TRAIN_ROOT": str(tmp_path / "root"), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(RUN_SH), "perf"], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [f"gpu_train: error: no assembled bundle in {tmp_path / 'root' / 'stage'}: "
                                               "run the train call first"]
