"""Planning a merge's memory from headers only, on models shaped like Llama-3-70B (8 experts and a base), written
as sparse safetensors files: real headers, holes for the data (no disk used, nothing read)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

import mergescale.engine.memory as memory
from mergescale.api import plan_memory
from mergescale.engine.memory import MemoryBudgetError
from mergescale.io.checkpoint import SafetensorsCheckpoint

HIDDEN, VOCAB = 8192, 128256
LLAMA3_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
              "num_key_value_heads": 8, "vocab_size": VOCAB, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16"}  # fmt: skip


def llama3_70b_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from transformers' own Llama built on the meta device (nothing allocated)."""
    fields = {k: v for k, v in LLAMA3_70B.items() if k not in ("architectures", "model_type", "torch_dtype")}
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**fields))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def write_sparse_model(folder: Path, shapes: dict[str, tuple[int, ...]]) -> int:
    """A bf16 safetensors file with a real header and a hole for the data; returns its apparent size."""
    folder.mkdir(parents=True)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        nbytes = 2
        for d in shape:
            nbytes *= d
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)  # a hole: no data written, no disk used
    (folder / "config.json").write_text(json.dumps(LLAMA3_70B))
    return 8 + len(raw) + offset


@pytest.fixture(scope="module")
def llama3_70b_ties(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("llama3-70b")
    shapes = llama3_70b_shapes()
    sizes = [write_sparse_model(root / name, shapes) for name in ["base", *(f"expert{i}" for i in range(8))]]
    assert sizes[0] > 140e9  # 70.6B parameters in bf16
    config = {
        "merge_method": "ties",
        "base_model": str(root / "base"),
        "models": [{"model": str(root / f"expert{i}"), "parameters": {"weight": 1.0, "density": 0.2}}
                   for i in range(8)],  # fmt: skip
        "dtype": "bfloat16",
    }
    path = root / "ties.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def no_weights_read(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("planning read a weight")

    monkeypatch.setattr(SafetensorsCheckpoint, "read", refuse)
    monkeypatch.setattr(SafetensorsCheckpoint, "map", refuse)


def test_plan_of_eight_70b_experts_fits_the_budget_from_headers_only(llama3_70b_ties, no_weights_read, monkeypatch):
    planned = plan_memory(llama3_70b_ties, max_memory="24GB")
    assert planned.peak <= 24e9
    embed = 2 * VOCAB * HIDDEN  # the bf16 embedding: its output and one more waiting for the writer
    assert planned.peak > planned.baseline + 2 * embed
    assert planned.blocked >= 2  # the embedding and the head at least: their stacks alone are 38 GB
    text = "\n".join(planned.describe())
    assert "model.embed_tokens.weight:" in text and "blocks of" in text
    # without a budget every product that can block does (WHOLE_BYTES is 0): the peak stays far below the
    # 38 GB stack, and a roomier budget changes nothing but the size of the blocks
    assert memory.WHOLE_BYTES == 0
    default = plan_memory(llama3_70b_ties)
    assert default.peak < 12e9 and default.blocked == planned.blocked
    roomy = plan_memory(llama3_70b_ties, max_memory="64GB")
    assert roomy.blocked == planned.blocked and roomy.peak <= 64e9
    # where whole stacks are allowed (WHOLE_BYTES), a budget with room for them uses it
    monkeypatch.setattr(memory, "WHOLE_BYTES", 1 << 62)
    roomy = plan_memory(llama3_70b_ties, max_memory="64GB")
    assert roomy.blocked < planned.blocked and roomy.peak <= 64e9


def test_a_budget_below_one_block_is_refused_in_one_line(llama3_70b_ties, no_weights_read):
    with pytest.raises(MemoryBudgetError) as err:
        plan_memory(llama3_70b_ties, max_memory="4GB")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("--max-memory 4.00 GB cannot hold one block of tensor")
    assert "(ties, 8 models): it needs at least" in message


def _main(monkeypatch, capsys, *args: str | Path) -> tuple[int, str, str]:
    """The console script's ``main()``: (exit code, stdout, stderr)."""
    import sys

    import mergescale.cli
    from mergescale.cli import main

    monkeypatch.setattr(mergescale.cli, "_exit_now", sys.exit)
    monkeypatch.setattr(sys, "argv", ["mergescale", *map(str, args)])
    with pytest.raises(SystemExit) as exited:
        main()
    out = capsys.readouterr()
    return int(exited.value.code or 0), out.out, out.err


def test_dry_run_prints_the_plan_and_writes_nothing(llama3_70b_ties, tmp_path, no_weights_read, monkeypatch, capsys):
    out = tmp_path / "out"
    code, stdout, _ = _main(monkeypatch, capsys, "merge", llama3_70b_ties, out, "--dry-run", "--max-memory", "24GB")
    assert code == 0
    assert stdout.startswith("planned peak memory: ") and "(--max-memory 24.00 GB)" in stdout
    assert all(len(line) <= 80 for line in stdout.splitlines()), stdout
    assert not out.exists()
    code, _, stderr = _main(monkeypatch, capsys, "merge", llama3_70b_ties, out, "--dry-run", "--max-memory", "3GB")
    assert code == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --max-memory 3.00 GB cannot hold one block"), stderr


def test_the_plan_counts_the_compiled_loops_once_unless_they_are_loaded(llama3_70b_ties, no_weights_read, monkeypatch):
    """TIES runs numba's loops: a process that has not loaded them yet plans their runtime once, on every job
    from the first that loads them; one that has (its resident set holds them) plans nothing more."""
    from mergescale.methods import kernels

    monkeypatch.setattr(memory, "current_rss", lambda: 10**9)  # the same baseline for both plans
    monkeypatch.setattr(kernels, "loaded", lambda: True)
    loaded = plan_memory(llama3_70b_ties, max_memory="24GB")
    monkeypatch.setattr(kernels, "loaded", lambda: False)
    fresh = plan_memory(llama3_70b_ties, max_memory="24GB")
    assert fresh.peak - loaded.peak == memory.FUSED_LOOPS_BYTES
    assert all(j.runtime == memory.FUSED_LOOPS_BYTES for j in fresh.jobs[fresh.peak_job :])
    assert all(j.runtime == 0 for j in loaded.jobs)
