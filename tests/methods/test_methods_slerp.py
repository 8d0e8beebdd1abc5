"""slerp between the base and one model: endpoints, the spherical midpoint, (anti)parallel and zero vectors."""

from __future__ import annotations

import math

import pytest
import torch
from methods_helpers import run

from mergescale.errors import ConfigError

E1 = torch.tensor([1.0, 0.0, 0.0, 0.0])
E2 = torch.tensor([0.0, 2.0, 0.0, 0.0])


def slerp(base, other, t):
    return run("slerp", [other], base, [{}], {"t": t})


def test_endpoints():
    g = torch.Generator().manual_seed(1)
    base, other = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    torch.testing.assert_close(slerp(base, other, 0.0), base)
    torch.testing.assert_close(slerp(base, other, 1.0), other)


def test_orthogonal_midpoint():
    # Ω = π/2: coefficients sin(Ω/2)/sin(Ω) = √2/2 on both raw vectors
    out = slerp(E1, E2, 0.5)
    torch.testing.assert_close(out, torch.tensor([math.sqrt(0.5), 2 * math.sqrt(0.5), 0.0, 0.0]))


def test_known_angle_at_t():
    # 60° apart, t = 0.25: c0 = sin(0.75·π/3)/sin(π/3), c1 = sin(0.25·π/3)/sin(π/3)
    v0 = torch.tensor([1.0, 0.0])
    v1 = torch.tensor([0.5, math.sqrt(3) / 2]) * 3.0
    s = math.sin(math.pi / 3)
    expected = math.sin(0.75 * math.pi / 3) / s * v0 + math.sin(0.25 * math.pi / 3) / s * v1
    torch.testing.assert_close(slerp(v0, v1, 0.25), expected)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_parallel_and_antiparallel_fall_back_to_lerp(sign):
    v0 = torch.tensor([1.0, 2.0, 3.0])
    v1 = sign * 2.5 * v0
    torch.testing.assert_close(slerp(v0, v1, 0.3), 0.7 * v0 + 0.3 * v1)


def test_zero_tensor_uses_a_right_angle_like_mergekit():
    v1 = torch.tensor([0.0, 3.0])
    torch.testing.assert_close(slerp(torch.zeros(2), v1, 0.3), math.sin(0.3 * math.pi / 2) * v1)


def test_needs_exactly_one_other_model():
    with pytest.raises(ConfigError, match="exactly one"):
        run("slerp", [E1, E2], E1, [{}, {}], {"t": 0.5})
