"""Stage 4 of training: the training log, the loss curve, the validation figures and the model card.

Files written into the adapter folder: ``training_log.jsonl`` (one JSON row per log interval, validation or
event), ``loss.png`` and ``README.md`` (the model card).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch

from ..machine import machine_info as base_machine_info
from ..models.encoder import fuse_queries

# ---- training_log.jsonl ------------------------------------------------------------------------------


class TrainingLog:
    """Append-only JSON lines; rank 0 only (other ranks hold a disabled log)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def reset(self) -> None:
        if self.enabled:
            self._write_all([])

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows the interrupted run wrote after its checkpoint (the resumed run redoes them)."""
        if self.enabled:
            self._write_all([r for r in read_log(self.path) if r.get("step", 0) <= step])

    def write(self, row: dict) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(_json(row) + "\n")

    def _write_all(self, rows: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(_json(r) + "\n" for r in rows), encoding="utf-8")


def read_log(path: Path) -> list[dict]:
    rows = []
    if Path(path).is_file():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _json(row: dict) -> str:
    def clean(v):
        if isinstance(v, float):
            return round(v, 6) if math.isfinite(v) else None  # JSON has no NaN
        return v

    return json.dumps({k: clean(v) for k, v in row.items()})


# ---- loss.png ----------------------------------------------------------------------------------------


def plot_losses(rows: list[dict], path: Path) -> Path | None:
    """Training losses per logged step (left), validation cosine (middle) and, when the run tracked it, the
    held-out greedy-decode ROUGE-L (right: how faithful --explain is, step by step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if "loss" in r and r.get("loss") is not None]
    val = [r for r in rows if r.get("val_cos") is not None and "event" not in r]
    if not train and not val:
        return None
    curve = decode_curve(rows)
    fig, axes = plt.subplots(1, 3 if curve else 2, figsize=(16 if curve else 11, 4))
    ax1, ax2 = axes[0], axes[1]
    if curve:
        axes[2].plot([s for s, _ in curve], [r for _, r in curve], "o-", color="tab:green")
        axes[2].set_xlabel("step")
        axes[2].set_ylabel("held-out greedy decode ROUGE-L")
        axes[2].grid(alpha=0.3)
    for key, style in (("loss", "-"), ("recon", "--"), ("align", ":")):
        points = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        if points and any(v for _, v in points):
            ax1.plot(*zip(*points), style, label=key)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss")
    ax1.set_yscale("log")
    ax1.legend()
    ax1.grid(alpha=0.3)
    if val:
        ax2.plot([r["step"] for r in val], [r["val_cos"] for r in val], "o-", label="student")
        refit = [r for r in rows if r.get("event") == "refit_head" and r.get("val_cos") is not None]
        if refit:  # the closed-form head refit after the loop (ridge.py)
            ax2.plot([r["step"] for r in refit], [r["val_cos"] for r in refit], "*", markersize=12,
                     label="after the head refit")
        ax2.legend()
        ax2.set_xlabel("step")
        ax2.set_ylabel("val mean cos(student, teacher(response))")
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def decode_curve(rows: list[dict]) -> list[tuple[int, float]]:
    """(step, held-out decode ROUGE-L) from the log's validation rows (TrainConfig.val_decode), the one a
    --max-minutes stop logs included (a "deadline" event: the loop's last point)."""
    return [(r["step"], r["val_rouge_l"]) for r in rows
            if r.get("val_rouge_l") is not None and r.get("event", "deadline") == "deadline"]


# ---- validation figures --------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def rouge_l_f1(candidate: str, reference: str) -> float:
    """ROUGE-L F1 on lower-cased word tokens (longest common subsequence, O(n·m) dynamic programme)."""
    a, b = _words(candidate), _words(reference)
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


@torch.no_grad()
def validation_figures(encoder, queries: list[str], responses: list[str], response_vecs: np.ndarray,
                       query_vecs: np.ndarray, decode_samples: int = 64, decode_tokens: int = 64,
                       batch_size: int = 32, n_examples: int = 5) -> dict:
    """The numbers that tell whether training worked, all on the held-out split.

    - student_cos: mean cos(student embedding, teacher(response));
    - baseline_cos: mean cos(teacher(query), teacher(response)) — what you get with no training at all;
    - with a query anchor: anchor_cos (the anchor alone) and fused_cos (what `--query-mode fused` searches with);
    - reconstruction: decode the student's soft prompt and compare it with the real response (teacher cosine
      and ROUGE-L F1), on the first `decode_samples` held-out queries; plus example triples.
    """
    if not queries:
        return {}
    student = encoder.encode(queries, batch_size=batch_size)
    cos = lambda vecs: float((vecs * response_vecs).sum(1).mean())
    figures = {"n_val": len(queries), "student_cos": cos(student), "baseline_cos": cos(query_vecs)}
    if encoder.config.anchor:  # the query anchor alone, and fused with the student at the fitted weight
        anchored, w = encoder.anchor_queries(query_vecs), encoder.config.fuse_weight
        fused = fuse_queries(student, anchored, w)
        figures.update(anchor_cos=cos(anchored), fused_cos=cos(fused), fuse_weight=w, query_mode=encoder.config.query_mode)
    n = min(decode_samples, len(queries))
    if n:
        decoded = encoder.decode(queries[:n], max_new_tokens=decode_tokens, batch_size=min(batch_size, 16),
                                 int8=False)
        decoded_vecs = encoder.encode_teacher(decoded)
        figures["reconstruction"] = {
            "n": n,
            "max_new_tokens": decode_tokens,
            "teacher_cos": float((decoded_vecs * response_vecs[:n]).sum(1).mean()),
            "rouge_l_f1": float(np.mean([rouge_l_f1(d, r) for d, r in zip(decoded, responses[:n])])),
        }
        figures["examples"] = [{"query": q, "response": r, "decoded": d}
                               for q, r, d in list(zip(queries, responses, decoded))[:n_examples]]
    return figures


