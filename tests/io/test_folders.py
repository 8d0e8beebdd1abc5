"""The files beside a model's weights (mergescale.io.folders): finding the folder that holds them, copying them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergescale.errors import InputModelError
from mergescale.io.folders import (
    CONFIG_JSON,
    TOKENIZER_FILES,
    copy_model_files,
    find_folder,
    find_tokenizer_folder,
    read_model_config,
)


def _folder(root: Path, name: str, *files: str) -> Path:
    folder = root / name
    folder.mkdir()
    for f in files:
        (folder / f).write_text(f"{name}/{f}")
    return folder


def test_the_first_folder_holding_a_file_wins(tmp_path: Path) -> None:
    weights = _folder(tmp_path, "weights", "model.safetensors")
    step = _folder(tmp_path, "step", CONFIG_JSON)
    run = _folder(tmp_path, "run", CONFIG_JSON, "tokenizer.json")
    assert find_folder([None, weights, step, run], (CONFIG_JSON, *TOKENIZER_FILES)) == step
    assert find_folder([weights, step, run], TOKENIZER_FILES) == run
    assert find_folder([weights], TOKENIZER_FILES) is None
    assert find_tokenizer_folder([weights, None, run], "the held-out loss") == run
    with pytest.raises(InputModelError, match=f"no tokenizer files in {weights}, {step}; the held-out loss needs"):
        find_tokenizer_folder([weights, step], "the held-out loss")


def test_copy_replaces_or_keeps_what_the_target_has(tmp_path: Path) -> None:
    src = _folder(tmp_path, "src", "tokenizer.json", "generation_config.json", "model.safetensors")
    dst = _folder(tmp_path, "dst", "tokenizer.json")
    assert copy_model_files(src, dst, keep_existing=True) == ["generation_config.json"]
    assert (dst / "tokenizer.json").read_text() == "dst/tokenizer.json"
    assert copy_model_files(src, dst) == ["tokenizer.json", "generation_config.json"]
    assert (dst / "tokenizer.json").read_text() == "src/tokenizer.json"
    assert not (dst / "model.safetensors").exists()


def test_read_model_config_names_the_folder_and_the_need(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "m")
    with pytest.raises(InputModelError, match=f"{folder}: no config.json; evaluating it needs one"):
        read_model_config(folder, "evaluating it")
    (folder / CONFIG_JSON).write_text("{not json")
    with pytest.raises(InputModelError, match="cannot read config.json"):
        read_model_config(folder, "evaluating it")
    (folder / CONFIG_JSON).write_text(json.dumps({"model_type": "llama"}))
    assert read_model_config(folder, "evaluating it") == {"model_type": "llama"}
