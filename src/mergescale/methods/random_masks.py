"""Seeded random masks for DARE and DELLA: pure functions of a CPU generator, fast.

Every draw comes from the CPU generator the method hands in (seeded from (seed, tensor name, model index)
only, see :func:`mergescale.methods.base.tensor_seed`); masks are then moved to the compute device, so a merge on
CUDA drops exactly the entries a merge on CPU drops, whatever the order of tensors or the number of threads.

Speed (4096×4096, one core): ``torch.rand(...) < p`` costs ~105 ms, ``torch.bernoulli_`` ~190 ms and
``uint8.random_()`` ~55 ms, all one generator call per entry. Full-range int64 draws viewed as bytes give 8
random bytes per call: 19 ms. Each entry then gets one byte, compared with the first byte of p: that decides
all entries but the ~1/256 whose byte equals it, and those are decided by further bytes drawn only for them
(:class:`LazyBernoulli`). The mask is exactly Bernoulli(P/2³²) with P = round(p·2³²), i.e. p within 1.2e-10.

Draw order (what makes a mask a function of the seed alone): n first bytes for the whole tensor; then, for
the undecided entries in ascending index order, one byte each per round, for at most three rounds.
"""

from __future__ import annotations

import torch

_BITS = 32


def random_bytes(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n,) uniform uint8 on the CPU: 64-bit draws (8 bytes per generator call) viewed as bytes."""
    words = torch.empty((n + 7) // 8, dtype=torch.int64).random_(-(1 << 63), None, generator=generator)
    return words.view(torch.uint8)[:n]


class ByteStream:
    """The bytes :func:`random_bytes` gives, taken in pieces: ``take(a)`` then ``take(b)`` are the first a + b
    bytes of ``random_bytes(a + b)`` (a CPU generator's draws do not depend on how they are split), and after
    the last piece of n bytes the generator has advanced exactly as by ``random_bytes(n)``."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self._left = torch.empty(0, dtype=torch.uint8)  # bytes of the last word drawn, not yet taken

    def take(self, n: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """(n,) uint8, the stream's next n bytes. With ``buffer`` (a CPU int64 tensor of at least ⌈n/8⌉
        entries, reused from call to call) the draw lands in it instead of fresh memory: what was returned
        before is then overwritten."""
        if n <= self._left.numel():
            out, self._left = self._left[:n], self._left[n:]
            return out
        left = self._left.clone() if buffer is not None else self._left  # the buffer is drawn over below
        need = n - left.numel()
        m = (need + 7) // 8
        words = torch.empty(m, dtype=torch.int64) if buffer is None else buffer[:m]
        words.random_(-(1 << 63), None, generator=self.generator)
        fresh = words.view(torch.uint8)
        out = torch.cat([left, fresh[:need]]) if left.numel() else fresh[:need]
        self._left = fresh[need:].clone() if buffer is not None else fresh[need:]
        return out


class LazyBernoulli:
    """Keep/drop decisions for n entries with keep probability p, decided byte by byte.

    ``first`` holds each entry's first byte: an entry is kept if ``first < digit``, dropped if ``first > digit``
    and undecided if equal; :meth:`resolve` decides the undecided ones (all of them, in one call, in ascending
    index order) from the generator.
    """

    def __init__(self, n: int, p: float, generator: torch.Generator, *, draw: bool = True) -> None:
        threshold = min(max(round(p * (1 << _BITS)), 0), 1 << _BITS)  # keep iff U < threshold, U ~ [0, 2³²)
        self.constant: bool | None = None if 0 < threshold < 1 << _BITS else threshold > 0
        self.digits = (threshold % (1 << _BITS)).to_bytes(_BITS // 8, "big")
        self.digit = self.digits[0]
        self.generator = generator
        # draw=False: the caller takes the n first bytes itself, in pieces (ByteStream), before resolve()
        drawn = draw and self.constant is None
        self.first = random_bytes(n, generator) if drawn else torch.empty(0, dtype=torch.uint8)

    def resolve(self, undecided: torch.Tensor) -> torch.Tensor:
        """Bool (u,): which of the undecided entries (ascending flat positions, CPU) are kept."""
        kept = torch.zeros(undecided.numel(), dtype=torch.bool)
        pending = torch.arange(undecided.numel())  # (r,) indices into `undecided` still tied with p
        for digit in self.digits[1:]:
            if pending.numel() == 0:
                break
            b = random_bytes(pending.numel(), self.generator)  # (r,)
            kept[pending[b < digit]] = True
            pending = pending[b == digit]
        return kept  # entries tied on all 32 bits have U == P, so U < P fails: dropped


def bernoulli_mask(
    shape: torch.Size | tuple[int, ...],
    p: float,
    generator: torch.Generator,
    *,
    device: torch.device | str = "cpu",
    complement: bool = False,
) -> torch.Tensor:
    """Boolean mask of ``shape``: each entry True with probability ``p`` (keep), independently.

    With ``complement=True`` returns the negated mask (the entries to drop) of the very same draw. The draw
    depends only on ``generator``'s state, ``shape`` and ``p``; DARE applies the same draw chunk by chunk.
    """
    n = 1
    for s in shape:
        n *= int(s)
    draw = LazyBernoulli(n, p, generator)
    if draw.constant is not None or n == 0:
        return torch.full(tuple(shape), bool(draw.constant) != complement, dtype=torch.bool, device=device)
    keep = draw.first < draw.digit  # (n,)
    undecided = (draw.first == draw.digit).nonzero().squeeze(1)  # (u,) ascending
    keep[undecided] = draw.resolve(undecided)
    if complement:
        keep.logical_not_()
    return keep.view(tuple(shape)).to(device)


def uniform(shape: torch.Size | tuple[int, ...], generator: torch.Generator, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """Float32 uniforms on [0, 1) of ``shape`` from ``generator`` (for masks with per-entry probabilities)."""
    return torch.rand(tuple(shape), generator=generator, dtype=torch.float32).to(device)


_PACK = 0x0102040810204080  # w·_PACK puts byte j's low bit of the int64 word w at bit 56 + j
_SPREAD = 0x0101010101010101  # p·_SPREAD copies a byte p into all 8 bytes of a word
_PICK = -0x7FBFDFEFF7FBFDFF  # 0x8040201008040201 as int64: byte j keeps bit j


def pack_bits(flags: torch.Tensor, out: torch.Tensor | None = None, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """(c,) uint8 0/1 flags -> (⌈c/8⌉,) uint8, flag j of each group of 8 at bit j (one multiply per 8 flags);
    into ``out`` when given, using the int64 ``scratch`` (⌈c/8⌉ entries at least) for the words."""
    c = flags.numel()
    if c % 8:
        flags = torch.cat([flags, flags.new_zeros(8 - c % 8)])
    words = flags.view(torch.int64)  # (c/8,) little endian: flag j in byte j
    packed = torch.mul(words, _PACK, out=scratch[: words.numel()] if scratch is not None else None)
    packed.bitwise_right_shift_(56).bitwise_and_(0xFF)  # (c/8,) each in [0, 255]: the cast below is exact
    return out.copy_(packed) if out is not None else packed.to(torch.uint8)


def unpack_bits(packed: torch.Tensor, c: int) -> torch.Tensor:
    """The first ``c`` flags of :func:`pack_bits`'s output, as uint8 0/1 (c,) (multiplying by uint8 flags is
    several times faster than by a bool mask here)."""
    words = packed.to(torch.int64).mul_(_SPREAD).bitwise_and_(_PICK)  # (c/8,) byte j: flag j at bit j
    return words.view(torch.uint8)[:c].clamp_(max=1)
