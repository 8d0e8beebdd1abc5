"""The pool of large read/write buffers: a buffer is reused only once no tensor views it any more."""

from __future__ import annotations

import torch

from mergescale.engine.buffers import BufferPool


def test_a_buffer_is_reused_only_after_every_view_of_it_is_gone():
    pool = BufferPool(min_bytes=16)
    first = pool.take(64)
    view = first.view(torch.float32).reshape(4, 4)[1:]  # a view that outlives the tensor it came from
    first.fill_(7)
    del first
    second = pool.take(64)
    assert pool.allocated == 2  # the view still holds buffer 1
    second.fill_(0)
    assert bool((view.view(torch.uint8) == 7).all())  # untouched by the second request
    del view
    third = pool.take(64)
    assert pool.allocated == 2  # buffer 1 came back
    assert third.data_ptr() != second.data_ptr()


def test_sizes_below_the_minimum_are_not_pooled_and_sizes_must_match():
    pool = BufferPool(min_bytes=100)
    assert pool.take(99) is None
    a = pool.take(128)
    del a
    b = pool.take(256)  # another size: a new buffer, the idle 128 stays
    assert pool.allocated == 2 and b.numel() == 256


def test_idle_buffers_beyond_the_cap_are_released_largest_first():
    pool = BufferPool(max_idle_bytes=300, min_bytes=1)
    big, small = pool.take(1000), pool.take(200)
    del big, small
    keep = pool.take(50)  # both idle (1200 bytes > 300): the 1000-byte one goes
    assert pool.held_bytes == 200 + 50
    del keep
