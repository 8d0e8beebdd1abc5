"""Greedy generation in batches, cut at stop sequences (lm-evaluation-harness's ``generate_until`` semantics).

Prompts are sorted by length (longest first) and left-padded; decoding stops for a row when its text contains a
stop sequence or the EOS token, and for the batch when every row has stopped or ``max_new_tokens`` is reached.
The decoded continuation is cut at the first occurrence of each stop sequence, in order, as the harness does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


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

    The decoding loop is ``model.generate``'s greedy search written out (a key-value cache, positions from the
    attention mask, the last position's logits only, finished rows padded): the same tokens (tested against
    ``generate`` and lm-evaluation-harness), without the per-step machinery of logits processors and stopping
    criteria, which costs more than the forward pass of a small model.
    """
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    budget = max(1, max_length - max_new_tokens)
    prompts = [list(p)[-budget:] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    forward = _Forward(model)
    stops = [s for s in stop if s]
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
        tokens, bad = _greedy(
            forward, tokenizer, input_ids.to(device), attention.to(device), max_new_tokens, pad_id, stops
        )
        if nonfinite_rows is not None:
            nonfinite_rows.extend(i for row, i in enumerate(idx) if bad[row])
        texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
        for i, text in zip(idx, texts, strict=True):
            outputs[i] = cut_at_stop(text, stop)
        if on_progress is not None:
            on_progress(len(idx))
    return outputs


class _Forward:
    """One decoding step of a causal LM with a key-value cache, across transformers versions' argument names."""

    def __init__(self, model: Any) -> None:
        import inspect

        self.model = model
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.positions = "position_ids" in params
        self.keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # transformers 4.x
            return DynamicCache()

    def __call__(
        self, ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        kwargs: dict[str, Any] = {self.cache_arg: cache, "use_cache": True}
        if self.positions:
            kwargs["position_ids"] = positions
        if self.keep:
            kwargs[self.keep] = 1
        logits = self.model(input_ids=ids, attention_mask=attention, **kwargs).logits  # (B, T or 1, V)
        return logits[:, -1, :]  # (B, V)


def _greedy(
    forward: _Forward,
    tokenizer: Any,
    ids: torch.Tensor,
    attention: torch.Tensor,
    max_new_tokens: int,
    pad_id: int,
    stops: list[str],
) -> tuple[torch.Tensor, list[bool]]:
    """(B, new) greedy tokens of a left-padded batch, padding after a row finished (EOS or a stop string), and
    which rows ever saw a NaN / +Inf logit."""
    eos = tokenizer.eos_token_id
    rows = ids.shape[0]
    positions = (attention.cumsum(-1) - 1).masked_fill(attention == 0, 1)  # (B, T), as generate() sets them
    cache = forward.new_cache()
    logits = forward(ids, attention, positions, cache)  # (B, V)
    done = torch.zeros(rows, dtype=torch.bool, device=ids.device)  # (B,)
    bad = [False] * rows
    new: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        now = (torch.isnan(logits) | torch.isposinf(logits)).any(-1).tolist()
        bad = [b or n for b, n in zip(bad, now, strict=True)]
        token = torch.where(done, torch.full_like(done, pad_id, dtype=torch.long), logits.argmax(-1))  # (B,)
        new.append(token)
        if eos is not None:
            done |= token == eos
        if stops:  # the rows still running whose text now holds a stop string
            generated = torch.stack(new, 1)  # (B, step + 1)
            for r in (~done).nonzero().flatten().tolist():
                if any(s in tokenizer.decode(generated[r], skip_special_tokens=True) for s in stops):
                    done[r] = True
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        attention = torch.cat([attention, attention.new_ones((rows, 1))], 1)  # (B, T + step + 1)
        positions = positions[:, -1:] + 1  # (B, 1)
        logits = forward(token[:, None], attention, positions, cache)
    return torch.stack(new, 1), bad
