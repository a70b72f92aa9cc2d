"""Stage 3 of training: the optimisation loop, readable top to bottom (nanoGPT style).

    before step 0 (fresh linear head): fit align_proj in closed form (ridge.py) on the untrained encoder's features
    for step in range(start, steps):
        for each micro-batch (gradient accumulation):
            queries ─► encoder ─► soft prompt, embedding
            loss = w_recon · CE(backbone reproduces the response after the soft prompt)
                 + w_align · L_align(embedding, teacher(response))
            backward
        clip grad norm; skip the update when the loss or the norm is not finite; AdamW step; lr schedule
        every val_every steps: validation on the held-out split; every checkpoint_every: checkpoint

Only the encoder's trainable parameters (special tokens, recon_proj, align_proj) are optimised; the backbone and
teacher stay frozen. Batches come from a deterministic stream (epoch e is a permutation seeded by (seed, e)), so
the data position of a checkpoint is just the step number and `resume` reproduces an uninterrupted run.
Under torchrun (WORLD_SIZE > 1) the encoder is wrapped in DDP with the frozen parts ignored, every rank takes its
own slice of each global batch, and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import TrainError
from .report import TrainingLog, rouge_l_f1
from .ridge import fit_head

ALIGN_LOSSES = ("cos", "mse", "infonce")
SCHEDULES = ("linear", "cosine")


def short_targets(cfg: dict) -> tuple[int, int]:
    """(how many first steps train on short targets, their length), from a config as a dict: the loop's TrainConfig
    and the model card's stored config, where configs from before these fields have none (0 steps)."""
    n = round((cfg.get("short_target_share") or 0.0) * cfg["steps"])
    return n, min(cfg.get("short_target_tokens", 8), cfg["max_target_tokens"])


