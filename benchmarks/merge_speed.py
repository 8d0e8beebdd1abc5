"""Merge speed and memory: mergescale vs mergekit on a base + 4 random Llama experts (~268M params, bf16).

Each merge runs as a whole process (import, plan, merge, write), timed with its peak RSS; the inputs are read
once beforehand so the page cache is warm for every contender, and the time to read all inputs once is reported
as the floor. Prints a table of medians and the ratios to mergekit (issue #3's targets; for the methods added
by issue #16, mergekit's time is the target: not slower).

    python benchmarks/merge_speed.py                        # issue #3's methods, 3 repeats, mergekit if installed
    python benchmarks/merge_speed.py --methods new --repeats 1                  # issue #16's methods
    python benchmarks/merge_speed.py --methods ties --repeats 1 --layers 32     # a model twice as deep
    python benchmarks/merge_speed.py --device cuda          # also GPU times (skips without CUDA)

Configs: every method merges the 4 experts onto the base with the parameters below, except those taking a
fixed number of models (nuslerp: 2; nearswap, arcee_fusion: 1), ``karcher`` (no base), ``slerp_slices``
(the Hub's most common shape: a gradient SLERP written as slices) and ``passthrough`` (a frankenmerge of one
expert's layers [0, L·3/4) + [L/4, L): 1.5× the depth). ``lore`` has no peer in mergekit.
"""

from __future__ import annotations

import argparse
import importlib.util
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


def build_inputs(root: Path, layers: int, n_experts: int) -> tuple[Path, list[Path]]:
    config = llama_config(layers=layers)
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


def write_config(path: Path, method: str, base: Path, experts: list[Path], layers: int) -> Path:
    model_params, params = METHODS[method]
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
    ap.add_argument("--methods", default=",".join(ISSUE_3), help="comma-separated, or 'new' (issue #16's), or 'all'")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--cache", type=Path, default=BENCH_DIR / "merge")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: skipping GPU timings")
        return

    root = args.cache / f"llama-{args.layers}l"
    base, experts = build_inputs(root, args.layers, args.experts)
    inputs = [base, *experts]
    in_bytes = sum(p.stat().st_size for f in inputs for p in f.glob("*.safetensors"))
    read_all_once(inputs)  # warm the page cache
    read_s = median([read_all_once(inputs) for _ in range(args.repeats)])
    use_mergekit = not args.no_mergekit and importlib.util.find_spec("mergekit") is not None

    print(f"machine: {machine()}")
    print(f"inputs: base + {args.experts} experts, {args.layers} layers, {in_bytes / 1e9:.2f} GB bf16 on disk")
    print(f"read all inputs once (in-process, warm cache): {read_s:.2f} s")
    rows = []
    work = root / "work"
    names = {"new": list(NEW), "all": list(METHODS)}.get(args.methods, args.methods.split(","))
    for method in names:
        cfg = write_config(root / f"{method}.yaml", method, base, experts, args.layers)
        ours, theirs = [], []
        for _ in range(args.repeats):
            shutil.rmtree(work, ignore_errors=True)
            r = run_process(["mergescale", "merge", str(cfg), str(work / "ours"), "--quiet", "--device", args.device])
            if r.returncode != 0:
                raise SystemExit(f"mergescale failed on {method}:\n{r.output}")
            ours.append(r)
            if use_mergekit and method not in NO_PEER:
                extra = ["--cuda"] if args.device.startswith("cuda") else []
                r = run_process(["mergekit-yaml", str(cfg), str(work / "mergekit"), "--quiet", *extra])
                if r.returncode != 0:
                    raise SystemExit(f"mergekit failed on {method}:\n{r.output}")
                theirs.append(r)
        shutil.rmtree(work, ignore_errors=True)
        row = {
            "method": method,
            "ours_s": median([r.seconds for r in ours]),
            "ours_rss": max(r.peak_rss_gb for r in ours),
            "mk_s": median([r.seconds for r in theirs]) if theirs else float("nan"),
            "mk_rss": max(r.peak_rss_gb for r in theirs) if theirs else float("nan"),
        }
        rows.append(row)
        print(f"  {method}: ours {row['ours_s']:.2f} s, mergekit {row['mk_s']:.2f} s", flush=True)

    print()
    print("| method | mergescale s | peak RSS GB | mergekit s | peak RSS GB | ratio | target | read-once s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["ours_s"] / r["mk_s"] if use_mergekit and r["method"] not in NO_PEER else float("nan")
        target = TARGETS.get(r["method"], float("nan"))
        ok = "" if ratio != ratio else (" ok" if ratio <= target else " MISSED")
        print(f"| {r['method']} | {r['ours_s']:.2f} | {r['ours_rss']:.2f} | {r['mk_s']:.2f} | {r['mk_rss']:.2f} "
              f"| {ratio:.3f} | ≤ {target:.3f}{ok} | {read_s:.2f} |")


if __name__ == "__main__":
    main()
