"""Sparsification of one task vector τ = θ − θ_base: the first step of the task-arithmetic family.

Four ways, with mergekit 0.1.5's semantics (``mergekit/sparsify.py``), n = entries of the tensor (per tensor):

- ``magnitude`` (TIES, https://arxiv.org/abs/2306.01708): keep the k = max(1, ⌊density·n⌋) entries of largest
  |τ|, zero the rest. Exact, ties broken as in :mod:`mergescale.methods.selection`.
- ``magnitude_outliers`` (Model Breadcrumbs, https://arxiv.org/abs/2312.06795): drop the n_top = ⌊γ·n⌋ largest
  and the smallest, keeping target = ⌊density·n⌋ entries: ascending ranks [n_bot, n_bot + target) with
  n_bot = max(0, n − target − n_top) (so fewer than n_top are dropped when density + γ > 1, as in mergekit).
- ``random`` (DARE, https://arxiv.org/abs/2311.03099): drop each entry independently with probability
  1 − density; the mask comes from the model's seeded generator (:mod:`mergescale.methods.random_masks`).
- ``della_magprune`` (DELLA, https://arxiv.org/abs/2406.11617): drop with a probability that falls with the
  entry's magnitude rank in its row: keep probability (density − ε) + 2ε·r/(C − 1), r = 0 for the smallest of the
  C entries of the row (dim 1; a 1-D tensor is one row; equal magnitudes ranked by index; one column: r/(C−1)
  taken as 0, where mergekit would fail on 0/0).

``density >= 1`` leaves τ untouched (no rescaling either), exactly like mergekit.

Rescaling (``rescale``): mergekit rescales the kept entries so the L1 norm of τ is unchanged,
τ' ← τ'·‖τ‖₁/‖τ'‖₁ (skipped when either norm is below 1e-7). The DARE paper instead divides by the keep
probability, τ' ← τ'/density; ``rescale_by_density`` selects that (our extension, random methods only).

Work is split so the caller can stream, over row blocks of the tensor (:mod:`mergescale.methods.blocked`) or
the whole tensor as one block: :func:`sparsifier` gives a model's :class:`Sparsifier`, whose statistics pass
turns θ into τ in place and gathers what the decision needs (exact thresholds by :class:`TopKSearch`, the
random mask's first bytes in flat order, L1 sums over the fixed grid), whose ``prepare`` makes a block's τ', and
whose ``apply_`` zeroes the dropped entries of each chunk while the caller combines the models chunk by chunk;
its ``scale`` is the rescale factor the caller folds into the model's weight. The result does not depend on the
blocks: thresholds and masks are exact functions of the whole tensor and its seed, sums are taken over the grid.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from mergescale.errors import ConfigError
from mergescale.methods import kernels
from mergescale.methods.blocked import AbsSum, Block, GridSum, grid_pieces
from mergescale.methods.random_masks import ByteStream, LazyBernoulli, pack_bits, uniform, unpack_bits
from mergescale.methods.selection import (
    SWEEP_CHUNK,
    BlockThreshold,
    TopKApply,
    TopKSearch,
    nonzero_bytes,
    round8,
)

Sparsification = Literal["magnitude", "magnitude_outliers", "random", "della_magprune"]
RANDOM: tuple[Sparsification, ...] = ("random", "della_magprune")

_RESCALE_EPS = 1e-7  # mergekit's threshold below which a norm is treated as zero and no rescale happens


def _l1_factor(before: float, after: float) -> float:
    """‖τ‖₁ / ‖τ'‖₁ as mergekit computes it, 1 when either is (near) zero."""
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return 1.0
    return before / after


def check_della_range(density: float, epsilon: float, where: str) -> None:
    """DELLA's keep probabilities span density ± epsilon: the range must lie inside (0, 1). A density of 1 keeps
    everything and draws no probabilities, so it is not checked."""
    if density < 1.0 and (density + epsilon >= 1.0 or density - epsilon <= 0.0):
        raise ConfigError(
            f"{where}: della needs density ± epsilon inside (0, 1), got density={density:g}, epsilon={epsilon:g}"
        )