@dataclass
class TrainConfig:
    # ---- data -----------------------------------------------------------------------------------
    queries: str = ""  # query file (jsonl with text/query/prompt/instruction, or .txt one per line)
    out: str = ""  # adapter folder to write
    limit: int | None = None  # use only the first N queries of the file
    val_size: int = 200  # held-out queries (smallest text hashes), never trained on
    tune_size: int = 256  # further queries kept out of training to choose λ, the fused weight and the query mode
    # ---- models ---------------------------------------------------------------------------------
    backbone: str | None = None  # None: the packaged SmolLM2-135M-Instruct
    teacher: str | None = None  # None: the packaged all-MiniLM-L6-v2
    adapter: str | None = None  # start from this adapter folder instead of a fresh one
    n_thought: int = 10
    n_compress: int = 10
    align_head: str = "linear"  # linear | mlp
    anchor: bool = True  # fit a query anchor after the loop (see ridge.py); fused queries then use it
    system_prompt: str | None = None  # chat system prompt for responses and queries (None: template default)
    # how the backbone reads the soft prompt back: chat | raw (models/encoder.py EncoderConfig). chat since 2026-12:
    # the raw soft prompt's first answer token was never right (benchmarks/results/explain/README.md)
    recon_format: str = "chat"
    init_prompt: str | None = None  # a fresh adapter's special tokens start from this text's tokens (None: random rows)
    device: str | None = None  # None: cuda when available, else cpu
    threads: int = 0  # CPU threads; 0: the free cores (bitwise-exact resume wants the same count)
    cache_dir: str | None = None  # None: $RKIT_HOME/cache
    # ---- stage 1: responses ---------------------------------------------------------------------
    max_new_tokens: int = 128
    gen_batch_size: int = 0  # 0: 32 on CPU, 256 on CUDA
    # ---- stage 3: optimisation ------------------------------------------------------------------
    steps: int = 1000
    batch_size: int = 16  # per device and micro-batch
    grad_accum: int = 1
    lr: float = 1e-3
    # lr multipliers per parameter group (head None: resolved by train(): 0.01 after a ridge initialisation, which
    # keeps the fitted head; 1 otherwise). See param_groups().
    special_lr_scale: float = 1.0  # the special-token embeddings
    # recon_proj: the soft-prompt projection the head reads from. 1.0 since 2026-12-03: at ×0.1 (kept so the ridge
    # head held during the loop) decodes stayed generic; the head is refitted after the loop anyway (ridge.py)
    recon_lr_scale: float = 1.0
    head_lr_scale: float | None = None  # align_proj
    min_lr_ratio: float = 0.1  # the schedule decays to lr · min_lr_ratio
    warmup: int = 50
    schedule: str = "linear"  # linear | cosine decay after warm-up
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_target_tokens: int = 128  # response tokens (+ eos) the soft prompt must reproduce
    # shorter targets first: the first `short_target_share` of the steps reconstruct only the first
    # `short_target_tokens` answer tokens. A greedy decode starts at the answer's first token, and a loss over the
    # whole answer is carried by later positions the frozen model continues by itself, so the soft prompt learns
    # *that* an answer follows but not *which* (benchmarks/results/explain/README.md, "Shorter targets first")
    short_target_share: float = 0.5
    short_target_tokens: int = 8
    # the first `first_tokens` answer tokens count `first_token_weight` times in the training L_recon (1: a plain
    # mean). Same reason as above, without leaving the later tokens out; validation keeps the plain mean
    first_token_weight: float = 1.0
    first_tokens: int = 4
    align_loss: str = "cos"  # cos (2 − 2·cos) | mse (mean-reduced, weak: see RESEARCH.md) | infonce (cos + in-batch)
    w_recon: float = 1.0  # 0 skips the reconstruction forward entirely
    w_align: float = 10.0
    temperature: float = 0.05  # infonce
    target_mix: float = 0.0  # train towards normalise((1−m)·teacher(response) + m·teacher(query))
    ridge_init: bool | None = None  # None: on for a fresh linear head (train() resolves it)
    refit_head: bool | None = None  # refit the linear head in closed form after the loop (None: as ridge_init)
    ridge_samples: int = 20000  # training queries used to fit the ridge initialisation
    eval_batch_size: int = 32
    val_every: int = 200
    checkpoint_every: int = 200
    log_every: int = 10
    seed: int = 0
    resume: bool = False
    stop_after: int | None = None  # leave a checkpoint and stop after this step (time-boxed runs, tests)
    # a time.time() stamp: the loop ends after the step in flight once it passes, and the run finishes as if that
    # were its last step (refit, anchor, figures, adapter) — a GPU job that must end inside its lease (benchmarks/gpu_train)
    deadline: float | None = None
    # ---- report ---------------------------------------------------------------------------------
    decode_samples: int = 64  # validation queries decoded for the reconstruction figures
    val_decode: int = 16  # held-out queries decoded greedily at every validation (the ROUGE-L-vs-steps curve; 0: off)
    answer_bank: int = 2000  # training answers stored with the adapter for the latent lens (models/lens.py; 0: none)
    decode_tokens: int = 64
    command: str | None = None  # the exact command line, for the model card

    # fields that may differ between a run and its resumption without changing the result
    RESUME_FREE = ("resume", "stop_after", "deadline", "command", "device", "threads", "val_every", "checkpoint_every", "log_every",
                   "decode_samples", "decode_tokens", "val_decode", "answer_bank", "eval_batch_size", "gen_batch_size", "cache_dir", "out",
                   "queries")  # the data itself is compared by fingerprint, not by path

    def target_tokens(self, step: int) -> int:
        """Response tokens the reconstruction loss covers at optimizer step `step` (0-based)."""
        n_short, short_tokens = short_targets(vars(self))
        return short_tokens if step < n_short else self.max_target_tokens

    def check(self) -> None:
        if self.align_loss not in ALIGN_LOSSES:
            raise TrainError(f"unknown --align-loss '{self.align_loss}' (use {', '.join(ALIGN_LOSSES)})")
        if self.schedule not in SCHEDULES:
            raise TrainError(f"unknown schedule '{self.schedule}' (use {', '.join(SCHEDULES)})")
        if self.init_prompt is not None and not self.init_prompt.strip():
            raise TrainError("--init-prompt is empty (leave it out for random vocabulary rows)")
        if self.recon_format not in ("raw", "chat"):
            raise TrainError(f"unknown --recon-format '{self.recon_format}' (use raw or chat)")
        if self.align_head not in ("linear", "mlp"):
            raise TrainError(f"unknown --align-head '{self.align_head}' (use linear or mlp)")
        if self.tune_size < 0 or self.val_size < 0:
            raise TrainError("--val-size and --tune-size must be >= 0")
        if not 0.0 <= self.short_target_share <= 1.0:
            raise TrainError("--short-target-share must be between 0 and 1")
        if self.first_token_weight <= 0:
            raise TrainError(f"--first-token-weight must be > 0, got {self.first_token_weight}")
        for name in ("steps", "batch_size", "grad_accum", "max_new_tokens", "max_target_tokens", "short_target_tokens", "first_tokens", "n_compress",
                     "val_every", "checkpoint_every", "log_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.n_thought < 0 or self.warmup < 0 or self.lr <= 0:
            raise TrainError("--n-thought and --warmup must be >= 0 and --lr > 0")
        if self.w_recon < 0 or self.w_align < 0 or self.w_recon + self.w_align == 0:
            raise TrainError("loss weights must be >= 0 and not both 0")
        if not 0.0 <= self.target_mix <= 1.0:
            raise TrainError(f"target mix must be in [0, 1], got {self.target_mix}")

    def resume_key(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self.RESUME_FREE}


@dataclass
class LoopData:
    """What the loop trains on: aligned lists/rows, training split and held-out split."""

    train_queries: list[str]
    train_responses: list[str]
    train_targets: torch.Tensor  # (N, D) float32, unit rows (what the embedding is pulled towards)
    val_queries: list[str]
    val_responses: list[str]
    val_targets: torch.Tensor  # (M, D) teacher(response): the validation figure is measured against these
    # teacher vectors the closed-form fits need (ridge.py); empty tensors when a caller has none
    train_query_vecs: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # teacher(query), training rows
    train_response_vecs: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # teacher(response), unmixed
    val_query_vecs: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    # the tune split: training-pool queries kept out of the loop, on which λ, the fused weight and the mode are chosen
    tune_queries: list[str] = field(default_factory=list)
    tune_targets: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # teacher(response)
    tune_query_vecs: torch.Tensor = field(default_factory=lambda: torch.zeros(0))

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for q in self.train_queries:
            h.update(q.encode() + b"\0")
        return h.hexdigest()[:16]


@dataclass
class LoopState:
    step: int = 0  # optimizer steps taken (skipped ones included): also the data position
    skipped: int = 0
    elapsed: float = 0.0  # seconds spent in the loop over all (resumed) runs
    ridge: dict = field(default_factory=dict)
    last_val: dict = field(default_factory=dict)
    time_stopped: bool = False  # the loop ended at cfg.deadline, before cfg.steps

    def done(self, cfg: "TrainConfig") -> bool:
        """The loop is over (all steps, or the deadline): what follows it runs."""
        return self.step >= cfg.steps or self.time_stopped


# ---- distributed ------------------------------------------------------------------------------------
def world() -> tuple[int, int]:
    """(rank, world size) under torchrun; (0, 1) otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def wrap_ddp(encoder):
    """DDP over the trainable parameters only (the frozen backbone/teacher are neither broadcast nor reduced)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    frozen = [n for n, _ in encoder.named_parameters() if n.startswith(("backbone.", "teacher."))]
    frozen += [n for n, _ in encoder.named_buffers() if n.startswith(("backbone.", "teacher."))]
    DDP._set_params_and_buffers_to_ignore_for_model(encoder, frozen)
    device_ids = [encoder.device.index] if encoder.device.type == "cuda" else None
    return DDP(encoder, device_ids=device_ids)


# ---- reproducibility --------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def batch_indices(micro_step: int, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """The examples of one micro-batch for one rank: a pure function of the position in the data stream.

    Epoch e visits a permutation seeded by (seed, e); each epoch is cut into whole global batches (the tail is
    dropped so every batch has the same size). A pool smaller than one global batch is repeated.
    """
    global_bs = batch_size * world_size
    per_epoch = max(n // global_bs, 1)
    epoch, slot = divmod(micro_step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    if n < global_bs:
        order = order.repeat(math.ceil(global_bs / n))
    start = slot * global_bs + rank * batch_size
    return order[start : start + batch_size].tolist()


# ---- batches and losses -----------------------------------------------------------------------------
def tokenize_targets(tokenizer, responses: list[str], max_tokens: int, device) -> dict:
    """Right-padded response tokens + eos, cut to max_tokens (a cut response keeps no eos: it did not end there).

    `padding_side` is passed per call so the tokenizer stays left-padding for queries.
    """
    texts = [r + tokenizer.eos_token for r in responses]
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", truncation=True,
                      max_length=max_tokens, add_special_tokens=False)
    return {"target_ids": batch["input_ids"].to(device), "target_mask": batch["attention_mask"].to(device)}


def make_batch(encoder, queries: list[str], responses: list[str], targets: torch.Tensor, cfg: TrainConfig,
               target_tokens: int | None = None, weighted: bool = False) -> dict:
    """Queries, teacher targets and (when L_recon is on) the responses cut to `target_tokens` (default: all of
    cfg.max_target_tokens; validation always scores those). ``weighted``: the training loss's per-token weights
    (cfg.first_token_weight) ride along as "target_weights"."""
    batch = dict(encoder.tokenize_queries(queries))
    batch["targets"] = targets.to(encoder.device)
    if cfg.w_recon > 0:  # the reconstruction forward is the expensive part: no targets, no forward
        batch.update(tokenize_targets(encoder.tokenizer, responses, target_tokens or cfg.max_target_tokens, encoder.device))
        if weighted and cfg.first_token_weight != 1.0:
            mask = batch["target_mask"].float()
            first = torch.arange(mask.shape[1], device=mask.device) < cfg.first_tokens
            batch["target_weights"] = mask * torch.where(first, cfg.first_token_weight, 1.0)
    return batch


def align_loss(embedding: torch.Tensor, targets: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """cos: 2 − 2·cos (same scale as the squared distance of unit vectors, but not divided by D);
    mse: mean-reduced MSE on the raw embedding (≈100× weaker than L_recon: RESEARCH.md);
    infonce: cos + in-batch contrastive loss against the other examples' targets."""
    if cfg.align_loss == "mse":
        return F.mse_loss(embedding, targets)
    student = F.normalize(embedding, dim=-1)
    loss = (2 - 2 * (student * targets).sum(-1)).mean()
    if cfg.align_loss == "infonce":
        logits = student @ F.normalize(targets, dim=-1).T / cfg.temperature
        loss = loss + F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))
    return loss


