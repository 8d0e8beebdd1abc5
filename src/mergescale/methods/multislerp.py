"""Multi-SLERP: a weighted barycentre of k models on the hypersphere, computed in the tangent space.

With vᵢ the k flattened tensors (minus θ_base when a base model is given), weights wᵢ (normalised to sum to 1 by
default), nᵢ = ‖vᵢ‖ and uᵢ = vᵢ / (nᵢ + ε):

    m  = Σ wᵢuᵢ / ‖Σ wᵢuᵢ‖                     (the weighted mean direction)
    τ  = Σ wᵢ (uᵢ − ⟨uᵢ, m⟩·m)                  (the weighted mean of the uᵢ projected on m's tangent space)
    θ  = (cos ‖τ‖'·m + sin ‖τ‖'·τ/‖τ‖') · Σ wᵢnᵢ  (+ θ_base),  ‖τ‖' = ‖τ‖ + ε

(the exponential map at m, rescaled to the weighted mean norm). One model: θ = that model. When the mean
direction vanishes (‖Σ wᵢuᵢ‖ < ε): two models fall back to w₀v₀ + w₁v₁ (+ θ_base); more are an error.
Goddard 2025, "Multi-SLERP", https://goddard.blog/posts/multislerp-wow-what-a-cool-idea.

mergekit 0.1.5 semantics (``merge_methods/multislerp.py``), matched here: base optional (the origin of the
sphere, not merged); ``weight`` per model (required), ``normalize_weights`` (true) and ``eps`` (10⁻⁸) global.
"""

from __future__ import annotations

import math

import torch

from mergescale.errors import ConfigError
from mergescale.methods.base import MergeMethod, MethodInputs, ParamSpec


def multislerp(inputs: MethodInputs) -> torch.Tensor:
    """Multi-SLERP of the k models (around the base when given), in float32."""
    k = inputs.k
    if k == 1:
        return inputs.tensors[0].to(torch.float32)
    eps = float(inputs.params.get("eps", 1e-8))
    shape = inputs.tensors.shape[1:]
    stack = inputs.tensors.to(torch.float32).reshape(k, -1)  # (k, n) engine-owned
    base = inputs.base.to(torch.float32).reshape(-1) if inputs.base is not None else None
    if base is not None:
        stack.sub_(base)
    weights = torch.tensor([float(p["weight"]) for p in inputs.model_params], dtype=torch.float32)  # (k,)
    if bool(inputs.params.get("normalize_weights", True)):
        weights = weights / weights.sum()
    w = weights.to(stack.device)  # (k,)
    norms = torch.linalg.vector_norm(stack, dim=-1)  # (k,) nᵢ
    scaled = w / (norms + eps)  # (k,) the weight of each raw row in Σ wᵢuᵢ
    mean = torch.mv(stack.T, scaled)  # (n,) Σ wᵢuᵢ, one pass
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if k == 2:
            res = stack[0] * w[0] + stack[1] * w[1]
            return (res + base if base is not None else res).view(shape)
        raise ConfigError(
            f"multislerp: tensor {inputs.name!r}: the weighted mean direction of the models is zero "
            "(antipodal models with balancing weights); change the weights"
        )
    mean.div_(mean_norm)  # m
    dots = torch.mv(stack, mean) / (norms + eps)  # (k,) ⟨uᵢ, m⟩
    # τ = Σ wᵢ(uᵢ − ⟨uᵢ, m⟩m) = Σ wᵢuᵢ − (Σ wᵢ⟨uᵢ, m⟩)·m (zero up to rounding, as in mergekit)
    tangent = torch.mv(stack.T, scaled).sub_(mean, alpha=float((w * dots).sum()))
    t_norm = float(torch.linalg.vector_norm(tangent)) + eps
    result = mean.mul_(math.cos(t_norm)).add_(tangent, alpha=math.sin(t_norm) / t_norm)
    result.mul_(float((norms * w).sum()))
    if base is not None:
        result.add_(base)
    return result.view(shape)


METHOD = MergeMethod(
    name="multislerp",
    fn=multislerp,
    base="optional",
    model_params=(ParamSpec("weight", float, doc="the model's weight in the barycentre"),),
    global_params=(
        ParamSpec("normalize_weights", bool, True, doc="divide the weights by their sum"),
        ParamSpec("eps", float, 1e-8, low=0.0, doc="added to norms before dividing"),
    ),
    min_models=1,
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    doc=__doc__ or "",
)
