"""Task-vector diagnostics of a draw, from the same read as its merges (an engine input observer).

With τᵢ = θᵢ − θ_base the task vector of expert i over every floating-point tensor of the model:

* ``norm`` of expert i: ‖τᵢ‖₂, and ``relative_distance``: ‖τᵢ‖₂ / ‖θ_base‖₂ (how far fine-tuning moved it);
* ``cosine`` of experts i, j: ⟨τᵢ, τⱼ⟩ / (‖τᵢ‖ ‖τⱼ‖) (0 for orthogonal updates; TIES' motivation is that
  interference grows with conflicting, overlapping updates);
* ``sign_agreement`` of experts i, j: the share of entries where both are non-zero that have the same sign;
* the draw's means of the pairwise values (``mean_cosine``, ``mean_sign_agreement``) and of the relative
  distances (``mean_relative_distance``).

Sums are accumulated in float64 over chunks of each tensor, so memory holds one tensor's inputs (as the engine
already does for stacked methods) plus float32 chunks.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from mergescale.engine.plan import TensorJob, TensorRead

_CHUNK = 1 << 20  # entries per float32 chunk: a few MB per input


@dataclass(frozen=True)
class Diagnostic:
    """One statistic: ``a`` / ``b`` name the expert(s) it concerns ("" for the draw's summaries)."""

    stat: str
    a: str
    b: str
    value: float | None


class TaskVectorStats:
    """Accumulates the statistics above as the engine reads a draw's inputs.

    Args:
        base: the plan's source index of the base model.
        experts: the plan's source index of each expert -> its name (task).
    """

    def __init__(self, base: int, experts: dict[int, str]) -> None:
        self.base = base
        self.experts = dict(experts)
        self.order = list(self.experts)
        k = len(self.order)
        self.sq = [0.0] * k  # ‖τᵢ‖²
        self.base_sq = 0.0
        self.dot = [[0.0] * k for _ in range(k)]
        self.agree = [[0] * k for _ in range(k)]
        self.both = [[0] * k for _ in range(k)]
        self.tensors = 0
        self._job: TensorJob | None = None
        self._arrived: dict[str, dict[int, torch.Tensor]] = {}  # tensor name -> source -> tensor

    def observe(self, job: TensorJob, read: TensorRead, tensor: torch.Tensor) -> None:
        if not read.dtype.is_floating_point or (read.source != self.base and read.source not in self.experts):
            return
        if job is not self._job:  # a tensor whose inputs did not all arrive in its job is not a task vector
            self._job, self._arrived = job, {}
        arrived = self._arrived.setdefault(read.name, {})
        arrived[read.source] = tensor
        if len(arrived) == len(self.experts) + 1:
            self._accumulate(self._arrived.pop(read.name))
            self.tensors += 1

    def _accumulate(self, inputs: dict[int, torch.Tensor]) -> None:
        base = inputs[self.base].reshape(-1)
        flat = [inputs[i].reshape(-1) for i in self.order]
        k = len(self.order)
        for start in range(0, base.numel(), _CHUNK):
            b = base[start : start + _CHUNK].to(torch.float32)  # (c,)
            self.base_sq += float(torch.dot(b, b))
            taus = torch.stack([x[start : start + _CHUNK].to(torch.float32) for x in flat]) - b  # (k, c)
            gram = (taus @ taus.T).double()  # (k, k)
            signs = torch.sign(taus)  # (k, c)
            nonzero = (signs != 0).to(torch.float32)
            same = (signs @ signs.T + nonzero @ nonzero.T) / 2  # entries where both are non-zero with one sign
            both = nonzero @ nonzero.T
            for i in range(k):
                self.sq[i] += float(gram[i, i])
                for j in range(i + 1, k):
                    self.dot[i][j] += float(gram[i, j])
                    self.agree[i][j] += int(round(float(same[i, j])))
                    self.both[i][j] += int(round(float(both[i, j])))

    def result(self) -> list[Diagnostic]:
        """Every statistic, per expert, per pair and for the draw (undefined values are None)."""
        out: list[Diagnostic] = []
        names = [self.experts[i] for i in self.order]
        base_norm = math.sqrt(self.base_sq)
        distances = []
        for i, name in enumerate(names):
            norm = math.sqrt(self.sq[i])
            rel = norm / base_norm if base_norm > 0 else None
            distances.append(rel)
            out += [Diagnostic("norm", name, "", norm), Diagnostic("relative_distance", name, "", rel)]
        cosines, agreements = [], []
        for i, j in itertools.combinations(range(len(names)), 2):
            denom = math.sqrt(self.sq[i] * self.sq[j])
            cos = self.dot[i][j] / denom if denom > 0 else None
            agree = self.agree[i][j] / self.both[i][j] if self.both[i][j] else None
            cosines.append(cos)
            agreements.append(agree)
            out += [Diagnostic("cosine", names[i], names[j], cos), Diagnostic("sign_agreement", names[i], names[j], agree)]
        out += [
            Diagnostic("mean_cosine", "", "", _mean(cosines)),
            Diagnostic("mean_sign_agreement", "", "", _mean(agreements)),
            Diagnostic("mean_relative_distance", "", "", _mean(distances)),
            Diagnostic("base_norm", "", "", base_norm),
        ]
        return out


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None
