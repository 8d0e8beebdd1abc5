"""The along-run engine's scheduling and memory: job order, finite checks, releasing mapped pages."""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from mergescale.engine import sliding
from mergescale.io.checkpoint import SafetensorsCheckpoint, release_map_pages


def _jobs(sizes: list[int]) -> list[SimpleNamespace]:
    return [SimpleNamespace(nbytes=n, name=f"t{i}") for i, n in enumerate(sizes)]


@pytest.mark.parametrize(
    ("sizes", "big_at"),
    [
        ([100, 100, 5, 5, 5, 5, 5], [0, 6]),  # a Llama: output head and embedding first, then the layers
        ([5, 5, 90, 5, 100, 5, 60, 5, 5], [0, 4, 8]),  # three big ones: first, middle, last
        ([100, 5, 5, 5], [0]),  # one big one: order kept
    ],
)
def test_job_order_puts_the_largest_jobs_apart_and_keeps_every_job(sizes, big_at):
    jobs = _jobs(sizes)
    order = sliding._job_order(jobs)
    assert sorted(j.name for j in order) == sorted(j.name for j in jobs)
    assert [k for k, j in enumerate(order) if 2 * j.nbytes >= max(sizes)] == big_at
    small = [j.name for j in order if 2 * j.nbytes < max(sizes)]
    assert small == [j.name for j in jobs if 2 * j.nbytes < max(sizes)]  # the others keep their order


def test_check_kind_sums_every_window_unless_they_are_convex():
    assert sliding._check_kind(torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.25, 0.75]])) == sliding._CHECK_ROW
    assert sliding._check_kind(torch.tensor([[1.5, -0.5]])) == sliding._CHECK_ALL
    assert sliding._check_kind(torch.tensor([[2.0, 0.0]])) == sliding._CHECK_ALL


def _fold(xs: list[torch.Tensor], w: torch.Tensor, check: int) -> tuple[float, torch.Tensor]:
    checked = torch.cat([w, w.abs().sum(0, keepdim=True)])
    target = torch.empty(w.shape[0], xs[0].numel())
    cpu = torch.device("cpu")
    total = sliding._fold_range(xs, [checked], [(0, len(xs))], [target], [check], [False] * len(xs), 0,
                                xs[0].numel(), 4, cpu)  # fmt: skip
    return total, target


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_the_check_row_flags_a_non_finite_input_even_at_weight_zero(bad):
    xs = [torch.ones(10) for _ in range(3)]
    total, target = _fold(xs, torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]]), sliding._CHECK_ROW)
    assert math.isfinite(total) and torch.equal(target, torch.ones(2, 10))
    xs[0][4] = bad  # weight 0.5 in the first window, 0 in the second: the check row still sees it
    total, _ = _fold(xs, torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]]), sliding._CHECK_ROW)
    assert not math.isfinite(total)


def test_windows_that_may_overflow_are_summed_themselves():
    xs = [torch.full((1,), 2e38), torch.full((1,), -2e38)]  # one entry: the sum over entries stays finite
    w = torch.tensor([[1.5, -0.5]])  # 4e38: overflows, while the check row (1.5·2e38 − 0.5·2e38) does not
    total, target = _fold(xs, w, sliding._CHECK_ROW)
    assert math.isfinite(total) and torch.isinf(target).all()  # the check row alone would miss it...
    total, _ = _fold(xs, w, sliding._CHECK_ALL)
    assert not math.isfinite(total)  # ...which is why such weights are _CHECK_ALL


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page release is Linux only")
def test_released_pages_stop_counting_and_read_back_the_file(tmp_path):
    n = 1 << 20  # 4 MB of float32: 1024 pages
    data = torch.arange(n, dtype=torch.float32)
    save_file({"w": data}, tmp_path / "model.safetensors")
    src = SafetensorsCheckpoint(tmp_path, [tmp_path / "model.safetensors"])
    t = src.map("w")  # populated
    rss_before = _mapped_rss_kb(t)
    release_map_pages(t, 1000, n - 1000)
    assert _mapped_rss_kb(t) < rss_before - 3000  # all but the two partial ends' pages are gone
    assert torch.equal(t, data)  # read again, from the page cache
    src.close()


def _mapped_rss_kb(t: torch.Tensor) -> int:
    """Rss of the memory mapping that holds ``t`` (from /proc/self/smaps)."""
    addr = t.data_ptr()
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1])
    raise AssertionError("mapping not found")