def _della_keep_mask(
    tau: torch.Tensor, density: float, epsilon: float, generator: torch.Generator, where: str
) -> torch.Tensor:
    """DELLA's MagPrune keep mask: keep probability grows linearly with the magnitude rank within each row."""
    check_della_range(density, epsilon, where)
    rows = tau if tau.dim() >= 2 else tau.reshape(1, -1)  # (R, C, ...) ranks are taken along dim 1
    cols = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)  # (R, C, ...) ascending magnitude
    rank = torch.empty_like(order)
    src = torch.arange(cols, device=tau.device).view(1, cols, *([1] * (rows.dim() - 2))).expand_as(order)
    rank.scatter_(1, order, src)  # (R, C, ...) rank 0 = smallest in its row
    del order
    probs = rank.to(torch.float32).div_(max(cols - 1, 1)).mul_(2.0 * epsilon).add_(density - epsilon)
    u = uniform(rows.shape, generator, device=tau.device)  # (R, C, ...)
    return (u < probs).view(tau.shape)


# ---------------------------------------------------------------------------------------------------------------
# the same sparsifications over blocks (blocked merging: :mod:`mergescale.methods.blocked`)
# ---------------------------------------------------------------------------------------------------------------
class Sparsifier:
    """What survives of one model's τ = θ − θ_base, decided over blocks that come in flat order.

    ``statistics(block, i)`` gathers what the decision needs from model ``i``'s rows of a materialized block
    (also leaving τ there in place); rows as read come instead piece by piece through ``feed`` while
    ``sweeping`` (:meth:`~.task_arithmetic.TaskVectorMerge.statistics`). ``end_pass()`` decides (True: another pass). For combining,
    ``prepare(block, i)`` is called once per block, then ``apply_(xc, bc, start)`` on each chunk of the block in
    flat order (``xc`` the model's chunk as in the block, ``bc`` the base's): the chunk becomes τ' (τ computed
    there when the block is fresh, so the block is swept once), its dropped entries zeroed. ``scale`` is the
    rescale factor. The identity (density 1) only computes τ.
    """

    scale: float = 1.0
    has_statistics = False
    fresh = True  # the block being combined holds θ (τ is computed chunk by chunk)

    def sample_positions(self) -> torch.Tensor | None:
        return None

    def take_sample(self, tau: torch.Tensor) -> None:
        pass

    def statistics(self, block: Block, i: int) -> None:
        if block.materialized and block.fresh:  # τ in place, for the apply pass of this same block
            block.model(i).sub_(block.flat_base())

    @property
    def sweeping(self) -> bool:
        """Whether this pass needs the model's entries piece by piece through :meth:`feed` (any block as read)."""
        return False

    def feed(self, xc: torch.Tensor, bp: torch.Tensor, g: int) -> None:
        """The model's flat entries ``[g, g + c)`` of a block as read (float32, in flat order after the previous
        piece; the caller's scratch) and the base's ``bp``: what :meth:`statistics` does piece by piece."""
        raise NotImplementedError

    def end_pass(self) -> bool:
        return False

    def prepare(self, block: Block, i: int) -> None:
        self.fresh = block.fresh

    def apply_(self, xc: torch.Tensor, bc: torch.Tensor, start: int) -> None:
        if self.fresh:
            xc.sub_(bc)

    def cuts(self) -> list[tuple[int, int]]:
        """Flat ranges ``apply_`` must walk in order in one thread (see :class:`TopKApply`)."""
        return []


class _Nothing(Sparsifier):
    """``magnitude_outliers`` keeping ⌊density·n⌋ = 0 entries: τ' = 0."""

    def apply_(self, xc: torch.Tensor, bc: torch.Tensor, start: int) -> None:
        xc.zero_()


