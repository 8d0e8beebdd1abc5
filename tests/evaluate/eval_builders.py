"""Builders for the evaluation tests: tiny Llama models with their own tokenizers (word-level and byte-level BPE)
and task folders in the documented YAML + JSONL format. (Not named after the package: a test package called
``evaluate`` would shadow Hugging Face's ``evaluate`` library, which lm-eval imports.)"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
import yaml

# How closely two float32 computations of one log-likelihood (or a loss, or a perplexity) must agree: other batch
# sizes, packing, attention kernels or another CPU's vector width (AVX2 against AVX-512) change the order of the
# float32 sums. float32 keeps about 7 significant digits and a sum over n tokens loses about sqrt(n) ulps more,
# so the tolerance is relative (1e-5, ~80 ulps) with an absolute floor for values near zero (a token's
# log-softmax is off by eps times the logits' scale). An absolute 1e-6 on a perplexity of 783 failed on a Xeon.
F32_LL = {"rel": 1e-5, "abs": 1e-4}

WORDS = [
    f"{c}{v}{e}" for c in "bdfgklmnprst" for v in "aeiou" for e in ("", "n", "s")
]  # 180 pronounceable words


def word_tokenizer() -> Any:
    """A word-level tokenizer (whitespace and punctuation split) over WORDS, no special tokens added."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<unk>", "<pad>", "<s>", "</s>", ".", ",", "?", ":", "!", *WORDS]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def bpe_tokenizer() -> Any:
    """A small byte-level BPE tokenizer that prepends <s> (as Llama's does): spaces are part of tokens, so the
    harness's context/continuation split matters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [
        " ".join(rng.choice(WORDS) for _ in range(12)) + rng.choice([".", "?", ":"]) for _ in range(400)
    ]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_llama(
    vocab_size: int, seed: int = 0, *, max_positions: int = 256, bos: int = 2, eos: int = 3
) -> Any:
    """A random 2-layer Llama (hidden 32). A wide init makes its predictions far from uniform, so choices differ."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_positions, initializer_range=0.3,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def save_model(model: Any, tokenizer: Any, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def mc_rows(
    rng: random.Random, n: int, *, ctx: tuple[int, int] = (3, 12), n_choices: tuple[int, int] = (2, 4)
) -> list[dict]:
    rows = []
    for _ in range(n):
        k = rng.randint(*n_choices)
        choices = [sentence(rng, 1, 4) for _ in range(k)]
        rows.append(
            {
                "context": sentence(rng, *ctx) + rng.choice(["", ":", " ?"]),
                "choices": choices,
                "gold": rng.randrange(k),
                "id": rng.random(),
            }
        )
    return rows


def gen_rows(rng: random.Random, n: int) -> list[dict]:
    return [
        {
            "prompt": sentence(rng, 3, 8) + " :",
            "references": [sentence(rng, 1, 3) for _ in range(rng.randint(1, 2))],
        }
        for _ in range(n)
    ]


def ppl_rows(rng: random.Random, n: int) -> list[dict]:
    return [{"text": sentence(rng, 5, 30) + " ."} for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_task(folder: Path, spec: dict, splits: dict[str, list[dict]]) -> Path:
    """A task folder: ``task.yaml`` (``spec`` + data paths) and one JSONL file per split."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        write_jsonl(folder / f"{split}.jsonl", rows)
    spec = {**spec, "data": {split: f"{split}.jsonl" for split in splits}}
    (folder / "task.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return folder / "task.yaml"
