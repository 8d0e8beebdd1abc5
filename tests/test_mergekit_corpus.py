"""The corpus acceptance: real published mergekit configs give mergekit 0.1.5's weights.

Every ``tests/mergekit_corpus/*.yml`` is a config published on a model card or in mergekit's examples (its header
names the source and what, if anything, was adapted: layer ranges are scaled to the 4-layer test models). The
models it names are mapped, in order of appearance, onto tiny 4-layer Llamas built here (with tokenizers; a model
the header marks ``extended-vocabulary`` gets four more tokens than the others, so ``tokenizer_source: union`` has
something to do). Each config runs through mergekit 0.1.5 (with ``dtype: float32`` and ``out_dtype`` the config's
dtype, so both compute in float32) and through ``mergescale.merge`` as written, and then:

- same tensor names, shapes and dtypes; vocabulary tensors are compared token by token (mergekit orders the
  tokens a union adds from hash-ordered dicts);
- at most 10⁻⁴ of a tensor's entries may differ beyond one unit in the last place of the output dtype (top-k
  ties broken differently); random-mask methods (header ``random``): the same tensors, all finite;
- the same ``num_hidden_layers`` and ``vocab_size``; the output loads and runs in transformers;
- a config mergekit refuses (header ``mergekit: fails``) is refused by us in one line, or merged;
- the warnings the header lists (keys mergekit ignores) are given.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mergescale.api import merge
from mergescale.config import ConfigWarning
from mergescale.errors import MergeScaleError
from mergescale.io.checkpoint import iter_tensors, open_checkpoint

pytest.importorskip("mergekit.merge")

pytestmark = pytest.mark.slow

CORPUS = Path(__file__).parent / "mergekit_corpus"
FILES = sorted(CORPUS.glob("*.yml"))
LAYERS = 4
VOCAB = 128  # the size of tests/conftest.py's test tokenizer
N_EXPERTS = 12
EXTRA_TOKENS = ["x0", "x1", "x2", "x3"]


def header(path: Path) -> dict[str, str]:
    """The ``# key: value`` lines at the top of a corpus file."""
    out: dict[str, str] = {}
    key = None
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        m = re.match(r"#\s*([\w-]+):\s*(.*)", line)
        if m:
            key = m.group(1)
            out[key] = m.group(2).strip()
        elif key is not None:
            out[key] += " " + line.lstrip("# ").strip()
    return out


# ---------------------------------------------------------------------------------------------------------------
# models


def _tokenizer(extra: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 4)] + extra
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def _model(seed: int, vocab: int, base=None):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    if base is not None:
        state = base.state_dict()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                rows = min(p.shape[0], state[name].shape[0])
                p[:rows] = state[name][:rows]
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


@pytest.fixture(scope="session")
def corpus_models(tmp_path_factory) -> dict[str, Path]:
    """base, expert0..expert11 (base + seeded noise) and ext (an expert with 4 more tokens), 4 layers each."""
    root = tmp_path_factory.mktemp("corpus-models")
    base = _model(0, VOCAB)
    out = {}
    for name, model, extra in [("base", base, []),
                               *[(f"expert{i}", _model(200 + i, VOCAB, base), []) for i in range(N_EXPERTS)],
                               ("ext", _model(300, VOCAB + len(EXTRA_TOKENS), base), EXTRA_TOKENS)]:
        model.save_pretrained(root / name)
        _tokenizer(extra).save_pretrained(root / name)
        out[name] = root / name
    return out


def _referenced(cfg: dict[str, Any]) -> list[str]:
    names: list[str] = []

    def add(n: Any) -> None:
        if isinstance(n, str) and n not in names:
            names.append(n)

    add(cfg.get("base_model"))
    modules = list((cfg.get("modules") or {}).values())
    for holder in [cfg, *modules]:
        for m in holder.get("models") or []:
            add(m.get("model"))
        for s in holder.get("slices") or []:
            add(s.get("base_model"))
            for src in s.get("sources") or []:
                add(src.get("model"))
    tok = cfg.get("tokenizer") or {}
    for src in (cfg.get("tokenizer_source"), tok.get("source") if isinstance(tok, dict) else None):
        if src not in (None, "base", "union"):
            add(src)
    return names


def substitute(cfg: dict[str, Any], head: dict[str, str], models: dict[str, Path]) -> dict[str, Any]:
    """The config with each model name replaced by a test model: the base by ``base``, the header's
    ``extended-vocabulary`` model by ``ext``, the others by expert0, expert1, ... in order of appearance."""
    mapping: dict[str, str] = {}
    experts = iter(range(N_EXPERTS))
    for name in _referenced(cfg):
        if name == cfg.get("base_model"):
            mapping[name] = str(models["base"])
        elif name == head.get("extended-vocabulary"):
            mapping[name] = str(models["ext"])
        else:
            mapping[name] = str(models[f"expert{next(experts)}"])
    out = copy.deepcopy(cfg)

    def fix(d: dict[str, Any], *keys: str) -> None:
        for k in keys:
            if isinstance(d.get(k), str) and d[k] in mapping:
                d[k] = mapping[d[k]]

    fix(out, "base_model", "tokenizer_source")
    if isinstance(out.get("tokenizer"), dict):
        fix(out["tokenizer"], "source")
    for holder in [out, *(out.get("modules") or {}).values()]:
        for m in holder.get("models") or []:
            fix(m, "model")
        for s in holder.get("slices") or []:
            fix(s, "base_model")
            for src in s.get("sources") or []:
                fix(src, "model")
    return out


