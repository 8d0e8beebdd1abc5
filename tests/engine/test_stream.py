"""The streaming engine's scheduling must never change a result: prefetch budgets, workers, groups."""

from __future__ import annotations

import pytest
import torch

from mergescale.api import plan_merges
from mergescale.config import load_config
from mergescale.engine.stream import run_plan
from mergescale.io.writer import MemorySink


def _config(method: str, models, base=None, **params):
    c = {
        "merge_method": method,
        "models": [{"model": str(m), "parameters": {"weight": 0.2 + 0.3 * i}} for i, m in enumerate(models)],
        "parameters": params,
        "dtype": "bfloat16",
    }
    if base is not None:
        c["base_model"] = str(base)
    return load_config(c)


def _run(configs, **kwargs) -> list[dict[str, torch.Tensor]]:
    sinks = [MemorySink() for _ in configs]
    run_plan(plan_merges(list(zip(configs, sinks, strict=True))), progress=False, **kwargs)
    return [s.state_dict for s in sinks]


@pytest.mark.parametrize("prefetch_bytes", [1, 3000])
def test_small_budgets_cut_linear_terms_into_blocks_with_the_same_result(llama_models, prefetch_bytes):
    experts = [llama_models[f"expert{i}"] for i in range(3)]
    configs = [
        _config("linear", experts),
        _config("task_arithmetic", experts, base=llama_models["base"], **{"lambda": 0.7}),
        _config("ties", experts[:2], base=llama_models["base"]),  # a stacked method in the same read
    ]
    reference = _run(configs)
    # a budget of 1 byte makes blocks of one input (a float32 partial sum carried over each); 3000 bytes, a few
    # inputs per block. Other blocks mean other BLAS calls: equal up to float32 rounding before the bf16 cast.
    for got, want in zip(_run(configs, prefetch_bytes=prefetch_bytes, workers=2), reference, strict=True):
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=8e-3, atol=1e-6, msg=name)


def test_worker_count_does_not_change_results(llama_models):
    experts = [llama_models[f"expert{i}"] for i in range(3)]
    configs = [_config("linear", experts)]
    one, = _run(configs, workers=1)
    three, = _run(configs, workers=3)
    for name in one:
        assert torch.equal(one[name], three[name]), name
