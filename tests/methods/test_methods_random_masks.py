"""Seeded Bernoulli masks: the right probability, a pure function of the generator, exact complements."""

from __future__ import annotations

import math

import torch

from mergescale.methods.random_masks import bernoulli_mask, random_bytes


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_keep_fraction_matches_probability():
    n = 1_000_000
    for p in (0.01, 0.3, 77 / 256, 0.5, 0.9):
        frac = bernoulli_mask((n,), p, _gen(1)).double().mean().item()
        assert abs(frac - p) < 6 * math.sqrt(p * (1 - p) / n), p


def test_resolution_beyond_the_first_byte():
    # p just above a multiple of 1/256: only the lazily drawn later bytes can tell the difference
    n = 2_000_000
    p = 77 / 256 + 0.5 / 256
    frac = bernoulli_mask((n,), p, _gen(2)).double().mean().item()
    assert abs(frac - p) < 6 * math.sqrt(p * (1 - p) / n)
    assert abs(frac - 77 / 256) > 3 * math.sqrt(p * (1 - p) / n)  # p is 6σ away from the byte grid


def test_first_byte_decides_as_documented():
    n = 100_000
    p = 0.3
    mask = bernoulli_mask((n,), p, _gen(3))
    first = random_bytes(n, _gen(3))
    digit = round(p * 2**32) >> 24
    assert torch.equal(mask[first < digit], torch.ones(int((first < digit).sum()), dtype=torch.bool))
    assert not mask[first > digit].any()


def test_pure_function_of_the_generator_and_complement():
    a = bernoulli_mask((300, 301), 0.37, _gen(4))
    b = bernoulli_mask((300, 301), 0.37, _gen(4))
    c = bernoulli_mask((300, 301), 0.37, _gen(5))
    drop = bernoulli_mask((300, 301), 0.37, _gen(4), complement=True)
    assert a.shape == (300, 301) and a.dtype == torch.bool
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(drop, ~a)


def test_independent_of_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = bernoulli_mask((1_000_003,), 0.2, _gen(6))
        torch.set_num_threads(1)
        b = bernoulli_mask((1_000_003,), 0.2, _gen(6))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(a, b)


def test_edge_probabilities():
    assert bernoulli_mask((10,), 1.0, _gen(7)).all()
    assert not bernoulli_mask((10,), 0.0, _gen(7)).any()
    assert bernoulli_mask((0, 3), 0.5, _gen(7)).shape == (0, 3)
