"""The C allocator's settings for a merge run, and returning free heap pages before large allocations.

Merging allocates and frees tensors of the same few sizes over and over; how glibc serves them decides both
speed and peak memory (measurements in :func:`allocator_settings`). Both engines (:mod:`.stream`,
:mod:`.sliding`) run inside :func:`allocator_settings`, which restores the process's settings afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def allocator_settings() -> Iterator[None]:
    """For the duration of a run, make glibc reuse freed blocks of up to 64 MB instead of returning them to the
    OS; restored afterwards, since a process that merges also evaluates and trains (a study).

    Merging allocates and frees tensors of the same few sizes over and over; by default each one above 32 MB
    is a fresh mmap whose pages fault in on first touch, which was measured to cost more than reading the
    inputs (4 s vs 0.8 s to read and convert 2.7 GB of bf16 here). Above 64 MB (embeddings, output heads in
    float32) blocks still go back to the OS: keeping those too fragmented the heap and raised the peak RSS of
    a 10-checkpoint average from about 1.05 GB to 1.5-2.0 GB, growing with the number of checkpoints.

    Restored on exit: the mmap and trim thresholds (to glibc's documented defaults, 128 KiB; glibc's dynamic
    mmap threshold stays off once any program sets it). Not undoable: the number of arenas (one, so threads'
    arenas do not cap heap blocks at 64 MB and fall back to mmap): glibc fixes its arena limit the first time a
    second thread allocates, so a process keeps whatever limit was in force then.
    """
    global _LIBC
    libc = _glibc()
    if libc is None:  # not glibc: keep the defaults
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 64 << 20)
    libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)
    libc.mallopt(_M_ARENA_MAX, 1)
    outer, _LIBC = _LIBC, libc
    try:
        yield
    finally:
        _LIBC = outer
        if outer is None:
            libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
            libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
            libc.mallopt(_M_ARENA_MAX, 0)


def _glibc():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018  (not glibc without it)
        return libc
    except (OSError, AttributeError):
        return None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_GLIBC_DEFAULT_THRESHOLD = 128 * 1024


def before_large_allocation(nbytes: int, device: torch.device) -> None:
    """Return free heap pages (:func:`release_free_heap`) before a CPU allocation of 64 MB or more."""
    if device.type == "cpu" and nbytes >= _TRIM_BEFORE_BYTES:
        release_free_heap()


def release_free_heap() -> None:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim``), before a large allocation.

    With trimming off (:func:`allocator_settings`), pages freed by read buffers just under the mmap threshold (a
    bf16 embedding of a 268M model is 62.5 MiB) stay resident; the float32 stack allocated next is a fresh
    mapping, so both would count in the peak. Called only before the largest allocations, it costs little.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


# glibc while a run's allocator settings are in force (see allocator_settings), else None
_LIBC = None
# allocations from this size on are preceded by :func:`release_free_heap`
_TRIM_BEFORE_BYTES = 64 << 20
