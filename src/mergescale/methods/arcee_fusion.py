"""Arcee Fusion: keep the base, except where the other model changed a weight by an outlying amount.

With θ₁ the other model, δ = θ₁ − θ_base, rows taken along the last dimension (a 1-D tensor is one row):

    KL_r   = Σ_j p_rj · log(p_rj / q_rj),   p = softmax(θ₁)_r + 10⁻⁸,  q = softmax(θ_base)_r + 10⁻⁸
    s      = |δ| · KL_r                      (importance of each entry, scaled by its row's divergence)
    τ      = Q₂(s) + 1.5·(Q₃(s) − Q₁(s))     (Tukey's upper fence; Q the quartiles of all entries of s)
    θ      = θ_base + δ·[s ≥ τ]

Quartiles are order statistics: the entry at index ⌊q·(n − 1)⌋ of the sorted s (q = 0.25, 0.5, 0.75, the index
computed in float32 as mergekit does). Arcee AI 2025, "Arcee Fusion" (mergekit), https://arcee.ai.

mergekit 0.1.5 semantics (``merge_methods/arcee_fusion.py``), matched here: base required plus exactly one other
model, no parameters. One deliberate difference: for tensors of more than 10⁶ entries mergekit estimates the
quartiles from 10⁶ entries drawn at random (unseeded, so its result changes from run to run); here they are
exact, so the merge is deterministic (and equal to mergekit's on every tensor of up to 10⁶ entries).
"""

from __future__ import annotations

import torch

from mergescale.errors import ConfigError
from mergescale.methods.base import MergeMethod, MethodInputs

PROB_EPS = 1e-8
QUANTILES = (0.25, 0.5, 0.75)


def importance(theta: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|θ − θ_base| · KL(softmax(θ) ‖ softmax(θ_base)) per row (last dim), float32 of θ's shape."""
    p = torch.softmax(theta, dim=-1).add_(PROB_EPS)  # (..., C)
    q = torch.softmax(base, dim=-1).add_(PROB_EPS)  # (..., C)
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)  # (..., 1)
    del p, q
    return torch.sub(theta, base).abs_().mul_(kl)


def upper_fence(scores: torch.Tensor) -> torch.Tensor:
    """Q₂ + 1.5·(Q₃ − Q₁) of all entries, quartiles as sorted-entry lookups (0-dim float32)."""
    flat = scores.reshape(-1)
    n = flat.numel()
    # the same float32 arithmetic as mergekit's ``(q * (n - 1)).long()``
    idx = (torch.tensor(QUANTILES, dtype=torch.float32) * (n - 1)).long().tolist()
    q1, q2, q3 = (torch.kthvalue(flat, i + 1).values for i in idx)  # kthvalue is 1-based
    return q2 + 1.5 * (q3 - q1)


def arcee_fusion(inputs: MethodInputs) -> torch.Tensor:
    """θ_base + δ·[importance ≥ upper fence], in float32."""
    if inputs.base is None or inputs.k != 1:
        raise ConfigError(f"arcee_fusion: tensor {inputs.name!r}: needs base_model and exactly one other model")
    base = inputs.base.to(torch.float32)
    theta = inputs.tensors[0].to(torch.float32)
    if theta.numel() == 0:
        return base
    scores = importance(theta, base)
    keep = scores >= upper_fence(scores)  # (*shape) bool
    del scores
    delta = theta.sub_(base).mul_(keep)  # engine-owned stack row, reused
    return base.add_(delta)


METHOD = MergeMethod(
    name="arcee_fusion",
    fn=arcee_fusion,
    base="required",
    min_models=1,
    max_models=1,
    reference="https://arcee.ai",
    doc=__doc__ or "",
)
