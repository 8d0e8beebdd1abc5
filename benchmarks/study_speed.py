"""Study speed: ``mergescale study run`` against the way users run a merging study today (issue #13).

Today: a shell loop of one ``mergekit-yaml`` process per merge (writing a model folder) and one ``lm_eval``
process per model (reading it back), on our world's tasks exported with ``mergescale tasks export-lm-eval``,
plus one ``lm_eval`` process per baseline model needed to normalise (the base on the held-out tasks, each merged
expert on its own task). Here: one ``mergescale study run`` process over the same 8 cells, whose baselines are
a superset (every expert, the multitask model and the base on every task).

The 8 cells: one group of a built world (default ``m-it``), draws k = 2 and k = 4 (seed 0) x {linear,
task_arithmetic lambda 0.5, task_arithmetic lambda 1.0, ties density 0.2 lambda 1.0}: methods whose weights equal
mergekit's (DARE's random masks differ by design), so the two sides must give the same scores.

Reported: whole-process wall time of each side (imports, merges, evaluations, writing), their ratio (target
<= 0.1), the largest score difference over every (cell, task) (target <= 1e-4), the normalised scores of both,
and the bytes read per draw (one read of base + k experts whatever the number of methods).

    python benchmarks/study_speed.py --world world            # the quick world, built beforehand
    python benchmarks/study_speed.py --world world --group s-pt --workers 2
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _common import BENCH_DIR, machine, run_process  # noqa: E402

TARGET_RATIO = 0.1
TARGET_SCORE_GAP = 1e-4
METHODS = [
    {"method": "linear"},
    {"method": "task_arithmetic", "lambda": [0.5, 1.0]},
    {"method": "ties", "density": 0.2, "lambda": 1.0},
]
DRAWS = [(2, 0), (4, 0)]


def cells(world: Path, group: str) -> list[dict]:
    """The 8 cells: their mergekit configs (float32, as the study computes) and the tasks they are scored on."""
    from mergescale.study.grid import draw_experts
    from mergescale.world.tasks import HELD_IN

    size, kind = group.split("-")
    models = world / "models" / size / kind
    out = []
    for k, seed in DRAWS:
        experts = draw_experts(list(HELD_IN), k, seed)
        for entry in METHODS:
            for lam in entry.get("lambda", [None]) if isinstance(entry.get("lambda"), list) else [entry.get("lambda")]:
                method = entry["method"]
                params = {"weight": 1.0} | ({"density": entry["density"]} if "density" in entry else {})
                config: dict = {
                    "merge_method": method,
                    "models": [{"model": str(models / "experts" / t), "parameters": params} for t in experts],
                    "dtype": "float32",
                }
                if method != "linear":
                    config["base_model"] = str(models / "base")
                if lam is not None:
                    config["parameters"] = {"lambda": lam}
                label = method + (f" lambda={lam:g}" if method == "task_arithmetic" else "")
                out.append({"k": k, "seed": seed, "experts": experts, "label": label, "config": config})
    return out


def harness_scores(output_dir: Path) -> dict[str, dict[str, float]]:
    files = sorted(glob.glob(str(output_dir / "**" / "results_*.json"), recursive=True))
    results = json.loads(Path(files[-1]).read_text())["results"]
    return {task: {m.split(",")[0]: v for m, v in metrics.items() if m.endswith(",none")} for task, metrics in results.items()}


def shell_loop(world: Path, group: str, lm_tasks: Path, work: Path, held_out: list[str], primary: dict) -> tuple[float, dict]:
    """mergekit-yaml + lm_eval processes, as a researcher's script does; returns seconds and scores."""
    mergekit = shutil.which("mergekit-yaml") or "mergekit-yaml"
    lm_eval = shutil.which("lm_eval") or "lm_eval"
    size, kind = group.split("-")
    models = world / "models" / size / kind
    todo = cells(world, group)
    experts = sorted({t for c in todo for t in c["experts"]})

    def evaluate(model: Path, tasks: list[str], name: str) -> dict:
        out = work / "eval" / name
        run = run_process(
            [lm_eval, "--model", "hf", "--model_args", f"pretrained={model},dtype=float32", "--tasks", ",".join(tasks),
             "--include_path", str(lm_tasks), "--batch_size", "64", "--device", "cpu", "--output_path", str(out)],
        )  # fmt: skip
        if run.returncode:
            raise SystemExit(f"lm_eval failed on {model}:\n{run.output}")
        return harness_scores(out)

    start = time.perf_counter()
    scores: dict = {"base": evaluate(models / "base", held_out, "base"), "experts": {}, "cells": []}
    for t in experts:
        scores["experts"][t] = evaluate(models / "experts" / t, [t], f"expert-{t}")[t]
    for n, cell in enumerate(todo):
        cfg = work / f"cell{n}.yml"
        cfg.write_text(yaml.safe_dump(cell["config"]))
        out = work / f"merged{n}"
        run = run_process([mergekit, str(cfg), str(out), "--copy-tokenizer"])
        if run.returncode:
            raise SystemExit(f"mergekit-yaml failed:\n{run.output}")
        scores["cells"].append(evaluate(out, [*cell["experts"], *held_out], f"cell{n}"))
        shutil.rmtree(out)  # a study of hundreds of merges cannot keep them all
    return time.perf_counter() - start, scores


