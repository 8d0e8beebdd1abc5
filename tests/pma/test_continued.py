"""PMA-init and spike recovery: continued training from an average, with per-step loss and gradient norm."""

from __future__ import annotations

import math

import pytest
import torch
from pma_helpers import tiny_llama, word_tokenizer

from mergescale.pma.ablation import iter_ablation
from mergescale.pma.average import PMASettings
from mergescale.pma.continued import (
    ContinueSettings,
    SpikeSettings,
    TrainCurve,
    pma_init,
    spike_recovery,
    train_arm,
)
from mergescale.world.data import BlockDataset

STABLE = ContinueSettings(steps=24, lr=3e-3, schedule="constant", warmup_steps=4, batch_size=8)


@pytest.fixture(scope="module")
def markov_data() -> BlockDataset:
    """A little language: every word has three likely successors, so a tiny model's loss falls steadily."""
    g = torch.Generator().manual_seed(0)
    succ = torch.randint(4, 128, (128, 3), generator=g)
    seq = [4]
    for _ in range(32 * 8 * 120):
        seq.append(int(succ[seq[-1], int(torch.randint(0, 3, (1,), generator=g))]))
    return BlockDataset(torch.tensor(seq[: len(seq) // 32 * 32]).view(-1, 32))  # (N, 32)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, markov_data):
    """A stable-phase run of a tiny Llama: checkpoint-8, -16, -24 with optimizer state and loss logs."""
    root = tmp_path_factory.mktemp("tiny-run")
    tiny_llama(0).save_pretrained(root / "init")
    train_arm(root / "init", markov_data, STABLE, tokenizer=word_tokenizer(), save_every=8, out_dir=root / "run")
    return root / "run"


class _FirstWeights:
    """Keeps the model's weights when training begins (before any update)."""

    def __new__(cls, box: dict):
        from transformers import TrainerCallback

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                box["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}

        return _CB()


def test_pma_init_starts_from_the_average(tiny_run, markov_data):
    [step] = list(iter_ablation(tiny_run, [PMASettings("sma", 3)], [24], progress=False))
    [average] = step.results
    assert average.steps == [8, 16, 24]
    box: dict = {}
    settings = ContinueSettings(steps=6, lr=3e-3, schedule="anneal", batch_size=8)
    res = pma_init(average, tiny_run / "checkpoint-24", markov_data, settings, tokenizer=word_tokenizer(),
                   callbacks=[_FirstWeights(box)])  # fmt: skip
    got = box["weights"]
    for k, v in average.state_dict.items():
        assert torch.equal(got[k], v.float()), k
    assert res.averaged_steps == [8, 16, 24] and res.last_step == 24
    for curve in (res.pma, res.last):
        assert curve.steps == list(range(1, 7))
        assert all(math.isfinite(x) for x in curve.loss + curve.grad_norm)
        assert curve.lr[0] == pytest.approx(3e-3) and curve.lr[-1] == pytest.approx(3e-3 / 6)  # linear decay
        assert curve.grad_norm_std is not None and curve.max_grad_norm_jump is not None
    assert res.pma.loss[0] != res.last.loss[0]


def test_both_arms_see_the_same_batches(tiny_run, markov_data):
    # from the same weights, the two arms must be the same run: same data order, seed and optimizer state
    settings = ContinueSettings(steps=4, lr=3e-3, schedule="anneal", batch_size=8)
    last = tiny_run / "checkpoint-24"
    res = pma_init(last, last, markov_data, settings, tokenizer=word_tokenizer())
    assert res.pma.loss == res.last.loss and res.pma.grad_norm == res.last.grad_norm


def test_curve_statistics():
    c = TrainCurve(steps=[1, 2, 3, 4], loss=[3, 2, 2, 1], grad_norm=[1.0, 3.0, 2.0, 2.0])
    assert c.max_grad_norm_jump == 2.0 and c.final_loss == 1
    assert c.grad_norm_std == pytest.approx(math.sqrt(((1 - 2) ** 2 + 1 + 0 + 0) / 4))
    assert TrainCurve().grad_norm_std is None and TrainCurve().max_grad_norm_jump is None


@pytest.mark.slow
def test_spike_is_detected_where_injected_and_both_recoveries_resume(tiny_run, markov_data, tmp_path):
    spike = SpikeSettings(factor=300, at=10, length=3, steps=16, save_every=2, k=3, resume_steps=4)
    res = spike_recovery(tiny_run / "checkpoint-24", markov_data, spike, STABLE, tokenizer=word_tokenizer(),
                         workdir=tmp_path)  # fmt: skip
    assert res.spiked.lr[8] == pytest.approx(3e-3 * 300)  # the update of step 9 is the first spiked one
    assert res.detected_at == 10 and res.spike.last_good_step == 9
    assert res.averaged_steps == [4, 6, 8] and res.rollback_step == 8
    for arm in (res.from_average, res.from_rollback, res.unspiked):
        assert arm.steps[-1] == 12
    assert res.from_average.steps == list(range(9, 13))
    # the rollback arm repeats the unspiked run from step 8 on: same weights, optimizer state and batches
    assert res.from_rollback.loss == res.unspiked.loss[8:]
    assert max(res.spiked.loss[10:]) > 3 * max(res.unspiked.loss[8:])
