"""The built-in offline demo: create tiny models, merge them with every core method, check the results load.

It needs no network and no downloads: a tiny Llama base and a few "experts" (the base plus seeded
perturbations) are created with ``transformers``, saved as ordinary Hugging Face folders, merged by the same
code path as ``mergescale merge``, and each merge is loaded back with ``AutoModelForCausalLM`` and run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

DEMO_METHODS: dict[str, dict] = {
    "linear": {"models": {"weight": 1.0}, "parameters": {}},
    "task_arithmetic": {"models": {"weight": 1.0}, "parameters": {"lambda": 0.5}},
    "ties": {"models": {"weight": 1.0, "density": 0.2}, "parameters": {}},
    "dare_ties": {"models": {"weight": 1.0, "density": 0.5}, "parameters": {}},
}


@dataclass
class DemoRow:
    method: str
    seconds: float
    gb_per_s: float
    distance_to_base: float
    loads: bool


def _tiny_models(root: Path, n_experts: int, seed: int) -> tuple[Path, list[Path]]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(252)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=2, eos_token_id=3,
                         pad_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(seed)
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    experts = []
    for i in range(n_experts):
        g = torch.Generator().manual_seed(seed + 1 + i)
        expert = LlamaForCausalLM(config).to(torch.bfloat16)
        expert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in expert.parameters():
                p.add_((torch.randn(p.shape, generator=g) * 0.01).to(p.dtype))
        path = root / f"expert{i}"
        expert.save_pretrained(path, max_shard_size="200KB")  # sharded, like real checkpoints
        tokenizer.save_pretrained(path)
        experts.append(path)
    return base_dir, experts


def run_demo(out_dir: str | Path, *, n_experts: int = 3, seed: int = 0, overwrite: bool = False) -> list[DemoRow]:
    """Create tiny models under ``out_dir/models`` and merge them with each demo method into ``out_dir/merges``."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from mergescale.api import merge

    hf_logging.disable_progress_bar()  # our own table says what happened
    root = Path(out_dir)
    models_dir = root / "models"
    if not (models_dir / "base" / "config.json").is_file() or overwrite:
        models_dir.mkdir(parents=True, exist_ok=True)
        base, experts = _tiny_models(models_dir, n_experts, seed)
    else:
        base, experts = models_dir / "base", sorted(models_dir.glob("expert*"))
    base_model = AutoModelForCausalLM.from_pretrained(base, trust_remote_code=False)
    ids = torch.arange(16).unsqueeze(0)
    rows = []
    for method, spec in DEMO_METHODS.items():
        config = {
            "merge_method": method,
            "base_model": str(base),
            "models": [{"model": str(p), "parameters": dict(spec["models"])} for p in experts],
            "parameters": dict(spec["parameters"]),
            "dtype": "bfloat16",
            "seed": seed,
        }
        cfg_path = root / "configs" / f"{method}.yaml"
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        result = merge(cfg_path, root / "merges" / method, overwrite=True, progress=False)
        merged = AutoModelForCausalLM.from_pretrained(root / "merges" / method, trust_remote_code=False)
        with torch.no_grad():
            logits = merged(ids).logits
        dist = sum(
            float((a.float() - b.float()).norm() ** 2)
            for a, b in zip(merged.state_dict().values(), base_model.state_dict().values(), strict=True)
        ) ** 0.5
        rows.append(DemoRow(method, result.stats.seconds, result.stats.gb_per_s, dist,
                            bool(torch.isfinite(logits).all())))
    return rows
