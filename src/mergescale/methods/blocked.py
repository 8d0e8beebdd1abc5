"""Blocked merging: a method that works over row blocks of a tensor, so its memory follows a budget instead of
the ``(k, *shape)`` float32 stack of every input.

A method that can block declares it (:attr:`~mergescale.methods.base.MergeMethod.blocked`): given what it will
merge (:class:`TensorMeta`: shape, k, parameters, seed; no data), it returns a :class:`BlockedMerge`, a small
state machine the engine drives:

1. ``sample_positions()`` / ``take_sample(...)``: optional random access to a few entries of every input before
   anything else (the exact top-k selection estimates its band from a fixed sample, :mod:`.selection`);
2. statistics passes: ``statistics(block)`` on every block in order, then ``end_pass()``, which asks for
   another pass (a selection band that missed) or not; skipped by methods that need none (``has_statistics``);
3. the apply pass: ``apply(block)`` on every block in order returns that block's merged rows.

Blocks are rows of dim 0 (a 1-D tensor's rows are its entries), and cover the tensor in order; a method that
cannot cut some rows apart (DELLA ranks a 1-D tensor as one row) sets ``row_multiple``. When the whole tensor
is one block the engine hands the same block to every pass (``Block.fresh`` is then False after the first):
the method continues from what its statistics pass left in place (τ computed, masks applied), which is exactly
the whole-tensor computation, so that path costs nothing extra. Otherwise every pass gets the inputs afresh.

Every whole-tensor statistic a method derives must come out bit for bit the same whatever the blocks:
integer counts and exact selections do by nature; sums of floats are taken over a fixed grid of
:data:`GRID`-entry chunks of the flattened tensor (:class:`GridSum`), so their rounding depends on the tensor
alone. The registered method's function runs the same code on one block (:func:`run_in_memory`), hence blocked
and whole-tensor results are identical (tests force tiny blocks for each blocked method).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from mergescale.methods import kernels
from mergescale.methods.base import MethodInputs, TensorMeta

GRID = 1 << 18
"""Entries per chunk of the grid over which float sums are taken (the selection sweep's chunk)."""
_GRAM_PIECE = 1 << 14  # columns per piece of :func:`gram_sum` on the CPU: the pairs' products stay in cache


Runner = Callable[[Callable[[int], None], int], None]
"""``run(fn, n)`` calls ``fn(0) ... fn(n - 1)``, possibly concurrently (each call must touch its own data)."""


def sequential(fn: Callable[[int], None], n: int) -> None:
    for i in range(n):
        fn(i)


class Block:
    """Rows ``[start, stop)`` of dim 0 of every input, for one call of a blocked merge.

    The base's rows are float32 (``base``, or None). The models' rows are either materialized as a float32
    ``(k, r, *shape[1:])`` tensor, or kept as read (the engine's memory-mapped rows in their stored dtype) and
    converted piece by piece into the caller's scratch buffers when asked for, so a pass reads each input once
    from memory and works on cache-sized pieces. Either way, :meth:`piece`, :meth:`chunk` and :meth:`model` give
    float32 tensors the method may modify; only on a materialized block do the changes last (the tensor's only
    block, handed back with ``fresh`` False after an earlier pass).

    Attributes:
        start / stop: the rows.
        offset: flat (row-major) index of the block's first entry.
        numel: entries of one input's rows.
        k: merged models.
        fresh: True when the models' rows are as read; False when they are what an earlier pass left.
        run / workers: how to share independent work (per model, per column range) between ``workers`` threads
            (torch ops release the GIL); results must not depend on it.
    """

    def __init__(
        self,
        start: int,
        stop: int,
        offset: int,
        base: torch.Tensor | None,
        *,
        tensors: torch.Tensor | None = None,
        sources: Sequence[torch.Tensor] | None = None,
        numel: int | None = None,
        device: torch.device | None = None,
        fresh: bool = True,
        run: Runner = sequential,
        workers: int = 1,
    ) -> None:
        assert (tensors is None) != (sources is None), "models' rows either materialized or as read"
        self.start, self.stop, self.offset = start, stop, offset
        self.base = base
        self.tensors = tensors  # (k, r, ...) float32, materialized
        self._sources = [s.reshape(-1) for s in sources] if sources is not None else None  # (n,) stored dtype
        if tensors is not None:
            self.k, self.numel = int(tensors.shape[0]), int(tensors[0].numel()) if tensors.shape[0] else 0
            self.device = tensors.device
        else:
            assert sources is not None
            self.k = len(sources)
            self.numel = int(numel if numel is not None else self._sources[0].numel())  # type: ignore[index]
            self.device = device if device is not None else torch.device("cpu")
        if self.k == 0 and base is not None:
            self.numel = int(base.numel())
        self.fresh, self.run, self.workers = fresh, run, workers

    @property
    def materialized(self) -> bool:
        return self.tensors is not None

    def flat_base(self) -> torch.Tensor:
        assert self.base is not None
        return self.base.reshape(-1)

    def piece(self, i: int, lo: int, hi: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Model ``i``'s flat entries ``[lo, hi)`` of the block, float32: a view of a materialized block, else
        converted into ``out`` (at least ``hi - lo`` entries) or a new tensor."""
        if self.tensors is not None:
            return self.tensors[i].view(-1)[lo:hi]
        assert self._sources is not None
        dst = out[: hi - lo] if out is not None else torch.empty(hi - lo, dtype=torch.float32, device=self.device)
        return dst.copy_(self._sources[i][lo:hi])

    def chunk(self, lo: int, hi: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Every model's flat entries ``[lo, hi)``: ``(k, hi - lo)`` float32 (a view, or converted into the
        ``(k, ≥ hi - lo)`` buffer ``out``)."""
        if self.tensors is not None:
            return self.tensors.view(self.k, -1)[:, lo:hi]
        dst = out[:, : hi - lo] if out is not None else torch.empty((self.k, hi - lo), device=self.device)
        for i in range(self.k):
            self.piece(i, lo, hi, dst[i])
        return dst

    def task_vectors(self, lo: int, hi: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Every model's flat entries ``[lo, hi)`` minus the base's where the block has a base: ``(k, hi − lo)``
        float32 (a view or converted into ``out``, as :meth:`chunk`). On a materialized block the subtraction
        is made in place, once: a later pass over the same block (``fresh`` False) finds the task vectors."""
        tau = self.chunk(lo, hi, out)
        if self.base is not None and self.fresh:
            tau.sub_(self.flat_base()[lo:hi])
        return tau

    def model(self, i: int) -> torch.Tensor:
        """Model ``i``'s rows, flat float32 (a view of a materialized block, else a converted copy)."""
        return self.piece(i, 0, self.numel)


class BlockedMerge:
    """One tensor's merge, driven block by block (see the module docstring). Subclasses override what they use.

    Attributes:
        row_multiple: blocks start at multiples of this many rows (the last one ends at the tensor's end).
        temporaries: planning: float32 buffers of one model's block size the method allocates beside the
            block itself (e.g. DELLA's ranks), so the engine can size blocks within a memory budget.
        state_bytes: planning: what the method keeps across blocks (selection candidates, undecided random
            entries), an estimate in bytes.
        has_statistics: whether statistics passes run before the apply pass.
        materialize: the method needs each block's model rows as one float32 tensor (whole rows at once, kept
            from its statistics pass for the apply pass within a block) rather than converted piece by piece.
        fused_loops: planning: on the CPU the method runs the compiled loops of :mod:`~.kernels`, whose runtime
            the process loads on their first call.
    """

    row_multiple: int = 1
    temporaries: float = 0.0
    state_bytes: int = 0
    has_statistics: bool = False
    materialize: bool = False
    fused_loops: bool = False

    def sample_positions(self) -> torch.Tensor | None:
        """Flat positions (int64, CPU) to read from every input before the first pass, or None."""
        return None

    def take_sample(self, tensors: torch.Tensor, base: torch.Tensor | None) -> None:
        """The float32 entries at :meth:`sample_positions`: ``(k, S)`` of the models and ``(S,)`` of the base."""

    def statistics(self, block: Block) -> None:
        """Accumulate whole-tensor statistics from one block (blocks come in order)."""

    def end_pass(self) -> bool:
        """After a statistics pass over every block: True to ask for another one."""
        return False

    def apply(self, block: Block) -> torch.Tensor:
        """The merged rows of ``block`` (float32, ``(stop - start, *shape[1:])``); may be ``block.base``."""
        raise NotImplementedError


BlockedFactory = Callable[[TensorMeta], "BlockedMerge | None"]
"""What a method declares: the blocked merge of a tensor, or None when this configuration cannot block."""


def block_bounds(rows: int, rows_per_block: int, row_multiple: int = 1) -> list[tuple[int, int]]:
    """``[start, stop)`` of every block: ``rows_per_block`` rounded down to a multiple of ``row_multiple`` (at
    least one multiple)."""
    step = max(row_multiple, rows_per_block // row_multiple * row_multiple)
    return [(s, min(rows, s + step)) for s in range(0, rows, step)] or [(0, 0)]


def drive(
    merge: BlockedMerge,
    bounds: Sequence[tuple[int, int]],
    fill: Callable[[int, int], Block],
    emit: Callable[[Block, torch.Tensor], None],
    gather: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]] | None = None,
    done: Callable[[Block], None] | None = None,
) -> None:
    """Run ``merge`` over the blocks ``bounds``: ``fill(start, stop)`` reads a block afresh, ``emit(block,
    rows)`` takes each block's result, ``gather(positions)`` reads the sample, ``done(block)`` is told when a
    block's pass is over. A single materialized block is read once and handed to every pass."""
    positions = merge.sample_positions()
    if positions is not None:
        assert gather is not None, "this merge reads a sample: pass gather"
        merge.take_sample(*gather(positions))
    single: Block | None = None

    def get(start: int, stop: int) -> Block:
        nonlocal single
        if single is not None:
            single.fresh = False
            return single
        block = fill(start, stop)
        if len(bounds) == 1 and block.materialized:
            single = block
        return block

    def over(block: Block) -> None:
        if done is not None and block is not single:
            done(block)

    if merge.has_statistics:
        again = True
        while again:
            for start, stop in bounds:
                block = get(start, stop)
                merge.statistics(block)
                over(block)
            again = merge.end_pass()
    for start, stop in bounds:
        block = get(start, stop)
        emit(block, merge.apply(block))
        over(block)
    if single is not None and done is not None:
        done(single)


def run_in_memory(
    merge: BlockedMerge,
    inputs: MethodInputs,
    rows_per_block: int | None = None,
    *,
    lazy: bool = False,
    workers: int = 1,
    run: Runner = sequential,
) -> torch.Tensor:
    """Run a blocked merge over in-memory inputs; float32 result of the tensor's shape.

    By default the whole tensor is one block: the engine-owned stack and base themselves, modified in place as
    a method may (the engine's whole-tensor path). With ``rows_per_block`` every pass copies its blocks out of
    the inputs, which stay untouched, or with ``lazy`` hands the models' rows as read, to be converted piece by
    piece (as the engine does from memory maps); tests compare these with the whole-tensor result bit for bit.
    ``workers`` splits work as that many threads would, run by ``run`` (by default one after the other; the
    engine passes its threads).
    """
    meta = TensorMeta.of(inputs)
    k = inputs.k
    stack = inputs.tensors.reshape(k, *meta.shape) if meta.shape else inputs.tensors.reshape(k, 1)
    base = inputs.base
    if base is not None:
        base = base.reshape(meta.shape) if meta.shape else base.reshape(1)
    rows = meta.rows
    bounds = block_bounds(rows, rows if rows_per_block is None else max(1, rows_per_block), merge.row_multiple)
    whole = len(bounds) == 1 and not lazy
    out: torch.Tensor | None = None
    shape = meta.shape if meta.shape else (1,)

    def fill(start: int, stop: int) -> Block:
        if whole:
            return Block(start, stop, 0, base, tensors=stack, run=run, workers=workers)
        b = base[start:stop].clone() if base is not None else None
        offset = start * meta.row_numel
        if lazy and not merge.materialize:
            return Block(start, stop, offset, b, sources=list(stack[:, start:stop]), device=stack.device,
                         run=run, workers=workers)  # fmt: skip
        return Block(start, stop, offset, b, tensors=stack[:, start:stop].clone(), run=run, workers=workers)

    def emit(block: Block, rows_out: torch.Tensor) -> None:
        nonlocal out
        if whole:
            out = rows_out
            return
        if out is None:
            out = torch.empty(shape, dtype=torch.float32, device=rows_out.device)
        out[block.start : block.stop] = rows_out.reshape(block.stop - block.start, *shape[1:])

    def gather(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        p = positions.to(stack.device)
        return stack.reshape(k, -1)[:, p], (base.reshape(-1)[p] if base is not None else None)

    drive(merge, bounds, fill, emit, gather)
    assert out is not None
    return out.reshape(meta.shape)


def column_ranges(n: int, workers: int, offset: int, cuts: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Split a block's n columns into up to ``workers`` ranges for concurrent combining. A split never falls
    inside a threshold's cut chunk (global [start, end)), whose equal entries must be walked in order by one
    thread."""
    if workers <= 1 or n < 2 * (1 << 16):
        return [(0, n)]
    points = [0]
    for j in range(1, workers):
        p = n * j // workers
        for start, end in sorted(cuts):
            if start < offset + p < end:
                p = end - offset
        if points[-1] < p < n:
            points.append(p)
    points.append(n)
    return list(zip(points[:-1], points[1:], strict=True))


def grid_pieces(block: Block) -> Iterator[tuple[int, int]]:
    """The block's local ``[lo, hi)`` pieces of at most :data:`GRID` entries, cut where the whole tensor's grid
    chunks end, so per-piece work is the same for any blocks and whole chunks reach a :class:`GridSum` as they
    are (float sums are taken over the fixed grid whatever the pieces)."""
    n, offset = block.numel, block.offset
    lo = 0
    while lo < n:
        hi = min(n, lo + GRID - (offset + lo) % GRID)
        yield lo, hi
        lo = hi


def step_ranges(n: int, step: int, workers: int) -> list[tuple[int, int]]:
    """Split ``[0, n)`` into up to ``workers`` ranges of whole ``step``-entry pieces (the last piece may be short),
    for entry-by-entry work shared between threads: each range is cut into the same pieces as the whole."""
    pieces = -(-n // step) if n else 0
    if workers <= 1 or pieces <= 1:
        return [(0, n)]
    cuts = [min(n, pieces * j // workers * step) for j in range(workers + 1)]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]


class GridSum:
    """Σ over the grid chunks of a flat tensor of ``n`` entries of ``float(fn(chunk))``, fed in pieces in order.

    Every chunk ``[c·GRID, (c+1)·GRID)`` reaches ``fn`` whole: pieces that cover it are passed as views, and
    chunks cut by a piece boundary are gathered in a carry buffer first. So the result depends on the tensor's
    values alone, not on how it was cut into blocks (``fn`` must not depend on the chunk's memory layout: copy
    it first where a kernel might). ``fn`` returns one float or a list of them. Pieces may carry leading
    dimensions (``(m, c)``: m aligned flat tensors, e.g. every model's entries), the grid running along the last.
    """

    def __init__(self, n: int, fn: Callable[[torch.Tensor], float | list[float]], width: int = 1) -> None:
        self.n = n
        self.fn = fn
        self.values = [0.0] * width
        self.width = width
        self._carry: torch.Tensor | None = None
        self._carry_start = 0  # flat index of the chunk the carry belongs to
        self._carry_len = 0

    def _add(self, chunk: torch.Tensor) -> None:
        got = self.fn(chunk)
        got = [got] if isinstance(got, float) else got
        for i, v in enumerate(got):
            self.values[i] += v

    def feed(self, piece: torch.Tensor, offset: int) -> None:
        """The flat entries ``[offset, offset + c)`` of a ``(..., c)`` piece (in order after the previous one)."""
        pos, end = offset, offset + piece.shape[-1]
        while pos < end:
            chunk_start = pos - pos % GRID
            chunk_end = min(chunk_start + GRID, self.n)
            take = min(end, chunk_end) - pos
            part = piece[..., pos - offset : pos - offset + take]
            if pos == chunk_start and take == chunk_end - chunk_start:
                self._add(part)  # a whole chunk
            else:
                if self._carry is None:
                    lead = tuple(piece.shape[:-1])
                    self._carry = torch.empty((*lead, min(GRID, self.n)), dtype=piece.dtype, device=piece.device)
                if self._carry_len == 0:
                    self._carry_start = chunk_start
                assert self._carry_start == chunk_start and self._carry_len == pos - chunk_start, "pieces out of order"
                self._carry[..., self._carry_len : self._carry_len + take] = part
                self._carry_len += take
                if self._carry_start + self._carry_len == chunk_end:
                    self._add(self._carry[..., : self._carry_len])
                    self._carry_len = 0
            pos += take

    def add_chunk(self, offset: int, c: int, value: float) -> None:
        """``fn``'s value for the whole chunk ``[offset, offset + c)``, computed by the caller."""
        assert self.whole_chunk(offset, c), "not a whole chunk"
        self.values[0] += value

    def whole_chunk(self, offset: int, c: int) -> bool:
        """Whether ``[offset, offset + c)`` is one whole chunk of the grid (with nothing carried)."""
        return offset % GRID == 0 and c == min(GRID, self.n - offset) and self._carry_len == 0

    @property
    def value(self) -> float:
        return self.values[0]


class AbsSum:
    """Σ|x| of a chunk as a Python float. On the CPU with numba, :func:`~.kernels.abs_sum` (float64, 32
    accumulators: what the fused DARE sweep computes too; a chunk that is not contiguous is copied first);
    otherwise torch's float32 cascade summation. |x| or the copy goes to a scratch buffer kept from call to call:
    a sweep's fresh chunk-sized temporaries, interleaved with the small tensors a statistics pass keeps,
    fragmented the heap by about the size of a chunk per piece (DARE's pass grew by 1.2 GB on one tensor)."""

    def __init__(self) -> None:
        self._scratch: torch.Tensor | None = None

    def __call__(self, chunk: torch.Tensor) -> float:
        c = chunk.numel()
        lanes = kernels.HAVE_NUMBA and chunk.device.type == "cpu" and chunk.dtype == torch.float32
        if lanes and chunk.is_contiguous():
            return kernels.abs_sum(chunk)
        if self._scratch is None or self._scratch.numel() < c or self._scratch.device != chunk.device:
            self._scratch = torch.empty(c, dtype=chunk.dtype, device=chunk.device)
        buf = self._scratch[:c].view(chunk.shape)
        if lanes:
            return kernels.abs_sum(buf.copy_(chunk))
        return float(torch.abs(chunk, out=buf).sum())


def gram_sum(chunk: torch.Tensor) -> list[float]:
    """⟨xᵢ, xⱼ⟩ for i ≤ j of the rows of an ``(m, c)`` chunk, the upper triangle row by row (m(m+1)/2 floats).

    Float64, so the products of float32 entries are exact. On the CPU the chunk is copied piece by piece (fixed
    offsets of the chunk, cache-sized) into a fresh contiguous float64 buffer and each piece's Gram matrix is one
    small matrix product, added in order: the same chunk gives the same bits whatever the chunk's own layout
    (a view of a block, or of the whole tensor), since every piece is laid out alike and multiplied alike.
    Measured: 1.4 ms against 5.1 ms for the elementwise products of 5 rows of 256K entries, one thread."""
    m, c = int(chunk.shape[0]), int(chunk.shape[-1])
    step = min(c, _GRAM_PIECE) if chunk.device.type == "cpu" else c
    total = torch.zeros((m, m), dtype=torch.float64, device=chunk.device)  # (m, m)
    for s in range(0, c, step):
        w = min(step, c - s)
        piece = torch.empty((m, w), dtype=torch.float64, device=chunk.device).copy_(chunk[:, s : s + w])  # (m, w)
        total += piece @ piece.T
    rows, cols = torch.triu_indices(m, m, device=chunk.device)
    return total[rows, cols].tolist()


def gram_matrix(values: Sequence[float], m: int) -> torch.Tensor:
    """The symmetric ``(m, m)`` float64 Gram matrix from the upper triangle row by row, as :func:`gram_sum`
    gives it (and a :class:`GridSum` of it sums it)."""
    gram = torch.empty((m, m), dtype=torch.float64)
    rows, cols = torch.triu_indices(m, m)
    upper = torch.tensor(list(values), dtype=torch.float64)  # (m(m+1)/2,)
    gram[rows, cols] = upper
    gram[cols, rows] = upper
    return gram
