"""Task-vector diagnostics against their formulas, on small tensors and on a stored draw."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from mergescale.engine.plan import TensorJob, TensorRead
from mergescale.study.diagnostics import TaskVectorStats
from mergescale.study.draws import DrawJob, StudyContext, plan_chunks
from mergescale.study.grid import MergeCell, ModelRef, StudyGroup
from mergescale.study.spec import EvalSpec


def _direct(base: list[torch.Tensor], experts: list[list[torch.Tensor]]) -> dict:
    b = torch.cat([t.reshape(-1) for t in base]).double()
    taus = [torch.cat([t.reshape(-1) for t in e]).double() - b for e in experts]
    out = {}
    for i, tau in enumerate(taus):
        out[("norm", i)] = tau.norm().item()
        out[("relative_distance", i)] = tau.norm().item() / b.norm().item()
    for i, j in itertools.combinations(range(len(taus)), 2):
        out[("cosine", i, j)] = (taus[i] @ taus[j] / (taus[i].norm() * taus[j].norm())).item()
        both = (taus[i] != 0) & (taus[j] != 0)
        out[("sign_agreement", i, j)] = ((taus[i].sign() == taus[j].sign()) & both).sum().item() / both.sum().item()
    return out


def test_statistics_equal_their_formulas_on_small_tensors() -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (11,), (3, 3)]
    base = [torch.randn(s, generator=g) for s in shapes]
    experts = []
    for _ in range(3):
        e = [b + 0.1 * torch.randn(b.shape, generator=g) for b in base]
        e[1][:4] = base[1][:4]  # some entries untouched: zero task-vector entries do not count for signs
        experts.append(e)
    names = {1: "a", 2: "b", 3: "c"}
    stats = TaskVectorStats(0, names)
    for n, shape in enumerate(shapes):
        reads = tuple(TensorRead(src, f"t{n}", shape, torch.float32, 0) for src in range(4))
        job = TensorJob(reads, ())
        for src in (2, 0, 3, 1):  # any arrival order
            tensor = base[n] if src == 0 else experts[src - 1][n]
            stats.observe(job, reads[src], tensor.to(torch.bfloat16).to(torch.float32))
    step = TensorRead(0, "step", (1,), torch.int64, 8)
    stats.observe(TensorJob((step,), ()), step, torch.tensor([3]))  # non-float tensors are not task-vector entries
    rounded = lambda ts: [t.to(torch.bfloat16).to(torch.float32) for t in ts]  # noqa: E731
    want = _direct(rounded(base), [rounded(e) for e in experts])
    got = {(d.stat, d.a, d.b): d.value for d in stats.result()}
    letters = "abc"
    for key, value in want.items():
        stat, *idx = key
        a = letters[idx[0]]
        b = letters[idx[1]] if len(idx) > 1 else ""
        assert got[(stat, a, b)] == pytest.approx(value, rel=1e-5), key
    cos = [want[k] for k in want if k[0] == "cosine"]
    assert got[("mean_cosine", "", "")] == pytest.approx(sum(cos) / len(cos), rel=1e-5)
    assert stats.tensors == len(shapes)


@pytest.mark.slow
def test_a_stored_draw_matches_its_models(micro_study: Path, micro_world: Path) -> None:
    from mergescale.io.checkpoint import open_checkpoint
    from mergescale.study import load_study

    results = load_study(micro_study)
    draw = next(d for d in results.draws if d.k == 2 and d.group == "xs-it")
    folders = [micro_world / "models/xs/it/base"] + [micro_world / f"models/xs/it/experts/{t}" for t in draw.experts]
    tensors = []
    for folder in folders:
        src = open_checkpoint(folder)
        tensors.append([src.read(n).float() for n, i in src.info().items() if i.dtype.is_floating_point])
        src.close()
    want = _direct(tensors[0], tensors[1:])
    stored = results.diagnostics[draw.key]
    a, b = draw.experts
    assert stored[("cosine", a, b)] == pytest.approx(want[("cosine", 0, 1)], rel=1e-5)
    assert stored[("sign_agreement", a, b)] == pytest.approx(want[("sign_agreement", 0, 1)], rel=1e-6)
    assert stored[("norm", a, "")] == pytest.approx(want[("norm", 0)], rel=1e-5)
    assert math.isfinite(stored[("mean_relative_distance", "", "")])


def test_outputs_are_split_to_fit_the_budget(tmp_path: Path) -> None:
    """plan_chunks on a fake draw: each plan's outputs plus working memory fit what the budget leaves."""
    from safetensors.torch import save_file

    folder = tmp_path / "base"
    folder.mkdir()
    save_file({"a": torch.zeros(1000), "b": torch.zeros(250)}, str(folder / "model.safetensors"))  # 5,000 bytes
    ref = ModelRef("base", str(folder), "x")
    group = StudyGroup("g", None, None, None, ref, {"t1": ref, "t2": ref})
    cells = tuple(
        MergeCell(f"c{i}", "g", i, m, m, "cells", ({},), 2, 0, ("t1", "t2"))
        for i, m in enumerate(["linear", "ties", "linear", "ties"])
    )
    job = DrawJob(group, 2, 0, ("t1", "t2"), "d", cells)
    from mergescale.config import InputModel, MergeConfig

    outputs = [(c, 0, MergeConfig(merge_method=c.method, models=[InputModel(model="x")])) for c in cells]
    context = StudyContext("s", EvalSpec(), (), False, 30_000, str(tmp_path))
    model_bytes = 5_000
    chunks, scratch = plan_chunks(job, outputs, context, model_bytes)
    room = 30_000 - model_bytes
    linear, stacked = 5_000 + 4 * 1000 * 2, 5_000 + 4 * 1000 * 4  # output + working memory on the largest tensor
    assert not scratch
    for chunk in chunks:
        assert sum(linear if c.method == "linear" else stacked for c, _, _ in chunk) <= room
    assert [c.key for chunk in chunks for c, _, _ in chunk] == [c.key for c in cells]
    assert len(chunks) > 1
    tiny = StudyContext("s", EvalSpec(), (), False, 6_000, str(tmp_path))
    chunks, scratch = plan_chunks(job, outputs, tiny, model_bytes)
    assert scratch == {(c.key, 0) for c in cells} and len(chunks) == len(cells)


def test_stacked_methods_that_block_cost_one_block_on_large_tensors(monkeypatch):
    """The engine merges a large tensor of TIES over row blocks: the study plans that, not the whole stack;
    methods without a blocked form still cost their stack."""
    import mergescale.engine.memory as memory
    from mergescale.methods import get_method

    numel, k = 50_000_000, 8
    ties, lore = get_method("ties"), get_method("lore")  # lore: no blocked form
    assert memory.stacked_working_bytes(ties.blocked is not None, 2, 1000) == 4 * 1000 * 4  # small: whole
    blocked = memory.stacked_working_bytes(ties.blocked is not None, k, numel)
    assert blocked == memory.BLOCK_BYTES + int(0.1 * k * numel) < 4 * numel * (k + 2)
    assert memory.stacked_working_bytes(lore.blocked is not None, k, numel) == 4 * numel * (k + 2)
