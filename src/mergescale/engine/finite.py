"""The engines' check of input tensors for NaN / Inf."""

from __future__ import annotations

import math

import torch

from mergescale.errors import NonFiniteError


def raise_if_nonfinite(label: str, name: str, t: torch.Tensor) -> None:
    """Raise on NaN/Inf in a float32 tensor.

    A sum is ten times cheaper than ``isfinite`` and is non-finite whenever an entry is; only then (or on an
    overflowing sum of finite values) is the exact check run.
    """
    if not t.is_floating_point() or math.isfinite(float(t.sum())):
        return
    if not bool(torch.isfinite(t).all()):
        bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise NonFiniteError(f"{label}: tensor {name!r} contains {bad} values", in_input=True)