# ---- model card ------------------------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict:
    return {**base_machine_info(), "device": device.type}


def parameter_counts(encoder) -> dict:
    trainable = sum(p.numel() for p in encoder.trainable_parameters())
    backbone = sum(p.numel() for p in encoder.backbone.parameters())
    teacher = sum(p.numel() for p in encoder.teacher.parameters()) if encoder.teacher is not None else 0
    return {"trainable": trainable, "backbone_frozen": backbone, "teacher_frozen": teacher,
            "total": trainable + backbone, "trainable_share": trainable / max(1, trainable + backbone)}


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _cell(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[:limit] + " …"
    return text.replace("|", "\\|")


def _target_clause(cfg: dict) -> str:
    """What the loss line adds about the targets: the curriculum (shorter targets first) and the first tokens' weight;
    '' when every step used the whole target at equal weights (and for older configs)."""
    from .loop import short_targets  # here, not at the top: loop.py imports this module

    n, tokens = short_targets(cfg)
    clause = f"; the first {n} steps only the first {tokens}" if n else ""
    weight = cfg.get("first_token_weight", 1.0)
    return clause + (f"; the first {cfg['first_tokens']} count {weight:g}×" if weight != 1.0 else "")


def model_card(summary: dict) -> str:
    """README.md for the adapter folder, from the summary `train()` returns."""
    cfg, data, fig = summary["config"], summary["data"], summary.get("figures", {})
    machine, params = summary["machine"], summary["parameters"]
    rec = fig.get("reconstruction", {})
    ridge = summary.get("ridge") or {}
    where = f"GPU ({machine.get('gpu')})" if machine["device"] == "cuda" else f"CPU ({machine['cpu']}, {machine['threads']} thread{'s' if machine['threads'] > 1 else ''})"
    lines = [
        f"# rkit adapter: {summary['backbone']} → {summary['teacher']}",
        "",
        f"Produced by `rkit train` on {where}. It stores only the trainable parts of the GenerativeEncoder (special "
        f"tokens and the two projections); the backbone and teacher named in `config.json` stay frozen.",
        "",
        "## Command",
        "```",
        cfg.get("command") or "(called from Python: retrieval_kit.train.train)",
        "```",
        "",
        "## Data",
        f"- query file: `{data['file']}` — {data['records']} records read{' (--limit ' + str(cfg['limit']) + ')' if cfg.get('limit') else ''}, "
        f"{data['unique']} distinct",
        f"- training queries: {data['train']} (with a usable response: {data['train_used']}); held-out validation queries: "
        f"{data['val']} (the `--val-size` smallest text hashes; never trained on or tuned on); tune queries (kept out of "
        f"training, used to choose λ, the fused weight and the query mode): {data.get('tune', 0)}",
        f"- responses: the backbone's own greedy answers, chat template, at most {cfg['max_new_tokens']} new tokens "
        f"(system prompt: {cfg.get('system_prompt') or 'template default'}); targets: teacher(response), L2-normalised",
        *([f"- special tokens started from the tokens of {cfg['init_prompt']!r} (`--init-prompt`), not random rows"]
          if cfg.get("init_prompt") else []),
        "",
        "## Training",
        f"- steps: {summary['steps']}"
        f"{' (ended at the wall-clock deadline, before the planned ' + str(cfg['steps']) + '; the schedule was cut short)' if summary.get('stopped_at_deadline') else ''}"
        f" (skipped as non-finite: {summary['skipped']}), batch {cfg['batch_size']} × "
        f"grad-accum {cfg['grad_accum']} × {summary.get('world_size', 1)} device(s), AdamW lr {cfg['lr']} "
        f"(× {cfg['special_lr_scale']} special tokens, × {cfg['recon_lr_scale']} recon_proj, × {cfg['head_lr_scale']} head) "
        f"({cfg['schedule']} decay after {cfg['warmup']} warm-up steps, to ×{cfg['min_lr_ratio']}), grad clip {cfg['grad_clip']}, seed {cfg['seed']}",
        f"- loss = {cfg['w_recon']} · L_recon (response tokens ≤ {cfg['max_target_tokens']}{_target_clause(cfg)}) + {cfg['w_align']} · "
        f"L_align ({cfg['align_loss']}); the backbone reads the soft prompt back "
        f"{'as the user turn of its chat template' if cfg.get('recon_format') == 'chat' else 'raw (no template)'}; "
        f"{cfg['n_thought']} thought + {cfg['n_compress']} compression tokens, "
        f"{cfg['align_head']} alignment head; ridge initialisation of the head: "
        f"{'yes (λ = ' + str(ridge.get('alpha')) + ' × mean feature variance, ' + str(ridge.get('samples')) + ' queries)' if ridge else 'no'}; "
        f"closed-form refit of the head after the loop: {'yes (λ = ' + str(summary['refit'].get('alpha')) + ')' if summary.get('refit') else 'no'}",
        f"- wall time: {summary['wall_s'] / 60:.1f} min in total ({summary['loop_s'] / 60:.1f} min in optimisation steps); this "
        f"run's stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in summary.get("timings_s", {}).items()),
        f"- parameters: {params['trainable']:,} trainable of {params['total']:,} "
        f"({100 * params['trainable_share']:.2f} %; backbone {params['backbone_frozen']:,} frozen, teacher "
        f"{params['teacher_frozen']:,} frozen and used only for targets)",
        "",
        "## Machine",
        f"- {where}; {machine['platform']}; Python {machine['python']}; torch {machine['torch']}; backbone weights "
        f"{machine.get('backbone_dtype', '?')}",
        "",
        f"## Validation ({fig.get('n_val', 0)} held-out queries)",
        "",
        "| query embedding | mean cos to teacher(response) |",
        "|---|---:|",
        f"| no training: teacher(query) (baseline) | {_fmt(fig.get('baseline_cos'))} |",
    ]
    if ridge:
        lines.append(f"| untrained encoder, random head | {_fmt(ridge.get('val_cos_before'))} |")
        lines.append(f"| untrained encoder + ridge-initialised head (step 0) | {_fmt(ridge.get('val_cos'))} |")
    refit = summary.get("refit") or {}
    if refit:
        lines.append(f"| trained encoder, head as the loop left it (step {summary['steps']}) | {_fmt(refit.get('val_cos_before'))} |")
        lines.append(f"| trained encoder + head refitted in closed form ({'kept' if refit.get('kept') else 'not kept: worse on the tune split'}) "
                     f"| {_fmt(refit.get('val_cos'))} |")
    lines.append(f"| **this adapter: student (generative embedding alone)** | **{_fmt(fig.get('student_cos'))}** |")
    anchor = summary.get("anchor") or {}
    if "anchor_cos" in fig:
        lines += [
            f"| query anchor alone: teacher(query) through the fitted teacher-space map | {_fmt(fig['anchor_cos'])} |",
            f"| **this adapter: fused, {fig['fuse_weight']:.2f}·student + {1 - fig['fuse_weight']:.2f}·anchor** | "
            f"**{_fmt(fig['fused_cos'])}** |",
            "",
            f"Query anchor (closed form after the loop, ridge λ = {anchor.get('alpha')} × mean feature variance); fused "
            f"weight and default query mode chosen on {anchor.get('tune_n', 0)} tune queries kept out of training "
            f"(tune-split cosines: {anchor.get('tune_cos')}). `rkit search` uses `{fig.get('query_mode') or 'generative'}` "
            f"query vectors by default with this adapter.",
        ]
    if rec:
        lines += [
            "",
            f"Reconstruction (the student's soft prompt decoded greedily, ≤ {rec['max_new_tokens']} tokens, first "
            f"{rec['n']} held-out queries, compared with the backbone's real response): teacher cosine "
            f"{_fmt(rec['teacher_cos'])}, ROUGE-L F1 {_fmt(rec['rouge_l_f1'])}.",
        ]
    curve = summary.get("decode_curve") or []
    if curve:
        lines += ["", f"Explanation faithfulness during training (greedy decode of the first {summary['config'].get('val_decode')} "
                      "held-out queries, ≤ 32 tokens, ROUGE-L F1 against the real answers; also in `loss.png`):", "",
                  "| step | " + " | ".join(str(s) for s, _ in curve) + " |", "|---|" + "---:|" * len(curve),
                  "| ROUGE-L | " + " | ".join(f"{r:.3f}" for _, r in curve) + " |"]
    if fig.get("examples"):
        lines += ["", "## Examples (held-out)", "", "| query | backbone response | decoded from the student |", "|---|---|---|"]
        lines += [f"| {_cell(e['query'], 200)} | {_cell(e['response'])} | {_cell(e['decoded'])} |" for e in fig["examples"]]
    lines += ["", "## Files",
              "`config.json`, `adapter.safetensors` (the adapter), `training_log.jsonl` (losses, lr, tokens/s, "
              "skipped steps, validation), `loss.png`, this README"
              + (f"; `answer_bank.jsonl` + `answer_bank.safetensors`: {summary['answer_bank']} training-pool answers "
                 "and their teacher vectors, for the latent lens (`rkit explain`)" if summary.get("answer_bank") else "")
              + ".", ""]
    return "\n".join(lines)
