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

The Gram sums ⟨τᵢ, τⱼ⟩ are taken in float64 in an order set by the tensor alone (over a fixed grid of the
flattened tensor, or row by row), so the engine can run the merge over row blocks of a large tensor with the
whole-tensor result bit for bit.
"""

from __future__ import annotations

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
)

SINGULAR = 1e-6
# Bytes of float64 offsets per piece of whole rows (filter_wise): the pairwise products stay in cache.
_ROWS_BYTES = 8 << 20
# Columns per piece of the per-tensor apply pass on the CPU: k float32 rows and the sum stay in cache.
_CHUNK_BYTES = 8 << 20


def model_stock(inputs: MethodInputs) -> torch.Tensor:
    """Model Stock for one tensor, in float32: :class:`ModelStockMerge` on the whole tensor as one block (the
    engine may run it over smaller blocks, with the same result)."""
    k = inputs.k
    if inputs.base is None or k < 2:
        raise ConfigError(f"model_stock: tensor {inputs.name!r}: needs base_model and at least 2 other models")
    if inputs.base.numel() == 0:
        return inputs.base.to(torch.float32).clone()
    return run_in_memory(ModelStockMerge(TensorMeta.of(inputs)), inputs)


def interpolation(k: int, gram: list[float]) -> float:
    """t = k·cos θ / (1 + (k − 1)·cos θ) from the upper triangle of the offsets' Gram matrix (row by row, as
    :func:`~mergescale.methods.blocked.gram_sum` gives it); 0 where the denominator is ≈ 0."""
    g = gram_matrix(gram, k).tolist()  # the same float64 values, as Python floats
    norms = [max(g[i][i], 0.0) ** 0.5 for i in range(k)]
    total = 0.0
    for i in range(k):
        for j in range(i + 1, k):
            denom = max(norms[i] * norms[j], SINGULAR)
            total += min(1.0, max(-1.0, g[i][j] / denom))
    cos = total / (k * (k - 1) // 2)  # mean pairwise cosine
    d = 1.0 + (k - 1) * cos
    return 0.0 if abs(d) < SINGULAR else k * cos / d


def fixed_row_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ over the last dim of ``(R, C)``, by pairwise halving with elementwise adds: every row is summed in an
    order set by C alone, on any device and whatever R (a reduction kernel may split a row differently when R
    changes: one row takes all the threads, a GPU picks its layout from R)."""
    while x.shape[-1] > 1:
        c = x.shape[-1]
        h = c // 2
        y = x[..., :h] + x[..., h : 2 * h]  # (R, h)
        if c % 2:
            y[..., h - 1] += x[..., 2 * h]
        x = y
    return x[..., 0]


