"""The one dtype parser that merge configs, evaluation and PMA share."""

from __future__ import annotations

import pytest
import torch

from mergescale.dtypes import parse_dtype
from mergescale.errors import ConfigError


def test_names_prefixes_and_dtypes() -> None:
    assert parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("torch.float16") is torch.float16
    assert parse_dtype(torch.float32) is torch.float32
    assert parse_dtype(None) is None


def test_auto_and_case_only_when_asked() -> None:
    assert parse_dtype("auto", auto=True) is None
    assert parse_dtype("BFloat16", any_case=True) is torch.bfloat16
    with pytest.raises(ConfigError, match=r"--dtype: unknown dtype 'auto'; use one of bf16, bfloat16"):
        parse_dtype("auto", key="--dtype")
    with pytest.raises(ConfigError, match="unknown dtype 'BF16'"):
        parse_dtype("BF16")
