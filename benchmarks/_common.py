"""Shared helpers of the benchmarks: random Llama checkpoints on disk and whole-process timing."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

BENCH_DIR = Path(__file__).resolve().parents[1] / ".bench"


def llama_config(layers: int = 16, hidden: int = 1024, intermediate: int = 2752, vocab: int = 32000) -> dict:
    """A Llama config of about 268M parameters at the defaults (16 layers, hidden 1024)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False, dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )
    return cfg.to_dict()


def llama_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = h * config["num_key_value_heads"] // config["num_attention_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (v, h)}
    return shapes


def write_random_llama(folder: Path, config: dict, seed: int, *, base: Path | None = None, noise: float = 0.01,
                       shard_bytes: int = 2 * 10**9) -> Path:
    """A random bf16 Llama checkpoint (sharded safetensors + index + config), or ``base`` plus seeded noise."""
    if (folder / "config.json").is_file():
        return folder
    from mergescale.io.checkpoint import open_checkpoint

    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    base_src = open_checkpoint(base) if base is not None else None
    shard: dict[str, torch.Tensor] = {}
    shards: list[dict[str, torch.Tensor]] = []
    size = 0
    for name, shape in llama_shapes(config).items():
        if base_src is not None:
            t = base_src.read(name).float() + noise * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) * 0.02
        t = t.to(torch.bfloat16)
        if size + t.numel() * 2 > shard_bytes and shard:
            shards.append(shard)
            shard, size = {}, 0
        shard[name] = t
        size += t.numel() * 2
    shards.append(shard)
    weight_map = {}
    for k, sh in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sh, tmp / fname, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(sh, fname)
    total = sum(t.numel() * 2 for sh in shards for t in sh.values())
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(folder)
    return folder


@dataclass
class ProcessRun:
    seconds: float
    peak_rss_gb: float
    returncode: int
    output: str
    cpu_seconds: float = 0.0  # user + system of the process and its children: what the load does not inflate much


_RSS_WRAPPER = (
    "import resource, subprocess, sys, time;"
    "t = time.perf_counter();"
    "r = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True);"
    "dt = time.perf_counter() - t;"
    "u = resource.getrusage(resource.RUSAGE_CHILDREN);"
    "sys.stdout.write(r.stdout[-3000:]);"
    "print('\\n@@', dt, u.ru_maxrss, r.returncode, u.ru_utime + u.ru_stime)"
)


def run_process(cmd: list[str], env: dict[str, str] | None = None) -> ProcessRun:
    """Run ``cmd`` as a whole process: wall time, CPU time and peak RSS (getrusage) of that process alone."""
    out = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, *cmd], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    last = [line for line in out.stdout.splitlines() if line.startswith("@@")][-1].split()
    return ProcessRun(float(last[1]), int(last[2]) / 1024**2, int(last[3]), out.stdout, float(last[4]))


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def machine() -> str:
    import platform

    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, {platform.system()}, torch {torch.__version__}"


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def evict_from_page_cache(folders: list[Path]) -> None:
    """Drop the folders' safetensors files from the page cache (``posix_fadvise(DONTNEED)``; no root needed),
    so the next run reads them from disk: the realistic case for checkpoints of a real training run."""
    for folder in folders:
        for f in folder.rglob("*.safetensors"):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
