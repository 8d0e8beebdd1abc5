"""PMA speed and memory: averaging 10 checkpoints of a ~268M-parameter bf16 Llama run (issues #5, #15).

Every contender runs as a whole process (import, discover, plan, stream, write), timed with its peak RSS, on a
warm page cache (the checkpoints are read once beforehand):

- ``read10+write1``: the floor: read every tensor of the 10 newest checkpoints once and write one model;
- ``pma sma N=10`` / ``N=6`` / ``N=3``: ``mergescale pma RUN -o OUT --window N`` (RSS must not grow with N);
- ``pma sweep 9``: ``--sweep strategy=sma,ema,wma window=3,6,10`` (9 models from one read);
- ``along-run T=20``: ``--along-run --window 10 --ends 20``: the 20 windows of 10 ending at each of the newest
  20 checkpoints (29 checkpoints read once, 20 models written), beside its floor ``read29+write20``;
- ``naive loop``: ``safetensors.load_file`` every checkpoint, average in float32, ``save_file``;
- ``mergekit linear``: ``mergekit-yaml`` over the same 10 (when installed; ``--no-mergekit`` to skip).

    nice -n 10 python benchmarks/pma_speed.py                  # 3 repeats, medians
    nice -n 10 python benchmarks/pma_speed.py --repeats 1 --no-mergekit --no-naive
    python benchmarks/pma_speed.py --cold        # checkpoints evicted from the page cache before every run
    # issue #15's numbers, against another checkout's code in the same run:
    python benchmarks/pma_speed.py --repeats 3 --no-mergekit --no-naive --only "N=10,along,read29" \
        --against /path/to/other/checkout/src

Repeats are interleaved (every contender once, then again), each run reports its wall time, CPU time (user +
system, what a shared machine's load inflates least) and peak RSS, and the load average is printed after each
round: on a shared machine compare ratios from one run, not absolute times across runs.

Acceptance (issue #5): one SMA of 10 ≤ 2 × (read10+write1), peak RSS ≤ 1.5 GB and not growing with N.
Acceptance (issue #15): the along-run curve of T = 20 windows of N = 10 ≤ 3 × one SMA of 10 (whole process),
and one SMA of 10 at ≥ 4 GB/s in-process (bytes read / time of the streaming, as ``mergescale pma`` prints it).
The checkpoints (29 by default: T + N − 1) are generated once into ``.bench/pma/`` (git-ignored), each the
previous one plus noise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # noqa: E402
    BENCH_DIR,
    ProcessRun,
    evict_from_page_cache,
    llama_config,
    machine,
    median,
    run_process,
    write_random_llama,
)

STEP = 1000
AGAINST = " [against]"


def _load(avg: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in avg)


def build_run(root: Path, n: int, layers: int) -> list[Path]:
    """``root/checkpoint-1000`` … ``checkpoint-<n·1000>``: a random bf16 Llama, then each the previous + noise."""
    config = llama_config(layers=layers)
    folders: list[Path] = []
    for i in range(n):
        base = folders[-1] if folders else None
        folders.append(
            write_random_llama(root / f"checkpoint-{STEP * (i + 1)}", config, seed=i, base=base, noise=0.002)
        )
    return folders


def read_all(folders: list[Path]) -> float:
    from mergescale.io.checkpoint import open_checkpoint

    t = time.perf_counter()
    for f in folders:
        src = open_checkpoint(f)
        for name in src.info():
            src.read(name)
        src.close()
    return time.perf_counter() - t


# -- the in-process contenders, run as `python pma_speed.py --case NAME RUN OUT` ------------------------------


def newest(run: Path, n: int) -> list[Path]:
    return sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-n:]


def case_read_write(run: Path, out: Path, n: int = 10, writes: int = 1) -> None:
    """Read every tensor of the ``n`` newest checkpoints once, and write ``writes`` models (the newest's tensors)
    via our writer."""
    from mergescale.io.checkpoint import open_checkpoint
    from mergescale.io.writer import ModelFolderSink

    sources = [open_checkpoint(f) for f in newest(run, n)]
    names = list(sources[-1].info())
    info = sources[-1].info()
    sinks = [ModelFolderSink(out / f"m{i}" if writes > 1 else out, config=sources[-1].config) for i in range(writes)]
    for sink in sinks:
        sink.begin([(n, info[n].shape, info[n].dtype) for n in names])
    for name in names:
        t = None
        for src in sources:
            t = src.read(name)
            t.view(-1)[0].item()  # touch it
        for sink in sinks:
            sink.write(name, t)
    for sink in sinks:
        sink.commit()


def case_naive(run: Path, out: Path, n: int = 10) -> None:
    """The hand-written loop: load every checkpoint at once, average in float32, save."""
    import torch
    from safetensors.torch import load_file, save_file

    folders = newest(run, n)
    states = []
    for f in folders:
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(f.glob("*.safetensors")):
            sd.update(load_file(shard))
        states.append(sd)
    avg = {k: (sum(s[k].float() for s in states) / len(states)).to(states[-1][k].dtype) for k in states[-1]}
    out.mkdir(parents=True)
    save_file(avg, out / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(folders[-1] / "config.json", out / "config.json")


def mergekit_config(path: Path, folders: list[Path]) -> Path:
    import yaml

    cfg = {"merge_method": "linear", "models": [{"model": str(f), "parameters": {"weight": 1.0}} for f in folders],
           "dtype": "bfloat16"}  # fmt: skip
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=["readwrite", "naive"], help=argparse.SUPPRESS)
    ap.add_argument("paths", nargs="*", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--checkpoints", type=int, default=10, help="N: checkpoints of one average")
    ap.add_argument("--ends", type=int, default=20, help="T: windows of the along-run curve (0: skip it)")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--cache", type=Path, default=BENCH_DIR / "pma")
    ap.add_argument(
        "--cold", action="store_true", help="evict the checkpoints from the page cache before every run (read from disk)"
    )
    ap.add_argument(
        "--only", help="comma-separated substrings of contender names to run (the floor always runs)"
    )
    ap.add_argument(
        "--against", type=Path,
        help="the src/ folder of another checkout: every mergescale contender also runs with it on PYTHONPATH "
             "(labelled '[against]'), interleaved with this checkout's runs",
    )  # fmt: skip
    args = ap.parse_args()
    if args.case == "readwrite":
        run, out, *rest = args.paths
        return case_read_write(run, out, *(int(str(x)) for x in rest))
    if args.case == "naive":
        run, out, *rest = args.paths
        return case_naive(run, out, *(int(str(x)) for x in rest))

    run = args.cache / f"run-{args.layers}l"
    n = args.checkpoints
    total = n + args.ends - 1 if args.ends else n
    every = build_run(run, total, args.layers)
    folders = every[-n:]
    size = sum(p.stat().st_size for f in folders for p in f.glob("*.safetensors"))
    read_all(every)  # warm the page cache
    read_s = median([read_all(folders) for _ in range(args.repeats)])
    if args.cold:
        cold = []
        for _ in range(args.repeats):
            evict_from_page_cache(folders)
            cold.append(read_all(folders))
        read_s = median(cold)
    me = [sys.executable, str(Path(__file__).resolve())]
    contenders: dict[str, list[str]] = {
        "read10+write1": [*me, "--case", "readwrite", str(run), "{out}", str(n)],
        f"pma sma N={n}": ["mergescale", "pma", str(run), "-o", "{out}", "--window", str(n), "-q"],
        "pma sma N=3": ["mergescale", "pma", str(run), "-o", "{out}", "--window", "3", "-q"],
        "pma sma N=6": ["mergescale", "pma", str(run), "-o", "{out}", "--window", "6", "-q"],
        "pma sweep 9": ["mergescale", "pma", str(run), "-o", "{out}", "--sweep", "strategy=sma,ema,wma",
                        f"window=3,{min(6, n)},{n}", "-q"],
    }  # fmt: skip
    if args.ends:
        t = args.ends
        contenders[f"read{total}+write{t}"] = [*me, "--case", "readwrite", str(run), "{out}", str(total), str(t)]
        contenders[f"along-run T={t}"] = ["mergescale", "pma", str(run), "-o", "{out}", "--along-run", "--window",
                                          str(n), "--ends", str(t), "-q"]  # fmt: skip
    if not args.no_naive:
        contenders["naive loop"] = [*me, "--case", "naive", str(run), "{out}", str(n)]
    if not args.no_mergekit and importlib.util.find_spec("mergekit") is not None:
        cfg = mergekit_config(args.cache / "linear.yaml", folders)
        contenders["mergekit linear"] = ["mergekit-yaml", str(cfg), "{out}", "--quiet"]

    if args.only:
        keep = args.only.split(",")
        contenders = {
            k: v for k, v in contenders.items() if k == "read10+write1" or any(x in k for x in keep)
        }
    if args.against is not None:
        for label in [k for k in contenders if k.startswith(("pma", "along-run"))]:
            contenders[label + AGAINST] = contenders[label]
    print(f"machine: {machine()}")
    print(f"run: {total} checkpoints x {size / n / 1e9:.2f} GB bf16 ({args.layers} layers); one average reads "
          f"{n}: {size / 1e9:.2f} GB")  # fmt: skip
    cache = "cold cache: evicted before every run" if args.cold else "warm cache"
    print(f"read all checkpoints once (in-process, {cache}): {read_s:.2f} s", flush=True)
    work = args.cache / "work"
    loads: list[tuple[float, float, float]] = [os.getloadavg()]
    print(f"load average at the start: {_load(loads[0])}", flush=True)
    runs: dict[str, list[ProcessRun]] = {label: [] for label in contenders}
    # interleaved (A, B, C, A, B, C, ...): on a shared machine every contender sees the same spread of load
    for rep in range(args.repeats):
        for label, cmd in list(contenders.items()):
            shutil.rmtree(work, ignore_errors=True)
            if args.cold:
                evict_from_page_cache(folders)
            env = {"PYTHONPATH": str(args.against)} if label.endswith(AGAINST) else None
            r = run_process([c.replace("{out}", str(work / "out")) for c in cmd], env)
            if r.returncode != 0 and label.endswith(AGAINST):
                # the older code may not have this command (the along-run curve came with issue 15)
                last = ([x for x in r.output.strip().splitlines() if not x.startswith("@@")] or ["?"])[-1]
                print(f"  {label}: not available in the other checkout ({last}); left out", flush=True)
                del contenders[label], runs[label]
                continue
            if r.returncode != 0:
                raise SystemExit(f"{label} failed:\n{r.output}")
            runs[label].append(r)
            shutil.rmtree(work, ignore_errors=True)
            if label.startswith(("along-run", "read")) and args.ends:
                read_all(every)  # 10 GB of outputs evict inputs from the page cache: warm them again
            rate = " ".join(re.findall(r"[0-9.]+ GB/s", r.output)[-1:])
            print(f"  [{rep + 1}/{args.repeats}] {label}: {r.seconds:.2f} s wall, {r.cpu_seconds:.2f} s CPU, "
                  f"{r.peak_rss_gb:.2f} GB {rate}", flush=True)  # fmt: skip
        loads.append(os.getloadavg())
        print(f"  load average: {_load(loads[-1])}", flush=True)
    results = {}
    for label, rs in runs.items():
        results[label] = {
            "seconds": median([r.seconds for r in rs]),
            "cpu_seconds": median([r.cpu_seconds for r in rs]),
            "peak_rss_gb": max(r.peak_rss_gb for r in rs),
            "all_seconds": [round(r.seconds, 3) for r in rs],
        }
        rates = [float(m) for r in rs for m in re.findall(r"([0-9.]+) GB/s", r.output)]
        if rates:
            results[label]["in_process_gb_s"] = median(rates)

    floor = results["read10+write1"]["seconds"]
    sma = results.get(f"pma sma N={n}")
    print()
    print(f"medians of {args.repeats}, interleaved; load average (1 min) from {min(x[0] for x in loads):.1f} to "
          f"{max(x[0] for x in loads):.1f}")  # fmt: skip
    base = sma["seconds"] if sma is not None else floor
    print(f"| contender | wall s | CPU s | peak RSS GB | GB/s in-process | × read10+write1 | × SMA of {n} |")
    print("|---|---|---|---|---|---|---|")
    for label, r in results.items():
        rate = f"{r['in_process_gb_s']:.2f}" if "in_process_gb_s" in r else ""
        print(f"| {label} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {r['peak_rss_gb']:.2f} | {rate} | "
              f"{r['seconds'] / floor:.2f} | {r['seconds'] / base:.2f} |")  # fmt: skip
    if sma is not None and "pma sma N=3" in results:
        ok_time = sma["seconds"] <= 2 * floor
        ok_rss = sma["peak_rss_gb"] <= 1.5
        print(
            f"\nacceptance: SMA of {n} = {sma['seconds'] / floor:.2f} x floor (<= 2: {'ok' if ok_time else 'MISSED'}), "
            f"peak RSS {sma['peak_rss_gb']:.2f} GB (<= 1.5: {'ok' if ok_rss else 'MISSED'}; "
            f"N=3: {results['pma sma N=3']['peak_rss_gb']:.2f} GB)"
        )
    if sma is not None and "pma sweep 9" in results:
        print(f"sweep of 9 = {results['pma sweep 9']['seconds'] / sma['seconds']:.2f} x one SMA of {n}")
    along = results.get(f"along-run T={args.ends}")
    if sma is not None and along is not None:
        ratio = along["seconds"] / sma["seconds"]
        print(f"along-run T={args.ends} N={n} = {ratio:.2f} x one SMA of {n}, whole process (<= 3: "
              f"{'ok' if ratio <= 3 else 'MISSED'})")  # fmt: skip
    if sma is not None and "in_process_gb_s" in sma:
        rate = sma["in_process_gb_s"]
        print(f"SMA of {n} in-process: {rate:.2f} GB/s (>= 4: {'ok' if rate >= 4 else 'MISSED'})")
    against = results.get(f"pma sma N={n}{AGAINST}"), results.get(f"along-run T={args.ends}{AGAINST}")
    if against[0] is not None and along is not None and against[1] is not None:
        ratio = against[1]["seconds"] / against[0]["seconds"]
        print(f"against {args.against}: along-run = {ratio:.2f} x its SMA of {n}; SMA of {n} "
              f"{against[0].get('in_process_gb_s', float('nan')):.2f} GB/s in-process")  # fmt: skip
    out = {"machine": machine(), "checkpoints": n, "ends": args.ends, "bytes": size, "read_all_s": read_s, "cold": args.cold,
           "load_averages": loads, "results": results}  # fmt: skip
    (args.cache / ("results-cold.json" if args.cold else "results.json")).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
