"""Where rkit keeps things on disk. Everything is overridable by environment variables."""

from __future__ import annotations

import os
from pathlib import Path


def rkit_home() -> Path:
    """Cache root (dequantised backbones, response caches). ``RKIT_HOME`` overrides ``~/.cache/rkit``."""
    return Path(os.environ.get("RKIT_HOME") or Path.home() / ".cache" / "rkit").expanduser()


def index_home() -> Path:
    """Default parent folder of named indexes. ``RKIT_INDEX_HOME`` overrides ``./indexes``."""
    return Path(os.environ.get("RKIT_INDEX_HOME") or Path.cwd() / "indexes").expanduser()


PACKAGE_DATA = Path(__file__).resolve().parent / "data"
SAMPLE_CORPUS = PACKAGE_DATA / "sample_corpus"
DEFAULT_ADAPTER = PACKAGE_DATA / "adapters" / "default"
