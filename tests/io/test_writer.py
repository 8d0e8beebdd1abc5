import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mergescale.errors import ConfigError, OutputError
from mergescale.io.atomic import AtomicFolder, check_output_folder
from mergescale.io.writer import (
    MemorySink,
    ModelFolderSink,
    ShardedSafetensorsWriter,
    parse_size,
    plan_shards,
)


def test_parse_size_units():
    assert parse_size("5GB") == 5_000_000_000
    assert parse_size("500MB") == 500_000_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("10kb") == 10_000
    assert parse_size(123) == 123
    for bad in ("lots", "-1GB", "0", 0):
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_plan_shards_consecutive_and_bounded():
    assert plan_shards([4, 4, 4, 4], 8) == [[0, 1], [2, 3]]
    assert plan_shards([10, 1, 1], 8) == [[0], [1, 2]]  # an oversized tensor gets a shard of its own
    assert plan_shards([], 8) == [[]]


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(8, 4, generator=g).to(torch.bfloat16),
        "b.bias": torch.randn(4, generator=g),
        "c.scalar": torch.tensor(3.0, dtype=torch.float16),
        "d.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }


def test_sharded_writer_roundtrip_in_any_order(tmp_path):
    tensors = _tensors()
    layout = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    w = ShardedSafetensorsWriter(tmp_path, layout, max_shard_size=40, metadata={"format": "pt"})
    for name in reversed(list(tensors)):  # arrival order does not matter
        w.write(name, tensors[name])
    w.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) > 1 and all(f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    loaded = {}
    for f in files:
        loaded.update(load_file(tmp_path / f))
        with safe_open(tmp_path / f, "pt") as h:
            assert h.metadata() == {"format": "pt"}
    assert loaded.keys() == tensors.keys()
    for n, t in tensors.items():
        assert loaded[n].dtype == t.dtype and torch.equal(loaded[n], t)


def test_sharded_writer_rejects_missing_and_wrong_size(tmp_path):
    tensors = _tensors()
    layout = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    w = ShardedSafetensorsWriter(tmp_path, layout, max_shard_size=10**9, metadata={})
    with pytest.raises(OutputError, match="bytes"):
        w.write("a.weight", torch.zeros(3))
    w.write("a.weight", tensors["a.weight"])
    with pytest.raises(OutputError, match="never written"):
        w.close()


def test_model_folder_sink_writes_index_config_and_tokenizer(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    (src / "generation_config.json").write_text("{}")
    tensors = _tensors()
    sink = ModelFolderSink(
        tmp_path / "out",
        config={"model_type": "llama", "torch_dtype": "float32"},
        copy_from=src,
        extra_files={"note.txt": "hi"},
        max_shard_size=40,
    )
    sink.begin([(n, tuple(t.shape), t.dtype) for n, t in tensors.items()])
    for n, t in tensors.items():
        sink.write(n, t)
    sink.commit()
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert (out / "note.txt").read_text() == "hi"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_sink_abort_leaves_nothing(tmp_path):
    sink = ModelFolderSink(tmp_path / "out")
    sink.begin([("x", (2,), torch.float32)])
    sink.write("x", torch.ones(2))
    sink.abort()
    assert list(tmp_path.iterdir()) == []


def test_atomic_folder_refuses_non_empty_and_overwrites(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("x")
    with pytest.raises(OutputError, match="not empty"):
        AtomicFolder(target)
    folder = AtomicFolder(target, overwrite=True)
    tmp = folder.create()
    (tmp / "new").write_text("y")
    folder.commit()
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    stale = tmp_path / ".out.tmp-999999999-deadbeef"
    stale.mkdir()
    folder = AtomicFolder(tmp_path / "out")
    folder.create()
    assert not stale.exists()
    folder.abort()
    assert list(tmp_path.iterdir()) == []


def test_memory_sink_keeps_tensors():
    sink = MemorySink()
    sink.begin([("x", (2,), torch.float32)])
    sink.write("x", torch.ones(2))
    sink.commit()
    assert torch.equal(sink.state_dict["x"], torch.ones(2))


def test_output_path_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        ModelFolderSink(f)
    assert os.path.isfile(f)


def test_output_folder_checks_the_folder_its_temporary_goes_in(tmp_path, monkeypatch):
    """The output is made as a hidden sibling: an existing, writable output folder in a folder that takes no new
    entries is refused up front, naming that folder (not after the merge)."""
    from pathlib import Path

    parent = tmp_path / "locked"
    (parent / "out").mkdir(parents=True)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: real_access(p, mode) and Path(p) != parent)
    with pytest.raises(OutputError, match=f"output folder {parent / 'out'}: cannot write there .*in {parent}"):
        check_output_folder(parent / "out", overwrite=True)
    with pytest.raises(OutputError, match="cannot create it .* is a file"):
        (tmp_path / "file").write_text("x")
        check_output_folder(tmp_path / "file" / "out", overwrite=False)
