"""NuSLERP: spherical interpolation between two models, optionally of their task vectors, optionally row by row.

With the two models' weights w₀, w₁, t = w₁ / (w₀ + w₁) (t = ½ when |w₀ + w₁| < 10⁻⁶) and v₀, v₁ the two
tensors (minus θ_base when a base model is given), each vector v cut from them (the whole tensor with
``nuslerp_flatten``, else each row along the last dimension, or each column with ``nuslerp_row_wise``):

    cos Ω = ⟨v₀/max(‖v₀‖, 10⁻⁷), v₁/max(‖v₁‖, 10⁻⁷)⟩      (clamped to [−1, 1])
    slerp = (sin((1 − t)Ω)·v₀ + sin(tΩ)·v₁) / sin Ω          (lerp (1 − t)·v₀ + t·v₁ where 1 − cos²Ω ≤ 10⁻¹⁶)
    θ     = θ_base + slerp(v₀ − θ_base, v₁ − θ_base)         (or slerp(v₀, v₁) without a base)

SLERP: Shoemake 1985, https://doi.org/10.1145/325165.325242; NuSLERP (weights instead of ``t``, task vectors,
row-wise) is Arcee AI's generalisation in mergekit (``merge_methods/nuslerp.py``).

mergekit 0.1.5 semantics, matched here: exactly two models besides an optional base; ``weight`` per model
(required); ``nuslerp_flatten`` (default true) and ``nuslerp_row_wise`` (default false) global. The interpolation
uses the raw vectors; only the angle uses normalised ones (so the result is not renormalised).
"""

from __future__ import annotations

import math

import torch

from mergescale.errors import ConfigError
from mergescale.methods.base import MergeMethod, MethodInputs, ParamSpec

NORM_EPS = 1e-7
COLINEAR_EPS = 1e-8
ZERO_SUM = 1e-6


def nuslerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Row-wise slerp of (..., C) float32 tensors along the last dimension."""
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1.0, 1.0)  # (..., 1)
    del u0, u1
    colinear = (1 - cos.square()) <= COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    return torch.where(colinear, (1 - t) * v0 + t * v1, out)


def nuslerp_flat(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """:func:`nuslerp_vectors` of two whole tensors as one vector each: the angle from three reductions, then one
    pass c₀·v₀ + c₁·v₁ (no normalised copies)."""
    n0 = max(float(torch.linalg.vector_norm(v0)), NORM_EPS)
    n1 = max(float(torch.linalg.vector_norm(v1)), NORM_EPS)
    cos = min(1.0, max(-1.0, float(torch.dot(v0.reshape(-1), v1.reshape(-1))) / (n0 * n1)))
    if 1 - cos * cos <= COLINEAR_EPS**2:
        c0, c1 = 1 - t, t
    else:
        theta = math.acos(cos)
        c0, c1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return torch.mul(v0, c0).add_(v1, alpha=c1)


def interpolation_factor(w0: float, w1: float) -> float:
    total = w0 + w1
    return 0.5 if abs(total) < ZERO_SUM else w1 / total


def nuslerp(inputs: MethodInputs) -> torch.Tensor:
    """NuSLERP of the two models (around the base when given), in float32."""
    if inputs.k != 2:
        raise ConfigError(f"nuslerp: tensor {inputs.name!r}: needs exactly two models besides the base, got {inputs.k}")
    t = interpolation_factor(float(inputs.model_params[0]["weight"]), float(inputs.model_params[1]["weight"]))
    v0, v1 = inputs.tensors[0].to(torch.float32), inputs.tensors[1].to(torch.float32)
    base = inputs.base.to(torch.float32) if inputs.base is not None else None
    if base is not None:  # the stack is engine-owned: task vectors in place
        v0, v1 = v0.sub_(base), v1.sub_(base)
    if bool(inputs.params.get("nuslerp_flatten", True)):
        out = nuslerp_flat(t, v0, v1)
    elif bool(inputs.params.get("nuslerp_row_wise", False)):
        out = nuslerp_vectors(t, v0.transpose(0, -1), v1.transpose(0, -1)).transpose(0, -1)
    else:
        out = nuslerp_vectors(t, v0, v1)
    return out.add_(base) if base is not None else out.contiguous()


METHOD = MergeMethod(
    name="nuslerp",
    fn=nuslerp,
    base="optional",
    model_params=(ParamSpec("weight", float, doc="the model's weight; t = w₁ / (w₀ + w₁)"),),
    global_params=(
        ParamSpec("nuslerp_flatten", bool, True, doc="one vector per tensor (false: one per row)"),
        ParamSpec("nuslerp_row_wise", bool, False, doc="without flatten: columns instead of rows"),
    ),
    min_models=2,
    max_models=2,
    doc=__doc__ or "",
)