RECON_GROUP = 4  # rows per reconstruction forward on a CPU: responses of like length together, little padding


def recon_group(device: torch.device, batch: int) -> int:
    """Rows per reconstruction forward. A CPU pays for every padded token, a GPU for every kernel launch: a
    forward + backward of a 30-layer backbone is thousands of small operator calls whatever its width, and the
    first H200 run stepped at 0.67 s at batch 16 in groups of 4 (benchmarks/gpu_train/README.md), launch-bound,
    so a GPU reconstructs the whole batch in one padded forward (the same loss: tests/test_fast_paths.py)."""
    return RECON_GROUP if device.type == "cpu" else batch


def recon_by_length(encoder, soft_prompt: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor,
                    group: int = RECON_GROUP, target_weights: torch.Tensor | None = None):
    """The batch's reconstruction loss (mean CE over all its response tokens; with ``target_weights``, their
    weighted mean) computed in groups of `group` responses of similar length, each cut to its own longest: the
    same loss and gradient as one padded forward, without running the backbone over padding. Responses vary from a
    few tokens to the 128 cap, so one padded batch was ~30% padding and trained slower on a CPU than a per-sample
    loop (benchmarks/perf, training stage)."""
    lengths = target_mask.sum(-1)
    mass = (target_mask if target_weights is None else target_weights).float().sum(-1)  # each row's share of the mean
    order = torch.argsort(lengths, descending=True)
    total = mass.sum().clamp(min=1e-12)
    loss = soft_prompt.new_zeros(())
    for start in range(0, len(order), group):
        rows = order[start : start + group]
        width = int(lengths[rows].max())
        if width == 0:
            continue
        weights = None if target_weights is None else target_weights[rows, :width]
        part = encoder.recon_loss(soft_prompt[rows], target_ids[rows, :width], target_mask[rows, :width], weights)
        loss = loss + part * mass[rows].sum() / total  # a group's mean, weighted by its share of the tokens
    return loss


