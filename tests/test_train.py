"""rkit train: the real default models on CPU, a handful of short queries, a few steps.

Kept small (short queries, 8-token responses, batch 2) so the whole file runs in a few minutes on 2 cores.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
from dataclasses import asdict

import numpy as np
import pytest
import torch
import typer
from safetensors.torch import load_file
from typer.testing import CliRunner

import retrieval_kit.train.loop as loop_module
import retrieval_kit.train.responses as responses_module
from retrieval_kit.errors import TrainError
from retrieval_kit.paths import DEFAULT_ADAPTER
from retrieval_kit.train import TrainConfig, cpu_threads, train
from retrieval_kit.train.data import load_split, read_queries, split_queries
from retrieval_kit.train.loop import LoopData, align_loss, batch_indices, lr_factor, tokenize_targets, train_loop
from retrieval_kit.train.report import decode_curve, read_log, rouge_l_f1
from retrieval_kit.train.targets import embed_texts, target_cache

QUERIES = [
    "What is the capital of France?",
    "Who wrote Hamlet?",
    "Name a primary color.",
    "How many legs does a spider have?",
    "What is two plus two?",
    "Define gravity in one sentence.",
]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A query file and a response/target cache shared by the tests of this module."""
    root = tmp_path_factory.mktemp("pool")
    path = root / "queries.jsonl"
    path.write_text("".join(json.dumps({"_id": str(i), "text": q}) + "\n" for i, q in enumerate(QUERIES)))
    return {"queries": path, "cache": root / "cache"}


@pytest.fixture(scope="module")
def fresh_encoder():
    """An untrained encoder of this module's own (tests below change its adapter weights)."""
    from retrieval_kit.models import EncoderConfig, build_encoder

    torch.manual_seed(0)
    return build_encoder(EncoderConfig(), device="cpu")


def tiny(pool, out, **overrides) -> TrainConfig:
    settings = dict(queries=str(pool["queries"]), out=str(out), cache_dir=str(pool["cache"]), limit=3, val_size=1,
                    max_new_tokens=8, max_target_tokens=16, steps=4, batch_size=2, warmup=0, val_every=100,
                    checkpoint_every=100, log_every=1, decode_samples=0, decode_tokens=4, eval_batch_size=8,
                    device="cpu")
    settings.update(overrides)
    return TrainConfig(**settings)


def digest(tensors) -> str:
    h = hashlib.sha256()
    for name, t in sorted(tensors):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


# ---- the pipeline with real models -------------------------------------------------------------------


