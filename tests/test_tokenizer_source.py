"""``tokenizer_source`` / ``tokenizer:``: the output vocabulary and the alignment of every model's rows, against
the rules written out and against mergekit 0.1.5."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import yaml

from mergescale.api import merge
from mergescale.io.checkpoint import iter_tensors, open_checkpoint
from mergescale.vocabulary import TokenRule, VocabularyAlignment

EMB = "model.embed_tokens.weight"


def test_alignment_rules():
    # output vocabulary of 5 tokens; three inputs (the third is the base)
    rows = {
        0: torch.tensor([0, 1, -1, -1, 2]),  # lacks tokens 2 and 3
        1: torch.tensor([0, -1, 1, -1, 2]),  # lacks 1 and 3
        2: torch.tensor([0, 1, 2, -1, -1]),  # the base: lacks 3 and 4
    }
    align = VocabularyAlignment(size=6, tokens=5, rows=rows, tensor_names={})
    xs = [torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[10.0], [20.0], [30.0]]), torch.tensor([[5.0], [6.0], [7.0]])]
    a, b, base = align.align(xs, [0, 1, 2], base=2)
    # token 1: in inputs 0 and the base → the base's row for input 1; token 2: in 1 and the base → the base's;
    # token 3: in none → 0; token 4: in 0 and 1 (not the base) → their mean (3 + 30)/2
    assert a[:5, 0].tolist() == [1.0, 2.0, 7.0, 0.0, 3.0]
    assert b[:5, 0].tolist() == [10.0, 6.0, 20.0, 0.0, 30.0]
    assert base[:5, 0].tolist() == [5.0, 6.0, 7.0, 0.0, 16.5]
    assert a[5, 0] == pytest.approx(sum([1.0, 2.0, 7.0, 0.0, 3.0]) / 5)  # padding: the mean of the model's rows
    # explicit rules: token 4 from input 1's row; token 0 forced to zeros even where every input has it
    ruled = VocabularyAlignment(6, 5, rows, {}, {4: TokenRule(source=1), 0: TokenRule(zero=True, force=True)})
    a, b, base = ruled.align(xs, [0, 1, 2], base=2)
    assert [a[0, 0], b[0, 0], base[0, 0]] == [0.0, 0.0, 0.0]
    assert base[4, 0] == 30.0 and a[4, 0] == 3.0  # only the inputs lacking the token take the rule's row


def _tokenizer(extra):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(60)] + extra
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory):
    """A base with tokens x0 x1; expert a with x0; expert b with x1 x2 (so every rule of the alignment fires)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    root = tmp_path_factory.mktemp("vocab-models")
    out = {}
    for i, (name, extra) in enumerate((("base", ["x0", "x1"]), ("a", ["x0"]), ("b", ["x1", "x2"]))):
        torch.manual_seed(i)
        cfg = LlamaConfig(vocab_size=64 + len(extra), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(root / name)
        _tokenizer(extra).save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def _rows_by_token(folder):
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(folder).get_vocab()
    tensors = dict(iter_tensors(open_checkpoint(folder)))
    return {tok: tensors[EMB][i] for tok, i in vocab.items()}, tensors


TOKENIZERS = {
    "union": {"tokenizer_source": "union"},
    "base": {"tokenizer_source": "base"},
    "model": {"tokenizer": {"source": "B", "pad_to_multiple_of": 8}},
    "rules": {"tokenizer": {"source": "union", "tokens": {
        "x2": {"source": {"kind": "zero"}},
        "w5": {"source": "A", "force": True},
        "x0": {"source": {"kind": "model_token", "model": "B", "token": "w7"}},
    }}},
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(TOKENIZERS))
@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_same_rows_as_mergekit(vocab_models, tmp_path, case, method):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    names = {"A": vocab_models["a"], "B": vocab_models["b"]}
    extra = copy.deepcopy(TOKENIZERS[case])
    text = yaml.safe_dump(extra)
    for key, path in names.items():
        text = text.replace(f" {key}\n", f" {path}\n").replace(f"'{key}'", f"'{path}'")
    extra = yaml.safe_load(text)
    cfg = {
        "merge_method": method,
        "base_model": vocab_models["base"],
        "models": [{"model": vocab_models["a"], "parameters": {"weight": 0.7}},
                   {"model": vocab_models["b"], "parameters": {"weight": 0.6}}],
        "dtype": "float32",
        **extra,
    }
    if method == "linear":
        cfg["parameters"] = {"weight": 0.2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "mk"),
                  options=MergeOptions(copy_tokenizer=True, quiet=True, write_model_card=False))
    merge(cfg, tmp_path / "ours", progress=False)
    theirs, t_all = _rows_by_token(str(tmp_path / "mk"))
    ours, o_all = _rows_by_token(str(tmp_path / "ours"))
    assert theirs.keys() == ours.keys()
    for tok in theirs:
        torch.testing.assert_close(ours[tok], theirs[tok], atol=1e-6, rtol=1e-5, msg=tok)
    assert o_all[EMB].shape == t_all[EMB].shape  # padding rows included
    for name in t_all:
        if "layers" in name or name == "model.norm.weight":
            torch.testing.assert_close(o_all[name], t_all[name], atol=1e-6, rtol=1e-5)
