"""SLERP: spherical linear interpolation between the base model and one other model.

With v₀ = θ_base and v₁ = θ_other (each tensor flattened to one vector), cos Ω = ⟨v₀/‖v₀‖, v₁/‖v₁‖⟩:

    θ = sin((1 − t)Ω)/sin Ω · v₀ + sin(tΩ)/sin Ω · v₁          when |cos Ω| ≤ 0.9995
    θ = (1 − t)·v₀ + t·v₁                                     otherwise ((anti)parallel: plain lerp)

Shoemake 1985, "Animating rotation with quaternion curves", https://doi.org/10.1145/325165.325242 (mergekit
cites https://en.wikipedia.org/wiki/Slerp).

mergekit 0.1.5 semantics (``merge_methods/slerp.py``), matched here: exactly two inputs, one of them the base:
either ``base_model`` listed under ``models`` next to one other model, or ``base_model`` plus one model (mergekit
then appends the base). ``t`` is a required global parameter (usually a gradient over layers), not bounded
(values outside [0, 1] extrapolate). The interpolation uses the raw tensors; only the angle uses normalised
ones. A norm ≤ 1e-8 is replaced by 1, so a zero tensor has cos Ω = 0 and gets sin(tπ/2)·v₁ (not a lerp), as
in mergekit.
"""

from __future__ import annotations

import math

import torch

from mergescale.errors import ConfigError
from mergescale.methods.base import MergeMethod, MethodInputs, ParamSpec

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def slerp_coefficients(t: float, v0: torch.Tensor, v1: torch.Tensor) -> tuple[float, float]:
    """(c₀, c₁) with slerp(t, v₀, v₁) = c₀v₀ + c₁v₁, for flat float32 vectors."""
    n0 = float(torch.linalg.vector_norm(v0))
    n1 = float(torch.linalg.vector_norm(v1))
    n0 = n0 if n0 > NORM_EPS else 1.0
    n1 = n1 if n1 > NORM_EPS else 1.0
    dot = float(torch.dot(v0, v1)) / (n0 * n1) if v0.numel() else 0.0
    dot = min(1.0, max(-1.0, dot))
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t
    omega = math.acos(dot)
    sin_omega = math.sin(omega)
    return math.sin((1.0 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega


def slerp(inputs: MethodInputs) -> torch.Tensor:
    """slerp(t, θ_base, θ_other) for one tensor, in float32."""
    if inputs.base is None or inputs.k != 1:
        raise ConfigError(
            f"slerp: tensor {inputs.name!r}: needs base_model and exactly one other model, got {inputs.k}"
        )
    t = float(inputs.params["t"])
    v0 = inputs.base.to(torch.float32).reshape(-1)  # (n,)
    v1 = inputs.tensors[0].to(torch.float32).reshape(-1)  # (n,)
    c0, c1 = slerp_coefficients(t, v0, v1)
    # v1 is the engine-owned buffer (or a float32 copy of it): scale it in place.
    return v1.mul_(c1).add_(v0, alpha=c0).view(inputs.base.shape)


METHOD = MergeMethod(
    name="slerp",
    fn=slerp,
    base="required",
    global_params=(ParamSpec("t", float, doc="interpolation factor: 0 gives the base, 1 the other model"),),
    min_models=1,
    max_models=1,
    reference="https://en.wikipedia.org/wiki/Slerp",
    doc=__doc__ or "",
)
