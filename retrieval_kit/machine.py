"""What machine a figure was measured on: every result file and model card records it."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_probe(name: str) -> bool:
    """One of torch's CPU feature probes (torch.cpu._is_amx_tile_supported …), as its dispatch sees the CPU; a
    private helper, so missing (or failing) means no."""
    import torch

    probe = getattr(torch.cpu, name, None)
    try:
        return bool(probe()) if probe else False
    except RuntimeError:
        return False


def cpu_bf16() -> str:
    """How this CPU multiplies bf16: "amx" (tiles), "avx512-bf16" (dot products) or "emulated" (neither), which
    sets most CPU timings here (two "AMD EPYC" boxes differ by exactly this)."""
    if cpu_probe("_is_amx_tile_supported"):
        return "amx"
    return "avx512-bf16" if cpu_probe("_is_avx512_bf16_supported") else "emulated"


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu_name(),
            "cpu_count": os.cpu_count(), "gpu": None}
    try:
        import torch

        info["torch"] = torch.__version__
        info["threads"] = torch.get_num_threads()
        info["cpu_bf16"] = cpu_bf16()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpus"] = torch.cuda.device_count()
    except ImportError:
        pass
    return info
