"""Fixtures of the PMA tests: tiny pre-training runs on disk in the layouts the tool reads (Hugging Face Trainer
folders with ``trainer_state.json``, folders named by step, torch DCP folders), built once per session."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from pma_helpers import STEPS, tiny_llama, trainer_state, word_tokenizer


def pytest_collection_modifyitems(items) -> None:
    # torch warns on every single-process DCP save/load; that is exactly what these tests do
    quiet = pytest.mark.filterwarnings(r"ignore:torch\.distributed is (disabled|unavailable):UserWarning")
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(quiet)


@pytest.fixture(scope="session")
def run_factory(tmp_path_factory) -> Callable[..., Path]:
    """``run_factory(layout="hf", dtype=float32, steps=STEPS, tokens=True, losses=None)`` -> a run folder.

    Checkpoint k is the tiny Llama after k seeded random "training" steps, so consecutive checkpoints differ.
    Layouts: ``hf`` (checkpoint-<step>/ with trainer_state.json), ``named`` (mixed step-folder spellings),
    ``dcp`` (checkpoint-<step>/ holding a DCP of {"model": ..., "optim": ...}, config.json in the run folder).
    """
    cache: dict[tuple, Path] = {}

    def build(
        layout: str = "hf",
        dtype: torch.dtype = torch.float32,
        steps: tuple[int, ...] = STEPS,
        tokens: bool = True,
        losses: dict[int, float] | None = None,
    ) -> Path:
        key = (layout, dtype, steps, tokens, tuple(sorted((losses or {}).items())))
        if key in cache:
            return cache[key]
        root = tmp_path_factory.mktemp(f"run-{layout}")
        model = tiny_llama(0)
        g = torch.Generator().manual_seed(1)
        names = {100: "step_100", 200: "step200", 300: "iter_0000300", 400: "global_step400"}
        for step in steps:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
            if layout == "named":
                folder = root / names.get(step, f"step-{step}")
            else:
                folder = root / f"checkpoint-{step}"
            if layout == "dcp":
                import torch.distributed.checkpoint as dcp

                sd = {k: v.to(dtype).clone() for k, v in model.state_dict().items()}
                dcp.save(
                    {"model": sd, "optim": {"lr": torch.tensor(0.1)}, "step": step},
                    checkpoint_id=str(folder),
                    no_dist=True,
                )
            else:
                model.to(dtype).save_pretrained(folder)
                model.float()
                word_tokenizer().save_pretrained(folder)
            (folder / "trainer_state.json").write_text(
                json.dumps(trainer_state(step, tokens=tokens, losses=losses))
            )
            (folder / "optimizer.pt").write_bytes(b"not a pickle: must never be opened")
        if layout == "dcp":
            model.config.save_pretrained(root)
            word_tokenizer().save_pretrained(root)
        cache[key] = root
        return root

    return build


@pytest.fixture(scope="session")
def hf_run(run_factory) -> Path:
    return run_factory("hf")
