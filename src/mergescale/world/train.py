"""Training recipes on the Hugging Face ``Trainer``: WSD pre-training, its annealed branch, and fine-tuning.

- :func:`pretrain_stable`: warmup, then a constant learning rate, a Trainer checkpoint (``checkpoint-<step>/``
  with ``trainer_state.json``, optimizer state and the tokenizer) every ``checkpoint_every`` steps, with the PMA
  callback averaging online (``pma-<step>/`` beside each checkpoint) when it is installed.
- :func:`anneal`: the decay branch of warmup-stable-decay (Hu et al., MiniCPM, arXiv 2404.06395): from the last
  stable checkpoint, with its optimizer state, the rate falls linearly to zero on fresh data.
- :func:`finetune`: supervised fine-tuning with the loss on answers only (instruction tuning, experts,
  multitask), linear warmup then linear decay.

Recipes write into the folder they are given and hold no caching logic; :mod:`mergescale.world.build` decides
what runs and where the results go.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)
from transformers.trainer_callback import PrinterCallback

from mergescale.world.data import IGNORE, PadCollator, SupervisedDataset
from mergescale.world.presets import FinetuneSettings, ModelSize, PretrainSettings

# One callback per training run reports (step, total, loss) to whoever shows progress.
StepReporter = Callable[[int, int, float | None], None]


class _ReportSteps(TrainerCallback):
    def __init__(self, report: StepReporter) -> None:
        self.report = report
        self.loss: float | None = None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])
            self.report(state.global_step, state.max_steps, self.loss)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.report(state.global_step, state.max_steps, self.loss)


def new_model(
    size: ModelSize, tokenizer: PreTrainedTokenizerFast, max_length: int, seed: int
) -> LlamaForCausalLM:
    """A freshly initialised Llama of this size (tied embeddings: at these sizes they are most of the weights)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=max_length,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with no decay on norms and biases; built the same way in both WSD phases so the annealed branch
    can load the stable phase's optimizer state."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    # One fused kernel per step instead of ~10 ops per tensor: at these sizes the per-op cost is the cost
    # (measured on the quick `s` model: 2.5 -> 1.0 ms of a ~20 ms step).
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True)


