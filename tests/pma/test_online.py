"""Online averaging: PMAAverager on its own, and PMACallback inside a real (tiny) Trainer run."""

from __future__ import annotations

import json

import pytest
import torch
from pma_helpers import load_weights, tiny_llama, word_tokenizer
from transformers import TrainerCallback

from mergescale.errors import ConfigError
from mergescale.pma import PMAAverager, PMACallback, average_checkpoints


def test_sma_and_ema_match_their_formulas():
    models = [{"w": torch.randn(3, 4), "n": torch.tensor([i])} for i in range(5)]
    sma, ema = PMAAverager("sma"), PMAAverager("ema", alpha=0.3)
    for i, m in enumerate(models):
        sma.update(m, step=10 * (i + 1))
        ema.update(m, step=10 * (i + 1))
    mean = sum(m["w"].double() for m in models) / 5
    rec = models[0]["w"].double()
    for m in models[1:]:
        rec = 0.3 * m["w"].double() + 0.7 * rec
    assert torch.allclose(sma.averaged_state_dict()["w"].double(), mean, atol=1e-6)
    assert torch.allclose(ema.averaged_state_dict()["w"].double(), rec, atol=1e-6)
    assert sma.averaged_state_dict()["n"].item() == 4  # integer tensors keep the latest value
    assert (sma.count, sma.first_step, sma.last_step) == (5, 10, 50)


def test_state_round_trip_continues_identically(tmp_path):
    stream = [{"w": torch.randn(8)} for _ in range(6)]
    whole = PMAAverager("ema", alpha=0.2)
    for m in stream:
        whole.update(m)
    first = PMAAverager("ema", alpha=0.2)
    for m in stream[:3]:
        first.update(m)
    first.save_state(tmp_path / "state")
    assert {p.name for p in (tmp_path / "state").iterdir()} == {"average.safetensors", "state.json"}
    resumed = PMAAverager("ema", alpha=0.2)
    resumed.load_state(tmp_path / "state")
    for m in stream[3:]:
        resumed.update(m)
    assert torch.equal(resumed.averaged_state_dict()["w"], whole.averaged_state_dict()["w"])
    with pytest.raises(ConfigError, match="saved PMA state is ema"):
        PMAAverager("sma").load_state(tmp_path / "state")


def test_tied_weights_are_averaged_once_and_the_folder_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(0, tie=True)
    averager = PMAAverager("sma")
    snapshots = []
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        averager.update(model)
    assert "lm_head.weight" not in averager.averaged_state_dict()  # the same tensor as the embeddings
    averager.save_pretrained(tmp_path / "avg", model=model)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "avg")
    mean = sum(s["model.embed_tokens.weight"] for s in snapshots) / 3
    assert torch.allclose(loaded.lm_head.weight, mean, atol=1e-6)
    assert json.loads((tmp_path / "avg" / "pma.json").read_text())["updates"] == 3
    # a plain state dict (no transformers model) is written with the given config
    averager.save_pretrained(tmp_path / "plain", config=model.config.to_dict())
    assert torch.allclose(load_weights(tmp_path / "plain")["model.embed_tokens.weight"], mean, atol=1e-6)


# -- a real tiny training run ---------------------------------------------------------------------------------


