"""Shared fixtures: tiny randomly initialised transformers models, built once per session and saved as real
Hugging Face folders (config.json, safetensors, tokenizer files)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# one thread: tiny models gain nothing from an OpenMP team, and on a busy 2-core machine they lose 10x to it
torch.set_num_threads(1)

VOCAB = 128


def tiny_config(arch: str):
    """A tiny config of one of the architectures the tests cover."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    if arch == "llama":
        return tf.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False)
    if arch == "qwen2":
        return tf.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=False)
    if arch == "mistral":
        return tf.MistralConfig(**common, num_key_value_heads=2, tie_word_embeddings=False)
    if arch == "mixtral":
        return tf.MixtralConfig(**common, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, tie_word_embeddings=True, bos_token_id=2, eos_token_id=3)
    raise ValueError(arch)


def build_tokenizer():
    """A word-level tokenizer over a tiny vocabulary, in Hugging Face's fast-tokenizer format."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def make_model(arch: str, seed: int, *, base=None, noise: float = 0.02):
    """A tiny random model; with ``base``, a copy of it plus seeded noise (a stand-in for a fine-tuned expert)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    if base is not None:
        model.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * noise)
    return model.eval()


def save_model(model, path: Path, *, dtype: torch.dtype = torch.float32, shard: str | None = None) -> Path:
    model = model.to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory) -> Callable[..., dict[str, Path]]:
    """``model_factory(arch, n_experts=2, dtype=..., shard=None)`` -> {"base": path, "expert0": path, ...}, cached."""
    cache: dict[tuple, dict[str, Path]] = {}

    def build(arch: str = "llama", n_experts: int = 2, dtype: torch.dtype = torch.float32, shard: str | None = None):
        key = (arch, n_experts, dtype, shard)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"{arch}-{str(dtype).split('.')[-1]}")
            base = make_model(arch, 0)
            paths = {"base": save_model(base, root / "base", dtype=dtype, shard=shard)}
            base = make_model(arch, 0)
            for i in range(n_experts):
                expert = make_model(arch, 100 + i, base=base)
                paths[f"expert{i}"] = save_model(expert, root / f"expert{i}", dtype=dtype, shard=shard)
            cache[key] = paths
        return cache[key]

    return build


@pytest.fixture(scope="session")
def llama_models(model_factory) -> dict[str, Path]:
    return model_factory("llama", n_experts=3)


@pytest.fixture(scope="session")
def micro_build(tmp_path_factory):
    """The whole micro world built end to end (~20 s); tests that change it work on a copy."""
    from mergescale.world.build import build_world

    return build_world(tmp_path_factory.mktemp("micro") / "world", "micro", seed=0, workers=1)
