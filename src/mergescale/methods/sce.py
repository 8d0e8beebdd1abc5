"""SCE: Select the task-vector entries whose values vary most across models, Calculate a weight per model from
its energy, Erase entries whose sign disagrees with the majority.

With τᵢ = θᵢ − θ_base for the k models:

1. select (``select_topk`` = ρ < 1): σ² = Var_i(τᵢ) entry by entry (population variance); keep the
   ⌊ρ·#{σ² ≠ 0}⌋ entries of largest σ² in every τᵢ, zero the rest;
2. calculate: wᵢ = mean(τᵢ²) / Σⱼ mean(τⱼ²)   (wᵢ = 1/k when that sum is below 10⁻⁶);
3. erase: per entry the majority sign s = sign(Σᵢ τᵢ) (ties → +); eᵢ = [sign(τᵢ) = s];
4. θ = θ_base + Σᵢ wᵢeᵢτᵢ / max(Σᵢ wᵢeᵢ, 10⁻⁶).

Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models", https://arxiv.org/abs/2408.07990.

mergekit 0.1.5 semantics (``merge_methods/sce.py``), matched here: base required; no per-model parameters (no
weights: they come from step 2); ``select_topk`` (1.0) and ``int8_mask`` (false; mergekit's mask dtype, no effect
here) global. Equal variances at the selection threshold are broken by index (mergekit: by ``torch.topk``'s
order), the only place the two can differ beyond float rounding.

The merge runs over row blocks of a tensor (:class:`SceMerge`, :mod:`~mergescale.methods.blocked`), the whole
tensor being one block: σ² is entry by entry; the count of σ² ≠ 0 is an integer and the selection an exact top-k
over blocks (:class:`~mergescale.methods.selection.TopKSearch`), so both are the same whatever the blocks; the
energies are float sums over the fixed grid (:class:`~mergescale.methods.blocked.GridSum`); sign election and
the weighted sum are entry by entry, their sums over the k models taken in model order.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from mergescale.errors import ConfigError
from mergescale.methods.base import MergeMethod, MethodInputs, ParamSpec, TensorMeta
from mergescale.methods.blocked import GRID, Block, BlockedMerge, GridSum, column_ranges, run_in_memory
from mergescale.methods.selection import SWEEP_CHUNK, BlockThreshold, TopKApply, TopKSearch, top_k_mask

ZERO_ENERGY = 1e-6
MIN_DIVISOR = 1e-6


def variance_mask(tau: torch.Tensor, fraction: float) -> torch.Tensor:
    """Float32 mask of τ's entry shape keeping the ⌊fraction·#nonzero⌋ entries of largest variance over models
    (exact selection, :func:`~mergescale.methods.selection.top_k_mask`; equal variances at the threshold: the
    lowest index first, where mergekit's ``topk`` picks any)."""
    var = population_variance(tau)  # (*shape)
    keep = int(int(torch.count_nonzero(var)) * fraction)
    return top_k_mask(var, keep).to(torch.float32)


_VAR_CHUNK = 1 << 16


def population_variance(tau: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.var(tau, dim=0, unbiased=False)`` of ``(k, *shape)``, accumulated in float64 as torch does on the
    CPU, by float64 column chunks: ten times faster than torch's strided reduction here. The sums over the k
    models are taken one model after the other, entry by entry, so every entry's variance is set by its own k
    values alone, whatever the chunk or block it is computed in (``out``: an ``(n,)`` float32 buffer)."""
    k = tau.shape[0]
    flat = tau.reshape(k, -1)  # (k, n)
    n = flat.shape[1]
    out = torch.empty(n, dtype=torch.float32, device=tau.device) if out is None else out[:n]
    for s in range(0, n, _VAR_CHUNK):
        c = flat[:, s : s + _VAR_CHUNK].to(torch.float64)  # (k, c)
        mean = c[0].clone()
        for i in range(1, k):
            mean.add_(c[i])
        mean.div_(k)  # (c,)
        c.sub_(mean).square_()
        acc = c[0]
        for i in range(1, k):
            acc.add_(c[i])
        out[s : s + _VAR_CHUNK] = acc.div_(k)
    return out.view(tau.shape[1:])


def energy_weights(tau: torch.Tensor) -> torch.Tensor:
    """(k,) wᵢ = mean(τᵢ²) / Σⱼ mean(τⱼ²), uniform when the sum is below 10⁻⁶ (sums over the fixed grid)."""
    k = tau.shape[0]
    flat = tau.reshape(k, -1)
    sums = GridSum(flat.shape[1], square_sums, width=k)
    sums.feed(flat, 0)
    return weights_from_square_sums(sums.values, flat.shape[1])


def square_sums(chunk: torch.Tensor) -> list[float]:
    """Σ x² of every row of a ``(k, c)`` chunk, in float32 (torch's cascade summation), as Python floats."""
    return chunk.square().sum(dim=-1).tolist()


def weights_from_square_sums(sums: list[float], n: int) -> torch.Tensor:
    """(k,) float32 wᵢ = mean(τᵢ²) / Σⱼ mean(τⱼ²) from Σ τᵢ² over the n entries (float64 arithmetic)."""
    energy = [s / n for s in sums] if n else [0.0] * len(sums)
    total = sum(energy)
    if abs(total) < ZERO_ENERGY:
        return torch.full((len(sums),), 1.0 / len(sums), dtype=torch.float32)
    return torch.tensor([e / total for e in energy], dtype=torch.float32)


def sce(inputs: MethodInputs) -> torch.Tensor:
    """SCE for one tensor, in float32: :class:`SceMerge` on the whole tensor as one block (the engine may run it
    over smaller blocks, with the same result), written over the engine-owned base."""
    if inputs.base is None:
        raise ConfigError(f"sce: tensor {inputs.name!r}: needs base_model")
    if inputs.k == 0 or inputs.base.numel() == 0:
        return inputs.base.to(torch.float32)
    return run_in_memory(SceMerge(TensorMeta.of(inputs)), inputs)


def blocked_sce(meta: TensorMeta) -> SceMerge | None:
    return SceMerge(meta) if meta.has_base and meta.k > 0 and meta.numel > 0 else None


# Columns per chunk of the combination: k rows of float32 and a few temporaries stay in cache.
_CHUNK_BYTES = 8 << 20

_COUNT, _SELECT, _ENERGY, _DONE = "count", "select", "energy", "done"


class SceMerge(BlockedMerge):
    """SCE over row blocks. Statistics passes, each over every block in order:

    1. ``count`` (ρ < 1): σ² entry by entry, the number of σ² ≠ 0 (an integer), hence k = ⌊ρ·count⌋;
    2. ``select`` (0 < k): σ² fed to :class:`~mergescale.methods.selection.TopKSearch` (its band from the
       fixed sample read before the first pass; a band that missed takes two more passes);
    3. ``energy``: τᵢ masked by the selection (:class:`~mergescale.methods.selection.TopKApply` on σ², which
       zeroes what is not in the top k: the top k all have σ² > 0), Σ τᵢ² over the fixed grid;

    then the apply pass recomputes the masked τᵢ per chunk (σ² and the mask again) and combines them. On a tensor
    that is one materialized block (the whole-tensor function) τ is computed in place once, σ² kept from the
    count pass and the masked τ from the energy pass, so each is computed once, as the whole-tensor code did.
    """

    has_statistics = True
    fused_loops = True  # TopKSearch's band sweep

    def __init__(self, meta: TensorMeta) -> None:
        self.k, self.n = k, n = meta.k, meta.numel
        self.fraction = float(meta.params.get("select_topk", 1.0))
        self.select = 0.0 < self.fraction < 1.0
        self.nothing = self.fraction <= 0.0  # every τ zeroed (also when the count leaves nothing to keep)
        self.phase = _COUNT if self.select else _ENERGY
        self.count = 0
        self.threshold: BlockThreshold | None = None
        self.search: TopKSearch | None = None
        self.energy = GridSum(n, square_sums, width=k)
        self.weights: torch.Tensor | None = None  # (k,) float32
        self._var: torch.Tensor | None = None  # (n,) σ² of a tensor that is one materialized block
        self._sample: torch.Tensor | None = None  # (S,) σ² at the selection's sample positions
        self._positions: torch.Tensor | None = None
        self._mask: TopKApply | None = None  # the selection, applied to σ² chunk by chunk in flat order
        if self.select and n >= 2:
            self._positions = TopKSearch(n, [1]).sample_positions()  # a function of n alone (no sums asked for)
        # the selection's candidates (~2 % of the entries), its sample, the energies' carry chunk
        self.state_bytes = int(n * 4 * 0.025) + (4 * self._positions.numel() if self._positions is not None else 0)
        self.state_bytes += k * min(GRID, n) * 4 * 2
        # up to three statistics passes and the apply: each block's rows are converted to float32 once, and a
        # tensor that fits one block is read and converted once for all of them (lazily, every pass converted
        # every input again: the 268M benchmark took 24.4 s against 18.5 s with whole stacks); σ² of the block
        # is kept between the passes of a single block
        self.materialize = True
        self.temporaries = 1.0

    # -- statistics ----------------------------------------------------------------------------------------------
    def sample_positions(self) -> torch.Tensor | None:
        return self._positions

    def take_sample(self, tensors: torch.Tensor, base: torch.Tensor | None) -> None:
        assert base is not None
        self._sample = population_variance(tensors - base)  # (S,) σ², entry by entry as the sweep computes it

    def _whole(self, block: Block) -> bool:
        """The tensor is this one materialized block, handed again to every pass (τ and σ² can stay)."""
        return block.materialized and block.offset == 0 and block.numel == self.n

    def _taus(self, block: Block, lo: int, hi: int, step: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(s, e, τ)`` for the block's flat ``[lo, hi)`` in pieces of at most ``step`` ending on the grid of that
        size: τ ``(k, e − s)`` float32 (computed in place on a fresh materialized block; in a scratch buffer from
        a lazy one; as left by an earlier pass otherwise)."""
        scratch = None if block.materialized else torch.empty((self.k, min(step, hi - lo)), device=block.device)
        s = lo
        while s < hi:
            g = block.offset + s
            e = min(hi, s + step - g % step)
            tau = block.task_vectors(s, e, scratch)  # (k, c) a view of a materialized block, or converted
            yield s, e, tau
            s = e

    def statistics(self, block: Block) -> None:
        if self.phase == _COUNT:
            self._count(block)
        elif self.phase == _SELECT:
            self._feed(block)
        else:
            self._energy(block)

    def _count(self, block: Block) -> None:
        n = block.numel
        if self._whole(block):
            self._var = torch.empty(n, dtype=torch.float32, device=block.device)
        ranges = column_ranges(n, block.workers, block.offset, [])
        counts = [0] * len(ranges)

        def count(j: int) -> None:
            lo, hi = ranges[j]
            buf = torch.empty(min(SWEEP_CHUNK, hi - lo), dtype=torch.float32, device=block.device)
            for s, e, tau in self._taus(block, lo, hi, SWEEP_CHUNK):
                var = population_variance(tau, self._var[s:e] if self._var is not None else buf)
                counts[j] += int(torch.count_nonzero(var))

        block.run(count, len(ranges))
        self.count += sum(counts)

    def _variances(self, block: Block, lo: int, hi: int, step: int) -> Iterator[tuple[int, int, torch.Tensor,
                                                                                       torch.Tensor]]:
        """``(s, e, τ, σ²)`` over the block's ``[lo, hi)``: σ² of the whole tensor's cache, or computed."""
        buf = None if self._var is not None else torch.empty(min(step, hi - lo), device=block.device)
        for s, e, tau in self._taus(block, lo, hi, step):
            var = self._var[s:e] if self._var is not None else population_variance(tau, buf)
            yield s, e, tau, var

    def _feed(self, block: Block) -> None:
        assert self.search is not None
        for s, _, _, var in self._variances(block, 0, block.numel, SWEEP_CHUNK):
            self.search.feed(var, block.offset + s)

    def _energy(self, block: Block) -> None:
        if self.threshold is not None and block.offset == 0:  # walk the equal entries from the beginning
            self._mask = TopKApply(self.threshold)
        for s, _, tau, var in self._variances(block, 0, block.numel, GRID):
            self._select_(tau, var, block.offset + s)
            self.energy.feed(tau, block.offset + s)
        self._var = None  # a whole tensor's masked τ stays in place for the apply pass

    def _select_(self, tau: torch.Tensor, var: torch.Tensor, start: int) -> None:
        """Zero, in place, the entries of τ ``(k, c)`` not selected (σ² of the chunk, at flat ``start``)."""
        if self.nothing:
            tau.zero_()
        elif self._mask is not None:
            self._mask.keep_(var, start)  # σ² of what is not in the top k zeroed (the top k have σ² > 0)
            tau.mul_(var != 0)

    def end_pass(self) -> bool:
        if self.phase == _COUNT:
            keep = int(self.count * self.fraction)
            if keep <= 0:
                self.nothing = True
                self.phase = _ENERGY
                return True
            self.search = TopKSearch(self.n, [keep])
            positions = self.search.sample_positions()
            if positions is not None:
                assert self._sample is not None and torch.equal(positions, self._positions)
                self.search.take_sample(self._sample)
            self._sample = None
            self.phase = _SELECT
            return True
        if self.phase == _SELECT:
            assert self.search is not None
            if not self.search.resolve():
                return True  # the band missed: more passes (a histogram, then the band again)
            (self.threshold,) = self.search.thresholds
            self.search = None
            self.phase = _ENERGY
            return True
        self.weights = weights_from_square_sums(self.energy.values, self.n)
        self.phase = _DONE
        return False

    # -- apply ---------------------------------------------------------------------------------------------------
    def apply(self, block: Block) -> torch.Tensor:
        assert self.weights is not None, "statistics passes first"
        k, n = self.k, block.numel
        base = block.flat_base()  # (n,) θ_base, overwritten by the result
        w = self.weights.tolist()  # float32 values: wᵢ·eᵢ is exactly wᵢ or 0
        masked = not block.fresh  # τ left masked in place by the energy pass
        if self.threshold is not None and block.offset == 0 and not masked:
            self._mask = TopKApply(self.threshold)
        step = n if block.device.type != "cpu" else max(1 << 14, _CHUNK_BYTES // (4 * (k + 4)))
        cuts = [self.threshold.cut[:2]] if self.threshold is not None and self.threshold.cut is not None else []
        ranges = column_ranges(n, block.workers, block.offset, cuts)

        def combine(j: int) -> None:
            lo, hi = ranges[j]
            buf = None if masked or self.threshold is None else torch.empty(min(step, hi - lo), device=block.device)
            for s, e, tau in self._taus(block, lo, hi, step):
                if not masked:
                    var = population_variance(tau, buf) if self._mask is not None and not self.nothing else tau[0]
                    self._select_(tau, var, block.offset + s)
                _combine(tau, w, base[s:e])

        block.run(combine, len(ranges))
        return block.base  # type: ignore[return-value]


def _combine(tau: torch.Tensor, w: list[float], out: torch.Tensor) -> None:
    """out += Σᵢ wᵢeᵢτᵢ / max(Σᵢ wᵢeᵢ, 10⁻⁶) for a chunk ``(k, c)`` of the τᵢ, eᵢ = [sign(τᵢ) = sign(Σⱼ τⱼ)]
    (ties → +); every sum over the models taken in model order, entry by entry."""
    k = tau.shape[0]
    total = tau[0].clone()
    for i in range(1, k):
        total.add_(tau[i])
    majority = total.ge_(0).mul_(2).sub_(1)  # (c,) ±1, ties +
    merged = torch.zeros_like(majority)
    divisor = torch.zeros_like(majority)
    for i in range(k):
        erased = (tau[i].sign() == majority).to(torch.float32).mul_(w[i])  # (c,) wᵢ·eᵢ
        merged.add_(tau[i] * erased)
        divisor.add_(erased)
    out.add_(merged.div_(divisor.clamp_(min=MIN_DIVISOR)))


METHOD = MergeMethod(
    name="sce",
    fn=sce,
    blocked=blocked_sce,
    base="required",
    global_params=(
        ParamSpec("select_topk", float, 1.0, doc="fraction of entries (by variance across models) kept"),
        ParamSpec("int8_mask", bool, False, doc="mergekit's mask dtype; no effect here"),
    ),
    min_models=1,
    reference="https://arxiv.org/abs/2408.07990",
    doc=__doc__ or "",
)
