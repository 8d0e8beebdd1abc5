"""Karcher mean: the Riemannian barycentre of the models' directions on the unit sphere, rescaled.

With the n inputs θᵢ (flattened), weights αᵢ = 1/n, norms rᵢ = ‖θᵢ‖ and directions uᵢ = θᵢ/rᵢ (inputs with
rᵢ ≤ tol are left out of the direction, their weights renormalised over the others, α'ᵢ):

    m₀   = Σ α'ᵢuᵢ / ‖Σ α'ᵢuᵢ‖                                  (u of the first input if that norm is ≤ tol)
    gₛ   = Σ α'ᵢ · θᵢₛ/sin θᵢₛ · (uᵢ − cos θᵢₛ·mₛ),  cos θᵢₛ = ⟨mₛ, uᵢ⟩   (terms with θᵢₛ < tol skipped)
    mₛ₊₁ = normalise(cos ‖gₛ‖·mₛ + sin ‖gₛ‖·gₛ/‖gₛ‖)           until ‖gₛ‖ < tol or ``max_iter`` steps
    θ    = (Σ αᵢrᵢ) · m

(the fixed-point iteration of Karcher's mean: the log map of every input at m, averaged, then the exp map).
Karcher 1977, "Riemannian center of mass and mollifier smoothing", https://doi.org/10.1002/cpa.3160300502;
in mergekit (``merge_methods/karcher.py``) with reference https://arxiv.org/abs/2603.04972.

mergekit 0.1.5 semantics, matched here: every input takes part, the base model too when the config names one
(it has no role of its own); ``max_iter`` (10) and ``tol`` (10⁻⁵) global; one input is returned as is; when
every norm is ≤ tol the result is zero.
"""

from __future__ import annotations

import torch

from mergescale.methods.base import MergeMethod, MethodInputs, ParamSpec


def karcher_mean(tensors: torch.Tensor, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """The rescaled Karcher mean of the rows of a (n, N) float32 tensor, as an (N,) tensor."""
    n = tensors.shape[0]
    if n == 1:
        return tensors[0].clone()
    alphas = [1.0 / n] * n
    norms = torch.linalg.vector_norm(tensors, dim=1)  # (n,)
    norm_values = norms.tolist()
    valid = [i for i, r in enumerate(norm_values) if r > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    units = torch.zeros_like(tensors)  # (n, N)
    for i, r in enumerate(norm_values):
        if r != 0.0:
            units[i] = tensors[i] / norms[i]
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    vunits = units[valid]  # (v, N)
    mean = torch.zeros_like(tensors[0])
    for a, u in zip(weights, vunits, strict=True):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean)
    mean = vunits[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(weights, vunits, strict=True):
            dot = torch.clamp(torch.dot(mean, u), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        t_norm = torch.linalg.vector_norm(tangent)
        if t_norm.item() < tol:
            break
        mean = torch.cos(t_norm) * mean + torch.sin(t_norm) * (tangent / t_norm)
        m_norm = torch.linalg.vector_norm(mean)
        if m_norm.item() > tol:
            mean = mean / m_norm
    scale = sum(a * r for a, r in zip(alphas, norms, strict=True))
    return scale * mean


def karcher(inputs: MethodInputs) -> torch.Tensor:
    """Karcher mean of every input (the base included when given), in float32."""
    rows = [inputs.tensors.to(torch.float32).reshape(inputs.k, -1)]
    if inputs.base is not None:
        rows.append(inputs.base.to(torch.float32).reshape(1, -1))
    stack = torch.cat(rows) if len(rows) > 1 else rows[0]
    out = karcher_mean(stack, int(inputs.params.get("max_iter", 10)), float(inputs.params.get("tol", 1e-5)))
    return out.view(inputs.tensors.shape[1:])


METHOD = MergeMethod(
    name="karcher",
    fn=karcher,
    base="optional",
    global_params=(
        ParamSpec("max_iter", int, 10, low=0, doc="most fixed-point steps"),
        ParamSpec("tol", float, 1e-5, low=0.0, doc="stop when the tangent step is shorter"),
    ),
    min_models=1,
    merges_base=True,
    reference="https://arxiv.org/abs/2603.04972",
    doc=__doc__ or "",
)