# ---------------------------------------------------------------------------------------------------------------
# runs, shared by the tests of one config


@dataclass
class Run:
    head: dict[str, str]
    config: dict[str, Any]
    mergekit: Path | None = None
    mergekit_error: str | None = None
    ours: Path | None = None
    ours_error: MergeScaleError | None = None
    warnings: list[str] = field(default_factory=list)


def _run_mergekit(cfg: dict[str, Any], out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    mk = copy.deepcopy(cfg)
    out_dtype = cfg.get("out_dtype") or cfg.get("dtype")
    mk["dtype"] = "float32"
    if out_dtype:
        mk["out_dtype"] = out_dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_merge(MergeConfiguration.model_validate(mk), str(out),
                  options=MergeOptions(copy_tokenizer=True, quiet=True, write_model_card=False))


@pytest.fixture(scope="session")
def corpus_run(corpus_models, tmp_path_factory):
    cache: dict[str, Run] = {}
    root = tmp_path_factory.mktemp("corpus-runs")

    def run(path: Path) -> Run:
        if path.name in cache:
            return cache[path.name]
        head = header(path)
        raw = yaml.safe_load(path.read_text())
        cfg = substitute(raw, head, corpus_models)
        r = Run(head, cfg)
        try:
            _run_mergekit(cfg, root / path.stem / "mergekit")
            r.mergekit = root / path.stem / "mergekit"
        except Exception as exc:  # mergekit raises RuntimeError, ValueError, TypeError...
            r.mergekit_error = f"{type(exc).__name__}: {exc}"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConfigWarning)
            try:
                merge(cfg, root / path.stem / "ours", progress=False)
                r.ours = root / path.stem / "ours"
            except MergeScaleError as exc:
                r.ours_error = exc
        r.warnings = [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]
        cache[path.name] = r
        return r

    return run


# ---------------------------------------------------------------------------------------------------------------
# the checks


def _vocab_order(folder: Path) -> list[int] | None:
    """Row of each token, tokens in sorted order, from the folder's tokenizer."""
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(str(folder)).get_vocab()
    return [vocab[t] for t in sorted(vocab)]


def _differing(ours: torch.Tensor, theirs: torch.Tensor) -> int:
    """Entries that differ by more than one unit in the last place of the output dtype (float32: 1e-5)."""
    eps = max(torch.finfo(theirs.dtype).eps, 1e-5) if theirs.is_floating_point() else 0.0
    a, b = ours.to(torch.float64), theirs.to(torch.float64)
    return int(((a - b).abs() > 1e-6 + eps * b.abs()).sum())


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_corpus_config_gives_mergekit_weights(path, corpus_run):
    r = corpus_run(path)
    for word in filter(None, (w.strip() for w in r.head.get("expect-warnings", "").split(","))):
        assert any(repr(word) in w or f".{word}" in w for w in r.warnings), f"no warning about {word!r}: {r.warnings}"
    if r.head.get("mergekit") == "fails":
        assert r.mergekit_error is not None, "mergekit was expected to refuse this config"
    else:
        assert r.mergekit_error is None, r.mergekit_error
    if r.head.get("mergescale") == "fails":
        assert r.ours_error is not None and "\n" not in str(r.ours_error)
        return
    assert r.ours_error is None, str(r.ours_error)
    if r.mergekit is None:
        return  # mergekit refused a config we merge: nothing to compare (the load test checks the output)
    theirs = dict(iter_tensors(open_checkpoint(r.mergekit)))
    ours = dict(iter_tensors(open_checkpoint(r.ours)))
    assert ours.keys() == theirs.keys()
    rows_theirs, rows_ours = _vocab_order(r.mergekit), _vocab_order(r.ours)
    random = r.head.get("random") == "true"
    for name, t in theirs.items():
        o = ours[name]
        assert (o.shape, o.dtype) == (t.shape, t.dtype), name
        if random:
            assert bool(torch.isfinite(o.float()).all()), name
            continue
        if rows_theirs != rows_ours and o.shape[0] >= len(rows_ours) and o.dim() == 2 and "layers" not in name:
            o, t = o[rows_ours], t[rows_theirs]  # vocabulary tensors, token by token
        bad = _differing(o, t)
        assert bad <= 1e-4 * t.numel(), f"{name}: {bad} of {t.numel()} entries differ"
    cfg_ours = json.loads((r.ours / "config.json").read_text())
    cfg_theirs = json.loads((r.mergekit / "config.json").read_text())
    for key in ("num_hidden_layers", "vocab_size"):
        assert cfg_ours[key] == cfg_theirs[key], key


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_corpus_output_loads_and_runs_in_transformers(path, corpus_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = corpus_run(path)
    if r.ours is None:
        pytest.skip(f"refused, as mergekit refuses it: {r.ours_error}")
    model = AutoModelForCausalLM.from_pretrained(str(r.ours))
    tok = AutoTokenizer.from_pretrained(str(r.ours))
    assert len(tok) <= model.config.vocab_size
    ids = tok("w1 w2 w3", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert bool(torch.isfinite(logits).all())
    chat = r.config.get("chat_template")
    if chat not in (None, "auto"):
        assert tok.chat_template