def compute_losses(model, encoder, batch: dict, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    out = model(batch["input_ids"], batch["attention_mask"])
    align = align_loss(out["embedding"].float(), batch["targets"], cfg)
    if cfg.w_recon > 0:
        recon = recon_by_length(encoder, out["soft_prompt"], batch["target_ids"], batch["target_mask"],
                                recon_group(batch["target_ids"].device, len(batch["target_ids"])),
                                batch.get("target_weights"))
    else:
        recon = torch.zeros((), device=align.device)
    return {"loss": cfg.w_recon * recon + cfg.w_align * align, "recon": recon, "align": align}


def autocast(device: torch.device):
    """bf16 autocast on CUDA (the backbone is already bf16 there; this covers the fp32 projections); none on CPU."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def param_groups(encoder, cfg: TrainConfig) -> list[dict]:
    """Trainable parameters in groups with their own learning rates (the schedule scales them all alike).

    Adam moves every weight by ~lr per step whatever its gradient's size. The head's input (mean soft prompt) has
    norm ~50 on SmolLM2 — mostly a query-independent offset, one dimension ≈ 40 — while a target coordinate is
    ~0.05, so one step at lr 1e-3 on align_proj or recon_proj shifts every output coordinate by ~lr·Σ|x| ≈ 0.4.
    Measured (500 queries, alignment only): a ridge-initialised head at val cos 0.542 fell to 0.395 after 15
    steps at uniform lr 1e-3, to 0.469 with the head at ×0.01, and held at 0.533 with head ×0.01 + recon_proj ×0.1.
    recon_proj ×0.1 was the default until 2026-12-03; it also slowed the soft prompt tenfold, and with L_recon on
    ×1 doubles held-out decode ROUGE-L (0.097 → 0.208, 240 steps) while the head refitted after the loop ends
    within 0.01 of the student cosine (benchmarks/results/explain/README.md). The head keeps ×0.01.
    """
    scale = lambda v: 1.0 if v is None else v  # unresolved (loop called directly): the plain rate
    scales = {"special": scale(cfg.special_lr_scale), "recon_proj.": scale(cfg.recon_lr_scale), "head": scale(cfg.head_lr_scale)}
    trainable = {id(p) for p in encoder.trainable_parameters()}
    groups: dict[str, list] = {"special": [], "recon_proj.": [], "head": []}
    for name, param in encoder.named_parameters():
        if id(param) in trainable:
            key = next((k for k in scales if name.startswith(k)), "head")
            groups[key].append(param)
    return [{"params": ps, "lr": cfg.lr * scales.get(k, 1.0), "name": k.rstrip(".")} for k, ps in groups.items() if ps]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to 1, then linear or cosine decay to min_lr_ratio at the last step."""
    if step < cfg.warmup:
        return (step + 1) / (cfg.warmup + 1)
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    if cfg.schedule == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * progress))
    else:
        decay = 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


