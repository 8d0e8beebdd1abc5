"""pma.json: one model (PMARecord) for offline and online averages, read back by read_record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergescale.errors import ConfigError
from mergescale.pma import PMAAverager
from mergescale.pma.record import PMA_JSON, AveragedCheckpoint, PMARecord, read_record

OFFLINE = PMARecord(
    mergescale_version="0.1.0", label="sma-N2", strategy="sma", window=2,
    checkpoints=[AveragedCheckpoint(name=f"checkpoint-{s}", path=f"/r/checkpoint-{s}", step=s, tokens=None, weight=0.5)
                 for s in (100, 200)],
)  # fmt: skip


def _write(folder: Path, data: dict) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / PMA_JSON).write_text(json.dumps(data))
    return folder


def test_offline_writes_its_fields_only_and_round_trips(tmp_path: Path) -> None:
    data = json.loads(OFFLINE.to_json())
    assert list(data)[:4] == ["mergescale_version", "mode", "label", "strategy"] and data["mode"] == "offline"
    assert "updates" not in data and "every" not in data
    assert read_record(_write(tmp_path / "a", data)) == OFFLINE
    del data["mode"]  # written before the field existed: an offline record
    assert read_record(_write(tmp_path / "b", data)) == OFFLINE


def test_online_average_folder_reads_as_a_record(tmp_path: Path) -> None:
    averager = PMAAverager("ema", alpha=0.3)
    for step in (10, 20, 30):
        averager.update({"w": torch.full((2,), float(step))}, step=step)
    averager.save_pretrained(tmp_path / "avg", config={"model_type": "llama"}, record={"every": 10})
    rec = read_record(tmp_path / "avg")
    assert (rec.mode, rec.strategy, rec.alpha, rec.updates) == ("online", "ema", 0.3, 3)
    assert (rec.first_step, rec.last_step, rec.every, rec.start_step) == (10, 30, 10, None)
    assert "checkpoints" not in json.loads((tmp_path / "avg" / PMA_JSON).read_text())
    with pytest.raises(ConfigError, match="has no field 'note'"):
        averager.save_pretrained(tmp_path / "bad", config={"model_type": "llama"}, record={"note": "x"})
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"updates": 3}, "an offline record has no updates"),
        ({"checkpoints": []}, "needs label, window and checkpoints"),
        ({"mode": "online"}, "an online record has no"),
        ({"mode": "later"}, "mode"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_a_record_of_the_wrong_shape_is_refused_naming_the_file(tmp_path: Path, change: dict, why: str) -> None:
    folder = _write(tmp_path, {**json.loads(OFFLINE.to_json()), **change})
    with pytest.raises(ConfigError, match=rf"{PMA_JSON}: not a valid pma.json \(.*{why}"):
        read_record(folder)
