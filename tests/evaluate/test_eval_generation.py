"""Our greedy decoding loop gives model.generate's tokens (greedy search with the same stops, EOS and padding)."""

from __future__ import annotations

import random

import pytest
import torch
from eval_builders import WORDS, bpe_tokenizer, tiny_llama, word_tokenizer
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from mergescale.evaluate.generation import cut_at_stop, generate_greedy


class _Stops(StoppingCriteria):
    def __init__(self, tokenizer, stops, width):
        self.tokenizer, self.stops, self.width = tokenizer, stops, width

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tokenizer.batch_decode(input_ids[:, self.width :], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts])


def _reference(model, tokenizer, prompts, stop, max_new_tokens):
    """transformers' own greedy search, one prompt at a time (no padding at all)."""
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                  pad_token_id=tokenizer.pad_token_id or 0, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                             stopping_criteria=StoppingCriteriaList([_Stops(tokenizer, stop, len(p))]))  # fmt: skip
        out.append(cut_at_stop(tokenizer.decode(gen[0, len(p) :], skip_special_tokens=True), stop))
    return out


@pytest.mark.parametrize("kind", ["word", "bpe"])
@pytest.mark.parametrize("stop", [["\n"], ["w7", "\n"], []])
def test_batched_loop_equals_generate(kind: str, stop: list[str]) -> None:
    tokenizer = word_tokenizer() if kind == "word" else bpe_tokenizer()
    model = tiny_llama(len(tokenizer), seed=3).eval()
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))) for _ in range(9)]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]  # uneven: left padding
    got = generate_greedy(model, tokenizer, prompts, stop=stop, max_new_tokens=6, max_length=64, batch_size=4)
    assert got == _reference(model, tokenizer, prompts, stop, 6)


def test_nonfinite_rows_are_reported() -> None:
    tokenizer = word_tokenizer()
    model = tiny_llama(len(tokenizer), seed=3).eval()
    with torch.no_grad():
        model.lm_head.weight[5] = float("nan")
    rows: list[int] = []
    generate_greedy(model, tokenizer, [[4, 5], [6]], stop=["\n"], max_new_tokens=2, max_length=32, nonfinite_rows=rows)
    assert sorted(rows) == [0, 1]
