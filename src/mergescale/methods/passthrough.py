"""Passthrough: one input tensor, copied (optionally scaled) into the output.

    θ = s · θ₁          (s = ``scale``, default 1)

With ``slices:`` this is how frankenmerges are written: each output layer is a copy of one source layer, and
overlapping or repeated layer ranges change the depth of the model (the layer-stacking of depth up-scaling,
Kim et al. 2023, "SOLAR 10.7B", https://arxiv.org/abs/2312.15166).

mergekit 0.1.5 semantics (``merge_methods/passthrough.py``), matched here: at most one input per tensor; the base
model has no role of its own (a ``base_model`` is the one input when it is the slice's source, and counts as a
second input otherwise, which mergekit refuses); ``scale`` is per input, optional (no scaling when absent).
A linear method: the engine copies the input straight from its stored dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergescale.errors import ConfigError
from mergescale.methods.base import MergeMethod, MethodInputs, ParamSpec, ParamValue


def coefficients(
    model_params: Sequence[dict[str, ParamValue]],
    params: dict[str, ParamValue],
    base_params: dict[str, ParamValue] | None,
    *,
    name: str = "<tensor>",
) -> tuple[list[float], float]:
    """θ = s·θ₁: the one coefficient is the input's ``scale``."""
    if len(model_params) != 1:
        raise ConfigError(f"passthrough: tensor {name!r}: takes exactly one input, got {len(model_params)}")
    return [float(model_params[0].get("scale", 1.0))], 0.0


def passthrough(inputs: MethodInputs) -> torch.Tensor:
    """s·θ₁ in float32."""
    (scale,), _ = coefficients(inputs.model_params, inputs.params, None, name=inputs.name)
    out = inputs.tensors[0].to(torch.float32)
    return out if scale == 1.0 else out.mul_(scale)


METHOD = MergeMethod(
    name="passthrough",
    fn=passthrough,
    base="optional",
    model_params=(ParamSpec("scale", float, 1.0, doc="factor the input is multiplied by"),),
    min_models=1,
    max_models=1,
    merges_base=True,
    linear_coefficients=coefficients,
    doc=__doc__ or "",
)
