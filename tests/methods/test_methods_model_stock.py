"""model_stock on offsets with known angles."""

from __future__ import annotations

import math

import pytest
import torch
from methods_helpers import run

from mergescale.errors import ConfigError


def test_two_models_at_sixty_degrees():
    base = torch.tensor([1.0, 1.0, 1.0])
    off_a = torch.tensor([2.0, 0.0, 0.0])
    off_b = torch.tensor([1.0, math.sqrt(3), 0.0])  # same norm, cos = 0.5
    out = run("model_stock", [base + off_a, base + off_b], base)
    t = 2 * 0.5 / (1 + 0.5)  # k·cos / (1 + (k − 1)·cos) = 2/3
    torch.testing.assert_close(out, base + t * (off_a + off_b) / 2)


def test_three_orthogonal_models_stay_at_the_base():
    base = torch.tensor([0.5, -0.5, 2.0])
    out = run("model_stock", [base + 3 * torch.eye(3)[i] for i in range(3)], base)
    torch.testing.assert_close(out, base)  # cos = 0 → t = 0


def test_identical_offsets_give_the_models():
    base = torch.zeros(4)
    theta = torch.tensor([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(run("model_stock", [theta, theta, theta], base), theta)  # cos = 1 → t = 1


def test_opposite_offsets_are_singular_and_keep_the_base():
    base = torch.tensor([1.0, 2.0])
    out = run("model_stock", [base + torch.tensor([1.0, 0.0]), base - torch.tensor([1.0, 0.0])], base)
    torch.testing.assert_close(out, base)  # 1 + (k − 1)·cos = 0


def test_filter_wise_uses_one_angle_per_row():
    base = torch.zeros(2, 2)
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [2.0, 0.0]])  # row 0 orthogonal (t = 0), row 1 parallel (t = 1)
    out = run("model_stock", [a, b], base, None, {"filter_wise": True})
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0], [1.5, 0.0]]))
    # over the whole tensor: cos = 2 / (√2·√5)
    cos = 2 / (math.sqrt(2) * math.sqrt(5))
    t = 2 * cos / (1 + cos)
    torch.testing.assert_close(run("model_stock", [a, b], base), t * (a + b) / 2)


def test_needs_two_models():
    with pytest.raises(ConfigError, match="at least 2"):
        run("model_stock", [torch.ones(3)], torch.zeros(3))
