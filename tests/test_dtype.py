"""The backbone's weight type: bf16 where the hardware multiplies bf16 natively, fp32 elsewhere, RKIT_DTYPE to force.

The rest of the suite runs float32 (conftest), so these tests are where bf16 meets the real model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from retrieval_kit.errors import InputError
from retrieval_kit.models import load_encoder
from retrieval_kit.models.backbone import cpu_has_native_bf16, pick_dtype

QUERIES = ["how do I rotate the API keys?", "what causes the northern lights",
           "error E1042 when mounting the backup volume", "best way to learn a second language as an adult"]


def test_auto_picks_bf16_exactly_on_cpus_that_multiply_bf16_natively(monkeypatch):
    monkeypatch.setenv("RKIT_DTYPE", "auto")
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert pick_dtype(torch.device("cpu")) == expected
    monkeypatch.delenv("RKIT_DTYPE")  # unset is auto too
    assert pick_dtype(torch.device("cpu")) == expected


@pytest.mark.parametrize("amx, avx512_bf16, expected, decodes_in",
                         [(True, False, torch.bfloat16, torch.float32), (True, True, torch.bfloat16, torch.float32),
                          (False, True, torch.bfloat16, torch.bfloat16), (False, False, torch.float32, torch.float32)])
def test_either_bf16_unit_amx_tiles_or_avx512_bf16_picks_bf16(monkeypatch, amx, avx512_bf16, expected, decodes_in):
    """AMX (Intel Xeon 4th gen+) and AVX512-BF16 (AMD Zen 4+) both multiply bf16 in hardware, 2.3-3.7x fp32;
    a CPU with neither would emulate it, so it keeps fp32. Decoding: bf16 where it was measured faster end to
    end (AVX512-BF16 without AMX), fp32 on AMX CPUs."""
    monkeypatch.setenv("RKIT_DTYPE", "auto")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert cpu_has_native_bf16() == (amx or avx512_bf16)
    assert pick_dtype(torch.device("cpu")) == expected
    assert pick_dtype(torch.device("cpu"), decoding=True) == decodes_in


def test_a_decoding_process_keeps_float32_on_amx_cpus_unless_forced(monkeypatch):
    """--explain / rkit explain decode token by token: one-row products, where bf16 ran 2x slower than fp32."""
    from retrieval_kit.models import backbone

    monkeypatch.setattr(backbone, "cpu_has_amx", lambda: True)
    monkeypatch.setenv("RKIT_DTYPE", "auto")
    assert pick_dtype(torch.device("cpu")) == torch.bfloat16
    assert pick_dtype(torch.device("cpu"), decoding=True) == torch.float32
    monkeypatch.setenv("RKIT_DTYPE", "bfloat16")  # a forced type is what the user asked for, decoding or not
    assert pick_dtype(torch.device("cpu"), decoding=True) == torch.bfloat16


def test_the_decoding_hint_reaches_the_backbone_the_encoder_loads(monkeypatch):
    """load_encoder(decoding=True) (what an explained search opens, tests/test_cli.py checks the CLI asks for
    it) loads the shipped adapter's backbone in fp32 on an AMX CPU, bf16 without the hint."""
    from retrieval_kit.models import backbone

    monkeypatch.setattr(backbone, "cpu_has_amx", lambda: True)
    monkeypatch.setenv("RKIT_DTYPE", "auto")
    assert load_encoder(device="cpu", decoding=True).backbone.dtype == torch.float32
    assert load_encoder(device="cpu").backbone.dtype == torch.bfloat16


def test_rkit_dtype_forces_either_type_and_refuses_others(monkeypatch):
    for value, dtype in [("float32", torch.float32), ("bfloat16", torch.bfloat16), (" BFloat16 ", torch.bfloat16)]:
        monkeypatch.setenv("RKIT_DTYPE", value)
        assert pick_dtype(torch.device("cpu")) == dtype
    monkeypatch.setenv("RKIT_DTYPE", "half")
    with pytest.raises(InputError, match="RKIT_DTYPE='half'"):
        pick_dtype(torch.device("cpu"))


def test_cli_refuses_a_bad_rkit_dtype_in_one_line_before_anything_else(monkeypatch, tmp_path):
    from rkit_cli.main import app

    monkeypatch.setenv("RKIT_DTYPE", "fp8")
    result = CliRunner().invoke(app, ["search", "anything", "--index", "no-such-index", "--index-dir", str(tmp_path)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "RKIT_DTYPE='fp8'" in lines[0]  # not the missing index: checked first
    assert "Traceback" not in result.output


def test_bf16_generative_embeddings_match_float32(encoder, monkeypatch):
    """The shipped adapter (trained with a bf16 backbone since 2026-12-07) runs in whichever type the CPU picks:
    its query vectors must be the same vectors in fp32 and bf16."""
    assert encoder.backbone.dtype == torch.float32  # the suite's fixture, forced by conftest
    monkeypatch.setenv("RKIT_DTYPE", "bfloat16")
    bf16 = load_encoder(device="cpu")
    assert bf16.backbone.dtype == torch.bfloat16
    ours, ref = bf16.encode(QUERIES), encoder.encode(QUERIES)
    assert ours.dtype == np.float32
    cos = (ours * ref).sum(-1)
    assert cos.min() > 0.999, cos
    # and the batch-of-one path (no padding) agrees with the batched one in bf16 as well
    single = np.concatenate([bf16.encode([q]) for q in QUERIES])
    assert (single * ours).sum(-1).min() > 0.999


DOCUMENTS = ["To rotate an API key, create a new key in the console, deploy it, then revoke the old one.",
             "Aurorae are caused by charged particles from the sun striking the upper atmosphere.",
             "E1042: the backup volume is already mounted read-only; unmount it before mounting again.",
             "Adults learn languages best with spaced repetition and daily conversation practice."]


def test_the_teacher_follows_the_backbones_pick_and_stays_in_the_same_space(encoder, monkeypatch):
    """A bf16 teacher (AMX CPUs, RKIT_DTYPE=bfloat16) embeds into the same space as fp32: an index built in one
    type is searched with queries made in the other. Its rows are unit length in float32 (sentence-transformers
    would normalise in bf16, norms off by ~1e-3)."""
    monkeypatch.setenv("RKIT_DTYPE", "bfloat16")
    bf16 = load_encoder(device="cpu")
    assert next(bf16.teacher.parameters()).dtype == torch.bfloat16
    texts = QUERIES + DOCUMENTS
    ours, ref = bf16.encode_teacher(texts), encoder.encode_teacher(texts)
    assert ours.dtype == np.float32
    assert np.abs(np.linalg.norm(ours, axis=1) - 1).max() < 1e-5
    assert (ours * ref).sum(-1).min() > 0.995
    # each query still finds its document, bf16 queries against fp32 documents
    queries = bf16.encode_teacher(QUERIES, role="query")
    assert list((queries @ ref[len(QUERIES):].T).argmax(1)) == [0, 1, 2, 3]
    monkeypatch.setenv("RKIT_DTYPE", "float32")
    assert next(load_encoder(device="cpu").teacher.parameters()).dtype == torch.float32
