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

Every vector above is a combination Σ cᵢvᵢ of the inputs, so everything follows from their Gram matrix
⟨vᵢ, vⱼ⟩, summed in float64 over a fixed grid of the flattened tensor
(:class:`~mergescale.methods.blocked.GridSum`): ‖Σ wᵢuᵢ‖² and ‖τ‖² are quadratic forms in it, ⟨uᵢ, m⟩ a product
with it, and θ one pass Σ cᵢvᵢ (+ θ_base). So the engine runs the merge over row blocks of a large tensor (a
statistics pass, then the apply pass) with the whole-tensor result bit for bit. (τ is zero in exact arithmetic:
mergekit's float32 gets rounding noise there, of relative size 10⁻⁷; the Gram form gets 10⁻¹⁶.)
"""

from __future__ import annotations

import math

import torch

from mergescale.errors import ConfigError
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
    step_ranges,
)

_CHUNK_BYTES = 8 << 20  # bytes per piece of the apply pass on the CPU: k float32 pieces stay in cache


def multislerp(inputs: MethodInputs) -> torch.Tensor:
    """Multi-SLERP of the k models (around the base when given), in float32: :class:`MultiSlerpMerge` on the
    whole tensor as one block (the engine may run it over smaller blocks, with the same result)."""
    if inputs.k == 1:
        return inputs.tensors[0].to(torch.float32)
    return run_in_memory(MultiSlerpMerge(TensorMeta.of(inputs)), inputs)


def multislerp_coefficients(name: str, weights: list[float], gram: torch.Tensor, eps: float) -> list[float]:
    """(c₁ … c_k) with θ − θ_base = Σ cᵢvᵢ, from the weights and the ``(k, k)`` float64 Gram matrix of the vᵢ.

    With sᵢ = wᵢ/(nᵢ + ε): Σ wᵢuᵢ = Σ sᵢvᵢ, ‖Σ sᵢvᵢ‖² = sᵀGs, ⟨uᵢ, m⟩ = (Gs)ᵢ/(‖Σ sᵢvᵢ‖·(nᵢ + ε)), and
    τ = (1 − Σ wᵢ⟨uᵢ, m⟩/‖Σ sᵢvᵢ‖)·Σ sᵢvᵢ."""
    k = len(weights)
    w = torch.tensor(weights, dtype=torch.float64)  # (k,)
    norms = gram.diagonal().clamp(min=0).sqrt()  # (k,) nᵢ
    scaled = w / (norms + eps)  # (k,) sᵢ
    mean_norm = math.sqrt(max(float(scaled @ gram @ scaled), 0.0))  # ‖Σ wᵢuᵢ‖
    if mean_norm < eps:
        if k == 2:
            return weights  # w₀v₀ + w₁v₁
        raise ConfigError(
            f"multislerp: tensor {name!r}: the weighted mean direction of the models is zero "
            "(antipodal models with balancing weights); change the weights"
        )
    dots = (gram @ scaled) / mean_norm / (norms + eps)  # (k,) ⟨uᵢ, m⟩
    tangent = scaled * (1.0 - float((w * dots).sum()) / mean_norm)  # (k,) τ's coefficients
    t_norm = math.sqrt(max(float(tangent @ gram @ tangent), 0.0)) + eps
    coefs = scaled * (math.cos(t_norm) / mean_norm) + tangent * (math.sin(t_norm) / t_norm)
    return (coefs * float((norms * w).sum())).tolist()


class MultiSlerpMerge(BlockedMerge):
    """Multi-SLERP over row blocks: a statistics pass sums the Gram matrix of the vᵢ (θᵢ − θ_base, or θᵢ) over
    the fixed grid (float64, :func:`~mergescale.methods.blocked.gram_sum`; it leaves the vᵢ in place when the
    tensor is one block), then the apply pass writes Σ cᵢvᵢ (+ θ_base) (:func:`multislerp_coefficients`). One
    model: that model, no statistics."""

    def __init__(self, meta: TensorMeta) -> None:
        self.k = meta.k
        self.name = meta.name
        self.eps = float(meta.params.get("eps", 1e-8))
        weights = torch.tensor([float(p["weight"]) for p in meta.model_params], dtype=torch.float32)  # (k,)
        if bool(meta.params.get("normalize_weights", True)):
            weights = weights / weights.sum()
        self.weights = [float(x) for x in weights.tolist()]
        self.has_statistics = self.k > 1
        self.sums = GridSum(meta.numel, gram_sum, width=self.k * (self.k + 1) // 2) if self.k > 1 else None
        self.coefficients: list[float] | None = None
        # every model's grid chunk in float32 (carry, piece) and float64 (gram_sum's copy, its products)
        self.state_bytes = self.k * min(GRID, meta.numel) * (4 + 4 + 8 + 8)

    def statistics(self, block: Block) -> None:
        assert self.sums is not None
        n = block.numel
        scratch = None if block.materialized else torch.empty((self.k, min(GRID, n)), device=block.device)
        for pos, end in grid_pieces(block):
            self.sums.feed(block.task_vectors(pos, end, scratch), block.offset + pos)

    def end_pass(self) -> bool:
        assert self.sums is not None
        gram = gram_matrix(self.sums.values, self.k)
        self.coefficients = multislerp_coefficients(self.name, self.weights, gram, self.eps)
        return False

    def apply(self, block: Block) -> torch.Tensor:
        n = block.numel
        if self.k == 1:
            return block.model(0)  # the model as is (the base is only the sphere's origin)
        assert self.coefficients is not None, "statistics pass first"
        base = block.flat_base() if block.base is not None else None  # (n,) overwritten by the result
        step = n if block.device.type != "cpu" else max(1 << 12, _CHUNK_BYTES // (4 * (self.k + 1)))
        out = None if base is not None or block.materialized else torch.empty(n, device=block.device)
        c = self.coefficients
        ranges = step_ranges(n, step, block.workers)

        def part(j: int) -> None:  # entry by entry: the threads' ranges give the same result as one
            lo, hi = ranges[j]
            scratch = None if block.materialized else torch.empty((self.k, min(step, hi - lo)), device=block.device)
            for s in range(lo, hi, step):
                e = min(hi, s + step)
                v = block.task_vectors(s, e, scratch)  # (k, c), scaled in place below
                acc = v[0].mul_(c[0])
                for i in range(1, self.k):
                    acc.add_(v[i].mul_(c[i]))  # Σ cᵢvᵢ in model order
                if base is not None:
                    base[s:e].add_(acc)
                elif out is not None:
                    out[s:e].copy_(acc)

        block.run(part, len(ranges))
        if base is not None:
            return block.base  # type: ignore[return-value]
        return out if out is not None else block.tensors[0]  # type: ignore[index]


def blocked_multislerp(meta: TensorMeta) -> MultiSlerpMerge | None:
    return MultiSlerpMerge(meta) if meta.k >= 1 else None


METHOD = MergeMethod(
    name="multislerp",
    fn=multislerp,
    blocked=blocked_multislerp,
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
