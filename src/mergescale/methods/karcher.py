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

import math

import torch

from mergescale.methods.base import MergeMethod, MethodInputs, ParamSpec


def karcher_mean(tensors: torch.Tensor, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """The rescaled Karcher mean of the rows of a (n, N) float32 tensor, as an (N,) tensor.

    Every iterate m is a combination of the inputs' directions (m = Σⱼ βⱼuⱼ: the first is, and each step adds
    combinations of m and the uⱼ), so the iteration runs on the (v, v) Gram matrix of the v valid directions,
    Gᵢⱼ = ⟨uᵢ, uⱼ⟩, in float64: ⟨m, uᵢ⟩ = (Gβ)ᵢ and ‖m‖² = βᵀGβ. The tensors are swept twice (the Gram matrix, and
    the final Σⱼ βⱼuⱼ) however many iterations run, where the direct form sweeps them 3v times per iteration.
    """
    n = tensors.shape[0]
    if n == 1:
        return tensors[0].clone()
    alphas = [1.0 / n] * n
    norms = torch.linalg.vector_norm(tensors, dim=1).tolist()  # (n,) rᵢ
    valid = [i for i, r in enumerate(norms) if r > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    weights = torch.tensor([alphas[i] / total for i in valid], dtype=torch.float64)  # (v,) α'ᵢ
    inv = torch.tensor([1.0 / norms[i] for i in valid], dtype=torch.float64)
    gram = _gram(tensors, valid) * inv[:, None] * inv[None, :]  # (v, v) ⟨uᵢ, uⱼ⟩

    def norm(beta: torch.Tensor) -> float:
        return float(beta @ gram @ beta) ** 0.5

    beta = weights.clone()  # m = Σ α'ᵢuᵢ, then normalised
    mean_norm = norm(beta)
    if mean_norm < tol:
        beta = torch.zeros_like(weights)
        beta[0] = 1.0
    else:
        beta = beta / mean_norm
    for _ in range(max_iter):
        dots = (gram @ beta).clamp(-1.0, 1.0)  # (v,) cos θᵢ = ⟨m, uᵢ⟩
        theta = torch.arccos(dots)
        step = torch.where(theta < tol, torch.zeros_like(theta), weights * theta / torch.sin(theta))  # (v,)
        # tangent g = Σᵢ stepᵢ (uᵢ − cos θᵢ·m): coefficients stepᵢ on uᵢ, −Σᵢ stepᵢ cos θᵢ on m
        gamma = step - float(step @ dots) * beta
        t_norm = norm(gamma)
        if t_norm < tol:
            break
        beta = math.cos(t_norm) * beta + (math.sin(t_norm) / t_norm) * gamma
        m_norm = norm(beta)
        if m_norm > tol:
            beta = beta / m_norm
    scale = sum(a * r for a, r in zip(alphas, norms, strict=True))
    coefs = (beta * inv * scale).to(torch.float32)  # (v,) on the raw rows: βⱼ/rⱼ·scale
    sel = tensors[valid] if len(valid) != n else tensors
    return torch.mv(sel.T, coefs.to(tensors.device))


_GRAM_CHUNK = 1 << 20  # columns per float64 block of the Gram matrix: bounded memory, exact-ish sums


def _gram(tensors: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """(v, v) float64 Gram matrix of the chosen rows, accumulated over float64 column blocks."""
    gram = torch.zeros((len(rows), len(rows)), dtype=torch.float64, device=tensors.device)
    sel = tensors[rows] if len(rows) != tensors.shape[0] else tensors
    for s in range(0, sel.shape[1], _GRAM_CHUNK):
        block = sel[:, s : s + _GRAM_CHUNK].to(torch.float64)
        gram += block @ block.T
    return gram.cpu()


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

