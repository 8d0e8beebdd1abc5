"""Helpers shared by the PMA tests (a module with a unique name, so test files can import it)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

STEPS = (100, 200, 300, 400, 500, 600)
TOKENS_PER_STEP = 4096


def tiny_llama(seed: int = 0, *, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tie,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(124)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def trainer_state(step: int, *, tokens: bool = True, losses: dict[int, float] | None = None) -> dict:
    """A trainer_state.json as the HF Trainer writes it (the fields we read)."""
    log = [
        {"step": s, "loss": v, "learning_rate": 1e-3} for s, v in sorted((losses or {}).items()) if s <= step
    ]
    return {
        "global_step": step,
        "num_input_tokens_seen": step * TOKENS_PER_STEP if tokens else 0,
        "log_history": log,
    }


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder (single or sharded safetensors)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out
