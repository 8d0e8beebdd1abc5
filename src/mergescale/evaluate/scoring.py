"""Batched log-likelihood scoring on a Hugging Face causal LM, with each context run once for all its choices.

The harness runs ``context + choice`` once per choice. Here one row holds the context followed by every
choice, packed::

    tokens    c0 c1 c2 c3 | a0 a1 | b0 b1 b2          (context, choice A without its last token, choice B ...)
    position   0  1  2  3 |  4  5 |  4  5  6          (each choice continues the context's positions)
    segment    0  0  0  0 |  1  1 |  2  2  2

and a 4-D attention mask lets a token see the earlier tokens of the context and of its own segment only, so
each choice is scored exactly as if it followed the context alone (same positions, same visible keys), up to
float rounding. The last token of a choice is never an input (nothing after it is scored), and logits are
computed only at the positions that predict a choice token (``logits_to_keep``).

Rows are sorted by length (longest first, so memory problems show at once) and batched; results go back to
their requests' order, so neither the batch size nor the order changes them beyond float rounding.
Models whose attention cannot take a 4-D mask (e.g. flash-attention) are scored one choice per row instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mergescale.evaluate.encoding import LoglikelihoodRequest

_PACKABLE_ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class _Row:
    """One input row: its tokens and, per continuation, where its targets are predicted."""

    request: int
    tokens: list[int]
    positions: list[int]
    segments: list[int]
    # per continuation: (index of the request's continuation, row positions predicting it, its tokens)
    targets: list[tuple[int, list[int], tuple[int, ...]]]


def can_pack(model: torch.nn.Module) -> bool:
    """Whether the model takes a custom 4-D attention mask and position ids (needed to pack choices)."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    params = inspect.signature(model.forward).parameters
    return impl in _PACKABLE_ATTENTION and "position_ids" in params


def build_rows(requests: Sequence[LoglikelihoodRequest], *, pack: bool) -> list[_Row]:
    """Lay out requests as rows: one row per request when packing, else one row per continuation."""
    rows: list[_Row] = []
    for r, req in enumerate(requests):
        groups = [list(range(len(req.conts)))] if pack else [[k] for k in range(len(req.conts))]
        for ks in groups:
            n_ctx = len(req.ctx)
            tokens = list(req.ctx)
            positions = list(range(n_ctx))
            segments = [0] * n_ctx
            targets = []
            for seg, k in enumerate(ks, start=1):
                cont = req.conts[k]
                start = len(tokens)
                body = cont[:-1]  # the last token is predicted, never fed
                tokens.extend(body)
                positions.extend(range(n_ctx, n_ctx + len(body)))
                segments.extend([seg] * len(body))
                # cont[0] is predicted at the context's last token, cont[t] at the segment's token t-1
                predict_at = [n_ctx - 1, *range(start, start + len(body))]
                targets.append((k, predict_at, cont))
            rows.append(
                _Row(request=r, tokens=tokens, positions=positions, segments=segments, targets=targets)
            )
    return rows


def attention_mask_4d(segments: torch.Tensor, dtype: torch.dtype, *, boolean: bool) -> torch.Tensor:
    """Mask letting query i see key j iff j <= i and j is a context token or in i's segment.

    segments: (B, T) with 0 = context, k = choice k, -1 = padding. Padding queries see the context (never an
    empty row, which would give NaN), and no real token sees padding. Returns (B, 1, T, T): boolean (True =
    attend) or additive float (0 / most negative value).
    """
    t = segments.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()  # (T, T)
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    context_key = (segments == 0)[:, None, :]  # (B, 1, T)
    allowed = causal[None] & (same | context_key)  # (B, T, T)
    allowed = allowed[:, None]  # (B, 1, T, T)
    if boolean:
        return allowed
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


@torch.inference_mode()
def score_loglikelihoods(
    model: torch.nn.Module,
    requests: Sequence[LoglikelihoodRequest],
    *,
    batch_size: int = 32,
    pad_token_id: int = 0,
    on_progress: Callable[[int], None] | None = None,
) -> list[list[float]]:
    """Sum of log-probabilities of every continuation of every request given its context.

    Returns, per request, one float per continuation (in ``request.conts`` order): log p(cont | ctx) =
    Σₜ log softmax(logits at the position before token t)[token t], as lm-evaluation-harness computes it.
    ``on_progress(n)`` is called after each batch with the number of requests it finished.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    pack = can_pack(model)
    rows = build_rows(requests, pack=pack)
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i].tokens), i))
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    keep_supported = "logits_to_keep" in inspect.signature(model.forward).parameters
    boolean_mask = getattr(model.config, "_attn_implementation", None) == "sdpa"

    results: list[list[float]] = [[0.0] * len(req.conts) for req in requests]
    remaining = [len(req.conts) for req in requests]  # rows a request still waits for (unpacked mode)
    for start in range(0, len(order), batch_size):
        batch = [rows[i] for i in order[start : start + batch_size]]
        b, t = len(batch), max(len(row.tokens) for row in batch)
        input_ids = torch.full((b, t), pad_token_id, dtype=torch.long)  # (B, T), right padding
        positions = torch.zeros((b, t), dtype=torch.long)
        segments = torch.full((b, t), -1, dtype=torch.long)
        for i, row in enumerate(batch):
            n = len(row.tokens)
            input_ids[i, :n] = torch.tensor(row.tokens)
            positions[i, :n] = torch.tensor(row.positions)
            segments[i, :n] = torch.tensor(row.segments)

        # Flatten every (row, position, target token, continuation) that is scored in this batch.
        row_idx: list[int] = []
        pos_idx: list[int] = []
        tgt: list[int] = []
        owner: list[int] = []
        owners: list[tuple[int, int]] = []
        for i, row in enumerate(batch):
            for k, predict_at, cont in row.targets:
                row_idx.extend([i] * len(cont))
                pos_idx.extend(predict_at)
                tgt.extend(cont)
                owner.extend([len(owners)] * len(cont))
                owners.append((row.request, k))
        pos_t = torch.tensor(pos_idx)

        kwargs: dict = {"input_ids": input_ids.to(device), "use_cache": False}
        if pack:
            kwargs["attention_mask"] = attention_mask_4d(segments, dtype, boolean=boolean_mask).to(device)
            kwargs["position_ids"] = positions.to(device)
        else:
            kwargs["attention_mask"] = (segments >= 0).long().to(device)  # (B, T); right padding, causal
        column = pos_t
        if keep_supported:
            keep = torch.unique(pos_t)  # sorted positions any row scores
            kwargs["logits_to_keep"] = keep.to(device)
            lookup = torch.full((t,), -1, dtype=torch.long)
            lookup[keep] = torch.arange(len(keep))
            column = lookup[pos_t]
        logits = model(**kwargs).logits  # (B, K or T, V)
        picked = logits[torch.tensor(row_idx, device=device), column.to(device)].float()  # (N, V)
        token_lp = picked.gather(1, torch.tensor(tgt, device=device)[:, None])[:, 0] - torch.logsumexp(
            picked, dim=-1
        )  # (N,)
        sums = torch.zeros(len(owners), dtype=torch.float32, device=device)
        sums.index_add_(0, torch.tensor(owner, device=device), token_lp)  # (continuations in batch,)
        done = 0
        for (r, k), value in zip(owners, sums.tolist(), strict=True):
            results[r][k] = value
        if pack:
            done = len(batch)
        else:
            for row in batch:
                remaining[row.request] -= 1
                done += remaining[row.request] == 0
        if on_progress is not None:
            on_progress(done)
    return results