class _Sequences(torch.utils.data.Dataset):
    """Generated text: counting sequences w_a, w_(a+1), ... with a random start, learnable by a tiny model."""

    def __init__(self, n: int = 512, length: int = 24, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(4, 124, (n,), generator=g)
        self.rows = [4 + (s - 4 + torch.arange(length)) % 120 for s in starts]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


class _StopAt(TrainerCallback):
    """Stops training after step ``step`` (a stand-in for a job killed after saving a checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _train(out, callbacks, *, max_steps=200, resume=None, eval_steps=None):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=3e-3,
        lr_scheduler_type="constant", warmup_steps=0, save_strategy="steps", save_steps=25, logging_steps=10,
        eval_strategy="steps" if eval_steps else "no", eval_steps=eval_steps, per_device_eval_batch_size=16,
        report_to=[], seed=0, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
        include_num_input_tokens_seen=True,
    )  # fmt: skip
    trainer = Trainer(
        model=tiny_llama(0), args=args, train_dataset=_Sequences(), eval_dataset=_Sequences(64, seed=1) if eval_steps else None,
        processing_class=word_tokenizer(), callbacks=callbacks,
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return trainer


@pytest.mark.slow
def test_callback_sma_equals_offline_pma_and_survives_resuming(tmp_path):
    torch.set_num_threads(1)
    full = tmp_path / "full"
    cb = PMACallback(strategy="sma", every=25)
    trainer = _train(full, [cb])
    history = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert history[-1] < history[0] - 1.0  # it really trained
    assert sorted(p.name for p in full.glob("pma-*")) == sorted(f"pma-{s}" for s in range(25, 201, 25))
    assert cb.averager.count == 8

    # the callback's SMA == offline pma over the same 8 checkpoints
    offline = average_checkpoints(full, tmp_path / "offline", window=8, progress=False)
    assert offline.steps == list(range(25, 201, 25))
    assert offline.checkpoints[-1].tokens == 200 * 8 * 24
    online, ref = load_weights(full / "pma-200"), load_weights(tmp_path / "offline")
    assert online.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(online[k], ref[k], atol=2e-6, rtol=1e-6)
    assert (full / "pma-200" / "tokenizer.json").is_file()

    # stop after step 100, resume from checkpoint-100: the same average as never stopping
    part = tmp_path / "part"
    _train(part, [PMACallback(strategy="sma", every=25), _StopAt(100)])
    assert not (part / "checkpoint-125").exists() and (part / "checkpoint-100" / "pma_state").is_dir()
    resumed_cb = PMACallback(strategy="sma", every=25)
    _train(part, [resumed_cb], resume=part / "checkpoint-100")
    assert resumed_cb.averager.count == 8  # 4 restored + 4 new
    final_full, final_part = load_weights(full / "checkpoint-200"), load_weights(part / "checkpoint-200")
    assert all(torch.equal(final_full[k], final_part[k]) for k in final_full)  # resuming is exact here...
    a, b = load_weights(full / "pma-200"), load_weights(part / "pma-200")
    assert all(torch.equal(a[k], b[k]) for k in a)  # ...and so is the average


@pytest.mark.slow
def test_eval_pma_loss_is_logged_beside_eval_loss(tmp_path):
    torch.set_num_threads(1)
    # EMA with alpha = 1 keeps only the newest weights: its loss must equal eval_loss
    same = PMACallback(strategy="ema", alpha=1.0, every=1, eval_pma=True, save_folders=False)
    trainer = _train(tmp_path / "a", [same], max_steps=30, eval_steps=30)
    entry = [e for e in trainer.state.log_history if "eval_pma_loss" in e][-1]
    evals = [e for e in trainer.state.log_history if "eval_loss" in e][-1]
    assert entry["step"] == 30 and entry["eval_pma_loss"] == pytest.approx(evals["eval_loss"], rel=1e-5)
    assert not list((tmp_path / "a").glob("pma-*"))
    # an SMA over the run differs, and training is undisturbed by the swap
    sma = PMACallback(strategy="sma", every=5, eval_pma=True)
    trainer2 = _train(tmp_path / "b", [sma], max_steps=30, eval_steps=30)
    entry2 = [e for e in trainer2.state.log_history if "eval_pma_loss" in e][-1]
    evals2 = [e for e in trainer2.state.log_history if "eval_loss" in e][-1]
    assert evals2["eval_loss"] == pytest.approx(evals["eval_loss"], rel=1e-6)
    assert entry2["eval_pma_loss"] != pytest.approx(evals2["eval_loss"], rel=1e-3)
    # the final average is written at the end of training too, as a loadable folder with its tokenizer
    assert (tmp_path / "b" / "pma-30" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "b" / "pma-30" / "pma.json").read_text())["updates"] == 6