def row_interpolation(k: int, tau: torch.Tensor) -> torch.Tensor:
    """t of every row of the offsets ``tau`` ``(k, R, C)`` (float32): ``(R, 1)`` float64 (filter_wise)."""
    x = tau.to(torch.float64)  # (k, R, C): products of float32 entries are exact
    gram = {(i, j): fixed_row_sum(x[i] * x[j]) for i in range(k) for j in range(i, k)}  # (R,) each
    norms = [gram[i, i].clamp(min=0).sqrt() for i in range(k)]
    total = torch.zeros_like(norms[0])
    for i in range(k):
        for j in range(i + 1, k):
            denom = (norms[i] * norms[j]).clamp(min=SINGULAR)
            total += (gram[i, j] / denom).clamp(-1.0, 1.0)
    cos = total / (k * (k - 1) // 2)  # (R,) mean pairwise cosine
    d = 1.0 + (k - 1) * cos
    singular = d.abs() < SINGULAR
    t = torch.where(singular, torch.zeros_like(cos), k * cos / torch.where(singular, torch.ones_like(d), d))
    return t.unsqueeze(-1)


class ModelStockMerge(BlockedMerge):
    """Model Stock over row blocks. One angle per tensor: a statistics pass sums the offsets' Gram matrix over
    the fixed grid (float64, :func:`~mergescale.methods.blocked.gram_sum`; it also leaves τ in place when the
    tensor is one block), then the apply pass adds (t/k)·Σ τᵢ to the base's rows. One angle per row
    (``filter_wise`` on a tensor of ≥ 2 dims): blocks hold whole rows, so the apply pass alone does it, piece by
    piece of rows, each row's sums in an order set by its length alone (:func:`fixed_row_sum`)."""

    def __init__(self, meta: TensorMeta) -> None:
        self.k = meta.k
        shape = meta.shape
        filter_wise = bool(meta.params.get("filter_wise", False))
        self.cols = int(shape[-1]) if filter_wise and len(shape) >= 2 else 0  # row length, 0: per tensor
        self.has_statistics = not self.cols
        self.sums = GridSum(meta.numel, gram_sum, width=self.k * (self.k + 1) // 2) if not self.cols else None
        self.scale: float | None = None  # t/k of the whole tensor
        if self.cols:
            self.rows_per_piece = max(1, _ROWS_BYTES // (8 * self.k * max(1, self.cols)))
            piece = self.rows_per_piece * self.cols
            # the float32 piece, its float64 copy, one product and the halving's first half, the sum
            self.state_bytes = piece * (4 * self.k + 8 * self.k + 8 + 4 + 4)
        else:
            # every model's grid chunk in float32 (carry, piece) and float64 (gram_sum's copy, its products)
            self.state_bytes = self.k * GRID * (4 + 4 + 8 + 8)

    def _step(self, n: int, device: torch.device) -> int:
        return n if device.type != "cpu" else max(1 << 12, _CHUNK_BYTES // (4 * (self.k + 1)))

    def statistics(self, block: Block) -> None:
        assert self.sums is not None
        base = block.flat_base()  # (n,)
        n = base.numel()
        scratch = None if block.materialized else torch.empty((self.k, min(GRID, n)), device=block.device)
        for pos, end in grid_pieces(block):
            tau = block.task_vectors(pos, end, scratch)  # (k, c) τᵢ (in place in a materialized block)
            self.sums.feed(tau, block.offset + pos)

    def end_pass(self) -> bool:
        assert self.sums is not None
        self.scale = interpolation(self.k, self.sums.values) / self.k
        return False

    def apply(self, block: Block) -> torch.Tensor:
        base = block.flat_base()  # (n,) overwritten by the result
        n = base.numel()
        if self.cols:
            step = self.rows_per_piece * self.cols
        else:
            assert self.scale is not None, "statistics pass first"
            step = self._step(n, block.device)
        scratch = None if block.materialized else torch.empty((self.k, min(step, n)), device=block.device)
        total = torch.empty(min(step, n), device=block.device)  # (c,) Σ τᵢ
        for s in range(0, n, step):
            e = min(n, s + step)
            tau = block.task_vectors(s, e, scratch)  # (k, c) τᵢ, or as the statistics pass left them
            acc = torch.add(tau[0], tau[1], out=total[: e - s])
            for i in range(2, self.k):
                acc.add_(tau[i])
            if self.cols:
                rows = (e - s) // self.cols
                scale = (row_interpolation(self.k, tau.view(self.k, rows, self.cols)) / self.k).to(torch.float32)
                acc.view(rows, self.cols).mul_(scale)  # (R, C) · (R, 1)
            else:
                acc.mul_(self.scale)
            base[s:e].add_(acc)  # θ_base + (t/k)·Σ τᵢ
        return block.base  # type: ignore[return-value]


def blocked_model_stock(meta: TensorMeta) -> ModelStockMerge | None:
    return ModelStockMerge(meta) if meta.has_base and meta.k >= 2 and meta.numel > 0 else None


METHOD = MergeMethod(
    name="model_stock",
    fn=model_stock,
    blocked=blocked_model_stock,
    base="required",
    global_params=(ParamSpec("filter_wise", bool, False, doc="one angle per row (last dim) instead of per tensor"),),
    min_models=2,
    reference="https://arxiv.org/abs/2403.19522",
    doc=__doc__ or "",
)
