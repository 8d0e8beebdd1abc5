"""LoRE-Merging: estimate a shared base and low-rank task vectors from the fine-tuned models alone, then merge.

For one tensor (a matrix; vectors are one-row matrices, higher ranks are flattened to (shape[0], −1)) of k
models θᵢ, LoRE solves

    min over θ₀, δᵢ of  Σᵢ ‖θ₀ + δᵢ − θᵢ‖²_F + μ‖δᵢ‖_*      subject to rank δᵢ ≤ r

by coordinate descent, starting from θ₀ = mean θᵢ (or θ_base when a base model is given):

    δᵢ ← SVTᵣ(θᵢ − θ₀)          keep the r largest singular values, each shrunk by μ/2 (soft threshold)
    θ₀ ← (1/k)·Σᵢ (θᵢ − δᵢ)

for ``iterations`` rounds (each step solves its block exactly, so the objective never increases), and returns
the task-arithmetic merge of the estimated task vectors:

    θ = θ₀ + λ·Σᵢ wᵢδᵢ

Liu et al. 2025, "LoRE-Merging: Exploring Low-Rank Estimation For Large Language Model Merging",
https://arxiv.org/abs/2502.10749. The low-rank δᵢ keep each model's few dominant directions and drop the
small full-rank part of its update, which is where task vectors interfere.

Parameters: ``weight`` per model (1.0); global ``rank`` r (16; 0 = no cap), ``mu`` μ (0.0: truncation only),
``iterations`` (3) and ``lambda`` λ (1.0). Matrices whose smaller side exceeds 2·(r + 8) use a randomized SVD
(Halko et al. 2011; 2 power iterations) whose Gaussian test matrix comes from the per-(seed, tensor, model)
generator, so the merge is deterministic; smaller ones an exact SVD.
"""

from __future__ import annotations

import torch

from mergescale.errors import ConfigError
from mergescale.methods.base import MergeMethod, MethodInputs, ParamSpec

OVERSAMPLE = 8
POWER_ITERATIONS = 2


def _randomized_svd(
    a: torch.Tensor, rank: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` (approximately) singular triplets of a (m, n) float32 matrix."""
    m, n = a.shape
    width = min(rank + OVERSAMPLE, m, n)
    omega = torch.randn((n, width), generator=generator, dtype=torch.float32).to(a.device)  # (n, ℓ)
    q = torch.linalg.qr(a @ omega).Q  # (m, ℓ)
    for _ in range(POWER_ITERATIONS):
        z = torch.linalg.qr(a.T @ q).Q  # (n, ℓ)
        q = torch.linalg.qr(a @ z).Q  # (m, ℓ)
    u_small, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)  # (ℓ, ℓ), (ℓ,), (ℓ, n)
    return q @ u_small, s, vh


def low_rank_threshold(
    a: torch.Tensor, rank: int, shrink: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """SVTᵣ(a): the best approximation of rank ≤ ``rank`` (0: any) with singular values shrunk by ``shrink``.

    It solves min_δ ‖δ − a‖²_F + 2·shrink·‖δ‖_* subject to rank δ ≤ r (singular vectors kept, values soft-
    thresholded), so with ``shrink = μ/2`` it is LoRE's δ-step.
    """
    m, n = a.shape
    small = min(m, n)
    if rank <= 0 or rank >= small:
        rank = small
    if generator is not None and small > 2 * (rank + OVERSAMPLE):
        u, s, vh = _randomized_svd(a, rank, generator)
    else:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
    s = (s[:rank] - shrink).clamp_(min=0.0)  # (r,)
    return (u[:, :rank] * s) @ vh[:rank]


def lore_estimate(
    thetas: torch.Tensor,
    rank: int,
    mu: float,
    iterations: int,
    start: torch.Tensor | None = None,
    generators: list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRE's coordinate descent on a (k, m, n) float32 stack: (θ₀ of (m, n), δ of (k, m, n))."""
    k = thetas.shape[0]
    theta0 = thetas.mean(dim=0) if start is None else start.clone()
    deltas = torch.empty_like(thetas)
    for _ in range(max(1, iterations)):
        for i in range(k):
            g = generators[i] if generators is not None else None
            deltas[i] = low_rank_threshold(thetas[i] - theta0, rank, mu / 2, g)
        theta0 = (thetas - deltas).mean(dim=0)
    return theta0, deltas


def lore(inputs: MethodInputs) -> torch.Tensor:
    """LoRE-Merging of one tensor, in float32."""
    k = inputs.k
    if k < 1:
        raise ConfigError(f"lore: tensor {inputs.name!r}: needs at least one model")
    shape = inputs.tensors.shape[1:]
    rows = shape[0] if len(shape) >= 2 else 1
    thetas = inputs.tensors.to(torch.float32).reshape(k, rows, -1)  # (k, m, n)
    start = inputs.base.to(torch.float32).reshape(rows, -1) if inputs.base is not None else None
    theta0, deltas = lore_estimate(
        thetas,
        rank=int(inputs.params.get("rank", 16)),
        mu=float(inputs.params.get("mu", 0.0)),
        iterations=int(inputs.params.get("iterations", 3)),
        start=start,
        generators=[inputs.generator(i) for i in range(k)],
    )
    lam = float(inputs.params.get("lambda", 1.0))
    weights = torch.tensor([float(p.get("weight", 1.0)) for p in inputs.model_params], dtype=torch.float32)
    merged = torch.tensordot(weights.to(deltas.device), deltas, dims=1)  # (m, n) Σ wᵢδᵢ
    return theta0.add_(merged, alpha=lam).view(shape)


METHOD = MergeMethod(
    name="lore",
    fn=lore,
    base="optional",
    model_params=(ParamSpec("weight", float, 1.0, doc="weight wᵢ of the model's estimated task vector"),),
    global_params=(
        ParamSpec("rank", int, 16, low=0, doc="largest rank of each estimated task vector (0: no cap)"),
        ParamSpec("mu", float, 0.0, low=0.0, doc="nuclear-norm weight μ (singular values shrunk by μ/2)"),
        ParamSpec("iterations", int, 3, low=1, doc="rounds of coordinate descent"),
        ParamSpec("lambda", float, 1.0, doc="scale λ of the merged task vectors"),
    ),
    min_models=1,
    reference="https://arxiv.org/abs/2502.10749",
    doc=__doc__ or "",
)
