"""``train.amp: auto``: bfloat16 only where the CPU computes it natively, explicit choices kept."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pretrain.config import ConfigError, load_config
from pretrain.engine.precision import amp_dtype, cpu_has_native_bf16, resolve_amp

CPU = torch.device("cpu")
AVX2 = frozenset({"avx", "avx2", "fma"})
SAPPHIRE = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})


def test_auto_on_cpu_follows_the_hardware_flags():
    assert not cpu_has_native_bf16(AVX2)
    assert cpu_has_native_bf16(SAPPHIRE) and cpu_has_native_bf16(frozenset({"avx512_bf16"}))
    assert resolve_amp("auto", CPU, AVX2) == "none"
    assert resolve_amp("auto", CPU, SAPPHIRE) == "bf16"


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_explicit_choices_are_kept(amp):
    assert resolve_amp(amp, CPU, AVX2) == amp


def test_dtypes_and_bad_value():
    assert amp_dtype("none") is None and amp_dtype("bf16") is torch.bfloat16 and amp_dtype("fp16") is torch.float16
    with pytest.raises(ValueError, match="train.amp"):
        resolve_amp("fp8", CPU)
    with pytest.raises(ConfigError, match="train.amp"):
        load_config(None, ["train.amp=fp8"])


def test_default_and_demo_are_auto():
    assert load_config(None, []).train.amp == "auto"
    assert load_config(Path(__file__).resolve().parents[1] / "configs/pretrain/demo_cpu.yaml", []).train.amp == "auto"