# ---- validation ---------------------------------------------------------------------------------------
@torch.no_grad()
def embed_queries(encoder, queries: list[str], batch_size: int, key: str = "embedding") -> torch.Tensor:
    """Encoder outputs for many queries in input order: the unit embedding, or ('features') mean(soft_prompt)."""
    rows = []
    with autocast(encoder.device):
        for start in range(0, len(queries), batch_size):
            out = encoder(**encoder.tokenize_queries(queries[start : start + batch_size]))
            rows.append(out["soft_prompt"].mean(1).float() if key == "features" else F.normalize(out["embedding"].float(), dim=-1))
    return torch.cat(rows).cpu() if rows else torch.zeros(0)


VAL_DECODE_TOKENS = 32  # short decodes keep validation cheap; the model card's figure uses decode_tokens


@torch.no_grad()
def validate(encoder, data: LoopData, cfg: TrainConfig) -> dict:
    """val_cos: mean cos(student, teacher(response)) on the held-out split; val_recon: its reconstruction CE."""
    if not data.val_queries:
        return {}
    emb = embed_queries(encoder, data.val_queries, cfg.eval_batch_size)
    result = {"val_cos": float((emb * data.val_targets).sum(-1).mean())}
    if cfg.w_recon > 0:
        losses = []
        for start in range(0, len(data.val_queries), cfg.eval_batch_size):
            sl = slice(start, start + cfg.eval_batch_size)
            batch = make_batch(encoder, data.val_queries[sl], data.val_responses[sl], data.val_targets[sl], cfg)
            with autocast(encoder.device):
                losses.append(float(compute_losses(encoder, encoder, batch, cfg)["recon"]))
        result["val_recon"] = float(np.mean(losses))
    n = min(cfg.val_decode, len(data.val_queries))
    if n:  # what --explain would show, tracked through training: the teacher-forced loss alone hid that it was noise
        decoded = encoder.decode(data.val_queries[:n], max_new_tokens=VAL_DECODE_TOKENS, batch_size=n, int8=False)
        result["val_rouge_l"] = float(np.mean([rouge_l_f1(d, r) for d, r in zip(decoded, data.val_responses[:n])]))
    return result


# ---- checkpoints --------------------------------------------------------------------------------------
CHECKPOINT = "state.pt"


