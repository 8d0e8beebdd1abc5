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

The merge runs over row blocks of a tensor (:class:`ArceeFusionMerge`, :mod:`~mergescale.methods.blocked`), the
whole tensor being one block: a block holds whole rows of the last dimension (a 1-D tensor is one block), so each
row's KL is computed within one block, always on at least two rows at once (a reduction over a single row may be
split between threads, which sums it in another order); s is entry by entry given its row's KL; the quartiles
are exact order statistics over blocks (:class:`~mergescale.methods.selection.TopKSearch`).
"""

from __future__ import annotations

import math

import torch

from mergescale.errors import ConfigError
from mergescale.methods.base import MergeMethod, MethodInputs, TensorMeta
from mergescale.methods.blocked import Block, BlockedMerge, run_in_memory
from mergescale.methods.selection import TopKSearch, top_k_thresholds_

PROB_EPS = 1e-8
QUANTILES = (0.25, 0.5, 0.75)


_ROW_BYTES = 4 << 20  # rows per chunk of the importance: the chunk's temporaries stay in cache


def row_divergence(t: torch.Tensor, b: torch.Tensor, *, lone: bool = False) -> torch.Tensor:
    """KL(softmax(t) ‖ softmax(b)) of each row of ``(r, C)`` float32 rows (+10⁻⁸ on both), ``(r, 1)``.

    A single row is reduced as one of two (the row twice), unless ``lone`` (the tensor's only row): torch splits
    a long reduction between threads when it has one output, and the same row must give the same bits in
    chunks of any number of rows."""
    if t.shape[0] == 1 and not lone:
        return row_divergence(t.expand(2, -1).contiguous(), b.expand(2, -1).contiguous())[:1]
    p = torch.softmax(t, dim=-1).add_(PROB_EPS)  # (r, C)
    q = torch.softmax(b, dim=-1).add_(PROB_EPS)
    return torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)  # (r, 1)


def _rows_per_chunk(cols: int) -> int:
    return max(2, _ROW_BYTES // (4 * cols or 1))


def importance(theta: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|θ − θ_base| · KL(softmax(θ) ‖ softmax(θ_base)) per row (last dim), float32 of θ's shape."""
    t2 = theta.reshape(-1, theta.shape[-1]) if theta.dim() else theta.reshape(1, 1)  # (R, C)
    b2 = base.reshape(t2.shape)
    out = torch.empty_like(t2)
    rows = _rows_per_chunk(t2.shape[1])
    for s in range(0, t2.shape[0], rows):
        t, b = t2[s : s + rows], b2[s : s + rows]
        kl = row_divergence(t, b, lone=t2.shape[0] == 1)  # (r, 1)
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


def quartile_indices(n: int) -> list[int]:
    """⌊q·(n − 1)⌋ for the three quartiles, in float32 arithmetic as mergekit's ``(q * (n - 1)).long()``."""
    return (torch.tensor(QUANTILES, dtype=torch.float32) * (n - 1)).long().tolist()


def fence(q1: float, q2: float, q3: float) -> torch.Tensor:
    """Q₂ + 1.5·(Q₃ − Q₁) in float32 (0-dim)."""
    a, b, c = (torch.tensor(v, dtype=torch.float32) for v in (q1, q2, q3))
    return b + 1.5 * (c - a)


def upper_fence(scores: torch.Tensor) -> torch.Tensor:
    """Q₂ + 1.5·(Q₃ − Q₁) of all entries, quartiles as sorted-entry lookups (0-dim float32)."""
    flat = scores.reshape(-1)
    return fence(*sorted_entries(flat, quartile_indices(flat.numel())))


def arcee_fusion(inputs: MethodInputs) -> torch.Tensor:
    """θ_base + δ·[importance ≥ upper fence], in float32: :class:`ArceeFusionMerge` on the whole tensor as one
    block (the engine may run it over smaller blocks, with the same result)."""
    if inputs.base is None or inputs.k != 1:
        raise ConfigError(f"arcee_fusion: tensor {inputs.name!r}: needs base_model and exactly one other model")
    if inputs.base.numel() == 0:
        return inputs.base.to(torch.float32)
    return run_in_memory(ArceeFusionMerge(TensorMeta.of(inputs)), inputs)


def blocked_arcee_fusion(meta: TensorMeta) -> ArceeFusionMerge | None:
    return ArceeFusionMerge(meta) if meta.has_base and meta.k == 1 and meta.numel > 0 else None


class ArceeFusionMerge(BlockedMerge):
    """Arcee Fusion over row blocks (blocks of whole rows of the last dimension; a 1-D tensor is one block).

    1. first statistics pass: every row's KL (kept: one float per row); on a tensor of up to 2¹⁶ entries the
       scores s also go straight to the exact selection of the quartiles (:class:`TopKSearch`, which takes every
       entry as a candidate there, and min(s) for the quartile at index 0 of tensors of up to 4 entries);
    2. otherwise the selection's band comes from s at its fixed sample (the entries read before the first pass
       and their rows' KL), and a second pass feeds s (a band that missed takes two more);
    3. the apply pass: θ_base + δ·[s ≥ fence], s from the rows' KL again.

    On a tensor that is one materialized block s is kept from the first pass (as the whole-tensor code did)."""

    has_statistics = True
    fused_loops = True  # TopKSearch's band sweep

    def __init__(self, meta: TensorMeta) -> None:
        shape = meta.shape
        self.n = n = meta.numel
        self.cols = int(shape[-1]) if shape else 1
        self.lines = n // self.cols  # rows of the last dimension
        if len(shape) <= 1:
            self.row_multiple = max(1, meta.rows)  # one row: one block
        self.kl = torch.empty(self.lines, dtype=torch.float32, device=meta.device)  # (lines,) each row's KL
        self.ranks = [n - i for i in quartile_indices(n)]  # the i-th smallest is the (n − i)-th largest
        self.inner = sorted({k for k in self.ranks if 0 < k < n})
        self.search = TopKSearch(n, self.inner) if self.inner else None
        self._positions = self.search.sample_positions() if self.search is not None else None
        self._sampled: tuple[torch.Tensor, torch.Tensor] | None = None  # θ₁ and θ_base at the sample positions
        self.first = True  # the first pass: the rows' KL
        self.feeding = self._positions is None  # the first pass also feeds s to the selection
        self.low = math.inf  # min(s): the quartile at index 0 (n ≤ 4)
        self.fence: torch.Tensor | None = None
        self._scores: torch.Tensor | None = None  # (n,) s of a tensor that is one materialized block
        # the rows' KL, the selection's candidates (~2 % of the entries) and sample (θ₁, θ_base, s)
        self.state_bytes = 4 * self.lines + int(n * 4 * 0.025)
        self.state_bytes += 12 * (self._positions.numel() if self._positions is not None else 0)
        self.temporaries = 0.0  # rows are scored in chunks of ~4 MiB

    def sample_positions(self) -> torch.Tensor | None:
        return self._positions

    def take_sample(self, tensors: torch.Tensor, base: torch.Tensor | None) -> None:
        assert base is not None
        self._sampled = (tensors[0].clone(), base.clone())

    def _chunks(self, block: Block) -> list[tuple[int, int]]:
        """The block's flat ``[lo, hi)`` chunks of whole rows (at least two rows where the block has them)."""
        step = _rows_per_chunk(self.cols) * self.cols
        return [(lo, min(block.numel, lo + step)) for lo in range(0, block.numel, step)]

    def _rows(self, block: Block, lo: int, hi: int, buf: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor]:  # fmt: skip
        """θ₁ and θ_base of the block's flat ``[lo, hi)`` (whole rows) as ``(r, C)``, and their rows' KL ``(r, 1)``
        (a view of the kept KL): θ₁ a view of a materialized block, else converted into ``buf``."""
        theta = block.piece(0, lo, hi, buf).view(-1, self.cols)
        line = (block.offset + lo) // self.cols
        return theta, block.flat_base()[lo:hi].view(-1, self.cols), self.kl[line : line + theta.shape[0]].view(-1, 1)

    def _divergence(self, block: Block, lo: int, hi: int, buf: torch.Tensor | None) -> tuple[torch.Tensor,
                                                                                           torch.Tensor, torch.Tensor]:  # fmt: skip
        theta, base, kl = self._rows(block, lo, hi, buf)
        kl.copy_(row_divergence(theta, base, lone=self.lines == 1))
        return theta, base, kl

    @staticmethod
    def _score(theta: torch.Tensor, base: torch.Tensor, kl: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """s = |θ₁ − θ_base|·KL of ``(r, C)`` rows into the flat ``out`` (may be θ₁'s own buffer): flat ``(r·C,)``."""
        return torch.sub(theta, base, out=out[: theta.numel()].view_as(theta)).abs_().mul_(kl).view(-1)

    def statistics(self, block: Block) -> None:
        chunks = self._chunks(block)
        if self.first and block.materialized and block.offset == 0 and block.numel == self.n:
            self._scores = torch.empty(self.n, dtype=torch.float32, device=block.device)  # kept for every pass
        if self.first and (self._scores is not None or not self.feeding):
            # rows are independent: the threads share them (KL, and a whole tensor's s, kept)
            def divergence(j: int) -> None:
                lo, hi = chunks[j]
                buf = None if block.materialized else torch.empty(hi - lo, device=block.device)
                theta, base, kl = self._divergence(block, lo, hi, buf)
                if self._scores is not None:
                    self._score(theta, base, kl, self._scores[lo:hi])

            block.run(divergence, len(chunks))
            if not self.feeding:
                return
        if self.search is None and self.n not in self.ranks:
            return
        if self._scores is not None:  # the whole tensor: s kept
            self._feed(self._scores, 0)
            return
        step = chunks[0][1] if chunks else 0
        buf = None if block.materialized else torch.empty(step, device=block.device)  # θ₁ converted, then s
        out = torch.empty(step, device=block.device) if block.materialized else buf
        assert out is not None
        for lo, hi in chunks:
            rows = self._divergence(block, lo, hi, buf) if self.first else self._rows(block, lo, hi, buf)
            self._feed(self._score(*rows, out), block.offset + lo)

    def _feed(self, s: torch.Tensor, offset: int) -> None:
        if self.search is not None:
            self.search.feed(s, offset)
        if self.n in self.ranks:
            self.low = min(self.low, float(s.min()))

    def end_pass(self) -> bool:
        first, self.first = self.first, False
        if first and not self.feeding:
            assert self.search is not None and self._sampled is not None and self._positions is not None
            theta, base = self._sampled
            kl = self.kl[self._positions.to(self.kl.device) // self.cols]  # (S,) each entry's row KL
            self.search.take_sample(torch.sub(theta, base).abs_().mul_(kl))  # s at the sample, as the sweep has it
            self._sampled = None
            return True
        if self.search is not None and not self.search.resolve():
            return True  # the band missed: more passes (a histogram, then the band again)
        found = dict(zip(self.inner, (t.value for t in self.search.thresholds), strict=True)) if self.search else {}
        q1, q2, q3 = (found.get(k, self.low) for k in self.ranks)
        self.fence = fence(q1, q2, q3)
        self.search = None
        return False

    def apply(self, block: Block) -> torch.Tensor:
        assert self.fence is not None, "statistics passes first"
        chunks = self._chunks(block)
        base = block.flat_base()  # (n,) overwritten by the result

        def merge(j: int) -> None:
            lo, hi = chunks[j]
            buf = None if block.materialized else torch.empty(hi - lo, device=block.device)
            theta, b, kl = self._rows(block, lo, hi, buf)
            if self._scores is not None:
                s = self._scores[lo:hi]
            else:
                s = self._score(theta, b, kl, torch.empty(hi - lo, device=block.device))
            keep = s >= self.fence  # (c,) bool
            delta = theta.view(-1).sub_(base[lo:hi]).mul_(keep)
            base[lo:hi].add_(delta)

        block.run(merge, len(chunks))
        return block.base  # type: ignore[return-value]


METHOD = MergeMethod(
    name="arcee_fusion",
    fn=arcee_fusion,
    blocked=blocked_arcee_fusion,
    base="required",
    min_models=1,
    max_models=1,
    reference="https://arcee.ai",
    doc=__doc__ or "",
)
