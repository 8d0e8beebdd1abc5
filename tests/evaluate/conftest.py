"""Session fixtures of the evaluation tests: tiny models saved as Hugging Face folders and a task suite."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))  # eval_builders, importable from the test modules too
from eval_builders import (  # noqa: E402
    bpe_tokenizer,
    gen_rows,
    mc_rows,
    ppl_rows,
    save_model,
    tiny_llama,
    word_tokenizer,
    write_task,
)


@pytest.fixture(scope="package", autouse=True)
def _one_torch_thread():
    """One torch thread for these tests: the tiny models gain nothing from two, and on the shared 2-core machine
    two OpenMP threads competing with other jobs made them several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def word_model(tmp_path_factory) -> Path:
    """A tiny Llama with a word-level tokenizer, as a Hugging Face folder."""
    tok = word_tokenizer()
    return save_model(tiny_llama(len(tok)), tok, tmp_path_factory.mktemp("models") / "word")


@pytest.fixture(scope="session")
def bpe_model(tmp_path_factory) -> Path:
    """A tiny Llama with a byte-level BPE tokenizer that adds BOS, as a Hugging Face folder."""
    tok = bpe_tokenizer()
    return save_model(
        tiny_llama(len(tok), seed=1, bos=tok.bos_token_id, eos=tok.eos_token_id),
        tok,
        tmp_path_factory.mktemp("models") / "bpe",
    )


@pytest.fixture(scope="session")
def suite_dir(tmp_path_factory) -> Path:
    """A suite with two multiple-choice tasks (one 2-shot), a generation task and a perplexity task."""
    root = tmp_path_factory.mktemp("suite")
    rng = random.Random(42)
    write_task(root / "mc_a", {"name": "mc_a", "category": "cat_x", "kind": "multiple_choice"},
               {"train": mc_rows(rng, 20), "test": mc_rows(rng, 40)})  # fmt: skip
    write_task(root / "mc_b", {"name": "mc_b", "category": "cat_y", "kind": "multiple_choice", "num_fewshot": 2,
                               "metrics": ["acc_norm", "acc"]},
               {"train": mc_rows(rng, 15), "validation": mc_rows(rng, 5), "test": mc_rows(rng, 30)})  # fmt: skip
    write_task(root / "gen", {"name": "gen", "category": "cat_x", "kind": "generation",
                              "generation": {"stop": ["."], "max_new_tokens": 6}},
               {"test": gen_rows(rng, 12)})  # fmt: skip
    write_task(
        root / "ppl", {"name": "ppl", "category": "lm", "kind": "perplexity"}, {"test": ppl_rows(rng, 10)}
    )
    suite = {
        "name": "tiny",
        "held_in": ["mc_a/task.yaml", "gen"],
        "held_out": ["mc_b/task.yaml", "ppl/task.yaml"],
    }
    (root / "suite.yaml").write_text(yaml.safe_dump(suite), encoding="utf-8")
    return root