class _Magnitude(Sparsifier):
    """``magnitude`` and ``magnitude_outliers``: exact top-k thresholds by :class:`TopKSearch`, applied chunk by
    chunk (keep the top ``keep``, then drop the top ``drop``)."""

    has_statistics = True

    def __init__(self, n: int, keep_k: int | None, drop_k: int | None, rescale: bool, outliers: bool) -> None:
        self.keep_k, self.drop_k, self.rescale, self.outliers = keep_k, drop_k, rescale, outliers
        self.search = TopKSearch(n, [k for k in (keep_k, drop_k) if k is not None], with_sums=rescale)
        self.keep: TopKApply | None = None
        self.drop: TopKApply | None = None
        self._keep_t: BlockThreshold | None = None
        self._drop_t: BlockThreshold | None = None

    def sample_positions(self) -> torch.Tensor | None:
        return self.search.sample_positions()

    def take_sample(self, tau: torch.Tensor) -> None:
        self.search.take_sample(tau)

    @property
    def sweeping(self) -> bool:
        return not self.search.finished  # finished: another model asked for one more pass

    def statistics(self, block: Block, i: int) -> None:
        if self.search.finished:
            return super().statistics(block, i)
        base = block.flat_base()
        for lo, hi in grid_pieces(block):  # a materialized block: views of its rows
            self.search.feed(block.piece(i, lo, hi), block.offset + lo, subtract=base[lo:hi] if block.fresh else None)

    def feed(self, xc: torch.Tensor, bp: torch.Tensor, g: int) -> None:
        self.search.feed(xc, g, subtract=bp)

    def end_pass(self) -> bool:
        if self.search.finished:
            return False
        if not self.search.resolve():
            return True
        found = dict(zip([k for k in (self.keep_k, self.drop_k) if k is not None], self.search.thresholds,
                         strict=True))  # fmt: skip
        self._keep_t = found.get(self.keep_k) if self.keep_k is not None else None
        self._drop_t = found.get(self.drop_k) if self.drop_k is not None else None
        if self.rescale:
            before = self.search.total
            if self.outliers:
                kept = (self._keep_t.top_sum if self._keep_t else before) - (self._drop_t.top_sum if self._drop_t else 0.0)
            else:
                assert self._keep_t is not None
                kept = self._keep_t.top_sum
            self.scale = _l1_factor(before, kept)
        return False

    def prepare(self, block: Block, i: int) -> None:
        self.fresh = block.fresh
        if block.offset == 0:  # the apply pass starts: walk the equal entries from the beginning
            self.keep = TopKApply(self._keep_t) if self._keep_t is not None else None
            self.drop = TopKApply(self._drop_t) if self._drop_t is not None else None

    def cuts(self) -> list[tuple[int, int]]:
        return [t.cut[:2] for t in (self._keep_t, self._drop_t) if t is not None and t.cut is not None]

    def apply_(self, xc: torch.Tensor, bc: torch.Tensor, start: int) -> None:
        if self.fresh:
            xc.sub_(bc)
        if self.keep is not None:
            self.keep.keep_(xc, start)
        if self.drop is not None:
            self.drop.drop_(xc, start)


