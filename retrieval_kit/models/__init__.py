"""Models: backbone and teacher loaders, and the GenerativeEncoder with its adapter folders."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelError
from ..paths import DEFAULT_ADAPTER
from .backbone import DEFAULT_BACKBONE, load_backbone
from .encoder import (
    DOC_MODES,
    QUERY_MODES,
    EncoderConfig,
    GenerativeEncoder,
    build_encoder,
    load_adapter,
    read_adapter_config,
)
from .teacher import DEFAULT_TEACHER, load_teacher

__all__ = [
    "DEFAULT_BACKBONE", "DEFAULT_TEACHER", "DOC_MODES", "QUERY_MODES", "EncoderConfig", "GenerativeEncoder",
    "build_encoder", "load_adapter", "load_backbone", "load_encoder", "load_teacher", "read_adapter_config",
]


def load_encoder(adapter: str | Path | None = None, backbone: str | None = None, teacher: str | None = None,
                 device=None, with_teacher: bool = True, decoding: bool = False) -> GenerativeEncoder:
    """The encoder a user asked for.

    - `adapter` given: that folder (its config names backbone and teacher; passing different ones is an error).
    - no adapter, no backbone/teacher: the adapter shipped with the package.
    - no adapter but a backbone or teacher: a fresh untrained adapter for that pair (for training from scratch).

    ``decoding``: this process will decode text (``--explain``): the backbone's weight type is picked for that
    (models/backbone.pick_dtype).
    """
    if adapter is None and backbone is None and teacher is None and (DEFAULT_ADAPTER / "config.json").is_file():
        adapter = DEFAULT_ADAPTER
    if adapter is None:
        config = EncoderConfig(backbone=backbone or DEFAULT_BACKBONE, teacher=teacher or DEFAULT_TEACHER)
        return build_encoder(config, device, with_teacher, decoding)
    config = read_adapter_config(adapter)
    for given, stored, what in ((backbone, config.backbone, "backbone"), (teacher, config.teacher, "teacher")):
        if given is not None and given != stored:
            raise ModelError(f"adapter {adapter} was trained for {what} '{stored}', not '{given}'")
    return load_adapter(adapter, device, with_teacher, decoding)