def ours(world: Path, group: str, work: Path, workers: int) -> tuple[float, Path]:
    size, kind = group.split("-")
    spec = {
        "name": "study-speed",
        "world": str(world),
        "world_sizes": [size],
        "world_kinds": [kind],
        "methods": METHODS,
        "num_experts": sorted({k for k, _ in DRAWS}),
        "seeds": sorted({s for _, s in DRAWS}),
        "eval": {"batch_size": 64},
    }
    path = work / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = work / "study"
    shutil.rmtree(out, ignore_errors=True)
    mergescale = shutil.which("mergescale") or "mergescale"
    run = run_process([mergescale, "study", "run", str(path), "-o", str(out), "-q", "--workers", str(workers)])
    if run.returncode:
        raise SystemExit(f"mergescale study run failed:\n{run.output}")
    return run.seconds, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=Path, default=Path("world"), help="a built world (mergescale world build)")
    ap.add_argument("--group", default="m-it", help="size-kind of the world group to merge")
    ap.add_argument("--workers", type=int, default=1, help="mergescale study --workers")
    args = ap.parse_args()
    from mergescale.evaluate import load_suite
    from mergescale.study import load_study

    world = args.world.resolve()
    work = BENCH_DIR / "study"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    lm_tasks = work / "lm_tasks"
    mergescale = shutil.which("mergescale") or "mergescale"
    run_process([mergescale, "tasks", "export-lm-eval", str(world / "tasks" / "suite.yaml"), str(lm_tasks)])
    suite = load_suite(world / "tasks" / "suite.yaml")
    held_out = [t.name for t in suite.held_out]
    primary = {t.name: t.primary_metric for t in suite.tasks}
    print(f"machine: {machine()}", flush=True)

    our_s, study_dir = ours(world, args.group, work, args.workers)
    print(f"mergescale study run (8 cells, workers {args.workers}): {our_s:.1f} s", flush=True)
    their_s, theirs = shell_loop(world, args.group, lm_tasks, work, held_out, primary)
    print(f"mergekit-yaml + lm_eval loop (8 merges, {len(theirs['experts']) + 1 + 8} lm_eval runs): {their_s:.1f} s")

    results = load_study(study_dir)
    gap = 0.0
    rows = []
    for n, cell in enumerate(cells(world, args.group)):
        lam = cell["config"].get("parameters", {}).get("lambda")
        mine = next(
            c for c in results.merges
            if (c.k, c.seed, c.method) == (cell["k"], cell["seed"], cell["config"]["merge_method"])
            and c.params.get("lambda") == lam
        )  # fmt: skip
        prim = results.primary(mine.key)
        held_in_theirs, held_out_theirs = [], []
        for task, s in prim.items():
            their = theirs["cells"][n][task][primary[task]]
            gap = max(gap, abs(their - s.score))
            ref = theirs["experts"][task][primary[task]] if task in cell["experts"] else theirs["base"][task][primary[task]]
            (held_in_theirs if task in cell["experts"] else held_out_theirs).append(their / ref if ref else float("nan"))
        scored = results.cell_scores(mine)
        rows.append(
            f"| {cell['label']} | {cell['k']} | {scored.held_in.mean:.4f} / {_plain_mean(held_in_theirs):.4f} "
            f"| {scored.held_out.mean:.4f} / {_plain_mean(held_out_theirs):.4f} |"
        )
    print("\n| cell | k | held-in ours / loop | held-out ours / loop |\n|---|---|---|---|")
    print("\n".join(rows))
    print("(the loop's normalised means are plain means over tasks; ours are per category first, as the paper does;"
          " the world has one task per category, so they agree)")
    for draw in results.draws:
        print(f"draw k={draw.k}: {draw.outputs} merges from one read of {draw.bytes_read / 1e6:.2f} MB "
              f"(base + {draw.k} experts), {draw.plans} plan(s)")
    ratio = our_s / their_s
    print(f"\nratio {ratio:.3f} (target <= {TARGET_RATIO}); largest score difference {gap:.2e} "
          f"(target <= {TARGET_SCORE_GAP:g})")


def _plain_mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


if __name__ == "__main__":
    main()
