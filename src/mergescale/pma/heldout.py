"""Loss of a model on held-out text, to compare a recovery average with a rollback checkpoint.

The loss is computed by :func:`mergescale.evaluate.evaluate` on a perplexity task built from the documents:
the mean next-token negative log-likelihood over every token of every document (long documents scored in
rolling windows of the model's context, as lm-evaluation-harness does), i.e. log-perplexity. This module only
reads the documents and builds a model for checkpoints that are not Hugging Face folders (DCP).
"""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mergescale.errors import InputModelError, NonFiniteScoreWarning, TaskError
from mergescale.io.checkpoint import open_checkpoint
from mergescale.io.sources import is_dcp


def load_texts(path: str | Path) -> list[str]:
    """Documents of an evaluation file: JSON Lines with a ``text`` field (or a JSON string per line), or plain
    text with one document per non-empty line."""
    path = Path(path).expanduser()
    try:
        raw = path.read_text()
    except OSError as exc:
        raise TaskError(f"eval data {path}: cannot read ({exc})") from None
    texts: list[str] = []
    for line_no, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix in (".jsonl", ".json"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskError(f"eval data {path}: line {line_no}: not valid JSON ({exc})") from None
            text = row.get("text") if isinstance(row, dict) else row
            if not isinstance(text, str):
                raise TaskError(f"eval data {path}: line {line_no}: expected a 'text' string")
            texts.append(text)
        else:
            texts.append(line)
    if not texts:
        raise TaskError(f"eval data {path}: no documents")
    return texts


def load_causal_lm(
    folder: str | Path, config: dict[str, Any] | None = None, *, trust_remote_code: bool = False
) -> torch.nn.Module:
    """A causal LM in float32 for evaluation, from a Hugging Face folder or any checkpoint mergescale reads
    (a DCP folder needs a ``config.json`` beside it, or ``config``). A model naming code of its own
    (``auto_map``) is refused unless ``trust_remote_code``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mergescale.evaluate.loading import check_remote_code

    folder = Path(folder)
    check_remote_code(folder, trust_remote_code=trust_remote_code)
    if config is None and (folder / "config.json").is_file() and not is_dcp(folder):
        return AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, trust_remote_code=trust_remote_code
        ).eval()
    source = open_checkpoint(folder)
    try:
        cfg_dict = dict(config or source.config or {})
        if "model_type" not in cfg_dict:
            raise InputModelError(
                f"{folder}: no config.json with a model_type; cannot build a model to evaluate"
            )
        if cfg_dict.get("auto_map") and not trust_remote_code:
            raise InputModelError(
                f"{folder}: its config's auto_map names code shipped with the model; mergescale never runs a "
                "model's own code unless you pass --trust-remote-code (trust_remote_code=True)"
            )
        model = AutoModelForCausalLM.from_config(
            AutoConfig.for_model(**cfg_dict), trust_remote_code=trust_remote_code
        ).float()
        from mergescale.pma.curves import load_weights_into

        try:
            load_weights_into(model, {n: source.read(n) for n in source.info()})
        except InputModelError as exc:
            raise InputModelError(f"{folder}: {exc}") from None
    finally:
        source.close()
    return model.eval()


def folder_loss(
    folder: str | Path,
    texts: Sequence[str],
    *,
    tokenizer_folder: Path,
    config: dict[str, Any] | None = None,
    batch_size: int = 8,
    trust_remote_code: bool = False,
) -> float:
    """Mean next-token NLL (nats per token) over ``texts`` of the model in ``folder``, with the tokenizer of
    ``tokenizer_folder``, by :func:`mergescale.evaluate.evaluate`; ``inf`` when it is not finite."""
    from transformers import AutoTokenizer

    from mergescale.evaluate import evaluate
    from mergescale.evaluate.loading import check_remote_code
    from mergescale.evaluate.tasks import Task, TaskData

    check_remote_code(Path(tokenizer_folder), trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder), trust_remote_code=trust_remote_code)
    model = load_causal_lm(folder, config, trust_remote_code=trust_remote_code)
    with tempfile.TemporaryDirectory(prefix="mergescale-heldout-") as tmp:
        data = Path(tmp) / "heldout.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        task = Task(name="heldout", kind="perplexity", data=TaskData(test=str(data)), metrics=["loss", "ppl"])
        with warnings.catch_warnings():  # a diverged model's loss is reported as inf, the recovery's answer
            warnings.simplefilter("ignore", NonFiniteScoreWarning)
            results = evaluate(
                model,
                [task],
                tokenizer=tokenizer,
                batch_size=batch_size,
                progress=False,
                on_nonfinite="undefined",
            )
    loss = results.score("heldout")
    return loss if math.isfinite(loss) else math.inf