def test_training_learns_and_changes_only_the_adapter(pool, tmp_path, fresh_encoder):
    encoder = fresh_encoder
    backbone_before = digest(encoder.backbone.state_dict().items())
    teacher_before = digest(encoder.teacher.state_dict().items())
    adapter_before = {k: v.clone() for k, v in encoder.adapter_state().items()}
    out = tmp_path / "adapter"
    # 2 training queries and batch 2: every step sees the same batch, so the loss must fall
    summary = train(tiny(pool, out, steps=6, lr=3e-3, ridge_init=False, decode_samples=1), encoder=encoder,
                    progress=False)

    losses = [r["loss"] for r in read_log(out / "training_log.jsonl") if r.get("loss") is not None]
    assert len(losses) == 6
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2])
    # frozen parts bit-identical, every trainable tensor moved
    assert digest(encoder.backbone.state_dict().items()) == backbone_before
    assert digest(encoder.teacher.state_dict().items()) == teacher_before
    for name, value in encoder.adapter_state().items():
        assert not torch.equal(value, adapter_before[name]), name
    trainable = sum(v.numel() for v in adapter_before.values())
    assert summary["parameters"]["trainable"] == trainable < summary["parameters"]["total"] / 100

    # the adapter folder: weights, config with the figures, model card, loss curve; no leftover checkpoint
    assert {p.name for p in out.iterdir()} == {"adapter.safetensors", "config.json", "README.md", "loss.png",
                                               "training_log.jsonl", "answer_bank.jsonl", "answer_bank.safetensors"}
    config = json.loads((out / "config.json").read_text())
    assert config["trained"] is True
    val = config["training"]["val"]
    # the reported held-out figures are what the saved adapter and the cached answer give (not merely "in range")
    from retrieval_kit.models import load_adapter
    from retrieval_kit.train.responses import GenerationConfig, response_cache

    (held_out,) = load_split(pool["queries"], val_size=1, limit=3).val
    gen = GenerationConfig(max_new_tokens=8, system_prompt=encoder.config.system_prompt,
                           max_query_tokens=encoder.config.max_query_tokens)
    answer = response_cache(pool["cache"], encoder.config.backbone, gen).lookup([held_out])[held_out]
    q_vec, a_vec = encoder.encode_teacher([held_out, answer])
    assert val["n_val"] == 1 and val["baseline_cos"] == pytest.approx(float(q_vec @ a_vec), abs=1e-4)
    saved = load_adapter(out, device="cpu")
    assert val["student_cos"] == pytest.approx(float(saved.encode([held_out])[0] @ a_vec), abs=1e-3)
    assert val["reconstruction"]["n"] == 1
    card = (out / "README.md").read_text()
    assert "baseline" in card and "trainable" in card and "CPU" in card
    # the decode-faithfulness curve: a greedy decode of the held-out query at step 0 and at the end, in log and card
    curve = [(r["step"], r["val_rouge_l"]) for r in read_log(out / "training_log.jsonl") if "val_rouge_l" in r]
    assert [step for step, _ in curve] == [0, 6] and "Explanation faithfulness during training" in card
    # the latent lens's bank: the training answers (never the held-out query), with their teacher vectors
    from retrieval_kit.models.lens import load_answer_bank

    bank = load_answer_bank(out)
    assert sorted(bank.queries) == sorted(load_split(pool["queries"], val_size=1, limit=3).train)
    assert held_out not in bank.queries and summary["answer_bank"] == 2
    np.testing.assert_allclose(bank.vectors, encoder.encode_teacher(bank.answers), atol=2e-3)
    assert summary["data"] == {"file": str(pool["queries"]), "records": 3, "unique": 3, "train": 2, "val": 1,
                               "train_used": 2, "tune": 0}


def _cache_items(cache_dir) -> int:
    with contextlib.closing(sqlite3.connect(cache_dir / "cache.sqlite3")) as db:
        return db.execute("SELECT count(*) FROM items").fetchone()[0]


