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
from mergescale.methods.selection import top_k_thresholds_

PROB_EPS = 1e-8
QUANTILES = (0.25, 0.5, 0.75)


_ROW_BYTES = 4 << 20  # rows per chunk of the importance: the chunk's temporaries stay in cache


def importance(theta: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|θ − θ_base| · KL(softmax(θ) ‖ softmax(θ_base)) per row (last dim), float32 of θ's shape."""
    t2 = theta.reshape(-1, theta.shape[-1]) if theta.dim() else theta.reshape(1, 1)  # (R, C)
    b2 = base.reshape(t2.shape)
    out = torch.empty_like(t2)
    rows = max(1, _ROW_BYTES // (4 * t2.shape[1] or 1))
    for s in range(0, t2.shape[0], rows):
        t, b = t2[s : s + rows], b2[s : s + rows]
        p = torch.softmax(t, dim=-1).add_(PROB_EPS)  # (r, C)
        q = torch.softmax(b, dim=-1).add_(PROB_EPS)
        kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)  # (r, 1)
        torch.sub(t, b, out=out[s : s + rows]).abs_().mul_(kl)
    return out.view(theta.shape)


def sorted_entries(flat: torch.Tensor, indices: list[int]) -> list[float]:
    """The entries of a flat non-negative float32 tensor at the given ranks of its ascending order, by one
    sweep of the exact selection (:mod:`mergescale.methods.selection`) instead of a sort."""
    n = flat.numel()
    ranks = [n - i for i in indices]  # the i-th smallest is the (n − i)-th largest
    inner = sorted({k for k in ranks if 0 < k < n})
    found = dict(zip(inner, (t.value for t in top_k_thresholds_(flat, inner)[0]), strict=True)) if inner else {}
    low = float(flat.min()) if n in ranks else 0.0
    return [found.get(k, low) for k in ranks]


def upper_fence(scores: torch.Tensor) -> torch.Tensor:
    """Q₂ + 1.5·(Q₃ − Q₁) of all entries, quartiles as sorted-entry lookups (0-dim float32)."""
    flat = scores.reshape(-1)
    n = flat.numel()
    # the same float32 arithmetic as mergekit's ``(q * (n - 1)).long()``
    idx = (torch.tensor(QUANTILES, dtype=torch.float32) * (n - 1)).long().tolist()
    q1, q2, q3 = (torch.tensor(v, dtype=torch.float32) for v in sorted_entries(flat, idx))
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
