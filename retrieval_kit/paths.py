"""Where rkit keeps things on disk, and its other environment settings. Everything is overridable by environment
variables."""

from __future__ import annotations

import os
import re
from pathlib import Path


def rkit_home() -> Path:
    """Cache root (dequantised backbones, response caches). ``RKIT_HOME`` overrides ``~/.cache/rkit``."""
    return Path(os.environ.get("RKIT_HOME") or Path.home() / ".cache" / "rkit").expanduser()


def index_home() -> Path:
    """Default parent folder of named indexes. ``RKIT_INDEX_HOME`` overrides ``./indexes``."""
    return Path(os.environ.get("RKIT_INDEX_HOME") or Path.cwd() / "indexes").expanduser()


DTYPE_CHOICES = ("auto", "float32", "bfloat16")
_DEVICE = re.compile(r"cpu|mps|cuda(:\d{1,2})?")


def check_device(device: str | None) -> str | None:
    """``--device``: cpu, cuda, cuda:N or mps. Checked here, without torch, so that a typo is one line before any
    model loads; whether the machine has that device is models/backbone.pick_device's to say."""
    from .errors import InputError

    if device is not None and not _DEVICE.fullmatch(device):
        raise InputError(f"--device '{device}': use cpu, cuda, cuda:N or mps")
    return device


def dtype_setting() -> str:
    """``RKIT_DTYPE``: the backbone's weight type, ``auto`` (the default: models/backbone.pick_dtype decides) or forced.

    Read here, without torch, so the CLI can refuse a bad value in one line before it loads any model."""
    from .errors import InputError

    value = os.environ.get("RKIT_DTYPE", "").strip().lower() or "auto"
    if value not in DTYPE_CHOICES:
        raise InputError(f"RKIT_DTYPE={value!r}: expected one of {', '.join(DTYPE_CHOICES)}")
    return value


PACKAGE_DATA = Path(__file__).resolve().parent / "data"
SAMPLE_CORPUS = PACKAGE_DATA / "sample_corpus"
DEFAULT_ADAPTER = PACKAGE_DATA / "adapters" / "default"
