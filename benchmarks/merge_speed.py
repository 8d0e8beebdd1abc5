"""Merge speed and memory: mergescale vs mergekit on a base + 4 random Llama experts (~268M params, bf16).

Each merge runs as a whole process (import, plan, merge, write), timed with its peak RSS; the inputs are read
once beforehand so the page cache is warm for every contender, and the time to read all inputs once is reported
as the floor. Prints a table of medians and the ratios to mergekit (issue #3's targets; for the methods added
by issue #16, mergekit's time is the target: not slower).

    python benchmarks/merge_speed.py                        # issue #3's methods, 3 repeats, mergekit if installed
    python benchmarks/merge_speed.py --methods new --repeats 1                  # issue #16's methods
    python benchmarks/merge_speed.py --methods ties --repeats 1 --layers 32     # a model twice as deep
    python benchmarks/merge_speed.py --device cuda          # also GPU times (skips without CUDA)
    python benchmarks/merge_speed.py --slice                # issue #17: 8 experts of Llama-3's vocabulary
    python benchmarks/merge_speed.py --baseline-src /tmp/before/src     # also an older mergescale, same run

``--slice`` merges base + 8 experts of a slice shaped like Llama-3's vocabulary (vocab 128,256 × hidden 2,048,
untied, one layer: 1.1 GB of bf16 each, generated under .bench/) by ``linear`` (the 8 experts), ``ties`` and
``dare_ties`` (density 0.2): the stacked methods' peak RSS and time are compared with the linear merge's of the
same run (issue #17's targets: at most +0.5 GB, at most 3×). ``--baseline-src`` runs every mergescale command
a second time with that ``src`` folder first on ``PYTHONPATH`` (e.g. ``git archive`` of an older commit), as the
row ``method (before)``, interleaved with the current code so both see the same machine load.

Configs: every method merges the 4 experts onto the base with the parameters below, except those taking a
fixed number of models (nuslerp: 2; nearswap, arcee_fusion: 1), ``karcher`` (no base), ``slerp_slices``
(the Hub's most common shape: a gradient SLERP written as slices) and ``passthrough`` (a frankenmerge of one
expert's layers [0, L·3/4) + [L/4, L): 1.5× the depth). ``lore`` has no peer in mergekit.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _common import BENCH_DIR, llama_config, machine, median, run_process, write_random_llama  # noqa: E402

METHODS = {
    "linear": ({"weight": 1.0}, {}),
    "task_arithmetic": ({"weight": 1.0}, {"lambda": 0.5}),
    "ties": ({"weight": 1.0, "density": 0.2}, {}),
    "dare_ties": ({"weight": 1.0, "density": 0.5}, {}),
    "dare_linear": ({"weight": 1.0, "density": 0.5}, {}),
    # issue #16
    "slerp_slices": ({}, {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}),
    "passthrough": ({}, {}),
    "nuslerp": ({"weight": 1.0}, {}),
    "multislerp": ({"weight": 1.0}, {}),
    "karcher": ({}, {}),
    "model_stock": ({}, {}),
    "sce": ({}, {"select_topk": 0.5}),
    "nearswap": ({}, {"t": 0.001}),
    "arcee_fusion": ({}, {}),
    "ram": ({}, {}),
    "ramplus_tl": ({}, {}),
    "lore": ({}, {"rank": 16, "iterations": 2}),
}
ISSUE_3 = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear")
NEW = tuple(m for m in METHODS if m not in ISSUE_3)
# issue #3: our time at most this fraction of mergekit's; issue #16: not slower than mergekit
TARGETS = {"linear": 1 / 3, "task_arithmetic": 1 / 3, "ties": 1 / 5, "dare_ties": 1 / 3, "dare_linear": 1 / 3,
           **{m: 1.0 for m in NEW}}
NO_PEER = {"lore"}
SLICE_METHODS = {"linear": ({"weight": 1.0}, {}), "ties": ({"weight": 1.0, "density": 0.2}, {}),
                 "dare_ties": ({"weight": 1.0, "density": 0.2}, {})}  # fmt: skip
SLICE_TARGETS = {"ties": (3.0, 0.5), "dare_ties": (3.0, 0.5)}  # (time ratio, extra peak RSS GB) to linear


# Llama-3's vocabulary on a 1B-style width: the tensors whose (k, *shape) float32 stack made stacked methods'
# memory grow with the number of experts (issue #17)
VOCAB_SLICE = {"layers": 1, "hidden": 2048, "intermediate": 8192, "vocab": 128256}


def build_inputs(root: Path, layers: int, n_experts: int, shape: dict | None = None) -> tuple[Path, list[Path]]:
    config = llama_config(**(shape or {"layers": layers}))
    base = write_random_llama(root / "base", config, seed=0)
    experts = [write_random_llama(root / f"expert{i}", config, seed=1 + i, base=base) for i in range(n_experts)]
    return base, experts


def read_all_once(folders: list[Path]) -> float:
    from mergescale.io.checkpoint import open_checkpoint

    t = time.perf_counter()
    for f in folders:
        src = open_checkpoint(f)
        for name in src.info():
            src.read(name)
    return time.perf_counter() - t


def write_config(path: Path, method: str, base: Path, experts: list[Path], layers: int,
                 table: dict | None = None) -> Path:  # fmt: skip
    model_params, params = (table or METHODS)[method]
    count = {"nuslerp": 2, "nearswap": 1, "arcee_fusion": 1}.get(method, len(experts))
    cfg: dict = {
        "merge_method": method,
        "models": [{"model": str(e), **({"parameters": dict(model_params)} if model_params else {})}
                   for e in experts[:count]],
        "parameters": dict(params),
        "dtype": "bfloat16",
    }
    # linear averages the experts, karcher too: a base_model would be merged in as one more model
    if method not in ("linear", "karcher", "lore"):
        cfg["base_model"] = str(base)
    if method == "slerp_slices":
        cfg = {"merge_method": "slerp", "base_model": str(base), "parameters": dict(params), "dtype": "bfloat16",
               "slices": [{"sources": [{"model": str(base), "layer_range": [0, layers]},
                                       {"model": str(experts[0]), "layer_range": [0, layers]}]}]}
    if method == "passthrough":
        cfg = {"merge_method": "passthrough", "dtype": "bfloat16", "slices": [
            {"sources": [{"model": str(experts[0]), "layer_range": [0, layers * 3 // 4]}]},
            {"sources": [{"model": str(experts[0]), "layer_range": [layers // 4, layers]}]}]}
    if not cfg.get("parameters"):
        cfg.pop("parameters", None)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=None, help="comma-separated, or 'new' (issue #16's), or 'all'")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--experts", type=int, default=None, help="default 4 (8 with --slice)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--slice", action="store_true", help="issue #17's 128k-vocabulary slice, 8 experts")
    ap.add_argument("--baseline-src", type=Path, default=None, help="an older mergescale's src folder, same run")
    ap.add_argument("--cache", type=Path, default=BENCH_DIR / "merge")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: skipping GPU timings")
        return
    n_experts = args.experts or (8 if args.slice else 4)
    if args.slice:
        root = args.cache / "vocab-slice"
        base, experts = build_inputs(root, 1, n_experts, VOCAB_SLICE)
        described = f"base + {n_experts} experts of a 128k-vocabulary slice (vocab 128256 x 2048, untied, 1 layer)"
        table, default_methods = SLICE_METHODS, ",".join(SLICE_METHODS)
    else:
        root = args.cache / f"llama-{args.layers}l"
        base, experts = build_inputs(root, args.layers, n_experts)
        described = f"base + {n_experts} experts, {args.layers} layers"
        table, default_methods = METHODS, ",".join(ISSUE_3)
    inputs = [base, *experts]
    in_bytes = sum(p.stat().st_size for f in inputs for p in f.glob("*.safetensors"))
    read_all_once(inputs)  # warm the page cache
    read_s = median([read_all_once(inputs) for _ in range(args.repeats)])
    use_mergekit = not args.no_mergekit and importlib.util.find_spec("mergekit") is not None

    print(f"machine: {machine()}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"inputs: {described}, {in_bytes / 1e9:.2f} GB bf16 on disk")
    print(f"read all inputs once (in-process, warm cache): {read_s:.2f} s")
    work = root / "work"
    spec = args.methods or default_methods
    names = {"new": list(NEW), "all": list(METHODS)}.get(spec, spec.split(","))
    contenders = [("", None)] + ([(" (before)", args.baseline_src.resolve())] if args.baseline_src else [])
    runs: dict[str, list] = {}
    for method in names:
        cfg = write_config(root / f"{method}.yaml", method, base, experts, args.layers, table)
        for _ in range(args.repeats):
            for suffix, src in contenders:
                shutil.rmtree(work, ignore_errors=True)
                env = {"PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"} if src else None
                r = run_process(["mergescale", "merge", str(cfg), str(work / "ours"), "--quiet", "--device",
                                 args.device], env=env)  # fmt: skip
                if r.returncode != 0:
                    raise SystemExit(f"mergescale{suffix} failed on {method}:\n{r.output}")
                runs.setdefault(method + suffix, []).append(r)
            if use_mergekit and method not in NO_PEER:
                extra = ["--cuda"] if args.device.startswith("cuda") else []
                r = run_process(["mergekit-yaml", str(cfg), str(work / "mergekit"), "--quiet", *extra])
                if r.returncode != 0:
                    raise SystemExit(f"mergekit failed on {method}:\n{r.output}")
                runs.setdefault(method + " [mergekit]", []).append(r)
        shutil.rmtree(work, ignore_errors=True)
        print(f"  {method}: " + ", ".join(f"{name} {median([r.seconds for r in rs]):.2f} s"
                                         for name, rs in runs.items() if name.split()[0] == method), flush=True)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    rows = []
    for method in names:
        for suffix, _ in contenders:
            ours = runs[method + suffix]
            theirs = runs.get(method + " [mergekit]", [])
            rows.append({
                "method": method + suffix,
                "base": method,
                "ours_s": median([r.seconds for r in ours]),
                "ours_rss": max(r.peak_rss_gb for r in ours),
                "mk_s": median([r.seconds for r in theirs]) if theirs else float("nan"),
                "mk_rss": max(r.peak_rss_gb for r in theirs) if theirs else float("nan"),
            })
    if args.slice:
        _print_slice_table(rows, contenders)
    else:
        _print_table(rows, read_s)


def _print_table(rows: list[dict], read_s: float) -> None:
    print("| method | mergescale s | peak RSS GB | mergekit s | peak RSS GB | ratio | target | read-once s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["ours_s"] / r["mk_s"]
        target = TARGETS.get(r["base"], float("nan"))
        ok = "" if ratio != ratio else (" ok" if ratio <= target else " MISSED")
        print(f"| {r['method']} | {r['ours_s']:.2f} | {r['ours_rss']:.2f} | {r['mk_s']:.2f} | {r['mk_rss']:.2f} "
              f"| {ratio:.3f} | ≤ {target:.3f}{ok} | {read_s:.2f} |")


def _print_slice_table(rows: list[dict], contenders: list) -> None:
    print("| method | mergescale s | peak RSS GB | time / linear | RSS − linear GB | target | mergekit s "
          "| peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|")
    for suffix, _ in contenders:
        linear = next((r for r in rows if r["method"] == "linear" + suffix), None)
        for r in (r for r in rows if r["method"].endswith(suffix) and (suffix or "(" not in r["method"])):
            ratio = r["ours_s"] / linear["ours_s"] if linear else float("nan")
            extra = r["ours_rss"] - linear["ours_rss"] if linear else float("nan")
            target = SLICE_TARGETS.get(r["base"])
            verdict = "—"
            if target is not None:
                verdict = f"≤ {target[0]:g}×, ≤ +{target[1]:g} GB: " + (
                    "met" if ratio <= target[0] and extra <= target[1] else "MISSED")
            print(f"| {r['method']} | {r['ours_s']:.2f} | {r['ours_rss']:.2f} | {ratio:.2f} | {extra:+.2f} "
                  f"| {verdict} | {r['mk_s']:.2f} | {r['mk_rss']:.2f} |")


if __name__ == "__main__":
    main()
