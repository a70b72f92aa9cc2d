"""The bundle and its parts: one tar split into pieces small enough for one `run` call each, with a manifest.

Standard library only: the GPU machine runs this before anything else is known to work there.

    manifest.json = {"bundle": {name, size, sha256}, "parts": [{name, call, size, sha256}], "files": [{path, size, sha256}], ...}

A part is checked the moment it lands (`stash`), so a corrupt transfer fails in the call that brought it, not three
calls later; `assemble` checks every part again, the joined bundle, and every extracted file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path

MANIFEST = "manifest.json"
BUNDLE = "bundle.tar"
VERIFIED = ".verified"  # written into the stage folder once every file matched: a rerun skips the work


class PartsError(Exception):
    """A missing, truncated or corrupt part or file: printed as one line by the command line (run.py)."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def split_file(path: Path, out_dir: Path, n_parts: int, call_of=lambda i: i + 1) -> list[dict]:
    """Cut `path` into `n_parts` near-equal pieces `out_dir/call<k>/<name>.part<i>`; return their manifest rows."""
    size = path.stat().st_size
    per = -(-size // n_parts)  # ceil: the last part is the short one
    rows = []
    with open(path, "rb") as src:
        for i in range(n_parts):
            call = call_of(i)
            folder = out_dir / f"call{call}"
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{path.name}.part{i + 1:02d}"
            h, written = hashlib.sha256(), 0
            with open(folder / name, "wb") as dst:
                while written < per:
                    block = src.read(min(1 << 22, per - written))
                    if not block:
                        break
                    dst.write(block)
                    h.update(block)
                    written += len(block)
            rows.append({"name": name, "call": call, "size": written, "sha256": h.hexdigest()})
    return rows


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PartsError(f"no {MANIFEST} in {folder}: carry a folder pack.py made") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise PartsError(f"unreadable {path}: {exc}") from None


def check_part(path: Path, row: dict) -> None:
    if not path.is_file():
        raise PartsError(f"part {row['name']} (call {row['call']}) is missing from {path.parent}: make that call "
                         f"first; if it was made, the machine went back between calls — start again from call 1")
    size = path.stat().st_size
    if size != row["size"]:
        raise PartsError(f"part {row['name']} is {size} bytes, the manifest says {row['size']}: truncated copy")
    digest = sha256_file(path)
    if digest != row["sha256"]:
        raise PartsError(f"part {row['name']} sha256 {digest[:12]}… does not match the manifest's {row['sha256'][:12]}…: corrupt copy")


def stash(carried: Path, parts_dir: Path) -> list[str]:
    """Check the parts one call carried and copy them (and the manifest) into `parts_dir` for the last call."""
    carried, parts_dir = Path(carried), Path(parts_dir)
    manifest = read_manifest(carried)
    here = [row for row in manifest["parts"] if (carried / row["name"]).exists()]
    if not here:
        raise PartsError(f"{carried} holds none of the manifest's parts")
    parts_dir.mkdir(parents=True, exist_ok=True)
    for row in here:
        check_part(carried / row["name"], row)
        shutil.copyfile(carried / row["name"], parts_dir / row["name"])
    old = parts_dir / MANIFEST
    if old.is_file() and read_manifest(parts_dir)["bundle"]["sha256"] != manifest["bundle"]["sha256"]:
        raise PartsError(f"{parts_dir} holds parts of another pack (bundle {read_manifest(parts_dir)['bundle']['sha256'][:12]}…): "
                         f"remove it, or use parts of one pack.py run only")
    shutil.copyfile(carried / MANIFEST, old)
    return [row["name"] for row in here]


def assemble(parts_dir: Path, stage: Path) -> dict:
    """Join, verify and extract the bundle into `stage`; return the manifest. Idempotent (a verified stage is kept)."""
    parts_dir, stage = Path(parts_dir), Path(stage)
    manifest = read_manifest(parts_dir)
    want = manifest["bundle"]["sha256"]
    marker = stage / VERIFIED
    if marker.is_file() and marker.read_text().strip() == want:
        return manifest
    for row in manifest["parts"]:
        check_part(parts_dir / row["name"], row)
    stage.mkdir(parents=True, exist_ok=True)
    bundle = stage.parent / (stage.name + "." + BUNDLE)
    h = hashlib.sha256()
    with open(bundle, "wb") as dst:
        for row in manifest["parts"]:
            with open(parts_dir / row["name"], "rb") as src:
                for block in iter(lambda: src.read(1 << 22), b""):
                    h.update(block)
                    dst.write(block)
    if h.hexdigest() != want:
        raise PartsError(f"joined bundle sha256 {h.hexdigest()[:12]}… does not match the manifest's {want[:12]}…: parts out of order or from another pack")
    try:
        with tarfile.open(bundle) as tar:
            tar.extractall(stage, filter="data")  # no absolute paths, links out of the folder or device files
    except (tarfile.TarError, OSError) as exc:
        raise PartsError(f"cannot extract {bundle}: {exc}") from None
    bundle.unlink()
    for row in manifest["files"]:
        path = stage / row["path"]
        if not path.is_file() or path.stat().st_size != row["size"] or sha256_file(path) != row["sha256"]:
            raise PartsError(f"extracted file {row['path']} does not match the manifest (size or sha256)")
    marker.write_text(want + "\n")
    return manifest


def tree_bytes(repo: Path) -> int:
    """Bytes of the working tree that every `run` call sends: tracked plus untracked-not-ignored files."""
    import subprocess

    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         check=True, capture_output=True).stdout
    total = 0
    for name in out.split(b"\0"):
        if name:
            path = Path(repo) / os.fsdecode(name)
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
    return total
