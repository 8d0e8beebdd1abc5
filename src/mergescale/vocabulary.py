"""Aligning the vocabulary rows of models whose tokenizers differ, before they are merged (pure tensor code).

With ``tokenizer_source: base | union | <model>`` the output has its own vocabulary (the base's, the union of
every model's, or one model's); each input's vocabulary tensors (embeddings and output head: vocabulary on axis
0) are re-indexed to it first, and the merge method sees aligned tensors. A row an input lacks (its tokenizer has
no such token) is filled as mergekit 0.1.5 fills it (``tokenizer/embed.py``), in this order:

1. a ``tokenizer.tokens`` entry for the token: zeros, that token's row in a named model, or another token's row
   of a model; with ``force: true`` it replaces the rows of the models that do have the token too;
2. the token is in exactly one input: that input's row;
3. in none: zeros;
4. the base model is an input and has it: the base's row;
5. otherwise the mean of the rows of the inputs that have it (summed in input order, then divided).

Rows past the vocabulary (``pad_to_multiple_of``) get the mean of that input's aligned rows.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from mergescale.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenRule:
    """An explicit fill of one output token's rows: zeros, or row ``row`` of source ``source``."""

    zero: bool = False
    source: int | None = None
    row: int | None = None
    force: bool = False


@dataclass
class VocabularyAlignment:
    """How the vocabulary tensors of the plan's sources map onto the output vocabulary.

    Attributes:
        size: rows of every aligned tensor (the output vocabulary, padded).
        tokens: tokens of the output vocabulary (rows ≥ ``tokens`` are padding).
        rows: per source, a (tokens,) int64 tensor: the source's row of each output token, −1 where it has none.
        tensor_names: per source, the names of its tensors with the vocabulary on axis 0.
        rules: output token id -> explicit fill (``tokenizer.tokens``).
        base: the config's base model (its source), for rule 4 when the method merges the base as a plain
            input (linear, karcher): mergekit looks the base up among the inputs by name.
    """

    size: int
    tokens: int
    rows: Mapping[int, torch.Tensor]
    tensor_names: Mapping[int, frozenset[str]]
    rules: Mapping[int, TokenRule] = field(default_factory=dict)
    base: int | None = None

    def covers(self, ref: object) -> bool:
        """Whether an input tensor (a :class:`~mergescale.engine.plan.TensorRef`) has a vocabulary axis."""
        return getattr(ref, "name", None) in self.tensor_names.get(getattr(ref, "source", -1), frozenset())

    def output_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return (self.size, *tuple(shape)[1:])

    def align(self, tensors: Sequence[torch.Tensor], sources: Sequence[int], base: int | None) -> list[torch.Tensor]:
        """Each input tensor (vocabulary on axis 0, float32) re-indexed to the output vocabulary, rows filled as
        the module docstring says; ``sources`` gives each tensor's source, ``base`` the base's (or None)."""
        n_tok = self.tokens
        rest = tuple(tensors[0].shape[1:])
        device = tensors[0].device
        rows = [self.rows[s].to(device) for s in sources]  # per input (tokens,)
        present = torch.stack([r >= 0 for r in rows])  # (M, tokens)
        aligned = []
        for x, r, have in zip(tensors, rows, present, strict=True):
            out = torch.zeros((self.size, *rest), dtype=x.dtype, device=device)
            out[:n_tok][have] = x[r[have]]
            aligned.append(out)
        forced = torch.zeros(n_tok, dtype=torch.bool, device=device)
        for token, rule in self.rules.items():
            if rule.force:
                forced[token] = True
        needs = (~present.all(dim=0)) | forced  # (tokens,) rows some input takes from the default
        if bool(needs.any()):
            default = self._defaults(tensors, sources, rows, present, needs, base, aligned)
            idx = needs.nonzero().squeeze(1)
            for m, out in enumerate(aligned):
                take = ~present[m, idx] | forced[idx]
                out[idx[take]] = default[take]
        if self.size > n_tok:
            for out in aligned:
                out[n_tok:] = out[:n_tok].mean(dim=0)
        return aligned

    def _defaults(
        self,
        tensors: Sequence[torch.Tensor],
        sources: Sequence[int],
        rows: Sequence[torch.Tensor],
        present: torch.Tensor,
        needs: torch.Tensor,
        base: int | None,
        aligned: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """(d, ...) rows for the d output tokens in ``needs``: rules, then donor / zero / base / mean."""
        idx = needs.nonzero().squeeze(1)  # (d,)
        have = present[:, idx]  # (M, d)
        count = have.sum(dim=0)  # (d,)
        total = torch.zeros((idx.numel(), *tensors[0].shape[1:]), dtype=tensors[0].dtype, device=idx.device)
        for m, out in enumerate(aligned):  # in input order, as mergekit adds them
            total[have[m]] += out[idx[have[m]]]
        default = total / count.clamp(min=1).view(-1, *([1] * (total.dim() - 1)))
        if base is not None and base in sources:
            b = list(sources).index(base)
            use_base = have[b] & (count > 1)
            default[use_base] = aligned[b][idx[use_base]]
        if bool((count == 0).any()):
            log.warning("%d tokens of the output vocabulary are in no model; their rows are zeros", int((count == 0).sum()))
        position = {int(t): i for i, t in enumerate(idx.tolist())}
        for token, rule in self.rules.items():
            if token not in position:
                continue
            i = position[token]
            if rule.zero:
                default[i] = 0
            elif rule.source is not None:
                if rule.source not in sources:
                    raise ConfigError(
                        "tokenizer.tokens: a token takes its embedding from a model that does not feed this tensor"
                    )
                m = list(sources).index(rule.source)
                row = rule.row if rule.row is not None else int(rows[m][token])
                if row < 0 or row >= tensors[m].shape[0]:
                    raise ConfigError(f"tokenizer.tokens: row {row} is out of range for its model")
                default[i] = tensors[m][row]
        return default
