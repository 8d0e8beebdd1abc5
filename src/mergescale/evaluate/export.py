"""Export our tasks as lm-evaluation-harness task YAMLs over the same local JSONL files.

Each task becomes ``OUT_DIR/<name>.yaml`` (``dataset_path: json`` with absolute ``data_files``), so
``lm_eval --include_path OUT_DIR --tasks <name>`` (or ``mergescale eval --backend lm-eval``) runs it unchanged:

* multiple choice: ``output_type: multiple_choice``, ``doc_to_text: context``, ``doc_to_choice: choices``,
  ``doc_to_target: gold``, same ``target_delimiter`` / ``fewshot_delimiter`` / ``num_fewshot``, few-shot
  examples from ``train`` with the harness's default sampler — prompts, log-likelihoods, ``acc`` and
  ``acc_norm`` match ``mergescale eval``;
* generation: ``output_type: generate_until`` with ``until`` = the task's stop sequences and
  ``max_gen_toks`` = ``max_new_tokens``; scored by ``mergescale_metrics.process_results`` (written next to the
  YAMLs with a copy of this package's ``exact_match`` / ``f1`` / ``rouge_l``: it needs nothing but Python);
* perplexity: ``output_type: loglikelihood_rolling`` over ``text`` with the harness's own metrics
  (``word_perplexity``, ``byte_perplexity``, ``bits_per_byte``); the harness has no token-weighted loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mergescale.errors import OutputError
from mergescale.evaluate.tasks import LOWER_IS_BETTER, Task

_METRICS_MODULE = "mergescale_metrics"
_PROCESS_RESULTS = '''

# -- written by `mergescale tasks export-lm-eval`: the harness calls this for every generation example ---------


def process_results(doc, results):
    output = results[0]
    references = doc["references"]
    return {
        "exact_match": exact_match(output, references),
        "f1": f1(output, references),
        "rouge_l": rouge_l(output, references),
    }
'''


def metrics_module_source() -> str:
    """The harness's metric file for generation tasks: our metrics module (pure, standard library only) with a
    ``process_results`` hook — a copy of the one definition, so the exported tasks run where mergescale is not
    installed and score exactly as ``mergescale eval`` does."""
    import inspect

    from mergescale.evaluate import metrics

    return inspect.getsource(metrics) + _PROCESS_RESULTS


class _Dumper(yaml.SafeDumper):
    """A YAML dumper that writes ``!function module.name`` tags for harness callbacks."""


class _Function(str):
    pass


_Dumper.add_representer(_Function, lambda dumper, value: dumper.represent_scalar("!function", str(value)))


def lm_eval_task_config(task: Task, *, name: str | None = None) -> dict[str, Any]:
    """The harness task config (as a dict) for one of our tasks."""
    assert task.metrics is not None
    files = {
        split: str(path.resolve())
        for split in ("train", "validation", "test")
        if (path := task.data_path(split)) is not None
    }
    config: dict[str, Any] = {
        "task": name or task.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": files},
        "test_split": "test",
    }
    if "train" in files:
        config["training_split"] = "train"
        config["fewshot_split"] = "train"
    if "validation" in files:
        config["validation_split"] = "validation"
    config |= {"target_delimiter": task.target_delimiter, "fewshot_delimiter": task.fewshot_delimiter}
    config["num_fewshot"] = task.num_fewshot
    if task.kind == "multiple_choice":
        config |= {
            "output_type": "multiple_choice",
            "doc_to_text": "context",
            "doc_to_choice": "choices",
            "doc_to_target": "gold",
        }
        metrics = task.metrics
    elif task.kind == "generation":
        config |= {
            "output_type": "generate_until",
            "doc_to_text": "prompt",
            "doc_to_target": "{{references[0]}}",
            "generation_kwargs": {
                "until": list(task.generation.stop),
                "max_gen_toks": task.generation.max_new_tokens,
                "do_sample": False,
            },
            "process_results": _Function(f"{_METRICS_MODULE}.process_results"),
        }
        metrics = task.metrics
    else:
        config |= {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "text"}
        metrics = ["word_perplexity", "byte_perplexity", "bits_per_byte"]
    config["metric_list"] = [
        {"metric": m, "aggregation": "mean", "higher_is_better": m not in LOWER_IS_BETTER}
        if task.kind != "perplexity"
        else {"metric": m}
        for m in metrics
    ]
    config["metadata"] = {
        "version": 1.0,
        "source": "mergescale",
        "category": task.category,
        "fingerprint": task.fingerprint(),
    }
    return config


def export_lm_eval(tasks: list[Task], out_dir: str | Path, *, prefix: str = "") -> list[Path]:
    """Write one harness YAML per task (named ``prefix + task.name``) into ``out_dir``; return their paths."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        if any(t.kind == "generation" for t in tasks):
            (out / f"{_METRICS_MODULE}.py").write_text(metrics_module_source(), encoding="utf-8")
        for task in tasks:
            name = prefix + task.name
            path = out / f"{name}.yaml"
            text = yaml.dump(
                lm_eval_task_config(task, name=name), Dumper=_Dumper, sort_keys=False, allow_unicode=True
            )
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
            written.append(path)
    except OSError as exc:
        raise OutputError(f"{out}: cannot write the harness task files: {exc}") from None
    return written
