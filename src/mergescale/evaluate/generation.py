"""Greedy generation in batches, cut at stop sequences (lm-evaluation-harness's ``generate_until`` semantics).

Prompts are sorted by length (longest first) and left-padded; decoding stops for a row when its text contains a
stop sequence or the EOS token, and for the batch when every row has stopped or ``max_new_tokens`` is reached.
The decoded continuation is cut at the first occurrence of each stop sequence, in order, as the harness does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)


class _StopOnStrings(StoppingCriteria):
    """Stop a row once its generated text (after the prompt) contains one of the stop sequences."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.prompt_length = prompt_length

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_length :]  # (B, generated so far)
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        done = [any(s in text for s in self.stop) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _NonFiniteLogits(LogitsProcessor):
    """Notes which rows ever got a NaN or +Inf logit (-Inf is a legitimate "never this token"); changes nothing."""

    def __init__(self, rows: int) -> None:
        self.rows = [False] * rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        bad = (torch.isnan(scores) | torch.isposinf(scores)).any(dim=-1).tolist()  # (B,)
        self.rows = [seen or now for seen, now in zip(self.rows, bad, strict=True)]
        return scores


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the first occurrence of each stop sequence (applied in order, as the harness does)."""
    for s in stop:
        if s:
            text = text.split(s)[0]
    return text


@torch.inference_mode()
def generate_greedy(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    stop: Sequence[str],
    max_new_tokens: int,
    max_length: int,
    batch_size: int = 32,
    on_progress: Callable[[int], None] | None = None,
    nonfinite_rows: list[int] | None = None,
) -> list[str]:
    """Greedy continuation of every tokenised prompt, decoded and cut at ``stop``.

    A prompt longer than ``max_length - max_new_tokens`` keeps its last tokens (the harness's left truncation).
    With ``nonfinite_rows`` (a list), the index of every prompt whose logits held a NaN or +Inf at some step is
    appended to it (their greedy tokens are meaningless).
    """
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    budget = max(1, max_length - max_new_tokens)
    prompts = [list(p)[-budget:] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    outputs: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)  # (B, T), left padding
        attention = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(prompts[i])
            input_ids[row, width - n :] = torch.tensor(prompts[i])
            attention[row, width - n :] = 1
        watch = _NonFiniteLogits(len(idx))
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            generation_config=config,
            stopping_criteria=StoppingCriteriaList([_StopOnStrings(tokenizer, stop, width)]),
            logits_processor=LogitsProcessorList([watch]),
        )  # (B, T + new)
        if nonfinite_rows is not None:
            nonfinite_rows.extend(i for row, i in enumerate(idx) if watch.rows[row])
        texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
        for i, text in zip(idx, texts, strict=True):
            outputs[i] = cut_at_stop(text, stop)
        if on_progress is not None:
            on_progress(len(idx))
    return outputs
