"""Micro-benchmark of the merge methods on one large tensor (not a test; run by hand).

    nice -n 10 python tests/methods/bench_methods.py [--rows 4096 --cols 4096 --k 4 --threads 2 --mergekit]

Times each method's pure function on a (k, rows, cols) float32 stack (base + k experts, fresh copy per call, the
copy not timed) and, with --mergekit, mergekit 0.1.5's implementation of the same method on the same tensors.
Prints, over --repeat runs, the median wall time and the minimum CPU time of the process in milliseconds (the
latter is what to compare on a busy shared machine, with --threads 1).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mergescale.methods import get_method
from mergescale.methods.base import MethodInputs

CASES: dict[str, tuple[dict, dict]] = {
    "linear": ({"weight": 1.0}, {}),
    "task_arithmetic": ({"weight": 1.0}, {}),
    "ties": ({"weight": 1.0, "density": 0.2}, {}),
    "dare_linear": ({"weight": 1.0, "density": 0.2}, {}),
    "dare_ties": ({"weight": 1.0, "density": 0.2}, {}),
    "breadcrumbs_ties": ({"weight": 1.0, "density": 0.8, "gamma": 0.01}, {}),
    "model_stock": ({}, {}),
}


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(t0: tuple[float, float]) -> tuple[float, float]:
    t1 = _clock()
    return t1[0] - t0[0], t1[1] - t0[1]


def _ours(name: str, stack: torch.Tensor, base: torch.Tensor, mp: dict, gp: dict) -> tuple[float, float]:
    inputs = MethodInputs(
        name="model.layers.0.mlp.up_proj.weight",
        tensors=stack.clone(),
        base=base,
        model_params=[dict(mp) for _ in range(stack.shape[0])],
        params=dict(gp),
        base_params=None,
        seed=0,
    )
    t0 = _clock()
    get_method(name)(inputs)
    return _since(t0)


def _theirs(name: str, stack: torch.Tensor, base: torch.Tensor, mp: dict, gp: dict) -> tuple[float, float]:
    from mergekit import merge_methods
    from mergekit.merge_methods.base import TensorGroup

    k = stack.shape[0]
    with_base = name != "linear"
    tensors = [base, *stack.unbind(0)] if with_base else list(stack.unbind(0))
    ids = ["base", *range(k)] if with_base else list(range(k))
    group = TensorGroup.from_tensors(tensors, ids=ids, base_index=0 if with_base else None)
    params = {key: {i: v for i in range(k)} for key, v in mp.items()} | gp
    t0 = _clock()
    merge_methods.get(name)((group,), parameters=params)
    return _since(t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--methods", default=",".join(CASES))
    ap.add_argument("--mergekit", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = torch.randn(args.rows, args.cols) * 0.02
    stack = base + torch.randn(args.k, args.rows, args.cols) * 0.002  # (k, rows, cols)
    print(f"{args.k} x {args.rows}x{args.cols} float32, {args.threads} threads, {args.repeat} runs")
    for name in args.methods.split(","):
        mp, gp = CASES[name]
        ours = [_ours(name, stack, base, mp, gp) for _ in range(args.repeat)]
        wall, cpu = statistics.median(x[0] for x in ours), min(x[1] for x in ours)
        line = f"{name:18s} ours wall {wall * 1e3:8.1f} ms  cpu {cpu * 1e3:8.1f} ms"
        if args.mergekit:
            theirs = [_theirs(name, stack, base, mp, gp) for _ in range(max(1, args.repeat // 2))]
            t_wall, t_cpu = statistics.median(x[0] for x in theirs), min(x[1] for x in theirs)
            line += f"   mergekit wall {t_wall * 1e3:8.1f} ms  cpu {t_cpu * 1e3:8.1f} ms  (cpu x{t_cpu / cpu:5.1f})"
        print(line, flush=True)


if __name__ == "__main__":
    main()
