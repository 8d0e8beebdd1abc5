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

Every iterate m is a combination of the inputs (m = Σⱼ βⱼθⱼ: the first is, and each step adds combinations of m
and the uⱼ), so the iteration runs on the (n, n) Gram matrix ⟨θᵢ, θⱼ⟩ alone (float64; ⟨m, uᵢ⟩ = (Gβ)ᵢ/rᵢ,
‖m‖² = βᵀGβ), summed over a fixed grid of the flattened tensor (:class:`~mergescale.methods.blocked.GridSum`).
So one statistics pass serves every iteration, however many run, and the apply pass writes θ = Σⱼ cⱼθⱼ: the
engine runs the merge over row blocks of a large tensor with the whole-tensor result bit for bit.
"""

from __future__ import annotations

import math

import torch

from mergescale.methods.base import MergeMethod, MethodInputs, ParamSpec
from mergescale.methods.blocked import (
    GRID,
    Block,
    BlockedMerge,
    GridSum,
    TensorMeta,
    gram_matrix,
    gram_sum,
    grid_pieces,
    run_in_memory,
)

_CHUNK_BYTES = 8 << 20  # bytes per piece of the apply pass on the CPU: every input's piece stays in cache


def karcher_coefficients(gram: torch.Tensor, max_iter: int = 10, tol: float = 1e-5) -> list[float]:
    """(c₁ … cₙ) with the rescaled Karcher mean θ = Σⱼ cⱼθⱼ, from the ``(n, n)`` float64 Gram matrix of n ≥ 2
    inputs (all zero when every norm is ≤ tol).

    The iteration runs on the (v, v) Gram matrix of the v valid directions, Gᵢⱼ = ⟨uᵢ, uⱼ⟩, with m = Σⱼ βⱼuⱼ."""
    n = gram.shape[0]
    alphas = [1.0 / n] * n
    norms = gram.diagonal().clamp(min=0).sqrt().tolist()  # (n,) rᵢ
    valid = [i for i, r in enumerate(norms) if r > tol]
    if not valid:
        return [0.0] * n
    total = sum(alphas[i] for i in valid)
    weights = torch.tensor([alphas[i] / total for i in valid], dtype=torch.float64)  # (v,) α'ᵢ
    inv = torch.tensor([1.0 / norms[i] for i in valid], dtype=torch.float64)
    g = gram[valid][:, valid] * inv[:, None] * inv[None, :]  # (v, v) ⟨uᵢ, uⱼ⟩

    def norm(beta: torch.Tensor) -> float:
        return max(float(beta @ g @ beta), 0.0) ** 0.5

    beta = weights.clone()  # m = Σ α'ᵢuᵢ, then normalised
    mean_norm = norm(beta)
    if mean_norm < tol:
        beta = torch.zeros_like(weights)
        beta[0] = 1.0
    else:
        beta = beta / mean_norm
    for _ in range(max_iter):
        dots = (g @ beta).clamp(-1.0, 1.0)  # (v,) cos θᵢ = ⟨m, uᵢ⟩
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
    coefs = [0.0] * n
    for j, c in zip(valid, (beta * inv * scale).tolist(), strict=True):
        coefs[j] = c  # on the raw inputs: βⱼ/rⱼ·scale
    return coefs


def karcher(inputs: MethodInputs) -> torch.Tensor:
    """Karcher mean of every input (the base included when given), in float32: :class:`KarcherMerge` on the
    whole tensor as one block (the engine may run it over smaller blocks, with the same result)."""
    meta = TensorMeta.of(inputs)
    if inputs.k + (inputs.base is not None) == 1:  # one input: as is
        only = inputs.tensors[0] if inputs.k else inputs.base
        assert only is not None
        return only.to(torch.float32).clone()
    return run_in_memory(KarcherMerge(meta), inputs)


class KarcherMerge(BlockedMerge):
    """The Karcher mean over row blocks: one statistics pass sums the inputs' Gram matrix over the fixed grid
    (float64, :func:`~mergescale.methods.blocked.gram_sum`; the base, when merged, is the last input), the
    fixed-point iteration runs on it (:func:`karcher_coefficients`), then the apply pass writes Σⱼ cⱼθⱼ."""

    has_statistics = True

    def __init__(self, meta: TensorMeta) -> None:
        self.k = meta.k
        self.n = meta.k + meta.has_base  # the inputs: the models, then the base
        self.max_iter = int(meta.params.get("max_iter", 10))
        self.tol = float(meta.params.get("tol", 1e-5))
        self.sums = GridSum(meta.numel, gram_sum, width=self.n * (self.n + 1) // 2)
        self.coefficients: list[float] | None = None
        # every input's grid chunk in float32 (carry, piece, the stack with the base) and float64 (gram_sum)
        self.state_bytes = self.n * min(GRID, meta.numel) * (4 + 4 + 4 + 8 + 8)

    def statistics(self, block: Block) -> None:
        n = block.numel
        base = block.flat_base() if block.base is not None else None
        if base is None and block.materialized:
            buf = None  # the models' chunks are views, straight to the sums
        else:
            buf = torch.empty((self.n, min(GRID, n)), device=block.device)  # (n, c) the models, then the base
        for pos, end in grid_pieces(block):
            if buf is None:
                rows = block.chunk(pos, end)  # (k, c) a view
            else:
                rows = buf[:, : end - pos]
                if self.k:
                    got = block.chunk(pos, end, buf[: self.k])
                    if got.data_ptr() != rows.data_ptr():
                        rows[: self.k].copy_(got)
                if base is not None:
                    rows[self.k].copy_(base[pos:end])
            self.sums.feed(rows, block.offset + pos)

    def end_pass(self) -> bool:
        self.coefficients = karcher_coefficients(gram_matrix(self.sums.values, self.n), self.max_iter, self.tol)
        return False

    def apply(self, block: Block) -> torch.Tensor:
        assert self.coefficients is not None, "statistics pass first"
        n = block.numel
        base = block.flat_base() if block.base is not None else None
        if base is not None:
            out = base  # (n,) overwritten by the result once its own term is taken
        elif block.materialized:
            out = block.tensors[0].view(-1)  # type: ignore[index]  # model 0's entries, read before written
        else:
            out = torch.empty(n, device=block.device)
        terms = [j for j, c in enumerate(self.coefficients) if c != 0.0]
        if not terms:
            return out.zero_()
        step = n if block.device.type != "cpu" else max(1 << 12, _CHUNK_BYTES // (4 * (self.n + 1)))
        scratch = None if block.materialized or not self.k else torch.empty((self.k, min(step, n)), device=block.device)
        acc_buf = torch.empty(min(step, n), device=block.device)
        for s in range(0, n, step):
            e = min(n, s + step)
            models = block.chunk(s, e, scratch) if self.k else None  # (k, c), scaled in place below
            acc = acc_buf[: e - s]
            for first, j in enumerate(terms):
                x = models[j] if j < self.k else base[s:e]  # type: ignore[index]
                c = self.coefficients[j]
                if first == 0:
                    torch.mul(x, c, out=acc)
                else:
                    acc.add_(x.mul_(c))  # Σⱼ cⱼθⱼ in input order
            out[s:e].copy_(acc)
        return out


def blocked_karcher(meta: TensorMeta) -> KarcherMerge | None:
    """Two inputs or more (one is returned as is by the function, no merge)."""
    return KarcherMerge(meta) if meta.k + meta.has_base >= 2 else None


METHOD = MergeMethod(
    name="karcher",
    fn=karcher,
    blocked=blocked_karcher,
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