class _Dare(Sparsifier):
    """``random``: keep ~ Bernoulli(density), the draw of :func:`~.random_masks.bernoulli_mask` taken block
    by block.

    The statistics pass takes the first bytes in flat order (:class:`ByteStream`), gathers the L1 sums over the
    grid (τ before and after the first byte's test) and the undecided entries, and keeps the first byte's
    verdicts packed 8 to a byte (n/8 bytes: a 32nd of the model's float32 tensor; not for a tensor that is one
    materialized block, whose τ' stays in place); then the undecided ones are resolved from the generator, as
    the whole-tensor draw does. The apply pass of a fresh block unpacks the verdicts, and the kept undecided
    entries get their τ back. Blocks start at multiples of 8 entries (``row_multiple``), so each is packed alone.
    """

    has_statistics = True

    def __init__(self, n: int, density: float, generator: torch.Generator, rescale: bool, by_density: bool) -> None:
        self.n, self.density, self.rescale, self.by_density = n, density, rescale, by_density
        self.l1 = rescale and not by_density
        self.draw = LazyBernoulli(n, density, generator, draw=False)
        self.stream = ByteStream(generator)
        self.bits: torch.Tensor | None = None  # (⌈n/8⌉,) uint8: the first byte's keep verdicts, packed
        self.before = GridSum(n, AbsSum())
        self.after = GridSum(n, AbsSum())
        # the undecided entries (~1/256 of them): their positions and τ, appended piece by piece into buffers
        # that grow by doubling (small tensors kept per piece among the pieces' temporaries fragmented the heap)
        self.tied = _Appender(n // 200 + 1024)
        self.kept_pos = torch.empty(0, dtype=torch.int64)
        self.kept_val = torch.empty(0)
        self.done = False
        self._buffers: _DareScratch | None = None

    @property
    def sweeping(self) -> bool:
        return not self.done

    def statistics(self, block: Block, i: int) -> None:
        if self.done:
            return super().statistics(block, i)
        base = block.flat_base()
        whole = block.offset == 0 and block.numel == self.n  # the tensor's one block: τ' stays in place
        for lo, hi in grid_pieces(block):  # a materialized block: views of its rows
            self.feed(block.piece(i, lo, hi), base[lo:hi], block.offset + lo, packed=not whole)

    def _scratch(self, device: torch.device) -> _DareScratch:
        if self._buffers is None or self._buffers.keep.device != device:
            self._buffers = _DareScratch(min(SWEEP_CHUNK, self.n), device)
        return self._buffers

    def feed(self, xc: torch.Tensor, bp: torch.Tensor, g: int, packed: bool = True) -> None:
        """The flat entries ``[g, g + c)`` (in flat order after the previous piece): ``xc`` becomes τ' (the first
        byte's verdicts applied), ``bp`` the base's entries. ``packed``: keep the verdicts (every block but a
        tensor that is one materialized block)."""
        c = xc.numel()
        buf = self._scratch(xc.device)
        if packed and self.bits is None:
            self.bits = torch.empty((self.n + 7) // 8, dtype=torch.uint8, device=xc.device)
        bits = self.bits[g // 8 : (g + c + 7) // 8] if packed and self.bits is not None else None
        digit = self.draw.digit
        # (c,) uint8, the piece's first bytes: taken piece by piece, so only a piece's bytes are held (the
        # stream gives the same bytes however they are cut)
        bc = self.stream.take(c, buf.words).to(xc.device)
        if self.before.whole_chunk(g, c) and kernels.available(xc, bp, bc):
            u, before, after = kernels.dare_sweep_(xc, bp, bc, digit, bits, buf.tied_pos, buf.tied_val, g)
            if u:
                self.tied.append(buf.tied_pos[:u], buf.tied_val[:u])
            if self.l1:
                self.before.add_chunk(g, c, before)
                self.after.add_chunk(g, c, after)
            return
        xc.sub_(bp)  # τ
        if self.l1:
            self.before.feed(xc, g)
        torch.eq(bc, digit, out=buf.flags[:c])
        tied = nonzero_bytes(buf.flags, c)  # (u,) undecided after the first byte
        if tied.numel():
            values = xc[tied]  # (u,) τ there, before the piece is masked below
            self.tied.append(tied.add_(g), values)
        keep = torch.lt(bc, digit, out=buf.keep[:c])
        xc.mul_(keep)
        if bits is not None:
            pack_bits(keep, out=bits, scratch=buf.words)
        if self.l1:
            self.after.feed(xc, g)

    def end_pass(self) -> bool:
        if self.done:
            return False
        self.done = True
        self._buffers = None
        after = self.after.value
        if len(self.tied):
            pos, val = self.tied.take()  # (u,) ascending positions, their τ
            kept = self.draw.resolve(pos.cpu()).to(pos.device)
            self.kept_pos, self.kept_val = pos[kept], val[kept]
            if self.l1:
                after += float(self.kept_val.abs().sum())
        if self.rescale:
            self.scale = 1.0 / self.density if self.by_density else _l1_factor(self.before.value, after)
        return False

    def apply_(self, xc: torch.Tensor, bc: torch.Tensor, start: int) -> None:
        if self.fresh:
            assert self.bits is not None
            c, skip = xc.numel(), start % 8
            packed = self.bits[start // 8 : (start + c + 7) // 8]
            if kernels.available(xc, bc, packed):
                kernels.dare_apply_(xc, bc, packed, skip)
            else:
                keep = unpack_bits(packed, skip + c)[skip:]  # (c,) 0/1
                xc.sub_(bc).mul_(keep)
        # the kept undecided entries (zeroed by the first byte's test) get their τ back
        bounds = torch.tensor([start, start + xc.numel()], device=self.kept_pos.device)
        lo, hi = torch.searchsorted(self.kept_pos, bounds).tolist()
        if hi > lo:
            xc[self.kept_pos[lo:hi] - start] = self.kept_val[lo:hi].to(xc.device)


class _DareScratch:
    """A DARE sweep's buffers for pieces of up to ``step`` entries, kept from piece to piece."""

    def __init__(self, step: int, device: torch.device) -> None:
        self.keep = torch.empty(step, dtype=torch.uint8, device=device)  # (step,) 1 keep / 0 drop
        self.words = torch.empty((step + 7) // 8, dtype=torch.int64)  # (step/8,) random draws, packed verdicts
        self.flags = torch.empty(round8(step), dtype=torch.uint8, device=device)  # (step,) 1 where undecided
        fused = device.type == "cpu"
        self.tied_pos = torch.empty(step if fused else 0, dtype=torch.int64)  # the fused sweep's undecided
        self.tied_val = torch.empty(step if fused else 0)


class _Appender:
    """Positions (int64) and values (float32) appended in order into buffers that grow by doubling."""

    def __init__(self, capacity: int) -> None:
        self.pos: torch.Tensor | None = None
        self.val: torch.Tensor | None = None
        self.capacity, self.size = capacity, 0

    def __len__(self) -> int:
        return self.size

    def append(self, pos: torch.Tensor, val: torch.Tensor) -> None:
        need = self.size + pos.numel()
        if self.pos is None or need > self.pos.numel():
            cap = max(need, self.capacity if self.pos is None else 2 * self.pos.numel())
            grown_pos = torch.empty(cap, dtype=torch.int64, device=pos.device)
            grown_val = torch.empty(cap, dtype=val.dtype, device=val.device)
            if self.pos is not None and self.val is not None:
                grown_pos[: self.size] = self.pos[: self.size]
                grown_val[: self.size] = self.val[: self.size]
            self.pos, self.val = grown_pos, grown_val
        assert self.val is not None
        self.pos[self.size : need] = pos
        self.val[self.size : need] = val
        self.size = need

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything appended (copies of the right size), and the buffers let go."""
        assert self.pos is not None and self.val is not None
        out = self.pos[: self.size].clone(), self.val[: self.size].clone()
        self.pos = self.val = None
        self.size = 0
        return out


class _Della(Sparsifier):
    """``della_magprune``: keep probabilities from magnitude ranks within rows (dim 1), so a block of whole
    rows decides alone; the uniforms come from the model's generator in flat order (replayed from its saved
    state in the apply pass of a fresh block). Needs materialized blocks (whole rows, and τ' made once per
    block). The L1 sums are taken over the grid."""

    has_statistics = True

    def __init__(self, shape: tuple[int, ...], density: float, epsilon: float, generator: torch.Generator,
                 rescale: bool, where: str) -> None:  # fmt: skip
        check_della_range(density, epsilon, where)
        self.shape, self.density, self.epsilon, self.rescale = shape, density, epsilon, rescale
        self.generator = generator
        self.state = generator.get_state()
        self.replay: torch.Generator | None = None
        n = math.prod(shape)
        self.before = GridSum(n, AbsSum())
        self.after = GridSum(n, AbsSum())
        self.done = False

    def _mask_(self, tau: torch.Tensor, generator: torch.Generator) -> None:
        """τ ← τ·keep for the block's flat τ, della's rows (r, C, ...); a 1-D tensor (one block) is one row."""
        rows = tau.view(-1, *self.shape[1:]) if len(self.shape) >= 2 else tau.view(1, -1)
        tau.mul_(_della_keep_mask(rows, self.density, self.epsilon, generator, "").view(-1))

    def statistics(self, block: Block, i: int) -> None:
        if self.done:
            return super().statistics(block, i)
        assert block.materialized, "della needs materialized blocks"
        x = block.model(i)
        x.sub_(block.flat_base())
        if self.rescale:
            self.before.feed(x, block.offset)
        self._mask_(x, self.generator)
        if self.rescale:
            self.after.feed(x, block.offset)

    def end_pass(self) -> bool:
        if not self.done:
            self.done = True
            if self.rescale:
                self.scale = _l1_factor(self.before.value, self.after.value)
        return False

    def prepare(self, block: Block, i: int) -> None:
        self.fresh = False  # τ' made here, for the whole block: ranks need whole rows
        if not block.fresh:
            return
        if self.replay is None or block.offset == 0:
            self.replay = torch.Generator(device="cpu")
            self.replay.set_state(self.state)
        x = block.model(i)
        x.sub_(block.flat_base())
        self._mask_(x, self.replay)


def sparsifier(
    n: int,
    shape: tuple[int, ...],
    method: Sparsification | None,
    density: float,
    *,
    rescale: bool = False,
    rescale_by_density: bool = False,
    gamma: float = 0.0,
    epsilon: float = 0.0,
    generator: torch.Generator | None = None,
    where: str = "",
) -> Sparsifier:
    """The blocked form of :func:`prepare_` (same arguments, same result), for one model's τ of ``n`` entries."""
    if method is None or density >= 1.0 or n == 0:
        return Sparsifier()
    if method == "magnitude":
        k = max(1, int(density * n))
        return Sparsifier() if k >= n else _Magnitude(n, k, None, rescale, outliers=False)
    if method == "magnitude_outliers":
        target = int(density * n)
        if target == 0:
            return _Nothing()
        n_top = int(gamma * n)
        first = n - max(0, n - target - n_top) - target  # descending rank of the first kept entry
        keep_k = first + target if 0 < first + target < n else None
        drop_k = first if 0 < first < n else None
        if keep_k is None and drop_k is None:
            return Sparsifier()
        return _Magnitude(n, keep_k, drop_k, rescale, outliers=True)
    if method in RANDOM:
        if generator is None:
            raise ValueError(f"{where}: random sparsification needs a generator")
        if method == "random":
            return _Dare(n, density, generator, rescale, rescale_by_density)
        return _Della(shape, density, epsilon, generator, rescale, where)
    raise ValueError(f"unknown sparsification {method!r}")
