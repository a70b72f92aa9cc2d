"""`rkit train`: responses → teacher targets → training loop → adapter folder (registered by cli/main.py)."""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from .common import console, guarded, print_json, quiet_libraries

DEFAULT_POOL = Path("train_queries") / "mixed.jsonl"  # inside $RKIT_DATA


def _command_line() -> str:
    prog = Path(sys.argv[0]).name
    return shlex.join(["rkit" if prog in ("rkit", "__main__.py") else prog, *sys.argv[1:]])


def _queries_path(queries: Optional[Path]) -> Path:
    from retrieval_kit.errors import InputError

    if queries is not None:
        return queries
    data = os.environ.get("RKIT_DATA")
    if not data:
        raise InputError("give --queries FILE (or set RKIT_DATA to the shared data folder to use its train_queries/mixed.jsonl)")
    return Path(data) / DEFAULT_POOL


@guarded
def train(
    out: Path = typer.Option(..., "--out", "-o", help="Adapter folder to write (model card, log and loss curve included)."),
    queries: Optional[Path] = typer.Option(None, "--queries", "-q", help="Query file: jsonl (text/query/prompt/instruction) or .txt, one per line. Default: $RKIT_DATA/train_queries/mixed.jsonl."),
    backbone: Optional[str] = typer.Option(None, help="Frozen LLM: HF name or folder (default: packaged SmolLM2-135M-Instruct)."),
    teacher: Optional[str] = typer.Option(None, help="Teacher sentence encoder: HF name or folder (default: packaged all-MiniLM-L6-v2)."),
    adapter: Optional[Path] = typer.Option(None, help="Start from this adapter folder instead of a fresh one."),
    steps: int = typer.Option(1000, min=1, help="Optimizer steps."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Queries per micro-batch (per device)."),
    grad_accum: int = typer.Option(1, "--grad-accum", min=1, help="Micro-batches per optimizer step."),
    lr: float = typer.Option(1e-3, help="Peak learning rate (AdamW)."),
    head_lr_scale: Optional[float] = typer.Option(None, "--head-lr-scale", min=0.0, help="lr multiplier for the alignment head (default 0.01 after --ridge-init, else 1)."),
    recon_lr_scale: float = typer.Option(1.0, "--recon-lr-scale", min=0.0, help="lr multiplier for the soft-prompt projection (0.1 before 2026-12-03)."),
    warmup: int = typer.Option(50, min=0, help="Linear warm-up steps."),
    schedule: str = typer.Option("linear", help="Decay after warm-up: linear or cosine."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="Response length limit (stage 1; part of the response cache key)."),
    max_target_tokens: int = typer.Option(128, "--max-target-tokens", min=1, help="Response tokens the soft prompt must reproduce."),
    short_target_share: float = typer.Option(0.5, "--short-target-share", min=0.0, max=1.0, help="Share of the steps that reconstruct only the first --short-target-tokens answer tokens (shorter targets first; 0: off)."),
    short_target_tokens: int = typer.Option(8, "--short-target-tokens", min=1, help="Answer tokens the short-target steps reconstruct."),
    first_token_weight: float = typer.Option(1.0, "--first-token-weight", min=0.0, help="The first --first-tokens answer tokens count this many times in L_recon (1: a plain mean)."),
    first_tokens: int = typer.Option(4, "--first-tokens", min=1, help="Answer tokens --first-token-weight applies to."),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="Chat system prompt (default: the template's own)."),
    n_thought: Optional[int] = typer.Option(None, "--n-thought", min=0, help="Thought tokens (default 10)."),
    n_compress: Optional[int] = typer.Option(None, "--n-compress", min=1, help="Compression tokens (default 10)."),
    align_head: Optional[str] = typer.Option(None, "--align-head", help="linear (default) or mlp."),
    init_prompt: Optional[str] = typer.Option(None, "--init-prompt", help="A fresh adapter's special tokens start as this text's tokens, repeated (e.g. \"Answer briefly:\"; default: random vocabulary rows)."),
    recon_format: Optional[str] = typer.Option(None, "--recon-format", help="How the backbone reads the soft prompt back: chat (default: as the user turn of its chat template) or raw (the soft prompt alone, as adapters before 2026-12)."),
    align_loss: str = typer.Option("cos", "--align-loss", help="cos (2−2·cos), mse, or infonce (cos + in-batch contrastive)."),
    w_recon: float = typer.Option(1.0, "--w-recon", min=0.0, help="Weight of L_recon (0 skips the reconstruction forward)."),
    w_align: float = typer.Option(10.0, "--w-align", min=0.0, help="Weight of L_align."),
    target_mix: float = typer.Option(0.0, "--target-mix", min=0.0, max=1.0, help="Mix teacher(query) into the targets."),
    ridge_init: Optional[bool] = typer.Option(None, "--ridge-init/--no-ridge-init", help="Closed-form init of a linear alignment head (default: on for a fresh linear head)."),
    refit_head: Optional[bool] = typer.Option(None, "--refit-head/--no-refit-head", help="Refit the linear head in closed form on the trained features after the loop (default: as --ridge-init)."),
    anchor: bool = typer.Option(True, "--anchor/--no-anchor", help="Fit a query anchor after training (fused queries use it; see the README)."),
    val_size: int = typer.Option(200, "--val-size", min=0, help="Held-out validation queries."),
    tune_size: int = typer.Option(256, "--tune-size", min=0, help="Queries kept out of training to choose λ, the fused weight and the query mode (at most a tenth of the training pool; the model card says how many)."),
    val_every: int = typer.Option(200, "--val-every", min=1, help="Validate every N steps."),
    checkpoint_every: int = typer.Option(200, "--checkpoint-every", min=1, help="Checkpoint every N steps."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N queries of the file."),
    seed: int = typer.Option(0, help="Seed for initialisation and data order."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Response/target cache (default $RKIT_HOME/cache)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint (same settings required)."),
    stop_after: Optional[int] = typer.Option(None, "--stop-after", min=1, help="Checkpoint and stop after this step (time-boxed runs; continue with --resume)."),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", min=0.0, help="Wall-clock guard: past this many minutes from the start the loop ends after the step in flight and the run finishes as if that were its last step (refit, anchor, figures, adapter; the model card says so)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 … (default: cuda when present)."),
    threads: int = typer.Option(0, min=0, help="CPU threads (0: the cores not busy with other processes)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Train an adapter: the backbone answers the queries, the teacher embeds the answers, the encoder learns them."""
    from retrieval_kit.errors import TrainError
    from retrieval_kit.train import TrainConfig
    from retrieval_kit.train import train as run_training

    quiet_libraries()
    if adapter is not None and any(v is not None for v in (n_thought, n_compress, align_head, system_prompt, recon_format, init_prompt)):
        raise TrainError("--adapter fixes the model shape: drop --n-thought/--n-compress/--align-head/--system-prompt/--recon-format/--init-prompt")
    config = TrainConfig(
        queries=str(_queries_path(queries)), out=str(out), limit=limit, val_size=val_size, tune_size=tune_size,
        backbone=backbone, teacher=teacher, adapter=str(adapter) if adapter else None,
        n_thought=10 if n_thought is None else n_thought, n_compress=n_compress or 10, align_head=align_head or "linear", anchor=anchor,
        recon_format=recon_format or "chat", init_prompt=init_prompt,
        system_prompt=system_prompt, device=device, threads=threads, cache_dir=str(cache_dir) if cache_dir else None,
        max_new_tokens=max_new_tokens, steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup=warmup,
        head_lr_scale=head_lr_scale, recon_lr_scale=recon_lr_scale,
        schedule=schedule, max_target_tokens=max_target_tokens, short_target_share=short_target_share,
        short_target_tokens=short_target_tokens, first_token_weight=first_token_weight, first_tokens=first_tokens, align_loss=align_loss, w_recon=w_recon, w_align=w_align,
        target_mix=target_mix, ridge_init=ridge_init, refit_head=refit_head, val_every=val_every, checkpoint_every=checkpoint_every, seed=seed,
        resume=resume, stop_after=stop_after, command=_command_line(),
        deadline=None if max_minutes is None else time.time() + 60 * max_minutes,
    )
    summary = run_training(config, progress=not as_json)
    if summary.get("rank", 0) != 0:  # under torchrun rank 0 reports for everyone
        return
    if as_json:
        print_json(summary)
        return
    _print_summary(summary)


def _print_summary(summary: dict) -> None:
    out = summary["out"]
    if summary["status"] == "stopped":
        console.print(f"stopped after step {summary['steps']}; checkpoint in {out}/checkpoint — continue with --resume")
        return
    fig = summary.get("figures", {})
    console.print(f"[bold green]trained[/] {summary['steps']} steps in {summary['wall_s'] / 60:.1f} min "
                  f"({summary['skipped']} skipped) → {out}")
    if fig:
        line = f"held-out ({fig['n_val']}): student cos {fig['student_cos']:.3f} vs no-training baseline {fig['baseline_cos']:.3f}"
        if summary.get("ridge", {}).get("val_cos") is not None:
            line += f" (ridge init {summary['ridge']['val_cos']:.3f})"
        refit = summary.get("refit") or {}
        if refit.get("val_cos_before") is not None and refit.get("val_cos") is not None:
            line += f"; head refit {refit['val_cos_before']:.3f} → {refit['val_cos']:.3f} ({'kept' if refit['kept'] else 'not kept'})"
        console.print(line)
        if "fused_cos" in fig:
            console.print(f"fused ({fig['fuse_weight']:.2f}·student + anchor): {fig['fused_cos']:.3f}; anchor alone "
                          f"{fig['anchor_cos']:.3f}; searches default to '{fig.get('query_mode')}' query vectors")
        rec = fig.get("reconstruction")
        if rec:
            console.print(f"reconstruction: teacher cos {rec['teacher_cos']:.3f}, ROUGE-L F1 {rec['rouge_l_f1']:.3f}")
    console.print(f"model card: {out}/README.md")
