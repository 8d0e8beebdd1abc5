"""The output model's tokenizer: ``tokenizer_source`` (base, union, a model) and ``chat_template``.

mergekit 0.1.5 semantics (``tokenizer/build.py``, ``merge.py``), matched here:

- ``base``: the base model's tokenizer (the first model's without a base); ``<model>``: that model's;
  ``union``: the base's, plus every other model's tokens it lacks (in config order, each model's in id order;
  mergekit's order comes from hash-ordered dicts and changes from run to run), plus every model's added
  (special) tokens. Tokens a model has past its embedding rows (id ≥ its ``vocab_size``) are left out.
- The output's ``vocab_size`` is the size of that vocabulary (rounded up to ``pad_to_multiple_of``); each
  model's rows are re-indexed to it (:mod:`mergescale.vocabulary`). The tokenizer is written with
  ``save_pretrained`` (not copied), as mergekit does.
- ``chat_template``: ``auto`` takes the template most of the input models' tokenizers have (none: unchanged), a
  name takes a built-in template (chatml, llama3, alpaca, mistral, exaone; written here from the formats'
  public descriptions), anything else of 20 characters or more with a ``{`` is a Jinja template itself.

Tokenizers load with ``trust_remote_code=False`` and from local folders only.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergescale.errors import ConfigError, InputModelError

CHAT_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
        "{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + "
        "'\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ message['content'] + eos_token }}{% else %}{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    ),
    "exaone": (
        "{% for message in messages %}{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}


def check_chat_template(value: str, where: str) -> None:
    """``auto``, a built-in name or a Jinja template; :class:`ConfigError` otherwise (as mergekit refuses it)."""
    if value == "auto" or value in CHAT_TEMPLATES:
        return
    if len(value) < 20 or "{" not in value:
        raise ConfigError(
            f"{where}: {value!r} is neither a template name ({', '.join(sorted(CHAT_TEMPLATES))}, auto) nor a "
            "Jinja template"
        )


def _load(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, use_fast=True)
    except Exception as exc:  # transformers raises many kinds for a missing or bad tokenizer
        raise InputModelError(f"{folder}: cannot load its tokenizer ({type(exc).__name__}: {exc})") from None


def model_chat_template(folder: Path) -> str | None:
    """The chat template a model folder's tokenizer carries, if any (its default one when it has several)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text().strip() or None
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        try:
            template = json.loads(cfg.read_text()).get("chat_template")
        except (OSError, json.JSONDecodeError):
            return None
        if isinstance(template, list):
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if isinstance(template, str) and template.strip():
            return template.strip()
    return None


def resolve_chat_template(value: str | None, folders: Sequence[Path]) -> str | None:
    """The template text a ``chat_template`` value stands for (None: leave the tokenizer's own)."""
    if value is None:
        return None
    if value == "auto":
        found = [t for t in (model_chat_template(f) for f in folders) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    return CHAT_TEMPLATES.get(value, value)


@dataclass
class BuiltTokenizer:
    """The output's tokenizer files and vocabulary, and each model's vocabulary (token -> embedding row)."""

    files: dict[str, bytes]
    vocab: dict[str, int]
    size: int  # rows of the output's vocabulary tensors (padded)
    model_vocabs: dict[str, dict[str, int]]


def vocab_size_of(config: Mapping[str, Any] | None) -> int | None:
    if not config:
        return None
    if isinstance(config.get("vocab_size"), int):
        return int(config["vocab_size"])
    text = config.get("text_config")
    return vocab_size_of(text) if isinstance(text, Mapping) else None


def _usable_vocab(tok: Any, vocab_size: int | None) -> dict[str, int]:
    vocab = tok.get_vocab()
    return {t: i for t, i in vocab.items() if vocab_size is None or i < vocab_size}


def build_tokenizer(
    mode: str,
    base: str,
    models: Sequence[str],
    folders: Mapping[str, Path],
    configs: Mapping[str, Mapping[str, Any] | None],
    *,
    chat_template: str | None = None,
    pad_to_multiple_of: int | None = None,
    add_tokens: Sequence[str] = (),
) -> BuiltTokenizer:
    """Build the output tokenizer (``mode``: base, union or a model reference) and every model's vocabulary.

    ``base`` is the base model (else the first model), ``models`` every model of the config.
    """
    import logging

    log = logging.getLogger(__name__)
    base_tok = _load(folders[base])
    base_vocab = base_tok.get_vocab()
    base_size = vocab_size_of(configs.get(base))
    if base_size is not None and any(i >= base_size for i in base_vocab.values()):
        raise ConfigError(
            f"tokenizer_source: the tokenizer of {base} has tokens past its {base_size} embedding rows; "
            "strip them from the tokenizer first"
        )
    toks: dict[str, Any] = {base: base_tok}
    for ref in models:
        if ref in toks:
            continue
        try:
            toks[ref] = _load(folders[ref])
        except InputModelError as exc:
            log.warning("%s; assuming it is the same as %s's", exc, base)
    if mode == "base":
        out = base_tok
    elif mode == "union":
        out = _union(base_tok, base, models, toks, configs)
    else:
        if mode not in folders:
            raise ConfigError(f"tokenizer_source: {mode!r} is not one of the config's models")
        out = toks.get(mode) or _load(folders[mode])
    existing = set(out.get_vocab())
    for token in add_tokens:
        if token not in existing:
            out.add_tokens(token)
            existing.add(token)
    template = resolve_chat_template(chat_template, [folders[m] for m in models])
    if template is not None:
        out.chat_template = template
    vocab = out.get_vocab()
    size = len(vocab)
    if pad_to_multiple_of and size % pad_to_multiple_of:
        size += pad_to_multiple_of - size % pad_to_multiple_of
    model_vocabs = {
        ref: _usable_vocab(toks.get(ref, base_tok), vocab_size_of(configs.get(ref)))
        for ref in dict.fromkeys([base, *models])
    }
    return BuiltTokenizer(_saved_files(out), vocab, size, model_vocabs)


def _union(base_tok: Any, base: str, models: Sequence[str], toks: Mapping[str, Any], configs: Mapping[str, Any]) -> Any:
    """The base tokenizer plus every other model's missing ordinary tokens, then every model's added tokens."""
    added: dict[str, Any] = {}
    new_tokens: list[str] = []
    seen = set(base_tok.get_vocab())
    for ref in dict.fromkeys([base, *models]):
        tok = toks.get(ref)
        if tok is None:
            continue
        size = vocab_size_of(configs.get(ref))
        decoder = tok.added_tokens_decoder
        added_contents = {info.content for info in decoder.values()}
        for token, idx in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if (size is not None and idx >= size) or token in added_contents:
                continue
            if token not in seen:
                seen.add(token)
                new_tokens.append(token)
        for idx, info in sorted(decoder.items()):
            if (size is None or idx < size) and info.content not in added:
                added[info.content] = info
    with tempfile.TemporaryDirectory() as tmp:  # a copy, so the base's tokenizer object stays as it was
        base_tok.save_pretrained(tmp)
        out = _load(Path(tmp))
    base_vocab = base_tok.get_vocab()
    for token in new_tokens:
        if token not in added and token not in base_vocab:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


def _saved_files(tok: Any) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


def tokenizer_files_with_template(folder: Path, chat_template: str, models: Sequence[Path]) -> dict[str, bytes] | None:
    """The donor's tokenizer, re-saved with ``chat_template`` set (None when ``auto`` finds no template)."""
    template = resolve_chat_template(chat_template, models)
    if template is None:
        return None
    tok = _load(folder)
    tok.chat_template = template
    return _saved_files(tok)