def test_resume_reproduces_the_uninterrupted_run_and_reuses_cached_responses(pool, tmp_path, monkeypatch):
    full = train(tiny(pool, tmp_path / "full", w_recon=0, checkpoint_every=2), progress=False)
    assert full["status"] == "finished" and full["ridge"]["val_cos"] is not None
    # after the loop the head is refitted on the trained features (no tune split here: kept unconditionally)
    assert full["refit"]["kept"] and full["refit"]["samples"] == 2 and full["refit"]["val_cos"] is not None
    assert [r for r in read_log(tmp_path / "full" / "training_log.jsonl") if r.get("event") == "refit_head"]
    from rkit_cli.train import _print_summary, console

    with console.capture() as printed:  # what `rkit train` prints at the end
        _print_summary(full)
    assert "baseline" in printed.get() and "head refit" in printed.get()

    # from here on the response cache must be enough: count generation calls, check the cache file is untouched
    calls = []
    real_generate = responses_module.generate_batch
    monkeypatch.setattr(responses_module, "generate_batch", lambda *a, **k: calls.append(1) or real_generate(*a, **k))
    cached_items = _cache_items(pool["cache"])
    assert cached_items >= 3 + 6  # 3 responses; their and the queries' teacher vectors

    part = tmp_path / "part"
    stopped = train(tiny(pool, part, w_recon=0, checkpoint_every=2, stop_after=2), progress=False)
    assert stopped["status"] == "stopped" and stopped["steps"] == 2
    assert (part / "checkpoint" / "state.pt").is_file() and not (part / "adapter.safetensors").exists()
    with pytest.raises(TrainError, match="--resume"):  # a second plain run must not silently start over
        train(tiny(pool, part, w_recon=0, checkpoint_every=2), progress=False)
    with pytest.raises(TrainError, match="lr"):  # resuming with other settings would not reproduce anything
        train(tiny(pool, part, w_recon=0, checkpoint_every=2, lr=5e-3, resume=True), progress=False)
    # a checkpoint from before a setting existed resumes as if it had the setting's default, and only then
    from retrieval_kit.train.loop import check_resumable

    older = torch.load(part / "checkpoint" / "state.pt", map_location="cpu", weights_only=False)
    same = TrainConfig(**older["config"])  # the run's own settings, as resolved by train()
    for key in ("first_token_weight", "first_tokens"):
        del older["config"][key]
    check_resumable(part / "checkpoint", same, older)
    with pytest.raises(TrainError, match="first_token_weight"):
        check_resumable(part / "checkpoint", TrainConfig(**{**asdict(same), "first_token_weight": 2.0}), older)
    resumed = train(tiny(pool, part, w_recon=0, checkpoint_every=2, resume=True), progress=False)
    assert resumed["status"] == "finished" and resumed["steps"] == 4

    a, b = load_file(str(tmp_path / "full" / "adapter.safetensors")), load_file(str(part / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name
    losses = lambda folder: [(r["step"], r["loss"]) for r in read_log(folder / "training_log.jsonl") if "loss" in r]
    assert losses(tmp_path / "full") == losses(part)
    assert calls == []
    assert _cache_items(pool["cache"]) == cached_items  # nothing generated or embedded again


@pytest.fixture
def free_threads():
    """Threads as train() picks them (on a shared CPU, oversubscribed OpenMP threads crawl); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(cpu_threads())
    yield
    torch.set_num_threads(before)


def test_non_finite_steps_are_skipped(tmp_path, fresh_encoder, monkeypatch, free_threads):
    encoder = fresh_encoder
    real = loop_module.compute_losses

    def poisoned(*args, **kwargs):
        losses = real(*args, **kwargs)
        return {**losses, "loss": losses["loss"] * float("nan")}

    monkeypatch.setattr(loop_module, "compute_losses", poisoned)
    targets = torch.nn.functional.normalize(torch.randn(3, encoder.config.embed_dim), dim=-1)
    data = LoopData(QUERIES[:2], ["Paris.", "Shakespeare."], targets[:2], QUERIES[2:3], ["Red."], targets[2:])
    before = {k: v.clone() for k, v in encoder.adapter_state().items()}
    cfg = TrainConfig(steps=2, batch_size=2, warmup=0, w_recon=0.0, ridge_init=False, val_every=100, log_every=1)
    state = train_loop(encoder, data, cfg, tmp_path)
    assert state.step == 2 and state.skipped == 2
    for name, value in encoder.adapter_state().items():
        assert torch.equal(value, before[name]), name
    rows = read_log(tmp_path / "training_log.jsonl")
    assert [r["skipped"] for r in rows if "skipped" in r] == [1, 2]
    assert [r["step"] for r in rows if r.get("event") == "non_finite_skipped"] == [1, 2]


def test_short_targets_first_cut_the_training_targets_but_never_the_validation_ones(tmp_path, fresh_encoder, monkeypatch, free_threads):
    encoder = fresh_encoder
    real = loop_module.tokenize_targets
    seen = []  # (max_tokens asked for, target columns the batch got)

    def spy(tokenizer, responses, max_tokens, device):
        out = real(tokenizer, responses, max_tokens, device)
        seen.append((max_tokens, out["target_ids"].shape[1]))
        return out

    monkeypatch.setattr(loop_module, "tokenize_targets", spy)
    targets = torch.nn.functional.normalize(torch.randn(3, encoder.config.embed_dim), dim=-1)
    long = "Paris is the capital and the largest city of France, on the Seine."
    data = LoopData(QUERIES[:2], [long, "William Shakespeare wrote Hamlet around 1600."], targets[:2],
                    QUERIES[2:3], [long], targets[2:])
    cfg = TrainConfig(steps=4, batch_size=2, warmup=0, ridge_init=False, val_every=100, log_every=1, val_decode=0,
                      max_target_tokens=16, short_target_share=0.5, short_target_tokens=3)
    state = train_loop(encoder, data, cfg, tmp_path)
    assert state.step == 4
    # validation at step 0 and at the end scores all 16 tokens; steps 1-2 train on 3, steps 3-4 on 16
    assert [m for m, _ in seen] == [16, 3, 3, 16, 16, 16]
    assert [w for _, w in seen] == [16, 3, 3, 16, 16, 16]  # the responses are longer than 16 tokens: every cut bites


# ---- one-line errors through the CLI -------------------------------------------------------------------


@pytest.fixture
def cli():
    from rkit_cli.train import train as train_command

    app = typer.Typer()
    app.command("train")(train_command)

    @app.callback()
    def main():  # a callback keeps `train` a sub-command, as in the real app
        pass

    runner = CliRunner()

    def run(*args):
        result = runner.invoke(app, ["train", *map(str, args)])
        lines = [line for line in result.output.splitlines() if line.strip()]
        return result.exit_code, lines

    return run


def test_cli_bad_inputs_fail_in_one_line(cli, tmp_path, pool):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": oops}\n')
    textless = tmp_path / "textless.jsonl"
    textless.write_text('{"_id": "1", "title": "no text here"}\n')
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    blocker.with_suffix(".tsv").write_text("1\t1410\t1\n")  # qrels, say: not queries
    out = tmp_path / "out"
    mine = tmp_path / "notes"  # a user's folder: the run would have replaced its README.md and config.json
    mine.mkdir()
    (mine / "README.md").write_text("my precious notes")
    (mine / "config.json").write_text('{"x": 1}')
    cases = [
        (["--queries", pool["queries"], "--out", mine], "folder of other files"),
        (["--queries", pool["queries"], "--out", blocker], "is a file"),
        (["--queries", empty, "--out", out], "empty"),
        (["--queries", broken, "--out", out], "broken.jsonl:2: invalid JSON"),
        (["--queries", textless, "--out", out], "textless.jsonl:1: record has no text"),
        (["--queries", tmp_path / "missing.jsonl", "--out", out], "not found"),
        (["--queries", blocker.with_suffix(".tsv"), "--out", out], "neither JSON lines"),
        (["--queries", tmp_path, "--out", out], "is a folder"),
        (["--queries", pool["queries"], "--out", blocker / "sub"], "not writable"),
        (["--queries", pool["queries"], "--out", out, "--align-loss", "l1"], "unknown --align-loss"),
        (["--queries", pool["queries"], "--out", out, "--val-size", 1, "--backbone", "no-such-org/no-such-model"], "cannot load backbone"),
        (["--queries", pool["queries"], "--out", out, "--val-size", 1, "--teacher", "no-such-org/no-such-teacher"], "cannot load teacher"),
        (["--queries", pool["queries"], "--out", out, "--adapter", DEFAULT_ADAPTER, "--init-prompt", "Answer briefly:"], "--init-prompt"),
        (["--queries", pool["queries"], "--out", out, "--val-size", 1, "--init-prompt", " "], "--init-prompt is empty"),
    ]
    for args, expected in cases:
        code, lines = cli(*args)
        assert code != 0, args
        assert len(lines) == 1 and expected in lines[0], (args, lines)
        assert "Traceback" not in lines[0]
    assert (mine / "README.md").read_text() == "my precious notes" and sorted(p.name for p in mine.iterdir()) == [
        "README.md", "config.json"]


def test_max_minutes_ends_the_loop_and_still_writes_a_whole_adapter(cli, pool, tmp_path):
    """--max-minutes 0: the guard is already past when the loop starts, so it ends after its first step and the run
    finishes as if that were the last (refit, anchor, figures, adapter), and the model card says the schedule was cut."""
    out = tmp_path / "guarded"
    code, lines = cli("--queries", pool["queries"], "--cache-dir", pool["cache"], "--out", out, "--limit", 3, "--val-size", 1,
                      "--max-new-tokens", 8, "--max-target-tokens", 16, "--steps", 40, "--batch-size", 2, "--warmup", 0,
                      "--val-every", 100, "--checkpoint-every", 100, "--max-minutes", 0, "--device", "cpu")
    assert code == 0, lines
    events = [r for r in read_log(out / "training_log.jsonl") if r.get("event") == "deadline"]
    assert [r["step"] for r in events] == [1]
    assert decode_curve(read_log(out / "training_log.jsonl"))[-1][0] == 1  # the card's curve ends where the loop did
    assert json.loads((out / "config.json").read_text())["training"]["steps"] == 1
    assert "ended at the wall-clock deadline, before the planned 40" in (out / "README.md").read_text()


def test_chat_recon_format_trains_and_decodes_what_it_trained(pool, tmp_path):
    """--recon-format chat: the backbone reads the soft prompt as its chat template's user turn, in training and in
    every decode alike (a decode that read it differently would explain with what training never taught)."""
    from retrieval_kit.models import EncoderConfig, build_encoder, load_adapter

    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig(recon_format="chat"), device="cpu")
    out = tmp_path / "chat"
    train(tiny(pool, out, steps=6, lr=3e-3, ridge_init=False, recon_format="chat"), encoder=encoder, progress=False)
    recon = [r["recon"] for r in read_log(out / "training_log.jsonl") if r.get("recon") is not None]
    assert np.mean(recon[-2:]) < 0.8 * np.mean(recon[:2])
    saved = load_adapter(out, device="cpu")
    assert saved.config.recon_format == "chat"
    # the decode is the backbone's greedy continuation of what recon_loss feeds it (template, soft prompt, assistant
    # header): rebuilt here step by step without a KV cache
    query = QUERIES[0]
    with torch.no_grad():
        soft = saved(**saved.tokenize_queries([query]))["soft_prompt"]
        prefix = saved.recon_inputs(soft)
        before, after = saved._chat_wrap()
        assert prefix.shape[1] == before.shape[1] + saved.config.n_compress + after.shape[1] and after.shape[1] > 0
        ids = []
        for _ in range(4):
            step = torch.cat([prefix, saved.backbone.get_input_embeddings()(torch.tensor([ids], dtype=torch.long))], 1)
            ids.append(int(saved.backbone(inputs_embeds=step).logits[0, -1].argmax()))
            if ids[-1] == saved.tokenizer.eos_token_id:  # where generate stops too
                break
    assert saved.decode([query], max_new_tokens=4)[0] == saved.tokenizer.decode(ids, skip_special_tokens=True).strip()
    with pytest.raises(TrainError, match="unknown --recon-format"):
        tiny(pool, out, recon_format="xml").check()
    with pytest.raises(TrainError, match="--first-token-weight must be > 0"):
        tiny(pool, out, first_token_weight=0.0).check()


# ---- small pieces, no models -----------------------------------------------------------------------------


def test_query_files_dedupe_and_a_split_stable_as_the_pool_grows(tmp_path):
    txt = tmp_path / "q.txt"
    txt.write_text("alpha\n\nbeta\nalpha\n")
    assert read_queries(txt) == ["alpha", "beta", "alpha"]
    jl = tmp_path / "q.jsonl"
    jl.write_text('{"query": "a"}\n{"prompt": "b"}\n{"instruction": "c"}\n{"text": "d", "query": "x"}\n')
    assert read_queries(jl) == ["a", "b", "c", "d"]
    assert read_queries(jl, limit=2) == ["a", "b"]
    split = load_split(txt, val_size=1)
    assert (split.n_lines, split.n_unique, len(split.train), len(split.val)) == (3, 2, 1, 1)

    small = [f"query {i}" for i in range(300)]
    large = small + [f"other query {i}" for i in range(700)]
    train_small, val_small = split_queries(small, 20)
    train_large, val_large = split_queries(large, 20)
    assert len(val_small) == 20 and not set(train_small) & set(val_small)
    assert set(val_large) & set(small) <= set(val_small)  # growing the pool never turns a training query into val
    assert split_queries(list(reversed(small)), 20)[1] == list(reversed(val_small))  # order-independent
    with pytest.raises(TrainError):
        split_queries(["one"], 1)


def test_data_stream_schedule_losses_and_rouge():
    first = [batch_indices(k, 10, 3, seed=0) for k in range(3)]  # one epoch: 3 whole batches of a permutation
    assert first == [batch_indices(k, 10, 3, seed=0) for k in range(3)]
    assert len(set(sum(first, []))) == 9
    assert batch_indices(0, 10, 3, seed=1) != first[0]
    assert len(batch_indices(5, 2, 4, seed=0)) == 4  # a pool smaller than a batch is repeated
    ranks = [batch_indices(0, 20, 4, seed=0, rank=r, world_size=2) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1])

    cfg = TrainConfig(steps=100, warmup=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) < lr_factor(9, cfg) <= 1.0
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(99, cfg) == pytest.approx(0.1 + 0.9 * (1 - 89 / 90))

    t = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    assert align_loss(3 * t, t, TrainConfig(align_loss="cos")).item() == pytest.approx(0.0, abs=1e-6)
    assert align_loss(-t, t, TrainConfig(align_loss="cos")).item() == pytest.approx(4.0, abs=1e-5)
    assert align_loss(t, t, TrainConfig(align_loss="infonce")).item() < align_loss(t.roll(1, 0), t, TrainConfig(align_loss="infonce")).item()

    assert rouge_l_f1("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l_f1("", "anything") == 0.0
    assert rouge_l_f1("cat the", "the cat") == pytest.approx(0.5)


def test_target_cache_embeds_only_what_is_missing_per_teacher(tmp_path, monkeypatch):
    monkeypatch.setattr("retrieval_kit.train.targets.CHUNK", 2)
    calls, progress = [], []

    def embed(texts):
        calls.append(list(texts))
        return np.array([[len(t), 1.0] for t in texts], dtype=np.float32)

    vecs = embed_texts(target_cache(tmp_path, "teacher-a"), ["a", "bb", "ccc", "a"], embed, progress.append)
    np.testing.assert_allclose(vecs, [[1 / 2**0.5] * 2, [2 / 5**0.5, 1 / 5**0.5], [3 / 10**0.5, 1 / 10**0.5],
                                      [1 / 2**0.5] * 2], rtol=1e-6)  # unit length, in order, duplicates once
    assert calls == [["a", "bb"], ["ccc"]] and progress == [0, 2, 1]
    again = embed_texts(target_cache(tmp_path, "teacher-a"), ["ccc", "dddd", "bb"], embed, progress.append)
    assert calls[-1] == ["dddd"] and progress[-2:] == [2, 1]  # two were cached
    np.testing.assert_allclose(again[[0, 2]], vecs[[2, 1]])
    embed_texts(target_cache(tmp_path, "teacher-b"), ["a"], embed)  # another teacher: its own vectors
    assert calls[-1] == ["a"]


def test_target_cache_in_a_damaged_file_is_a_one_line_train_error(tmp_path):
    (tmp_path / "cache.sqlite3").write_bytes(b"torn" * 1000)
    with pytest.raises(TrainError, match="unreadable") as err:
        embed_texts(target_cache(tmp_path, "t"), ["a"], lambda t: np.ones((len(t), 2)))
    assert "\n" not in str(err.value)


def test_targets_are_right_padded_with_eos_and_queries_stay_left_padded(fresh_encoder):
    encoder = fresh_encoder
    tok = encoder.tokenizer
    batch = tokenize_targets(tok, ["Paris is the capital of France.", "Yes"], 5, "cpu")
    ids, mask = batch["target_ids"], batch["target_mask"]
    assert ids.shape == (2, 5)
    assert mask[1].tolist()[:2] == [1, 1] and mask[1].tolist()[-1] == 0  # right padding
    assert ids[1, int(mask[1].sum()) - 1] == tok.eos_token_id  # short response ends with eos
    assert ids[0, -1] != tok.eos_token_id  # a cut response does not pretend to end
    assert tok.padding_side == "left"
    q = encoder.tokenize_queries(["hi", "a much longer question than the other one"])
    assert q["attention_mask"][0, 0] == 0 and q["attention_mask"][0, -1] == 1


def test_response_cache_generates_only_what_is_missing_per_config(tmp_path, monkeypatch):
    config = responses_module.GenerationConfig(max_new_tokens=4)
    batches = []
    monkeypatch.setattr(responses_module, "generate_batch",
                        lambda model, tok, batch, **kw: batches.append(list(batch)) or [q.upper() for q in batch])
    gen = lambda queries, **kw: responses_module.generate_responses(
        None, None, queries, backbone_name="bb", config=kw.get("config", config), cache_dir=tmp_path, batch_size=2)
    assert gen(["a", "b", "a"]) == {"a": "A", "b": "B"} and sorted(map(sorted, batches)) == [["a", "b"]]
    assert gen(["b", "c"]) == {"b": "B", "c": "C"} and batches[-1] == ["c"]
    other = responses_module.GenerationConfig(max_new_tokens=4, system_prompt="Be brief." + " really" * 40)
    gen(["a"], config=other)  # another generation config (a long prompt: the key is a full hash of it)
    assert batches[-1] == ["a"] and len(batches) == 3
    assert responses_module.response_cache(tmp_path, "bb", config).lookup(["a", "b", "c", "d"]) == \
        {"a": "A", "b": "B", "c": "C"}


def test_response_cache_in_a_damaged_file_is_a_one_line_train_error(tmp_path, monkeypatch):
    (tmp_path / "cache.sqlite3").write_text('{"query": "a", "response": "A"}\n{"query": "b", "resp')
    monkeypatch.setattr(responses_module, "generate_batch", lambda model, tok, batch, **kw: [q for q in batch])
    with pytest.raises(TrainError, match="delete it"):
        responses_module.generate_responses(None, None, ["a"], backbone_name="bb",
                                            config=responses_module.GenerationConfig(), cache_dir=tmp_path)


# ---- several processes ----------------------------------------------------------------------------------


def test_torchrun_two_processes_match_one_process(pool, tmp_path):
    """DDP on CPU (gloo): 2 ranks × batch 1 train the same adapter as 1 process × batch 2 (alignment loss only, so
    the per-rank means average to the global mean). A fresh RKIT_HOME makes both ranks want the backbone cache at
    once: one builds it, the other waits (it used to read a half-made folder)."""
    import os
    import shutil
    import subprocess
    import sys

    bin_dir = os.path.dirname(sys.executable)  # the venv's scripts; CI does not put them on PATH
    torchrun, rkit = shutil.which("torchrun", path=bin_dir), shutil.which("rkit", path=bin_dir)
    args = ["--queries", str(pool["queries"]), "--cache-dir", str(pool["cache"]), "--limit", "5", "--val-size", "1",
            "--tune-size", "0", "--max-new-tokens", "8", "--steps", "3", "--warmup", "0", "--w-recon", "0",
            "--threads", "1", "--device", "cpu", "--json"]
    env = {**os.environ, "RKIT_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--no-python", rkit, "train", *args,
                           "--out", str(tmp_path / "ddp"), "--batch-size", "1"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, "\n".join(l for l in proc.stderr.splitlines() if "Loading" not in l and "Converting" not in l)[-3000:]
    summary = json.loads(proc.stdout)  # one report (rank 0's), not one per rank
    assert summary["world_size"] == 2 and summary["status"] == "finished"

    single = train(tiny(pool, tmp_path / "one", limit=5, tune_size=0, steps=3, batch_size=2, w_recon=0, decode_samples=1),
                   progress=False)
    assert single["world_size"] == 1
    # same losses, gradients and held-out figure up to float noise (batch 1 vs a padded batch of 2; Adam's first
    # steps magnify noise in near-zero gradients, so the weights themselves are not compared bit for bit)
    ddp_log, one_log = read_log(tmp_path / "ddp" / "training_log.jsonl"), read_log(tmp_path / "one" / "training_log.jsonl")
    ddp_steps, one_steps = [r for r in ddp_log if "loss" in r], [r for r in one_log if "loss" in r]
    assert ddp_steps[-1]["step"] == one_steps[-1]["step"] == 3
    # measured noise between the two set-ups: 1.3e-3 to 2.6e-3 relative on the loss (fresh clones, 2 cores); a rank that did not
    # average its gradients, or trained on the other rank's rows, is off by far more than 1e-2
    assert ddp_steps[-1]["loss"] == pytest.approx(np.mean([r["loss"] for r in one_steps]), rel=1e-2)
    assert ddp_steps[-1]["grad_norm"] == pytest.approx(one_steps[-1]["grad_norm"], rel=3e-2)
    val = lambda log: [r["val_cos"] for r in log if "val_cos" in r and "event" not in r]
    assert val(ddp_log) == pytest.approx(val(one_log), abs=1e-3)


def test_the_cuda_configuration_bf16_backbone_and_autocast_runs_on_cpu(pool, tmp_path, monkeypatch):
    """CI has no GPU. What differs on CUDA is the numbers' type: the backbone loads in bf16 (pick_dtype) and the
    step runs under bf16 autocast. Run exactly that on CPU, so dtype mismatches between the fp32 adapter, the bf16
    backbone and the autocast projections show up here and not on someone's GPU."""
    import retrieval_kit.models.backbone as backbone_module

    monkeypatch.setattr(backbone_module, "pick_dtype", lambda device, decoding=False: torch.bfloat16)
    monkeypatch.setattr(loop_module, "autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    summary = train(tiny(pool, tmp_path / "bf16", steps=2, decode_samples=1), progress=False)
    assert summary["status"] == "finished" and summary["machine"]["backbone_dtype"] == "bfloat16"
    assert "backbone weights bfloat16" in (tmp_path / "bf16" / "README.md").read_text()
    rows = [r for r in read_log(tmp_path / "bf16" / "training_log.jsonl") if "loss" in r]
    assert rows and all(np.isfinite(r["loss"]) and r["recon"] > 0 for r in rows)
    weights = load_file(tmp_path / "bf16" / "adapter.safetensors")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())  # the adapter stays fp32


def test_the_amx_cpu_configuration_bf16_backbone_without_autocast_trains(pool, tmp_path, monkeypatch):
    """On a CPU with AMX the backbone loads in bf16 by itself (pick_dtype) and the step runs without autocast (the
    projections stay fp32, the encoder casts at the backbone's edges). Reach it the way a user does, by RKIT_DTYPE."""
    monkeypatch.setenv("RKIT_DTYPE", "bfloat16")
    summary = train(tiny(pool, tmp_path / "amx", steps=2), progress=False)
    assert summary["status"] == "finished" and summary["machine"]["backbone_dtype"] == "bfloat16"
    rows = [r for r in read_log(tmp_path / "amx" / "training_log.jsonl") if "loss" in r]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) and r["recon"] > 0 and r["grad_norm"] > 0 for r in rows)
    weights = load_file(tmp_path / "amx" / "adapter.safetensors")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_heavy_left_padding_and_truncated_queries_give_finite_gradients(fresh_encoder, dtype):
    """RESEARCH.md saw one non-finite gradient on GPU and suspected fully padded rows or queries cut past the
    assistant header. Here: a 1-token query batched with one far over max_query_tokens (cut before templating, so
    the header survives), ~250 positions of left padding, L_recon + L_align, fp32 and the CUDA-style bf16."""
    import copy

    encoder = copy.deepcopy(fresh_encoder)
    encoder.backbone.to(dtype)
    queries = ["hi", "explain the French revolution in detail " * 200]
    batch = encoder.tokenize_queries(queries)
    assert batch["input_ids"].shape[1] <= encoder.config.max_query_tokens + 64  # the long one was cut
    assert batch["attention_mask"][0].sum() < 40  # the short one is mostly padding
    header = encoder.tokenizer("assistant", add_special_tokens=False)["input_ids"]
    assert all(header[0] in row.tolist() for row in batch["input_ids"])  # the assistant header survived the cut
    cfg = TrainConfig(max_target_tokens=16)
    full = loop_module.make_batch(encoder, queries, ["Hello! How can I help?", "It began in 1789."],
                                  torch.nn.functional.normalize(torch.randn(2, 384), dim=-1), cfg)
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else loop_module.autocast(encoder.device)
    with cast:
        losses = loop_module.compute_losses(encoder, encoder, full, cfg)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in encoder.trainable_parameters())
