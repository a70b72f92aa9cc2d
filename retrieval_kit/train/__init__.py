"""Training: queries → backbone responses → teacher targets → loop → adapter folder.

    train(TrainConfig(queries="pool.jsonl", out="adapters/mine"))

Every stage is cached on disk and resumable: responses (stage 1, `responses.py`) and teacher vectors (stage 2,
`targets.py`) under the cache folder, keyed so identical work is never done twice; the loop (stage 3, `loop.py`)
checkpoints into ``<out>/checkpoint/`` and continues from there with ``resume=True``; the report (stage 4,
`report.py`) writes the training log, loss curve and model card next to the adapter.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from ..errors import TrainError
from ..paths import rkit_home
from .data import QuerySplit, load_split
from .loop import LoopData, TrainConfig, check_resumable, embed_queries, seed_everything, train_loop, world
from .report import (TrainingLog, decode_curve, machine_info, model_card, parameter_counts, plot_losses, read_log,
                     validation_figures)
from .responses import encoder_answers
from .ridge import fit_head, fit_query_anchor, mean_cos
from .targets import embed_texts, target_cache

__all__ = ["TrainConfig", "train"]


def train(config: TrainConfig, encoder=None, progress: bool = True) -> dict:
    """Run the whole pipeline; return a summary (also written into the adapter's config and model card).

    `encoder` lets a caller (tests) hand in an already loaded GenerativeEncoder instead of building one.
    """
    threads = torch.get_num_threads()
    try:
        return _train(config, encoder, progress)
    finally:
        torch.set_num_threads(threads)  # a library call should not leave the process's thread count changed


def _train(config: TrainConfig, encoder, progress: bool) -> dict:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    clock = _Clock(timings)
    cfg = config
    cfg.check()
    out = _prepare_out(Path(cfg.out), cfg.resume)
    device = _init_distributed(cfg.device)
    rank, world_size = world()
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg.threads))
    split = load_split(cfg.queries, cfg.val_size, cfg.limit)
    _resolve_model_fields(cfg)
    if cfg.resume:
        check_resumable(out / "checkpoint", cfg)  # fail fast, before minutes of model loading
    seed_everything(cfg.seed)  # fresh projections draw from the global RNG: same seed, same start
    with clock("load models"):
        encoder = encoder or _build_encoder(cfg, device)
    _sync_config_from_encoder(cfg, encoder)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else rkit_home() / "cache"

    # stages 1 and 2 write shared caches: rank 0 fills them, the other ranks then only read them
    if rank != 0:
        torch.distributed.barrier()
    with clock("responses"):
        responses = stage_responses(encoder, split, cfg, cache_dir, progress and rank == 0)
    with clock("targets"):
        data = stage_targets(encoder, split, responses, cfg, cache_dir, progress and rank == 0)
    if world_size > 1 and rank == 0:
        torch.distributed.barrier()

    with clock("loop"):
        state = stage_loop(encoder, data, cfg, out, progress and rank == 0)
    refit = {}
    if state.done(cfg) and cfg.refit_head:
        with clock("refit"):
            refit = stage_refit(encoder, data, cfg, state, out, progress and rank == 0)
    anchor = {}
    if state.done(cfg) and encoder.config.anchor:
        with _spinner("query anchor and fused weight (closed form, tune split)", progress and rank == 0), clock("anchor"):
            anchor = fit_query_anchor(encoder, data, lambda queries: embed_queries(encoder, queries, cfg.eval_batch_size))
    summary = {
        "out": str(out), "status": "finished" if state.done(cfg) else "stopped", "steps": state.step,
        "stopped_at_deadline": state.time_stopped,
        "skipped": state.skipped, "loop_s": state.elapsed, "ridge": state.ridge, "refit": refit, "anchor": anchor,
        "last_val": state.last_val,
        "backbone": encoder.config.backbone, "teacher": encoder.config.teacher, "world_size": world_size, "rank": rank,
        "data": {**split.describe(), "train_used": len(data.train_queries), "tune": len(data.tune_queries)},
        "config": asdict(cfg), "machine": {**machine_info(device), "backbone_dtype": str(encoder.backbone.dtype).removeprefix("torch.")}, "parameters": parameter_counts(encoder),
        "timings_s": timings,
    }
    if summary["status"] == "stopped" or rank != 0:
        summary["wall_s"] = time.perf_counter() - t_start
        return summary

    # stage 4: figures, adapter, report
    with _spinner("stage 4/4 validation figures (decoding held-out queries)", progress), clock("report"):
        summary["figures"] = validation_figures(
            encoder, data.val_queries, data.val_responses, data.val_targets.numpy(), data.val_query_vecs.numpy(),
            cfg.decode_samples, cfg.decode_tokens, cfg.eval_batch_size)
    summary["wall_s"] = time.perf_counter() - t_start
    encoder.config.trained = True
    encoder.config.training = _training_record(summary)
    encoder.save(out)
    if cfg.answer_bank:  # the latent lens's bank: training answers only, never the held-out split
        from ..models.lens import save_answer_bank

        vecs = data.train_response_vecs if len(data.train_response_vecs) == len(data.train_queries) else data.train_targets
        summary["answer_bank"] = save_answer_bank(out, data.train_queries, data.train_responses, vecs.numpy(),
                                                  cfg.answer_bank, cfg.seed)
    rows = read_log(out / "training_log.jsonl")
    summary["decode_curve"] = decode_curve(rows)
    plot_losses(rows, out / "loss.png")
    (out / "README.md").write_text(model_card(summary), encoding="utf-8")
    shutil.rmtree(out / "checkpoint", ignore_errors=True)  # finished: the adapter folder is what ships
    return summary


# ---- stages ------------------------------------------------------------------------------------------


def stage_responses(encoder, split: QuerySplit, cfg: TrainConfig, cache_dir: Path, progress: bool) -> dict[str, str]:
    """Stage 1: the backbone's own answer to every training and validation query (cached, resumable)."""
    queries = split.train + split.val
    batch = cfg.gen_batch_size or (256 if encoder.device.type == "cuda" else 32)
    with _bar("stage 1/4 responses", len(queries), progress) as advance:
        return encoder_answers(encoder, queries, cfg.max_new_tokens, cache_dir, batch_size=batch, on_batch=advance)


def stage_targets(encoder, split: QuerySplit, responses: dict[str, str], cfg: TrainConfig, cache_dir: Path,
                  progress: bool) -> LoopData:
    """Stage 2: teacher vectors of responses (targets) and queries (baseline, anchor, mixed targets), cached per teacher.

    Up to `tune_size` training-pool queries (at most a tenth, spread evenly) become the tune split: kept out of the
    loop and the fits, used only to choose λ, the fused weight and the query mode (ridge.py)."""
    # an empty answer gives the teacher nothing to embed and the decoder nothing to reproduce: leave it out
    pool = [q for q in split.train if responses[q].strip()]
    val = [q for q in split.val if responses[q].strip()]
    n_tune = min(cfg.tune_size, len(pool) // 10)  # at most a tenth of the pool, evenly spread over it
    tune_set = {pool[int(i)] for i in np.linspace(0, len(pool) - 1, n_tune)} if n_tune else set()
    tune = [q for q in pool if q in tune_set]
    train = [q for q in pool if q not in tune_set]
    if not train:
        raise TrainError("no training query got a non-empty response from the backbone")
    # answers are embedded as documents, queries as queries: one call each, so a teacher with per-role prompts
    # (EmbeddingGemma) gives each its own; a role-free one (MiniLM, mpnet) keeps the one cache it always had
    by_role = {"document": list(dict.fromkeys(responses[q] for q in pool + val)), "query": list(dict.fromkeys(pool + val))}
    prompts = getattr(encoder.teacher, "prompts", None) or {}
    roles_differ = any(prompts.get(role) for role in by_role)
    tables: dict[str, dict] = {}
    with _bar("stage 2/4 teacher targets", sum(map(len, by_role.values())), progress) as advance:
        for role, texts in by_role.items():
            matrix = embed_texts(target_cache(cache_dir, encoder.config.teacher, role if roles_differ else None), texts,
                                 lambda chunk, role=role: encoder.encode_teacher(chunk, cfg.eval_batch_size * 2, role=role),
                                 on_chunk=advance)
            tables[role] = dict(zip(texts, matrix))
    dim = encoder.config.embed_dim

    def vecs(texts: list[str], role: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([tables[role][t] for t in texts])) if texts else torch.zeros(0, dim)

    answers = lambda qs: vecs([responses[q] for q in qs], "document")
    queries = lambda qs: vecs(qs, "query")
    train_resp, train_query = answers(train), queries(train)
    targets = train_resp
    if cfg.target_mix > 0:
        targets = torch.nn.functional.normalize((1 - cfg.target_mix) * train_resp + cfg.target_mix * train_query, dim=-1)
    return LoopData(
        train_queries=train, train_responses=[responses[q] for q in train], train_targets=targets,
        val_queries=val, val_responses=[responses[q] for q in val], val_targets=answers(val),
        train_query_vecs=train_query, train_response_vecs=train_resp, val_query_vecs=queries(val),
        tune_queries=tune, tune_targets=answers(tune), tune_query_vecs=queries(tune),
    )


def stage_loop(encoder, data: LoopData, cfg: TrainConfig, out: Path, progress: bool):
    """Stage 3: the optimisation loop, with a progress bar showing loss and validation cosine."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns, disable=not progress) as bar:
        ridge_task = None
        task = bar.add_task("stage 3/4 training", total=cfg.steps, info="")
        info = {"loss": "", "val": ""}

        def on_event(kind: str, row: dict) -> None:
            nonlocal ridge_task
            if kind == "ridge":
                if ridge_task is None:
                    n = min(len(data.train_queries), cfg.ridge_samples)
                    ridge_task = bar.add_task("ridge init features", total=n, info="")
                bar.advance(ridge_task, row["n"])
                return
            if kind == "step":
                info["loss"] = f"loss {row['loss']:.3f} (recon {row['recon']:.3f} align {row['align']:.3f})"
            elif kind == "val" and "val_cos" in row:
                info["val"] = f"val cos {row['val_cos']:.3f}"
            bar.update(task, completed=row["step"], info=f"{info['loss']} {info['val']}".strip())

        return train_loop(encoder, data, cfg, out, on_event)


def stage_refit(encoder, data: LoopData, cfg: TrainConfig, state, out: Path, progress: bool) -> dict:
    """After the loop: the linear head refitted in closed form on the trained encoder's features (ridge.py).

    Kept only if it does at least as well on the tune split as the head the loop ended with."""
    embed = lambda queries, key="embedding": embed_queries(encoder, queries, cfg.eval_batch_size, key)
    score = lambda queries, targets: mean_cos(embed(queries), targets) if queries else None  # ridge.mean_cos
    tune_before = score(data.tune_queries, data.tune_targets)
    head_before = {k: v.clone() for k, v in encoder.align_proj.state_dict().items()}
    with _bar("refitting the head (trained features)", min(len(data.train_queries), cfg.ridge_samples), progress) as advance:
        fit = fit_head(encoder, data, cfg, embed, advance)
    kept = tune_before is None or fit["tune_cos"] >= tune_before
    if not kept:
        encoder.align_proj.load_state_dict(head_before)
    result = {**fit, "kept": kept, "tune_cos_before": tune_before, "val_cos_before": state.last_val.get("val_cos"),
              "val_cos": score(data.val_queries, data.val_targets)}
    TrainingLog(out / "training_log.jsonl", enabled=world()[0] == 0).write({"step": state.step, "event": "refit_head", **result})
    return result


# ---- helpers ---------------------------------------------------------------------------------------------


# What makes a folder an rkit run's own: a trained adapter's weights, a checkpoint, the training log
RUN_FILES = ("adapter.safetensors", "checkpoint", "training_log.jsonl")


def _prepare_out(out: Path, resume: bool) -> Path:
    """Fail early, in one line, when the adapter folder cannot be written (before any model is loaded), or holds
    files that are not an rkit run's: the run writes README.md, config.json … there, and would silently replace a
    user's own (as indexes, rkit never writes into a folder it did not make). An earlier run's folder is reused."""
    if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()) and \
            not any((out / name).exists() for name in RUN_FILES):
        raise TrainError(f"--out {out} is a folder of other files, not an rkit adapter: its README.md or "
                         "config.json would be overwritten; choose a new or empty folder")
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".rkit-write-test-{os.getpid()}"  # per process: torchrun ranks probe at once
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise TrainError(f"output folder {out} is not writable: {exc.strerror or exc}") from exc
    if not resume and (out / "checkpoint").is_dir():
        raise TrainError(f"{out} holds an unfinished run's checkpoint: add --resume to continue it, or use another --out")
    return out


def cpu_threads(requested: int = 0) -> int:
    """Threads for CPU training: `requested`, or (0) the cores we may use minus those other processes keep busy.

    On a shared machine this matters more than it seems: with 2 cores and one other busy process, 2 OpenMP threads
    ran a training step ~3.5× slower than 1 thread (threads wait on each other at every barrier).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    if requested > 0:
        return requested
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except OSError:
        busy = 0
    return max(1, min(cores, cores - busy))


def _init_distributed(device: str | None) -> torch.device:
    """Under torchrun (WORLD_SIZE > 1) join the process group and use this rank's GPU; otherwise a no-op."""
    from ..models.backbone import pick_device

    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return pick_device(device)
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
        # generous timeout: rank 0 may spend hours generating responses while the others wait at a barrier
        torch.distributed.init_process_group(backend, timeout=timedelta(hours=24))
    if torch.cuda.is_available() and device != "cpu":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _build_encoder(cfg: TrainConfig, device: torch.device):
    from ..models import EncoderConfig, build_encoder, load_encoder

    if cfg.adapter:
        return load_encoder(adapter=cfg.adapter, backbone=cfg.backbone, teacher=cfg.teacher, device=device)
    config = EncoderConfig(backbone=cfg.backbone, teacher=cfg.teacher,
                           n_thought=cfg.n_thought, n_compress=cfg.n_compress, align_head=cfg.align_head,
                           system_prompt=cfg.system_prompt, init_seed=cfg.seed, anchor=cfg.anchor,
                           recon_format=cfg.recon_format, init_prompt=cfg.init_prompt)
    return build_encoder(config, device)


def _resolve_model_fields(cfg: TrainConfig) -> None:
    """Fill in the model names and shape before anything is loaded (a starting adapter's config decides them)."""
    from ..models import read_adapter_config
    from ..models.backbone import DEFAULT_BACKBONE
    from ..models.teacher import DEFAULT_TEACHER

    if cfg.adapter:
        ac = read_adapter_config(cfg.adapter)
        for given, stored, what in ((cfg.backbone, ac.backbone, "backbone"), (cfg.teacher, ac.teacher, "teacher")):
            if given is not None and given != stored:
                raise TrainError(f"adapter {cfg.adapter} was trained for {what} '{stored}', not '{given}'")
        _copy_model_fields(cfg, ac)
    cfg.backbone, cfg.teacher = cfg.backbone or DEFAULT_BACKBONE, cfg.teacher or DEFAULT_TEACHER
    if cfg.ridge_init is None:  # the closed-form fit suits a fresh linear head; a starting adapter keeps its own
        cfg.ridge_init = cfg.align_head == "linear" and not cfg.adapter
    if cfg.refit_head is None:
        cfg.refit_head = cfg.ridge_init
    if (cfg.ridge_init or cfg.refit_head) and cfg.align_head != "linear":
        raise TrainError("--ridge-init and --refit-head need --align-head linear")
    # after a closed-form fit, slow the head whose Adam steps would undo it (see loop.param_groups)
    if cfg.head_lr_scale is None:
        cfg.head_lr_scale = 0.01 if cfg.ridge_init else 1.0


def _sync_config_from_encoder(cfg: TrainConfig, encoder) -> None:
    """The encoder (fresh or a starting adapter) decides the model shape; record it in the config."""
    if encoder.teacher is None:
        raise TrainError("training needs the encoder's teacher (load it with with_teacher=True)")
    _copy_model_fields(cfg, encoder.config)


def _copy_model_fields(cfg: TrainConfig, config) -> None:
    """The model's names and shape, from an adapter's EncoderConfig into the training config."""
    for name in ("backbone", "teacher", "n_thought", "n_compress", "align_head", "system_prompt", "anchor",
                 "recon_format", "init_prompt"):
        setattr(cfg, name, getattr(config, name))


def _training_record(summary: dict) -> dict:
    """What goes into config.json's `training`: enough to know how the adapter was made and how good it is."""
    fig = summary.get("figures", {})
    cfg = summary["config"]
    return {
        "command": cfg.get("command"), "data": summary["data"], "steps": summary["steps"], "skipped": summary["skipped"],
        "wall_s": round(summary["wall_s"], 1), "device": summary["machine"]["device"],
        "machine": summary["machine"].get("gpu") or summary["machine"]["cpu"],
        "hyperparameters": {k: cfg[k] for k in ("batch_size", "grad_accum", "lr", "special_lr_scale", "recon_lr_scale",
                                                 "head_lr_scale", "warmup", "schedule", "max_new_tokens",
                                                 "max_target_tokens", "short_target_share", "short_target_tokens", "first_token_weight", "first_tokens", "align_loss", "w_recon", "w_align", "target_mix",
                                                 "ridge_init", "refit_head", "seed")},
        "ridge": summary.get("ridge"), "refit": summary.get("refit"), "anchor": {k: v for k, v in (summary.get("anchor") or {}).items() if k != "fuse_grid"},
        "val": {k: fig.get(k) for k in ("n_val", "student_cos", "baseline_cos", "anchor_cos", "fused_cos", "fuse_weight",
                                        "reconstruction")},
        "parameters": summary["parameters"],
    }


class _Clock:
    """`with clock("stage"):` adds the stage's wall time (seconds) to a dict."""

    def __init__(self, timings: dict):
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - start, 2)


class _bar:
    """A rich progress bar with ETA whose `advance(n)` is handed to a stage as its callback."""

    def __init__(self, description: str, total: int, show: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("ETA"), TimeRemainingColumn(), disable=not show)
        self.task = self.progress.add_task(description, total=total)

    def __enter__(self):
        self.progress.start()
        return lambda n: self.progress.advance(self.task, n)

    def __exit__(self, *exc):
        self.progress.stop()
        return False


class _spinner(_bar):
    def __init__(self, description: str, show: bool):
        super().__init__(description, None, show)
