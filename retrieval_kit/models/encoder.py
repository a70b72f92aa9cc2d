"""GenerativeEncoder: embed the answer a frozen LLM would give to a query, without generating it.

    query ─► chat template ─► frozen backbone ─► [thought × T][compress × C]  (trainable input vectors)
                                                        │ final hidden states of the C compression tokens
                                                        ▼
                                     recon_proj (H→H)  = soft prompt ─► frozen backbone ─► decoded text
                                                        │ mean over C
                                                        ▼
                                     align_proj (H→D)  = embedding, in the teacher's space

Only `special`, `recon_proj` and `align_proj` are trainable; they are all an adapter folder stores.
The query prefix does not depend on any trainable weight, so it runs once without gradients and
only the suffix tokens run with gradients on top of its KV cache: training costs ~T+C tokens of
backward per query instead of the whole prompt.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import shutil
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, ModelError
from ..modes import DOC_MODES, QUERY_MODES
from . import int8_decode
from .backbone import DEFAULT_BACKBONE, load_backbone, pick_device
from .generation import (cost_sorted_batches, format_chat, generate_batch, length_sorted_batches, tokenize_prompts,
                         truncate_tokens)
from .teacher import DEFAULT_TEACHER, load_teacher, teacher_fingerprint

CONFIG_NAME = "config.json"
# a deferred model is loaded under this lock (a server's search and explain threads may both ask first); one for
# the module, not one per encoder, so an encoder stays deep-copyable
_LOAD_LOCK = threading.Lock()
WEIGHTS_NAME = "adapter.safetensors"
FORMAT_VERSION = 1


@dataclass
class EncoderConfig:
    backbone: str = DEFAULT_BACKBONE
    teacher: str = DEFAULT_TEACHER
    n_thought: int = 10
    n_compress: int = 10
    hidden_size: int = 0  # filled from the backbone
    embed_dim: int = 0  # filled from the teacher
    align_head: str = "linear"  # "linear" or "mlp" (more capacity for small backbones)
    # query anchor: a teacher-space map of teacher(query) towards teacher(answer), fitted in closed form by the
    # trainer; fused query vectors combine it with the generative embedding (see encode_queries)
    anchor: bool = False
    fuse_weight: float = 0.5  # weight of the generative vector in fused mode (the trainer fits it on held-out data)
    query_mode: str | None = None  # the query mode the trainer found best on held-out data (None: decided by `trained`)
    system_prompt: str | None = None  # None: the backbone template's own default
    # how the frozen backbone reads the soft prompt back (training's L_recon and every decode): "raw" — the soft
    # prompt alone, then the answer (adapters before 2026-12); "chat" — the soft prompt as the user turn of the
    # backbone's own chat template, then the assistant header, so the frozen model reads it as a question it
    # already knows how to answer (issue 17: raw decodes scored ROUGE-L 0.07)
    recon_format: str = "raw"
    max_query_tokens: int = 256
    init_seed: int = 0
    # a fresh adapter's special tokens start as this text's token rows, repeated in order to fill them (e.g.
    # "Answer briefly:", issue 17), instead of random vocabulary rows; None: random rows (init_seed)
    init_prompt: str | None = None
    trained: bool = False  # False: a stand-in; search then defaults to teacher query embeddings
    training: dict = field(default_factory=dict)  # summary written by the trainer (steps, data, figures)
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, data: dict) -> "EncoderConfig":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def _initial_rows(config: EncoderConfig, tokenizer, n_rows: int) -> torch.Tensor:
    """Vocabulary rows a fresh adapter's special tokens start from: the init prompt's tokens repeated in order, or
    random rows drawn with init_seed."""
    n = config.n_thought + config.n_compress
    if config.init_prompt is None:
        return torch.randint(0, n_rows, (n,), generator=torch.Generator().manual_seed(config.init_seed))
    ids = tokenizer(config.init_prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ModelError(f"init prompt {config.init_prompt!r} has no tokens")
    return torch.tensor(ids * -(-n // len(ids)))[:n]


def _align_head(kind: str, hidden: int, dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(hidden, dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, dim))
    raise ModelError(f"unknown align_head '{kind}' (use linear or mlp)")


class GenerativeEncoder(nn.Module):
    """The adapter plus its frozen models.

    Built with ``backbone`` and ``teacher`` given (a fresh adapter is initialised from the backbone), or, for a
    saved adapter, with loaders instead (``deferred``): a model is then loaded the first time something reads
    ``encoder.backbone`` / ``encoder.tokenizer`` / ``encoder.teacher``. A teacher-mode or hybrid-lexical search never
    touches the backbone, a bm25 one neither model, so neither pays for loading them (issue: performance).
    """

    _LAZY = {"backbone": "_backbone_loader", "tokenizer": "_backbone_loader", "teacher": "_teacher_loader"}

    def __init__(self, config: EncoderConfig, backbone, tokenizer, teacher=None, *, loaders: dict | None = None):
        super().__init__()
        self.config = config
        if loaders:  # a saved adapter: shapes come from its config, weights from its file, models on demand
            if not config.hidden_size or not config.embed_dim:
                raise ModelError("a deferred encoder needs hidden_size and embed_dim in its config")
            hidden = config.hidden_size
            self._backbone_loader = loaders["backbone"]
            self._teacher_loader = loaders.get("teacher")
            if self._teacher_loader is None:
                self.teacher = None
            self.special = nn.Parameter(torch.zeros(config.n_thought + config.n_compress, hidden))
        else:
            self._attach_backbone(backbone, tokenizer)
            self.teacher = teacher
            hidden = backbone.config.hidden_size
            config.hidden_size = hidden
            if teacher is not None:
                config.embed_dim = teacher_dim(teacher)
            # special tokens start as copies of random vocabulary rows: in-distribution inputs for the frozen model.
            # Rows as the embedding module outputs them, since they are fed as inputs_embeds past it (Gemma scales
            # by sqrt(hidden) inside it; a plain nn.Embedding gives the weight rows themselves), and only rows the
            # tokenizer uses (Qwen pads its matrix with never-trained rows past the vocabulary)
            embed = backbone.get_input_embeddings()
            rows = _initial_rows(config, tokenizer, min(embed.weight.shape[0], len(tokenizer)))
            with torch.no_grad():
                picked = embed(rows.to(embed.weight.device))
            self.special = nn.Parameter(picked.float().cpu().clone())
        if not config.embed_dim:
            raise ModelError("embed_dim unknown: load a teacher or give it in the config")
        with torch.random.fork_rng(devices=[]):  # same seed, same fresh adapter (and fingerprint), every time
            torch.manual_seed(config.init_seed)
            self.recon_proj = nn.Linear(hidden, hidden)
            self.align_proj = _align_head(config.align_head, hidden, config.embed_dim)
            if config.anchor:  # starts as the identity map: anchored(q) = teacher(q)
                self.anchor_proj = nn.Linear(config.embed_dim, config.embed_dim)
                nn.init.zeros_(self.anchor_proj.weight)
                nn.init.zeros_(self.anchor_proj.bias)
                self.anchor_proj.requires_grad_(False)  # closed-form fit after the loop, never by the optimiser
        if loaders:
            self.to(pick_device(loaders.get("device")))
            return
        with torch.no_grad():  # scaled identity: the soft prompt starts as the states, at input-embedding scale
            self.recon_proj.weight.copy_(torch.eye(hidden) * _state_to_embedding_scale(backbone, tokenizer))
            self.recon_proj.bias.zero_()
        self.to(backbone.device)

    # ---- models loaded on first use ---------------------------------------------------------------
    def __getattr__(self, name: str):
        loader_name = GenerativeEncoder._LAZY.get(name)
        if loader_name is not None and self.__dict__.get(loader_name) is not None:
            with _LOAD_LOCK:
                loader = self.__dict__.get(loader_name)
                if loader is not None:  # not loaded by another thread meanwhile
                    if loader_name == "_backbone_loader":
                        self._attach_backbone(*loader(self.device))
                    else:
                        self._attach_teacher(loader(self.device))
                    self.__dict__[loader_name] = None
            return getattr(self, name)
        return super().__getattr__(name)

    def _attach_backbone(self, backbone, tokenizer) -> None:
        hidden = self.config.hidden_size
        if hidden and backbone.config.hidden_size != hidden:
            raise ModelError(f"adapter was trained for hidden size {hidden}, backbone '{self.config.backbone}' has "
                             f"{backbone.config.hidden_size}")
        backbone.requires_grad_(False)
        self.backbone = backbone
        self.tokenizer = tokenizer

    def _attach_teacher(self, teacher) -> None:
        if teacher_dim(teacher) != self.config.embed_dim:
            raise ModelError(f"adapter was trained for a {self.config.embed_dim}-d teacher, '{self.config.teacher}' "
                             f"gives {teacher_dim(teacher)}-d vectors")
        self.teacher = teacher

    def load_models(self) -> "GenerativeEncoder":
        """Load every deferred model now (a server, before it says it is ready); returns the encoder."""
        for name in ("backbone", "teacher"):
            getattr(self, name)  # the first read loads it
        return self

    def loaded(self) -> dict[str, bool]:
        """Which frozen models are in memory (a deferred encoder loads each on first use)."""
        return {"backbone": self.__dict__.get("_backbone_loader") is None,
                "teacher": self.__dict__.get("_teacher_loader") is None}

    # ---- trainable-part bookkeeping -------------------------------------------------------------
    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("backbone.", "teacher."))}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith(("backbone.", "teacher.", "anchor_proj."))]

    @property
    def fingerprint(self) -> str:
        """The query encoder's identity: adapter weights, model names and every setting that changes its vectors.

        Recorded with each search; an index decides what it accepts by ``doc_fingerprint`` instead."""
        h = hashlib.sha256()
        h.update(json.dumps([self.config.backbone, self.config.teacher, self.config.n_thought,
                             self.config.n_compress, self.config.align_head, self.config.system_prompt]).encode())
        if self.config.anchor:  # the fitted weight changes fused vectors; older adapters keep their fingerprint
            h.update(json.dumps(["anchor", self.config.fuse_weight]).encode())
        if self.config.max_query_tokens != 256:  # cuts queries, so it changes vectors (256: as before, same hash)
            h.update(json.dumps(["max_query_tokens", self.config.max_query_tokens]).encode())
        for key, value in sorted(self.adapter_state().items()):
            h.update(key.encode())
            h.update(value.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def doc_fingerprint(self, mode: str = "teacher") -> str:
        """What produced document vectors embedded in ``mode``: the teacher alone (input side) or this adapter.

        An index is usable by any encoder with the same document fingerprint: teacher-embedded documents need no
        re-index after an adapter retrain, as long as the adapter was trained for the same teacher.
        """
        if mode == "generative":
            return self.fingerprint
        return teacher_fingerprint(self.config.teacher, self.config.embed_dim)

    @property
    def device(self) -> torch.device:
        return self.special.device

    def describe(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "backbone": self.config.backbone,
            "teacher": self.config.teacher,
            "trained": self.config.trained,
            "n_thought": self.config.n_thought,
            "n_compress": self.config.n_compress,
            "dim": self.config.embed_dim,
            "anchor": self.config.anchor,
            "fuse_weight": self.config.fuse_weight,
            # how faithfully this adapter's soft prompt decodes back to the answer (held-out ROUGE-L, model card)
            "explain_rouge_l": ((self.config.training.get("val") or {}).get("reconstruction") or {}).get("rouge_l_f1"),
        }

    # ---- the forward path -------------------------------------------------------------------------
    def tokenize_queries(self, queries: Sequence[str]) -> dict:
        queries = truncate_tokens(self.tokenizer, queries, self.config.max_query_tokens)
        prompts = [format_chat(self.tokenizer, q, self.config.system_prompt) for q in queries]
        return tokenize_prompts(self.tokenizer, prompts, self.device)

    def compress_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states of the compression tokens, (B, C, H) in float32."""
        return self.special_states(input_ids, attention_mask)[:, -self.config.n_compress :]

    def special_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states of every special token, thought then compression, (B, T + C, H) in float32 (the
        logit lens reads them all: models/lens.py)."""
        decoder = self.backbone.get_decoder()
        kwarg = _cache_kwarg(decoder)
        with torch.no_grad():  # the prompt does not depend on trainable weights
            shared = self._shared_prefix(input_ids, attention_mask)
            if shared is not None:  # the template's common opening is read from its cache: only the rest runs
                past, n_shared, input_ids, rest_mask = shared
                attention_mask = torch.cat([rest_mask.new_ones(len(rest_mask), n_shared), rest_mask], dim=-1)
                positions = n_shared + (rest_mask.long().cumsum(-1) - 1).clamp(min=0)
                past = {kwarg: past}
            else:
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                past = {}
        batch, n_special = input_ids.shape[0], self.special.shape[0]
        dtype = self.backbone.get_input_embeddings().weight.dtype
        suffix = self.special.to(dtype).unsqueeze(0).expand(batch, -1, -1)
        # prompts are left-padded, so every suffix sits right after its own last real token
        start = attention_mask.long().sum(-1, keepdim=True)
        suffix_pos = start + torch.arange(n_special, device=self.device)
        mask = torch.cat([attention_mask, attention_mask.new_ones(batch, n_special)], dim=-1)
        if not torch.is_grad_enabled():
            # encoding (no gradients): prompt and special tokens in one pass. At batch 1 a pass of this small
            # model costs mostly its weight reads, so two passes cost nearly twice one (benchmarks/perf)
            embeds = torch.cat([self.backbone.get_input_embeddings()(input_ids), suffix], dim=1)
            out = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=torch.cat([positions, suffix_pos], -1),
                          **past, use_cache=False)
            return out.last_hidden_state[:, -n_special:].float()
        # training: the prompt runs without autograd (nothing there trains), only the special tokens keep a graph
        with torch.no_grad():
            prefix = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, **past,
                             use_cache=True)
            cache = getattr(prefix, "cache", None) or prefix.past_key_values
        out = decoder(inputs_embeds=suffix, attention_mask=mask, position_ids=suffix_pos,
                      **{kwarg: cache}, use_cache=False)
        return out.last_hidden_state.float()

    def _shared_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """(cache of the opening every prompt shares, its length, the rest of each prompt, their mask) or None.

        Every prompt opens with the same chat-template tokens (SmolLM2: a 24-token system turn and the user header,
        about a third of a short query's prompt). They do not depend on the query nor on any trainable weight, so
        their keys/values are computed once per encoder and reused; only each prompt's rest runs. Positions stay as
        before (the rest continues at the shared length), so the states are the same up to float rounding
        (tests/test_lazy_models.py compares). None (the full prompt runs) when a batch does not open with them.
        """
        opening = self._template_opening()
        if opening is None:
            return None
        ids, cache = opening
        n = len(ids)
        lengths = attention_mask.long().sum(-1)
        if bool((lengths <= n).any()):
            return None
        window = _sliding_window(self.backbone.config)
        if window is not None and input_ids.shape[1] + self.special.shape[0] > window and bool((lengths < lengths.max()).any()):
            return None  # a shorter prompt's padding would sit between the opening and its rest, inside the window
        # left-padded: row i's real tokens are its last lengths[i] columns
        cols = (input_ids.shape[1] - lengths)[:, None] + torch.arange(n, device=input_ids.device)
        if not bool((input_ids.gather(1, cols) == ids).all()):
            return None  # e.g. a tokenizer merged the opening's last token with the query's first
        rest = int((lengths - n).max())
        rest_mask = (torch.arange(rest, device=input_ids.device) >= (rest - (lengths - n))[:, None]).long()
        past = copy.deepcopy(cache)
        past.batch_repeat_interleave(len(input_ids))
        return past, n, input_ids[:, -rest:], rest_mask

    def _template_opening(self):
        """(token ids every formatted query starts with, their KV cache at batch 1), computed once, or None."""
        key = (self.config.system_prompt, str(self.device), self.backbone.dtype)
        memo = self.__dict__.setdefault("_opening", {})
        if key not in memo:
            memo[key] = None
            sentinel = "\x00query\x00"
            prompt = format_chat(self.tokenizer, sentinel, self.config.system_prompt)
            text = prompt[: prompt.index(sentinel)] if sentinel in prompt else ""
            ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0].to(self.device)
            if len(ids) >= 2:
                with torch.no_grad():
                    out = self.backbone.get_decoder()(input_ids=ids[None], use_cache=True)
                past = getattr(out, "cache", None) or out.past_key_values
                if hasattr(past, "batch_repeat_interleave"):  # a transformers Cache (older tuples: no reuse)
                    memo[key] = (ids, past)
        return memo[key]

    def soft_prompt(self, states: torch.Tensor) -> torch.Tensor:
        return self.recon_proj(states)

    def embed_states(self, soft_prompt: torch.Tensor) -> torch.Tensor:
        """Unnormalised embedding from the soft prompt (mean over compression tokens, then align_proj)."""
        return self.align_proj(soft_prompt.mean(dim=1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        soft = self.soft_prompt(self.compress_states(input_ids, attention_mask))
        return {"soft_prompt": soft, "embedding": self.embed_states(soft)}

    def recon_inputs(self, soft_prompt: torch.Tensor) -> torch.Tensor:
        """What the frozen backbone reads before the answer it is to reproduce: the soft prompt, wrapped in the
        chat template's user turn and assistant header when ``recon_format`` is "chat". (B, L, H), backbone dtype."""
        dtype = self.backbone.get_input_embeddings().weight.dtype
        soft = soft_prompt.to(dtype)
        if self.config.recon_format == "raw":
            return soft
        before, after = (part.to(dtype).expand(len(soft), -1, -1) for part in self._chat_wrap())
        return torch.cat([before, soft, after], dim=1)

    def _chat_wrap(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Input embeddings of the chat template around a user turn: (system turn + user header, end of turn +
        assistant header), each (1, n, H), computed once per encoder."""
        if self.config.recon_format != "chat":
            raise ModelError(f"unknown recon_format '{self.config.recon_format}' (use raw or chat)")
        key = (self.config.system_prompt, str(self.device))
        memo = self.__dict__.setdefault("_wrap", {})
        if key not in memo:
            sentinel = "\x00soft\x00"
            prompt = format_chat(self.tokenizer, sentinel, self.config.system_prompt)
            before, after = prompt.split(sentinel, 1) if sentinel in prompt else ("", prompt)
            embed = self.backbone.get_input_embeddings()
            ids = [self.tokenizer(t, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.device)
                   for t in (before, after)]
            with torch.no_grad():
                memo[key] = tuple(embed(i).detach() for i in ids)
        return memo[key]

    def recon_logits(self, soft_prompt: torch.Tensor, target_ids: torch.Tensor,
                     target_mask: torch.Tensor) -> torch.Tensor:
        """The frozen backbone's next-token logits (float) for each scored target token, teacher-forced after the
        soft prompt as the decoder reads it (recon_inputs): one row per unpadded position of the right-padded
        targets, in the mask's row-major order (``target_ids[target_mask.bool()]`` are their labels).

        Only those positions go through the LM head: the soft prompt's and the padding's logits (a third of a
        batch's vocabulary-sized rows) were computed and thrown away before (benchmarks/perf, training stage).
        """
        embed = self.backbone.get_input_embeddings()
        prefix = self.recon_inputs(soft_prompt)
        n_prefix = prefix.shape[1]
        inputs = torch.cat([prefix, embed(target_ids)], dim=1)
        mask = torch.cat([target_mask.new_ones(target_mask.shape[0], n_prefix), target_mask], dim=1)
        states = self.backbone.get_decoder()(inputs_embeds=inputs, attention_mask=mask).last_hidden_state
        logits = self.backbone.get_output_embeddings()(states[:, n_prefix - 1 : -1][target_mask.bool()]).float()
        cap = getattr(self.backbone.config, "final_logit_softcapping", None)  # Gemma-style models cap their logits
        return torch.tanh(logits / cap) * cap if cap else logits

    def recon_loss(self, soft_prompt: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor,
                   target_weights: torch.Tensor | None = None) -> torch.Tensor:
        """L_recon: cross-entropy of the frozen backbone reproducing the target tokens after the soft prompt,
        padded positions ignored. ``target_weights`` (the mask's shape): a weighted mean over the scored tokens
        instead of the plain mean."""
        logits = self.recon_logits(soft_prompt, target_ids, target_mask)
        scored = target_mask.bool()
        if target_weights is None:
            return F.cross_entropy(logits, target_ids[scored])
        weights = target_weights[scored].to(logits.dtype)
        return (F.cross_entropy(logits, target_ids[scored], reduction="none") * weights).sum() / weights.sum().clamp(min=1e-12)

    # ---- inference API ----------------------------------------------------------------------------
    def _progress(self, total: int, description: str, show: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        return Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        disable=not show, transient=True)

    def _map_batches(self, texts: Sequence[str], batch_size: int, fn, description: str, show_progress: bool,
                     by_cost: bool = False) -> list:
        """Run fn over length-sorted batches, return results in the input order. ``by_cost``: one forward pass
        per batch (the encode), so batches are cut where padding costs more than a pass (cost_sorted_batches);
        a generation's every step costs a pass, so it keeps full batches."""
        texts = _check_texts(texts)
        results: list = [None] * len(texts)
        if by_cost:
            lengths = [min(len(ids), self.config.max_query_tokens)
                       for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
            batches = cost_sorted_batches(lengths, batch_size)
        else:
            batches = length_sorted_batches(texts, batch_size)
        with self._progress(len(texts), description, show_progress) as progress:
            task = progress.add_task(description, total=len(texts))
            for idx in batches:
                for i, value in zip(idx, fn([texts[i] for i in idx])):
                    results[i] = value
                progress.advance(task, len(idx))
        return results

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 32, show_progress: bool = False,
               with_soft_prompts: bool = False):
        """Generative embeddings, float32, L2-normalised, shape (n, embed_dim).

        ``with_soft_prompts``: (embeddings, soft prompts (n, C, hidden) float32), what ``decode`` reads back, so a
        search that is also explained runs the backbone over each query once, not once to search and once to decode.
        """
        def run(batch):
            out = self(**self.tokenize_queries(batch))
            emb = F.normalize(out["embedding"], dim=-1).cpu().numpy()
            soft = out["soft_prompt"].float().cpu().numpy() if with_soft_prompts else [None] * len(emb)
            return list(zip(emb, soft))

        rows = self._map_batches(texts, batch_size, run, "encoding queries", show_progress, by_cost=True)
        embeddings = _stack([e for e, _ in rows], self.config.embed_dim)
        if not with_soft_prompts:
            return embeddings
        shape = (0, self.config.n_compress, self.config.hidden_size)
        return embeddings, (np.stack([s for _, s in rows]) if rows else np.zeros(shape, dtype=np.float32))

    @torch.no_grad()
    def encode_teacher(self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False,
                       role: str = "document") -> np.ndarray:
        """teacher(texts), unit rows. ``role``: "query" for queries, "document" for everything embedded as a text to
        be found (documents, the backbone's answers, decodes). Teachers with prompts (EmbeddingGemma: "task: search
        result | query: …" / "title: none | text: …") apply their own per role; MiniLM and mpnet have none, so both
        roles give the same vectors there."""
        if self.teacher is None:
            raise ModelError("this encoder was loaded without a teacher")
        if role not in ("query", "document"):
            raise InputError(f"unknown teacher role '{role}' (use query or document)")
        texts = _check_texts(texts)
        if not texts:
            return np.zeros((0, self.config.embed_dim), dtype=np.float32)
        encode = self.teacher.encode_query if role == "query" else self.teacher.encode_document
        # normalised here, in float32: sentence-transformers would normalise in the model's type, and a bf16/fp16
        # teacher's rows then come out with norms up to ~1.002
        vecs = encode(list(texts), batch_size=batch_size, normalize_embeddings=False,
                      convert_to_numpy=True, show_progress_bar=show_progress)
        return _normalise(vecs.astype(np.float32))

    def encode_queries(self, texts: Sequence[str], mode: str = "generative", fuse_weight: float | None = None,
                       batch_size: int = 32, show_progress: bool = False) -> np.ndarray:
        """Query vectors in the teacher's space.

        generative: the student embedding alone (the method); teacher: teacher(query), input side;
        fused: normalise(w·generative + (1−w)·anchored teacher(query)), w = `fuse_weight` or the adapter's fitted
        weight. The anchored vector is teacher(query) moved by the adapter's fitted query anchor (none: unchanged).
        """
        return self.encode_query_modes(texts, [mode], fuse_weight, batch_size, show_progress)[mode]

    def encode_query_modes(self, texts: Sequence[str], modes: Sequence[str], fuse_weight: float | None = None,
                           batch_size: int = 32, show_progress: bool = False,
                           soft_prompts: bool = False) -> dict[str, np.ndarray]:
        """Vectors for several query modes at once, each model pass run once (hybrid search wants teacher and
        fused: fused reuses the teacher vectors instead of encoding the queries a second time).

        ``soft_prompts``: also return them under "soft_prompt" when a mode ran the backbone (for ``decode``)."""
        unknown = [m for m in modes if m not in QUERY_MODES]
        if unknown:
            raise InputError(f"unknown query mode '{unknown[0]}' (use {', '.join(QUERY_MODES)})")
        weight = self.config.fuse_weight if fuse_weight is None else fuse_weight
        if "fused" in modes and not 0.0 <= weight <= 1.0:
            raise InputError(f"fuse weight must be in [0, 1], got {weight}")
        out: dict[str, np.ndarray] = {}
        if "teacher" in modes or "fused" in modes:
            out["teacher"] = self.encode_teacher(texts, batch_size, show_progress, role="query")
        if "generative" in modes or "fused" in modes:
            if soft_prompts:
                out["generative"], out["soft_prompt"] = self.encode(texts, batch_size, show_progress, True)
            else:
                out["generative"] = self.encode(texts, batch_size, show_progress)
        if "fused" in modes:
            out["fused"] = fuse_queries(out["generative"], self.anchor_queries(out["teacher"]), weight)
        return {m: out[m] for m in (*modes, "soft_prompt") if m in out}

    def query_cuts(self, texts: Sequence[str], modes: Sequence[str]) -> list[str | None]:
        """Per query, a note when a model the ``modes`` run reads only its first tokens (None: read whole). The
        cut itself is the models' (the teacher's token window, max_query_tokens for the backbone); this says so,
        so a pasted paragraph does not silently lose its end."""
        readers = []  # modes first: reading self.teacher loads it, and a bm25 search must not
        if {"teacher", "fused"} & set(modes) and self.teacher is not None:
            readers.append(("the teacher", self.teacher.tokenizer, int(self.teacher.max_seq_length), True))
        if {"generative", "fused"} & set(modes):
            readers.append(("the backbone", self.tokenizer, self.config.max_query_tokens, False))
        cuts: list[list[str]] = [[] for _ in texts]
        for who, tokenizer, limit, special in readers:
            for i, ids in enumerate(tokenizer(list(texts), add_special_tokens=special)["input_ids"]):
                if len(ids) > limit:
                    cuts[i].append(f"{who} reads its first {limit} of {len(ids)} tokens")
        return [f"long query: {', '.join(c)}" if c else None for c in cuts]

    @torch.no_grad()
    def anchor_queries(self, teacher_vecs: np.ndarray) -> np.ndarray:
        """teacher(query) vectors moved towards where the answers lie (identity without a fitted anchor)."""
        if not self.config.anchor or len(teacher_vecs) == 0:
            return teacher_vecs
        return apply_anchor(self.anchor_proj, torch.from_numpy(np.ascontiguousarray(teacher_vecs, dtype=np.float32))).numpy()

    def encode_documents(self, texts: Sequence[str], mode: str = "teacher", batch_size: int = 64,
                         show_progress: bool = False) -> np.ndarray:
        if mode not in DOC_MODES:
            raise InputError(f"unknown document mode '{mode}' (use {', '.join(DOC_MODES)})")
        if mode == "teacher":
            return self.encode_teacher(texts, batch_size, show_progress)
        return self.encode(texts, batch_size, show_progress)

    @torch.no_grad()
    def decode(self, texts: Sequence[str], max_new_tokens: int = 64, batch_size: int = 16,
               show_progress: bool = False, soft_prompts: np.ndarray | None = None,
               generate_options: dict | None = None, int8: bool = True) -> list[str]:
        """Read the generative embedding back as text: the soft prompt continued greedily by the frozen backbone
        (KV-cached generation). ``soft_prompts`` (from ``encode(..., with_soft_prompts=True)``, one per text):
        decode those instead of encoding the texts again. ``generate_options``: more arguments for transformers'
        ``generate`` (e.g. ``num_beams``, ``repetition_penalty``; benchmarks/explain_faithfulness.py compares them).
        ``int8``: batches of ≤ 4 on a CPU (bf16 or float32 weights) take their one-row steps with int8 weights
        (models/int8_decode.py: 1.6-1.8x faster, as faithful); False decodes with the loaded weights only."""
        options = generate_options or {}
        if soft_prompts is None:
            def run(batch):
                return self._continue(self(**self.tokenize_queries(batch))["soft_prompt"], max_new_tokens, options, int8)

            return self._map_batches(texts, batch_size, run, "decoding", show_progress)
        soft = torch.as_tensor(soft_prompts, device=self.device)
        if len(soft) != len(_check_texts(texts)):
            raise InputError(f"{len(soft)} soft prompts for {len(_check_texts(texts))} texts")
        return [text for start in range(0, len(soft), batch_size)
                for text in self._continue(soft[start : start + batch_size], max_new_tokens, options, int8)]

    def _continue(self, soft: torch.Tensor, max_new_tokens: int, options: dict, int8: bool) -> list[str]:
        """Greedy continuation of a batch of soft prompts (all the same length: no padding) by the backbone; at
        batch ≤ 4 on a CPU, with int8 weights for the one-row steps (models/int8_decode.py)."""
        tok = self.tokenizer
        inputs = self.recon_inputs(soft)  # what training taught the backbone to continue
        mask = torch.ones(inputs.shape[:2], dtype=torch.long, device=self.device)
        few_rows = int8 and len(soft) <= int8_decode.MAX_ROWS  # one-row steps read 1/2 (bf16) or 1/4 (fp32) the bytes
        with int8_decode.steps(self.backbone) if few_rows else contextlib.nullcontext():
            out = self.backbone.generate(inputs_embeds=inputs, attention_mask=mask, max_new_tokens=max_new_tokens,
                                         do_sample=False, pad_token_id=tok.pad_token_id, **options)
        return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]

    def generate(self, texts: Sequence[str], max_new_tokens: int = 128, batch_size: int = 16,
                 show_progress: bool = False, **kwargs) -> list[str]:
        """The backbone's actual answers (chat template, greedy by default): HyDE and training responses."""
        system_prompt = kwargs.pop("system_prompt", self.config.system_prompt)  # once: every batch gets the same prompt

        def run(batch):
            return generate_batch(self.backbone, self.tokenizer, batch, max_new_tokens=max_new_tokens,
                                  system_prompt=system_prompt, **kwargs)

        return self._map_batches(texts, batch_size, run, "generating", show_progress)

    # ---- folder save / load -----------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().float().cpu().contiguous() for k, v in self.adapter_state().items()}
            save_file(state, str(folder / WEIGHTS_NAME))
            (folder / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
            # safetensors writes 0600 whatever the umask: a service account serving another user's adapter could
            # not read it. The weights take the mode the umask gave the config beside them (0644 under 022)
            shutil.copymode(folder / CONFIG_NAME, folder / WEIGHTS_NAME)
        except OSError as exc:
            raise ModelError(f"cannot write adapter to {folder}: {exc.strerror or exc}") from exc
        return folder


def apply_anchor(anchor_proj: nn.Module, teacher_vecs: torch.Tensor) -> torch.Tensor:
    """The anchored query: teacher(query) plus the fitted shift towards its answer, unit length, on the input's
    device and in its type (the trainer's tune vectors stay on the CPU while the projection sits on a GPU)."""
    return F.normalize(teacher_vecs + anchor_proj(teacher_vecs.to(anchor_proj.weight)).to(teacher_vecs), dim=-1)


def fuse_queries(generative: np.ndarray, anchored: np.ndarray, weight: float) -> np.ndarray:
    """Fused query vectors: normalise(w·generative + (1−w)·anchored). The one place this formula lives."""
    return _normalise(weight * generative + (1.0 - weight) * anchored)


def read_adapter_config(folder: str | Path) -> EncoderConfig:
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ModelError(f"{folder} is not an adapter folder (no {CONFIG_NAME})")
    try:
        config = EncoderConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ModelError(f"{path}: unreadable adapter config ({exc})") from exc
    if config.format_version > FORMAT_VERSION:
        raise ModelError(f"{path}: adapter format {config.format_version} is newer than this rkit understands")
    return config


def build_encoder(config: EncoderConfig, device=None, with_teacher: bool = True,
                  decoding: bool = False) -> GenerativeEncoder:
    device = pick_device(str(device) if device is not None else None)
    backbone, tokenizer = load_backbone(config.backbone, device, decoding=decoding)
    teacher = load_teacher(config.teacher, device) if with_teacher else None
    return GenerativeEncoder(config, backbone, tokenizer, teacher)


def load_adapter(folder: str | Path, device=None, with_teacher: bool = True, decoding: bool = False) -> GenerativeEncoder:
    """Load an adapter folder: its config names the backbone and teacher, its weights fill the trainable parts.
    ``decoding``: the caller will decode text (backbone.pick_dtype)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_adapter_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise ModelError(f"{folder}: missing {WEIGHTS_NAME}")
    if config.hidden_size and config.embed_dim:  # every adapter the trainer writes: models load on first use
        device = str(pick_device(str(device) if device is not None else None))
        loaders = {"device": device,
                   "backbone": lambda where: load_backbone(config.backbone, where, decoding=decoding),
                   "teacher": (lambda where: load_teacher(config.teacher, where)) if with_teacher else None}
        encoder = GenerativeEncoder(config, None, None, loaders=loaders)
    else:
        encoder = build_encoder(config, device, with_teacher, decoding)
    encoder.folder = folder  # where its answer bank lives (models/lens.py)
    try:
        state = load_file(str(weights))
        missing, unexpected = encoder.load_state_dict(state, strict=False)
    except (RuntimeError, OSError) as exc:
        raise ModelError(f"{weights}: weights do not fit {config.backbone} / {config.teacher} ({str(exc).splitlines()[0]})") from exc
    missing = [k for k in missing if not k.startswith(("backbone.", "teacher."))]
    if missing or unexpected:
        raise ModelError(f"{weights}: adapter weights missing {missing[:3]} / unexpected {unexpected[:3]}")
    return encoder


@torch.no_grad()
def _state_to_embedding_scale(backbone, tokenizer) -> float:
    """Ratio of input-embedding norm to final-state norm (~0.065 for SmolLM2-135M).

    Final states come out of the last norm layer far larger than the token embeddings the backbone reads;
    fed back unscaled as a soft prompt they start L_recon worse than uniform guessing.
    The embedding norm is that of what the embedding module outputs, the soft prompt's peers as inputs_embeds:
    Gemma's module multiplies its rows by sqrt(hidden). Its factor is measured on the probe tokens (exactly 1 for a
    plain nn.Embedding) rather than by running every row through it, a second copy of the whole matrix.
    """
    embed = backbone.get_input_embeddings()
    vocab = embed.weight
    ids = tokenizer("The answer is", return_tensors="pt", add_special_tokens=False)["input_ids"].to(vocab.device)
    factor = embed(ids).float().norm(dim=-1).sum() / vocab[ids].float().norm(dim=-1).sum().clamp(min=1e-12)
    states = backbone.get_decoder()(input_ids=ids).last_hidden_state.float()
    return float(vocab.float().norm(dim=-1).mean() * factor / states.norm(dim=-1).mean().clamp(min=1e-6))


def _sliding_window(config) -> int | None:
    """The attention window of a backbone with sliding-window layers (Gemma2/3, Mistral: no layer_types), else None."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    return window if window and (types is None or "sliding_attention" in types) else None


def _cache_kwarg(decoder) -> str:
    """transformers ≥5.x renamed `past_key_values` to `cache`; accept both."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def teacher_dim(teacher) -> int:
    get = getattr(teacher, "get_embedding_dimension", None) or teacher.get_sentence_embedding_dimension
    return int(get())


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    for t in texts:
        if not isinstance(t, str):
            raise InputError(f"expected text, got {type(t).__name__}")
    return texts


def _stack(rows: list, dim: int) -> np.ndarray:
    if not rows:
        return np.zeros((0, dim), dtype=np.float32)
    return np.stack(rows).astype(np.float32)


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)
