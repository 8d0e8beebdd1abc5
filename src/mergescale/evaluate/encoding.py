"""Tokenisation of (context, continuation) pairs exactly as lm-evaluation-harness's HF backend does it.

The harness (``TemplateLM._encode_pair``, ``HFLM.tok_encode``, ``TemplateLM.loglikelihood``, v0.4):

* trailing whitespace of the context moves to the front of the continuation;
* ``whole = encode(context + continuation)``, ``context_enc = encode(context)`` and the continuation's tokens are
  ``whole[len(context_enc):]`` (so a merge across the boundary is scored the way the harness scores it);
* ``encode`` uses the tokenizer's default special tokens, except that a string already starting with the prefix
  token's text is encoded without them;
* an empty context becomes the prefix token (BOS, else EOS) and the continuation is encoded without special
  tokens;
* a pair longer than ``max_length + 1`` tokens loses tokens from the left of its context.

The context encoding does not depend on the choice, so all choices of one example share it: the scorer runs it
once (see :mod:`mergescale.evaluate.scoring`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mergescale.errors import TaskError

_DEFAULT_MAX_LENGTH = 2048  # the harness's default when neither config nor tokenizer gives one
_TOKENIZER_INFINITY = 1000000000000000019884624838656  # transformers' "model_max_length not set"


@dataclass(frozen=True)
class LoglikelihoodRequest:
    """Score every continuation given one shared context: ``ctx`` and each of ``conts`` are token ids.

    ``owner`` says which example the request belongs to and ``choice_ids`` which choice each continuation is.
    """

    owner: int
    ctx: tuple[int, ...]
    conts: tuple[tuple[int, ...], ...]
    choice_ids: tuple[int, ...]


@dataclass(frozen=True)
class EncoderSettings:
    """What the harness-style encoder needs to know about the model and tokenizer."""

    prefix_token_id: int
    prefix_text: str
    max_length: int

    @classmethod
    def for_model(cls, tokenizer: Any, config: Any | None) -> EncoderSettings:
        """Prefix token (BOS, else EOS) and maximum length resolved as ``HFLM.prefix_token_id`` and
        ``resolve_max_length`` do: ``n_positions``, ``max_position_embeddings``, ``n_ctx`` of the (text)
        config, then the tokenizer's ``model_max_length``, then 2048."""
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise TaskError(
                "the tokenizer has neither a BOS nor an EOS token to condition an empty context on"
            )
        return cls(
            prefix_token_id=int(prefix),
            prefix_text=tokenizer.decode(prefix),
            max_length=resolve_max_length(config, tokenizer),
        )


def resolve_max_length(config: Any | None, tokenizer: Any | None) -> int:
    """The model's context length, resolved in lm-evaluation-harness's order."""
    cfg = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, attr, None)
        if value is not None:
            return int(value)
    model_max = getattr(tokenizer, "model_max_length", None)
    if model_max is not None and model_max != _TOKENIZER_INFINITY:
        return int(model_max)
    return _DEFAULT_MAX_LENGTH


def encode_batch(
    tokenizer: Any, settings: EncoderSettings, strings: Sequence[str], *, special: bool | None = None
) -> list[list[int]]:
    """``HFLM.tok_encode`` for many strings at once (one call into the fast tokenizer, not one per string).

    ``special=None`` uses the tokenizer's default special tokens, except for strings that already start with
    the prefix token's text; True / False force them on / off.
    """
    if not strings:
        return []
    if special is not None:
        return [list(ids) for ids in tokenizer(list(strings), add_special_tokens=special)["input_ids"]]
    with_bos = [
        i for i, s in enumerate(strings) if settings.prefix_text and s.startswith(settings.prefix_text)
    ]
    out = [list(ids) for ids in tokenizer(list(strings), add_special_tokens=True)["input_ids"]]
    if with_bos:
        plain = tokenizer([strings[i] for i in with_bos], add_special_tokens=False)["input_ids"]
        for i, ids in zip(with_bos, plain, strict=True):
            out[i] = list(ids)
    return out


