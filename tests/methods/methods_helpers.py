"""Helpers for the merge-method tests: building MethodInputs from small tensors (imported by the tests)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergescale.methods import get_method
from mergescale.methods.base import MethodInputs


def make_inputs(
    tensors: Sequence[torch.Tensor] | torch.Tensor,
    base: torch.Tensor | None = None,
    model_params: Sequence[dict] | None = None,
    params: dict | None = None,
    *,
    name: str = "model.layers.0.mlp.up_proj.weight",
    base_params: dict | None = None,
    seed: int = 0,
) -> MethodInputs:
    """MethodInputs over fresh float32 copies (methods may modify the stack in place)."""
    stack = torch.stack([t.to(torch.float32) for t in tensors]) if not isinstance(tensors, torch.Tensor) else tensors
    k = stack.shape[0]
    return MethodInputs(
        name=name,
        tensors=stack.clone(),
        base=None if base is None else base.to(torch.float32).clone(),
        model_params=[dict(p) for p in (model_params or [{} for _ in range(k)])],
        params=dict(params or {}),
        base_params=base_params,
        seed=seed,
    )


def run(method: str, *args, **kwargs) -> torch.Tensor:
    """Run a registered method on make_inputs(*args, **kwargs)."""
    return get_method(method)(make_inputs(*args, **kwargs))
