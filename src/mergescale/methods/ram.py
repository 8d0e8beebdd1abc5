"""RAM and RAM+ (tensor-local): task vectors kept where one model alone changed an entry, averaged where several did.

With τᵢ = θᵢ − θ_base, nᵢ = [|τᵢ| > ε] (the entries model i changed) and c = Σᵢ nᵢ (how many models changed
each entry):

    RAM:   θ = θ_base + Σᵢ τᵢnᵢ·([c = 1] + [c > 1]/c)

RAM+ (``ramplus_tl``) also boosts each model's unique entries by how much it overlaps with the others, per
tensor: ρᵢ = #(nᵢ ∧ [c > 1]) / max(#(nᵢ ∧ [c = 1]), ε), λᵢ = 1 + r·clamp(ρᵢ, 0, α), and

    RAM+:  θ = θ_base + Σᵢ τᵢnᵢ·(λᵢ[c = 1] + [c > 1]/c)

"Reinforced Agent Merging", https://arxiv.org/abs/2601.13572 (as implemented in mergekit 0.1.5,
``merge_methods/ram.py``, whose semantics are matched here: base required; ``epsilon`` (10⁻⁵), and for RAM+
``r`` (0.1) and ``alpha`` (0.2), global; no per-model parameters).
"""

from __future__ import annotations

from functools import partial

import torch

from mergescale.errors import ConfigError
from mergescale.methods.base import MergeMethod, MethodInputs, ParamSpec
from mergescale.methods.blocked import Block, BlockedMerge, TensorMeta, run_in_memory

# Columns per chunk: k rows of float32 and a few temporaries stay in cache.
_CHUNK_BYTES = 8 << 20


def ram(inputs: MethodInputs, *, plus: bool = False) -> torch.Tensor:
    """RAM (or RAM+ with ``plus``) for one tensor, in float32: :class:`RamMerge` on the whole tensor as one
    block (the engine may run it over smaller blocks, with the same result)."""
    name = "ramplus_tl" if plus else "ram"
    if inputs.base is None:
        raise ConfigError(f"{name}: tensor {inputs.name!r}: needs base_model")
    if inputs.k == 0:
        return inputs.base.to(torch.float32)
    return run_in_memory(RamMerge(TensorMeta.of(inputs), plus), inputs)


def blocked_ram(meta: TensorMeta, *, plus: bool = False) -> RamMerge | None:
    return RamMerge(meta, plus) if meta.has_base and meta.k > 0 else None


class RamMerge(BlockedMerge):
    """RAM / RAM+ over row blocks, chunk by chunk of columns (written over the engine-owned base): every entry
    is decided by its own column; RAM+'s per-model counts (integers, exact over blocks) take one statistics
    pass first, which also leaves τ in place when the tensor is one block."""

    def __init__(self, meta: TensorMeta, plus: bool) -> None:
        self.k, self.plus = meta.k, plus
        self.has_statistics = plus
        self.eps = float(meta.params.get("epsilon", 1e-5))
        self.r, self.alpha = float(meta.params.get("r", 0.1)), float(meta.params.get("alpha", 0.2))
        self.shared_n = torch.zeros(meta.k, dtype=torch.int64, device=meta.device)
        self.unique_n = torch.zeros(meta.k, dtype=torch.int64, device=meta.device)
        self.lam: torch.Tensor | None = None
        self.temporaries = 4.0  # a chunk's masks and products, per model, at most a block's worth (planning)

    def _step(self, n: int, device: torch.device) -> int:
        return n if device.type != "cpu" else max(1 << 14, _CHUNK_BYTES // (4 * (self.k + 4)))

    def statistics(self, block: Block) -> None:
        base = block.flat_base()
        n = base.numel()
        step = self._step(n, block.device)
        scratch = None if block.materialized else torch.empty((self.k, min(step, n)), device=block.device)
        for s in range(0, n, step):
            t = block.task_vectors(s, min(n, s + step), scratch)  # (k, c) τᵢ (in place in a materialized block)
            changed = t.abs() > self.eps  # (k, c)
            counts = changed.sum(dim=0, keepdim=True)  # (1, c)
            self.shared_n += (changed & (counts > 1)).sum(dim=1)
            self.unique_n += (changed & (counts == 1)).sum(dim=1)

    def end_pass(self) -> bool:
        rho = self.shared_n / self.unique_n.clamp(min=self.eps)
        self.lam = (1 + self.r * rho.clamp(min=0, max=self.alpha)).unsqueeze(-1)  # (k, 1)
        return False

    def apply(self, block: Block) -> torch.Tensor:
        base = block.flat_base()  # (n,) overwritten by the result
        n = base.numel()
        step = self._step(n, block.device)
        lam = self.lam.to(block.device) if self.lam is not None else None
        scratch = None if block.materialized else torch.empty((self.k, min(step, n)), device=block.device)
        for s in range(0, n, step):
            t = block.task_vectors(s, min(n, s + step), scratch)  # (k, c) τᵢ, or as the statistics pass left them
            changed = t.abs() > self.eps  # (k, c) nᵢ
            counts = changed.sum(dim=0, keepdim=True)  # (1, c)
            overlap, unique = counts > 1, counts == 1
            t.mul_(changed)
            shared = t * overlap / counts.clamp(min=1)
            own = t * unique if lam is None else t * unique * lam
            base[s : s + step].add_((own + shared).sum(dim=0))
        return block.base  # type: ignore[return-value]


_EPS = ParamSpec("epsilon", float, 1e-5, low=0.0, doc="|τ| above which an entry counts as changed")
METHODS = (
    MergeMethod(
        name="ram",
        fn=ram,
        blocked=blocked_ram,
        base="required",
        global_params=(_EPS,),
        min_models=1,
        reference="https://arxiv.org/abs/2601.13572",
        doc=__doc__ or "",
    ),
    MergeMethod(
        name="ramplus_tl",
        fn=partial(ram, plus=True),
        blocked=partial(blocked_ram, plus=True),
        base="required",
        global_params=(
            ParamSpec("r", float, 0.1, doc="strength of the boost of unique entries"),
            ParamSpec("alpha", float, 0.2, doc="cap on the overlap ratio ρ"),
            _EPS,
        ),
        min_models=1,
        reference="https://arxiv.org/abs/2601.13572",
        doc=__doc__ or "",
    ),
)
