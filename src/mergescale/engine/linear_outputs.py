"""Linear outputs of a merge run (averages, task arithmetic without sparsification, PMA): each tensor's inputs are
folded into every linear output as they arrive, in blocks of inputs, so memory does not grow with their number
(the arithmetic: :mod:`.linear_fold`)."""

from __future__ import annotations

import math
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mergescale.engine.allocator import before_large_allocation
from mergescale.engine.buffers import BufferPool, empty_tensor
from mergescale.engine.linear_fold import Block, fold_blocks
from mergescale.engine.plan import MergePlan, TensorJob
from mergescale.engine.threads import ByteBudget

if TYPE_CHECKING:
    from mergescale.engine.stream import _OutputState


class LinearFolder:
    """Folds a tensor name's inputs into every linear output as they arrive, in blocks.

    Each output's terms (its sources in read order) are cut into blocks of as many inputs as fit in
    ``block_bytes`` (at least one); a block is computed (:func:`~mergescale.engine.linear_fold.fold_blocks`) when
    its last input arrives, on top of the float32 partial sum of the output's earlier blocks, and an input is
    dropped once no block still needs it. So a 10-checkpoint average of a 62.5 MiB embedding holds at most three
    inputs at a time, and memory does not grow with the number of inputs. Blocks depend on the output's own
    terms and the tensor's size only, so an average gives the same bits alone or within a sweep.
    """

    def __init__(
        self,
        plan: MergePlan,
        device: torch.device,
        executor: Executor | None,
        workers: int,
        block_bytes: int,
        buffers: BufferPool,
        budget: ByteBudget,
    ):
        self.plan, self.device = plan, device
        self.executor, self.workers = executor, workers
        self.buffers = buffers
        self.block_bytes = block_bytes
        self.budget = budget
        self.outputs: list[_LinearOutput] = []
        self.arrived: dict[int, torch.Tensor] = {}  # read -> input
        self.arrived_bytes: dict[int, int] = {}

    def start(self, job: TensorJob, states: list[_OutputState]) -> None:
        self.job = job
        self.outputs = []
        # inputs still held only after a failure: every block ends by its job's last input
        for n in self.arrived_bytes.values():
            self.budget.release(n)
        self.arrived, self.arrived_bytes = {}, {}
        for st in states:
            if st.coefficients is None:
                continue
            p = st.product
            per_input = max(1, math.prod(p.shape) * p.dtype.itemsize)
            size = max(1, self.block_bytes // per_input)
            terms = [(r, st.coefficients[r]) for r in range(len(job.reads)) if r in st.coefficients]
            self.outputs.append(_LinearOutput(st, [terms[i : i + size] for i in range(0, len(terms), size)]))

    def add(self, read: int, x: torch.Tensor, nbytes: int) -> bool:
        """Take an input; False when no linear output needs it (the caller lets go of it)."""
        if not any(read == s for out in self.outputs for block in out.blocks[out.next :] for s, _ in block):
            return False
        self.arrived[read] = x
        self.arrived_bytes[read] = nbytes
        ready = []
        for out in self.outputs:
            if out.next < len(out.blocks) and all(s in self.arrived for s, _ in out.blocks[out.next]):
                ready.append((out, out.blocks[out.next], out.next == len(out.blocks) - 1))
                out.next += 1
        if ready:
            self._fold(ready)
        needed = {s for out in self.outputs for block in out.blocks[out.next :] for s, _ in block}
        for s in [s for s in self.arrived if s not in needed]:
            del self.arrived[s]
            self.budget.release(self.arrived_bytes.pop(s))
        return True

    def _fold(self, ready: list[tuple[_LinearOutput, list[tuple[int, float]], bool]]) -> None:
        # one pass over the inputs per output shape (a job's products usually share one tensor name)
        by_shape: dict[tuple[int, ...], list[tuple[_LinearOutput, list[tuple[int, float]], bool]]] = {}
        for item in ready:
            by_shape.setdefault(item[0].state.product.shape, []).append(item)
        for shape, group in by_shape.items():
            self._fold_shape(shape, group)

    def _fold_shape(
        self, shape: tuple[int, ...], ready: list[tuple[_LinearOutput, list[tuple[int, float]], bool]]
    ) -> None:
        reads = sorted({s for _, block, _ in ready for s, _ in block})
        row = {s: i for i, s in enumerate(reads)}
        before_large_allocation(4 * math.prod(shape), self.device)
        blocks = []
        for out, block, last in ready:
            st = out.state
            prior = st.acc
            if last:
                dtype = self.plan.output_dtype(st.spec, st.product)
                st.result = target = empty_tensor(shape, dtype, self.device, self.buffers)
            else:
                if st.acc is None:
                    st.acc = torch.empty(shape, dtype=torch.float32, device=self.device)
                target = st.acc
            blocks.append(Block([row[s] for s, _ in block], [c for _, c in block], target, prior))
        sums = fold_blocks([self.arrived[s] for s in reads], blocks, pool=self.executor, workers=self.workers)
        del blocks
        for (out, _, last), total in zip(ready, sums, strict=True):
            if last:
                out.state.result_sum, out.state.acc = total, None


@dataclass
class _LinearOutput:
    state: _OutputState
    blocks: list[list[tuple[int, float]]]  # the output's (source, coefficient) terms, cut into blocks
    next: int = 0  # the first block not yet computed
