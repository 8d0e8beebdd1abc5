"""Reusable buffers for the large tensors a merge produces, so memory does not fragment.

A merge produces the same few large tensor sizes over and over (the embedding and the output head, the MLP
matrices of every layer). Allocated fresh, each either page-faults in on first touch (glibc hands blocks above
its mmap threshold straight to the OS) or, kept in glibc's heap, fragments it: measured here, the peak RSS of a
10-checkpoint average rose with the number of checkpoints (0.73 GB at 3, 0.89 GB at 10) and more than 200,000
page faults went to re-touching freed memory. The engine takes its large results from this pool instead (its
inputs are memory maps, see ``SafetensorsCheckpoint.map``).

A buffer is a numpy array; tensors are made from it with ``torch.from_numpy``, whose storage holds a reference
to the array until the last tensor viewing it is gone. So "idle" is simply "nobody but the pool refers to the
array" — no tensor (view, slice or reshape) can outlive its buffer's reuse, whatever the code that holds it.
"""

from __future__ import annotations

import math
import sys
import threading

import numpy as np
import torch

# Tensors below this size come from the allocator as usual: its heap serves them well.
MIN_POOLED_BYTES = 16 << 20


class BufferPool:
    """Byte buffers of exact sizes, handed out as uint8 tensors and reused once every tensor on them is gone.

    Args:
        max_idle_bytes: idle buffers beyond this many bytes are released (the largest first), so a pool sized
            by a 1 GB embedding read at the start does not keep that memory for the rest of the merge.
        min_bytes: requests below this size return None (the caller allocates as usual).
    """

    def __init__(self, max_idle_bytes: int = 512 << 20, min_bytes: int = MIN_POOLED_BYTES) -> None:
        self.max_idle_bytes = max_idle_bytes
        self.min_bytes = min_bytes
        self._buffers: list[np.ndarray] = []
        self._lock = threading.Lock()
        self.allocated = 0  # buffers created (for tests and benchmarks)

    def take(self, nbytes: int) -> torch.Tensor | None:
        """A uint8 tensor of ``nbytes`` on an idle buffer (or a new one); None below ``min_bytes``."""
        if nbytes < self.min_bytes:
            return None
        with self._lock:
            idle = [i for i in range(len(self._buffers)) if _unreferenced(self._buffers, i)]
            found = next((i for i in idle if self._buffers[i].nbytes == nbytes), None)
            if found is None:
                buf = np.empty(nbytes, dtype=np.uint8)
                self._buffers.append(buf)
                self.allocated += 1
            else:
                buf = self._buffers[found]
                idle.remove(found)
            self._trim(idle)
            return torch.from_numpy(buf)

    def _trim(self, idle: list[int]) -> None:
        total = sum(self._buffers[i].nbytes for i in idle)
        drop: set[int] = set()
        for i in sorted(idle, key=lambda i: -self._buffers[i].nbytes):
            if total <= self.max_idle_bytes:
                break
            drop.add(i)
            total -= self._buffers[i].nbytes
        if drop:
            self._buffers = [b for i, b in enumerate(self._buffers) if i not in drop]

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return sum(b.nbytes for b in self._buffers)


def _unreferenced(buffers: list[np.ndarray], i: int) -> bool:
    # References to an idle buffer: the pool's list and getrefcount's own argument. A tensor made by
    # torch.from_numpy adds one through its storage, for as long as any view of it lives.
    return sys.getrefcount(buffers[i]) <= 2


def empty_tensor(
    shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device, pool: BufferPool
) -> torch.Tensor:
    """An uninitialised tensor, on a pooled buffer when it is large and on the CPU."""
    buf = pool.take(math.prod(shape) * dtype.itemsize) if device.type == "cpu" else None
    return torch.empty(shape, dtype=dtype, device=device) if buf is None else buf.view(dtype).view(shape)
