"""Model Stock: move from the base towards the average of the fine-tuned models by an amount set by their angle.

With k ≥ 2 models θᵢ, offsets τᵢ = θᵢ − θ_base and cos θ the mean over pairs i < j of cos∠(τᵢ, τⱼ):

    t = k·cos θ / (1 + (k − 1)·cos θ)
    θ = t·(Σᵢ θᵢ / k) + (1 − t)·θ_base          (t = 0, i.e. the base, where 1 + (k − 1)·cos θ ≈ 0)

Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models", https://arxiv.org/abs/2403.19522.

mergekit 0.1.5 semantics (``merge_methods/model_stock.py``), matched here: base required (listed under
``models`` or not; its entry is only the base), at least two other models, no per-model parameters (no weights).
``filter_wise`` (default false): false computes one angle over the whole flattened tensor; true computes one per
row along the last dimension (per output filter of a 2-D weight), 1-D tensors being a single row. Cosines use
max(‖τᵢ‖·‖τⱼ‖, 1e-6) as denominator and are clamped to [−1, 1].
"""

from __future__ import annotations

import torch

from mergescale.errors import ConfigError
from mergescale.methods.base import MergeMethod, MethodInputs, ParamSpec

SINGULAR = 1e-6


def model_stock(inputs: MethodInputs) -> torch.Tensor:
    """Model Stock for one tensor, in float32."""
    k = inputs.k
    if inputs.base is None or k < 2:
        raise ConfigError(f"model_stock: tensor {inputs.name!r}: needs base_model and at least 2 other models")
    shape = inputs.base.shape
    if inputs.base.numel() == 0:
        return inputs.base.to(torch.float32).clone()
    filter_wise = bool(inputs.params.get("filter_wise", False))
    cols = shape[-1] if filter_wise and len(shape) >= 2 else inputs.base.numel()
    base = inputs.base.to(torch.float32).reshape(-1, cols)  # (R, C) rows share one angle
    stack = inputs.tensors.to(torch.float32).reshape(k, -1, cols)  # (k, R, C), engine-owned
    stack.sub_(base)  # (k, R, C) offsets τᵢ

    rows = stack.transpose(0, 1)  # (R, k, C)
    gram = torch.bmm(rows, rows.transpose(1, 2))  # (R, k, k) ⟨τᵢ, τⱼ⟩ per row
    norms = gram.diagonal(dim1=1, dim2=2).clamp(min=0).sqrt()  # (R, k) ‖τᵢ‖
    iu = torch.triu_indices(k, k, offset=1, device=stack.device)  # (2, k(k−1)/2) pairs i < j
    dots = gram[:, iu[0], iu[1]]  # (R, P)
    denom = (norms[:, iu[0]] * norms[:, iu[1]]).clamp(min=SINGULAR)  # (R, P)
    cos = (dots / denom).clamp(-1.0, 1.0).mean(dim=1, keepdim=True)  # (R, 1) mean pairwise cosine

    d = 1.0 + (k - 1) * cos  # (R, 1)
    singular = d.abs() < SINGULAR
    t = torch.where(singular, torch.zeros_like(cos), k * cos / torch.where(singular, torch.ones_like(d), d))
    # t·mean(θᵢ) + (1 − t)·θ_base = θ_base + (t / k)·Σ τᵢ
    out = stack.sum(dim=0)  # (R, C)
    return out.mul_(t / k).add_(base).view(shape)


METHOD = MergeMethod(
    name="model_stock",
    fn=model_stock,
    base="required",
    global_params=(ParamSpec("filter_wise", bool, False, doc="one angle per row (last dim) instead of per tensor"),),
    min_models=2,
    reference="https://arxiv.org/abs/2403.19522",
    doc=__doc__ or "",
)