def _args(
    out: Path, *, steps: int, batch_size: int, seed: int, save_steps: int | None, **extra: Any
) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        logging_steps=max(1, min(10, steps // 10)),
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        save_total_limit=None,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        dataloader_num_workers=0,
        seed=seed,
        data_seed=seed,
        max_grad_norm=1.0,
        **extra,
    )


class _AnswerLossTrainer(Trainer):
    """A ``Trainer`` whose loss projects onto the vocabulary only the positions that have a label.

    Supervised examples label only their answer (5-15 % of the positions of a padded batch); the language-model
    head and its log-softmax over every position were a third of a fine-tuning step (measured on the quick
    models: 25-35 % of the step time saved). The loss is the same mean cross-entropy over labelled tokens that
    the model's own loss computes: ``-1/K sum_k log softmax(W h_{t_k})[y_{t_k + 1}]``.
    """

    def compute_loss(
        self, model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool = False, **kwargs: Any
    ) -> Any:
        logits, targets, _ = _answer_logits(model, inputs)  # (K, V), (K,)
        loss = torch.nn.functional.cross_entropy(logits.float(), targets)
        return (loss, {"logits": logits}) if return_outputs else loss


def _answer_logits(
    model: Any, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the positions whose next token is labelled (the decoder runs on every position, the vocabulary
    projection only on these), that token, and the row each position belongs to (row-major order, so a row's
    positions are contiguous and in order)."""
    labels = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    keep = labels != IGNORE  # (B, T-1)
    out = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hidden = out.last_hidden_state[:, :-1]  # (B, T-1, H)
    logits = model.get_output_embeddings()(hidden[keep])  # (K, V)
    return logits, labels[keep], keep.nonzero()[:, 0]


def _trainer(
    model: Any,
    args: TrainingArguments,
    data: Dataset,
    tokenizer: Any,
    *,
    report: StepReporter | None,
    callbacks: Sequence[TrainerCallback] = (),
    optimizers: tuple = (None, None),
    collator: Any = None,
    answer_loss: bool = False,
) -> Trainer:
    # Without a collator the Trainer pads every batch through the tokenizer, even fixed-length pre-training
    # blocks (5 % of a pre-training step); blocks are stacked, supervised examples padded by PadCollator.
    trainer = (_AnswerLossTrainer if answer_loss else Trainer)(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        data_collator=collator,
        callbacks=list(callbacks),
        optimizers=optimizers,
    )
    trainer.remove_callback(PrinterCallback)  # progress goes to the caller's bar, not to stdout
    if report is not None:
        trainer.add_callback(_ReportSteps(report))
    return trainer


def pma_callbacks(start_step: int) -> list[TrainerCallback]:
    """The online PMA averager (issue #5): an SMA of the weights at every step from ``start_step``, written as
    ``pma-<step>/`` beside each later checkpoint. The one place the world build touches online PMA."""
    from mergescale.pma import PMACallback

    return [PMACallback(strategy="sma", every=1, start_step=start_step)]


def pretrain_stable(
    model: LlamaForCausalLM,
    tokenizer: Any,
    blocks: Dataset,
    settings: PretrainSettings,
    out: Path,
    *,
    lr_scale: float,
    seed: int,
    pma_start: int = 0,
    report: StepReporter | None = None,
) -> None:
    """Warmup then constant rate; Trainer checkpoints every ``checkpoint_every`` steps under ``out``, and the
    online average of the steps from ``pma_start`` on beside them."""
    lr = settings.lr * lr_scale
    steps = settings.warmup_steps + settings.stable_steps
    opt = _optimizer(model, lr, settings.weight_decay)
    warmup = max(1, settings.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    args = _args(
        out, steps=steps, batch_size=settings.batch_size, seed=seed, save_steps=settings.checkpoint_every
    )
    trainer = _trainer(
        model,
        args,
        blocks,
        tokenizer,
        report=report,
        callbacks=pma_callbacks(pma_start),
        optimizers=(opt, sched),
        collator=default_data_collator,
    )
    trainer.train()


def anneal(
    checkpoint: Path,
    tokenizer: Any,
    blocks: Dataset,
    settings: PretrainSettings,
    out: Path,
    *,
    lr_scale: float,
    seed: int,
    report: StepReporter | None = None,
) -> None:
    """Decay the rate linearly from its peak to zero over ``anneal_steps``, starting from ``checkpoint`` (weights
    and optimizer state); the annealed model is saved in ``out``."""
    model = LlamaForCausalLM.from_pretrained(checkpoint, trust_remote_code=False)
    opt = _optimizer(model, settings.lr * lr_scale, settings.weight_decay)
    state = checkpoint / "optimizer.pt"
    if state.is_file():  # momentum carried over: the anneal continues the run rather than restarting it
        opt.load_state_dict(torch.load(state, map_location="cpu", weights_only=True))
        for group in opt.param_groups:  # this run's peak rate (the stable phase's is stored as initial_lr)
            group["lr"] = group["initial_lr"] = settings.lr * lr_scale
    n = settings.anneal_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / n))
    args = _args(out / "_trainer", steps=n, batch_size=settings.batch_size, seed=seed + 1, save_steps=None)
    trainer = _trainer(
        model, args, blocks, tokenizer, report=report, optimizers=(opt, sched), collator=default_data_collator
    )
    trainer.train()
    trainer.save_model(str(out))
    shutil.rmtree(out / "_trainer", ignore_errors=True)


class _BestOnValidation(TrainerCallback):
    """Model selection on validation answers, scored from one batched teacher-forced forward pass every
    ``every`` steps: a multiple-choice example is right when its gold continuation's first token has the
    highest logit among the choices' first tokens, a generation example when every answer token is the greedy
    one. The best weights are kept and put back at the end; training stops after ``patience`` checks without
    improvement (ties go to the lower answer loss)."""

    def __init__(
        self,
        validation: SupervisedDataset,
        collator: PadCollator,
        every: int,
        patience: int,
        min_steps: int = 0,
    ) -> None:
        self.batch = collator([validation[i] for i in range(len(validation))])
        self.candidates = validation.candidates
        self.every, self.patience, self.min_steps = every, patience, min_steps
        self.best: tuple[float, float] | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_step = 0
        self.stale = 0

    @torch.no_grad()
    def score(self, model: Any) -> tuple[float, float]:
        was_training = model.training
        model.eval()
        logits, targets, rows = _answer_logits(model, self.batch)  # (K, V), (K,), (K,)
        misses = torch.zeros(len(self.candidates)).index_add_(0, rows, (logits.argmax(-1) != targets).float())
        # (B,): where each row's first answer position is among the K (rows are sorted)
        firsts = torch.searchsorted(rows, torch.arange(len(self.candidates)))
        right = []
        for i, cands in enumerate(self.candidates):
            if cands is None:  # generation: every answer token is the greedy one
                right.append(bool(misses[i] == 0))
                continue
            first = int(firsts[i])
            right.append(cands[int(logits[first, cands].argmax())] == int(targets[first]))
        nll = torch.nn.functional.cross_entropy(logits.float(), targets).item()
        model.train(was_training)
        return sum(right) / len(right), -nll

    def check(self, model: Any, step: int) -> bool:
        """Score now; True when training should stop (all answers right, or no progress for ``patience`` checks
        once ``min_steps`` are done)."""
        score = self.score(model)
        if self.best is None or score > self.best:
            self.best, self.best_step, self.stale = score, step, 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.stale += 1
        return score[0] == 1.0 or (self.stale >= self.patience and step >= self.min_steps)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None and state.global_step % self.every == 0 and self.check(model, state.global_step):
            control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None:
            return
        if self.best_step != state.global_step:
            self.check(model, state.global_step)
        if self.best_state is not None:
            model.load_state_dict(self.best_state)


def finetune(
    base: Path,
    tokenizer: Any,
    data: Dataset,
    settings: FinetuneSettings,
    out: Path,
    *,
    lr_scale: float,
    seed: int,
    validation: SupervisedDataset | None = None,
    report: StepReporter | None = None,
) -> dict[str, Any]:
    """Full fine-tune of ``base`` on ``data`` (answers only); the result is saved in ``out``.

    Schedule: linear warmup, a constant rate, and a linear decay to zero over the last ``decay_fraction`` of the
    steps. Tiny models learn a task in a sudden jump after some steps at a high rate; a linear decay from the
    start spends half the run at rates too low to get there. With ``validation`` (and ``eval_every`` > 0) the
    weights that answer the validation examples best are kept, and training stops once they stop improving:
    a task learnt in 50 steps is not over-fitted for 200 more. Returns the steps run and the selection.
    """
    model = LlamaForCausalLM.from_pretrained(base, trust_remote_code=False)
    opt = _optimizer(model, settings.lr * lr_scale, settings.weight_decay)
    steps, warmup = settings.steps, settings.warmup_steps
    decay = max(1, round(settings.decay_fraction * steps))

    def rate(s: int) -> float:  # multiplier of the peak rate at optimizer step s
        return min(1.0, (s + 1) / max(1, warmup), (steps - s) / decay)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    collator = PadCollator(tokenizer.pad_token_id)
    callbacks: list[TrainerCallback] = []
    selector = None
    if validation is not None and len(validation) and settings.eval_every:
        selector = _BestOnValidation(
            validation, collator, settings.eval_every, settings.patience, settings.min_steps
        )
        callbacks.append(selector)
    args = _args(out / "_trainer", steps=steps, batch_size=settings.batch_size, seed=seed, save_steps=None)
    trainer = _trainer(
        model,
        args,
        data,
        tokenizer,
        report=report,
        collator=collator,
        optimizers=(opt, sched),
        callbacks=callbacks,
        answer_loss=True,
    )
    state = trainer.train()
    trainer.save_model(str(out))
    shutil.rmtree(out / "_trainer", ignore_errors=True)
    info: dict[str, Any] = {"steps": int(state.global_step)}
    if selector is not None and selector.best is not None:
        info.update(best_step=selector.best_step, validation_answer_acc=round(selector.best[0], 4))
    return info


def epochs(steps: int, batch_size: int, n: int) -> float:
    """How many passes over ``n`` examples ``steps`` batches make (recorded in world.json)."""
    return math.inf if n == 0 else steps * batch_size / n
