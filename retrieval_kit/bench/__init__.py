"""Benchmarks: BRIGHT, AdvBench-IR, any BEIR folder (CACM), MTEB — baselines side by side.

Data flows one way: datasets.py (BenchDataset) → methods.py (rankings, cached inputs) → metrics.py →
runner.py (results dict) → report.py (JSON, markdown, plot). mteb_model.py wraps the encoder for mteb.
"""

from .datasets import (
    BRIGHT_DOMAINS, BenchDataset, bright_domains, data_root, iter_bright, load_advbench_ir, load_beir, load_bright,
)
from .methods import METHODS, MethodConfig, load_bench_encoder, parse_methods
from .metrics import BEIR_METRICS, evaluate_run, harm_metrics
from .report import markdown, write_results
from .runner import BenchOutcome, run_benchmark

__all__ = [
    "BEIR_METRICS", "BRIGHT_DOMAINS", "BenchDataset", "BenchOutcome", "METHODS", "MethodConfig", "bright_domains",
    "data_root", "evaluate_run", "harm_metrics", "iter_bright", "load_advbench_ir", "load_beir", "load_bench_encoder",
    "load_bright", "markdown", "parse_methods", "run_benchmark", "write_results",
]