def save_checkpoint(folder: Path, encoder, optimizer, scheduler, state: LoopState, cfg: TrainConfig, data_fp: str) -> None:
    """Everything `resume` needs, written atomically (a killed save leaves the previous checkpoint intact)."""
    payload = {
        "adapter": {k: v.detach().cpu().clone() for k, v in encoder.adapter_state().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "loop": asdict(state),
        "config": cfg.resume_key(),
        "data": data_fp,
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (CHECKPOINT + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, folder / CHECKPOINT)
    except OSError as exc:
        raise TrainError(f"cannot write checkpoint {folder}: {exc.strerror or exc}") from exc


def _read_checkpoint(folder: Path) -> dict:
    path = folder / CHECKPOINT
    if not path.is_file():
        raise TrainError(f"--resume: no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)  # our own file: RNG states are pickled
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise TrainError(f"--resume: unreadable checkpoint {path} ({str(exc).splitlines()[0] if str(exc) else exc})") from exc


def check_resumable(folder: Path, cfg: TrainConfig, payload: dict | None = None) -> dict:
    """The checkpoint exists and was made with the same settings (else resuming would not reproduce anything)."""
    payload = payload or _read_checkpoint(folder)
    # a setting newer than the checkpoint counts as its default: new settings default to the old behaviour
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    changed = sorted(k for k, v in cfg.resume_key().items() if payload["config"].get(k, defaults.get(k)) != v)
    if changed:
        raise TrainError(f"--resume: settings differ from the checkpoint's: {', '.join(changed)}")
    return payload


def load_checkpoint(folder: Path, encoder, optimizer, scheduler, cfg: TrainConfig, data_fp: str) -> LoopState:
    payload = check_resumable(folder, cfg)
    if payload["data"] != data_fp:
        raise TrainError("--resume: the training queries differ from the checkpoint's (file, --limit or --val-size changed)")
    encoder.load_state_dict(payload["adapter"], strict=False)
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    set_rng_state(payload["rng"])
    state = LoopState(**payload["loop"])
    state.time_stopped = False  # a new run of the loop, with its own deadline
    return state


# ---- the loop -----------------------------------------------------------------------------------------
def train_loop(encoder, data: LoopData, cfg: TrainConfig, out: Path,
               on_event: Callable[[str, dict], None] | None = None) -> LoopState:
    """Train `encoder` in place; returns the final loop state. Events: ("ridge", n), ("step", row), ("val", row)."""
    emit = on_event or (lambda kind, row: None)
    rank, world_size = world()
    device = encoder.device
    ckpt_dir = out / "checkpoint"
    data_fp = data.fingerprint()
    params = encoder.trainable_parameters()
    optimizer = torch.optim.AdamW(param_groups(encoder, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    log = TrainingLog(out / "training_log.jsonl", enabled=rank == 0)

    if cfg.resume:
        state = load_checkpoint(ckpt_dir, encoder, optimizer, scheduler, cfg, data_fp)
        log.truncate_after(state.step)  # rows written after the checkpoint are redone identically
    else:
        seed_everything(cfg.seed)
        state = LoopState()
        log.reset()
        if cfg.ridge_init:
            before = validate(encoder, data, cfg).get("val_cos")
            embed = lambda queries, key="embedding": embed_queries(encoder, queries, cfg.eval_batch_size, key)
            state.ridge = {"val_cos_before": before, **fit_head(encoder, data, cfg, embed, lambda k: emit("ridge", {"n": k}))}
            log.write({"step": 0, "event": "ridge_init", **state.ridge})
        state.last_val = validate(encoder, data, cfg)
        if state.ridge:
            state.ridge["val_cos"] = state.last_val.get("val_cos")  # the ridge-initialised head, held out
        log.write({"step": 0, **state.last_val})
        emit("val", {"step": 0, **state.last_val})

    model = wrap_ddp(encoder) if world_size > 1 else encoder
    n_train = len(data.train_queries)
    window = {"loss": [], "recon": [], "align": [], "tokens": 0, "t0": time.perf_counter()}
    t_run = time.perf_counter() - state.elapsed

    while state.step < cfg.steps:
        # one optimizer step = grad_accum micro-batches
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[-1]  # the rate this step uses (the head group: the unscaled rate)
        finite = True
        for micro in range(cfg.grad_accum):
            idx = batch_indices(state.step * cfg.grad_accum + micro, n_train, cfg.batch_size, cfg.seed, rank, world_size)
            batch = make_batch(encoder, [data.train_queries[i] for i in idx], [data.train_responses[i] for i in idx],
                               data.train_targets[idx], cfg, cfg.target_tokens(state.step), weighted=True)
            sync = model.no_sync() if world_size > 1 and micro < cfg.grad_accum - 1 else contextlib.nullcontext()
            with sync:
                with autocast(device):
                    losses = compute_losses(model, encoder, batch, cfg)
                # always backward, even a non-finite loss: under DDP every rank must join the all-reduce
                (losses["loss"] / cfg.grad_accum).backward()
            finite &= bool(torch.isfinite(losses["loss"]))
            for k in ("loss", "recon", "align"):
                window[k].append(losses[k].item())
            window["tokens"] += int(batch["attention_mask"].sum()) + len(idx) * encoder.special.shape[0]
            window["tokens"] += int(batch["target_mask"].sum()) if "target_mask" in batch else 0
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        skip = torch.tensor(float(not (finite and torch.isfinite(grad_norm))), device=device)
        if world_size > 1:  # a rank with a bad local loss makes everyone skip
            torch.distributed.all_reduce(skip, op=torch.distributed.ReduceOp.MAX)
        if skip.item():
            state.skipped += 1  # the guard: a non-finite step never reaches the weights or Adam's moments
            optimizer.zero_grad(set_to_none=True)
            # what the culprit batch was, so the cause can be found (RESEARCH.md saw one such batch on GPU)
            log.write({"step": state.step + 1, "event": "non_finite_skipped", "loss": losses["loss"].item(),
                       "grad_norm": float(grad_norm), "queries": [data.train_queries[i][:80] for i in idx]})
            with warnings.catch_warnings():  # the schedule advances anyway; torch warns if no update came yet
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()
        else:
            optimizer.step()
            scheduler.step()
        state.step += 1
        state.elapsed = time.perf_counter() - t_run
        if cfg.deadline is not None and state.step < cfg.steps and _past(cfg.deadline, device, world_size):
            state.time_stopped = True  # ends like a finished run; validated now so the card's "loop left it" row is current
            state.last_val = validate(encoder, data, cfg)
            log.write({"step": state.step, "event": "deadline", **state.last_val})
            emit("val", {"step": state.step, **state.last_val})
            if rank == 0:
                save_checkpoint(ckpt_dir, encoder, optimizer, scheduler, state, cfg, data_fp)
            break

        if state.step % cfg.log_every == 0 or state.step == cfg.steps:
            now = time.perf_counter()
            means = {k: _mean(window[k]) for k in ("loss", "recon", "align")}
            if world_size > 1:  # log the global batch's losses, not rank 0's slice
                packed = torch.tensor(list(means.values()), device=device)
                torch.distributed.all_reduce(packed)
                means = dict(zip(means, (packed / world_size).tolist()))
            row = {"step": state.step, **means,
                   "lr": lr, "grad_norm": float(grad_norm),
                   "tokens_per_s": window["tokens"] * world_size / max(now - window["t0"], 1e-9),
                   "skipped": state.skipped, "elapsed_s": round(state.elapsed, 1)}
            log.write(row)
            emit("step", row)
            window = {"loss": [], "recon": [], "align": [], "tokens": 0, "t0": now}
        if state.step % cfg.val_every == 0 or state.step == cfg.steps:
            t_val = time.perf_counter()
            state.last_val = validate(encoder, data, cfg)
            window["t0"] += time.perf_counter() - t_val  # tokens/s counts training time only
            log.write({"step": state.step, **state.last_val})
            emit("val", {"step": state.step, **state.last_val})
        stopping = cfg.stop_after is not None and state.step >= cfg.stop_after and state.step < cfg.steps
        if rank == 0 and (state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps or stopping):
            save_checkpoint(ckpt_dir, encoder, optimizer, scheduler, state, cfg, data_fp)
        if stopping:
            break
    return state


def _past(deadline: float, device, world_size: int) -> bool:
    """time.time() ≥ deadline, agreed by every rank (one rank stopping alone would hang the others' all-reduce)."""
    past = torch.tensor(float(time.time() >= deadline), device=device)
    if world_size > 1:
        torch.distributed.all_reduce(past, op=torch.distributed.ReduceOp.MAX)
    return bool(past.item())


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")