def encode_choice_requests(
    tokenizer: Any, settings: EncoderSettings, contexts: Sequence[str], continuations: Sequence[Sequence[str]]
) -> list[LoglikelihoodRequest]:
    """Encode every (context, continuation) pair as the harness does and group the continuations of one
    example that share their context tokens into one request (normally: one request per example)."""
    stripped: list[str] = []
    moved: list[str] = []
    for context in contexts:
        body = context.rstrip()
        stripped.append(body)
        moved.append(context[len(body) :])  # trailing whitespace joins the continuation
    # One batched call for the contexts, one for every context+continuation string.
    nonempty = [i for i, c in enumerate(contexts) if c != ""]
    ctx_encs: dict[int, list[int]] = dict(
        zip(nonempty, encode_batch(tokenizer, settings, [stripped[i] for i in nonempty]), strict=True)
    )
    whole_strings = [stripped[i] + moved[i] + cont for i in nonempty for cont in continuations[i]]
    whole_encs = iter(encode_batch(tokenizer, settings, whole_strings))
    empty = [i for i, c in enumerate(contexts) if c == ""]
    bare = iter(
        encode_batch(tokenizer, settings, [cont for i in empty for cont in continuations[i]], special=False)
    )

    requests: list[LoglikelihoodRequest] = []
    for i in range(len(contexts)):
        pairs: list[tuple[list[int], list[int]]] = []
        for _ in continuations[i]:
            if contexts[i] == "":
                cont = next(bare)
                if cont and cont[0] == settings.prefix_token_id:
                    ctx, cont = cont[:1], cont[1:]
                else:
                    ctx = [settings.prefix_token_id]
            else:
                ctx = ctx_encs[i]
                cont = next(whole_encs)[len(ctx) :]
            pairs.append(_truncate(ctx, cont, settings.max_length, i))
        requests.extend(_group(i, pairs))
    return requests


def encode_rolling_requests(
    tokenizer: Any, settings: EncoderSettings, texts: Sequence[str]
) -> tuple[list[LoglikelihoodRequest], list[int]]:
    """Perplexity requests: every token of every text is predicted, the first one from the prefix token.

    Texts are encoded without special tokens and cut into the harness's rolling windows
    (``get_rolling_token_windows(context_len=1)`` + ``make_disjoint_window``), each window one request.
    Returns the requests and the number of scored tokens of each text.
    """
    max_len = settings.max_length
    requests: list[LoglikelihoodRequest] = []
    counts: list[int] = []
    for i, tokens in enumerate(encode_batch(tokenizer, settings, texts, special=False)):
        counts.append(len(tokens))
        if not tokens:
            raise TaskError(f"text {i} has no tokens")
        first = min(max_len, len(tokens))
        windows = [([settings.prefix_token_id, *tokens[: first - 1]], tokens[:first])]
        predicted = first
        while predicted < len(tokens):
            n_pred = min(len(tokens) - predicted, max_len)
            end = predicted + n_pred
            windows.append((tokens[max(end - max_len - 1, 0) : end - 1], tokens[end - n_pred : end]))
            predicted += n_pred
        for w, (inp, pred) in enumerate(windows):
            ctx = inp[: len(inp) - (len(pred) - 1)]  # make_disjoint_window
            requests.append(
                LoglikelihoodRequest(owner=i, ctx=tuple(ctx), conts=(tuple(pred),), choice_ids=(w,))
            )
    return requests, counts


def _truncate(ctx: list[int], cont: list[int], max_length: int, owner: int) -> tuple[list[int], list[int]]:
    if not cont:
        raise TaskError(f"example {owner}: a continuation encodes to no tokens")
    if len(cont) > max_length:
        raise TaskError(
            f"example {owner}: a continuation of {len(cont)} tokens exceeds the model's {max_length}"
        )
    if len(ctx) + len(cont) > max_length + 1:
        # The harness feeds (ctx + cont)[-(max_length + 1):][:-1]: the context loses tokens from the left.
        ctx = ctx[len(ctx) + len(cont) - (max_length + 1) :]
    return ctx, cont


def _group(owner: int, pairs: list[tuple[list[int], list[int]]]) -> list[LoglikelihoodRequest]:
    by_ctx: dict[tuple[int, ...], list[int]] = {}
    for k, (ctx, _) in enumerate(pairs):
        by_ctx.setdefault(tuple(ctx), []).append(k)
    return [
        LoglikelihoodRequest(
            owner=owner, ctx=ctx, conts=tuple(tuple(pairs[k][1]) for k in ks), choice_ids=tuple(ks)
        )
        for ctx, ks in by_ctx.items()
    ]
