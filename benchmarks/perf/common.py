"""What every stage of the performance suite shares: timing with repeats, one figure record, the machine.

A figure is always measured beside its peer in the same run (the box is shared and noisy: ratios travel,
absolute times less so), repeated, and reported as the median with min and max.
"""

from __future__ import annotations

import gc
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

RKIT = Path(sys.executable).with_name("rkit")  # the console script of the environment running the suite


@dataclass
class Stats:
    median: float
    min: float
    max: float
    runs: int

    def as_dict(self) -> dict:
        return asdict(self)


def timed(fn: Callable[[], object], repeat: int = 3, warmup: int = 0) -> Stats:
    """Wall seconds of ``fn()``: ``warmup`` untimed calls, then ``repeat`` timed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return stats(times)


def stats(values: list[float]) -> Stats:
    return Stats(statistics.median(values), min(values), max(values), len(values))


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank: what p50/p99 latency tables report."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


@dataclass
class Figure:
    """One row of benchmarks/perf/README.md.

    ``ours`` and ``peer`` are in ``unit``; ``ratio`` is how the target is stated (e.g. peer/ours for a
    speed-up, ours/peer for an overhead) and ``met`` compares it with the target. ``why`` is filled for an unmet
    target: why, and what would close it."""

    stage: str
    name: str
    ours: float
    unit: str
    peer: float | None = None
    peer_name: str | None = None
    ratio: float | None = None
    target: str | None = None
    met: bool | None = None
    why: str = ""
    detail: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def check(value: float | None, target: str) -> bool | None:
    """Whether ``value`` meets a target written as '≥ 30' or '≤ 1.5' (the text the README shows)."""
    if value is None:
        return None
    op, _, number = target.strip().partition(" ")
    bound = float(number.rstrip("×%ms "))
    return value >= bound if op in ("≥", ">=") else value <= bound


def sample_index(workdir: Path) -> Path:
    """The bundled sample corpus indexed (FAISS Flat) under ``workdir``, built by `rkit index` once."""
    from retrieval_kit.paths import SAMPLE_CORPUS

    folder = workdir / "indexes" / "cold"
    if not (folder / "manifest.json").is_file():
        subprocess.run([str(RKIT), "index", str(SAMPLE_CORPUS), "--name", "cold", "--index-dir", str(workdir / "indexes")],
                       check=True, capture_output=True)
    return folder
