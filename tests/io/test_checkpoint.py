import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from mergescale.errors import InputModelError
from mergescale.io.checkpoint import SafetensorsCheckpoint, TorchBinCheckpoint, iter_tensors, open_checkpoint


def test_single_and_sharded_folders_read_lazily(model_factory):
    single = model_factory("llama", n_experts=1)["base"]
    sharded = model_factory("llama", n_experts=1, shard="20KB")["base"]
    a, b = open_checkpoint(single), open_checkpoint(sharded)
    assert isinstance(a, SafetensorsCheckpoint) and isinstance(b, SafetensorsCheckpoint)
    assert len({i.file for i in b.info().values()}) > 1
    assert a.info().keys() == b.info().keys()
    assert a.config["model_type"] == "llama"
    for name, t in iter_tensors(a):
        assert torch.equal(t, b.read(name))
        assert tuple(t.shape) == a.info()[name].shape and t.dtype == a.info()[name].dtype


def test_bin_checkpoint_loads_weights_only(tmp_path):
    state = {"w": torch.randn(3, 2), "b": torch.zeros(2, dtype=torch.bfloat16)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    src = open_checkpoint(tmp_path)
    assert isinstance(src, TorchBinCheckpoint)
    assert torch.equal(src.read("w"), state["w"]) and src.info()["b"].dtype == torch.bfloat16


def test_bin_with_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(InputModelError, match="weights_only=True"):
        open_checkpoint(tmp_path).info()


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(InputModelError, match="does not exist"):
        open_checkpoint(tmp_path / "nope")
    with pytest.raises(InputModelError, match="no model weights found"):
        open_checkpoint(tmp_path)


def test_hub_id_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputModelError, match="Hub download failed"):
        open_checkpoint("no-such-org/no-such-model-xyz")


def test_corrupt_and_truncated_safetensors(tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(InputModelError, match="corrupt/model.safetensors: not a valid safetensors file"):
        open_checkpoint(corrupt).info()

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    save_file({"w": torch.randn(64, 64)}, truncated / "model.safetensors")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputModelError, match="truncated/model.safetensors"):
        src = open_checkpoint(truncated)
        src.info()
        src.read("w")


def test_index_pointing_to_missing_shard(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"w": "model-00001-of-00002.safetensors"}}')
    with pytest.raises(InputModelError, match="does not exist"):
        open_checkpoint(tmp_path).info()


def test_mapped_tensors_equal_read_ones_and_writes_never_reach_the_file(tmp_path):
    tensors = {
        "a": torch.arange(10_000, dtype=torch.float32).view(100, 100),  # offsets not page-aligned below
        "b": torch.randn(3, 5).to(torch.bfloat16),
        "c": torch.arange(7, dtype=torch.int64),
        "empty": torch.empty(0, 4),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    before = (tmp_path / "model.safetensors").read_bytes()
    ckpt = open_checkpoint(tmp_path)
    for name, want in tensors.items():
        got = ckpt.map(name)
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), name
        if got.numel():
            got.view(-1)[0] = 1  # a private copy-on-write page: the file stays as it was
    ckpt.close()
    assert (tmp_path / "model.safetensors").read_bytes() == before
    mapped = open_checkpoint(tmp_path).map("a")
    assert torch.equal(mapped, tensors["a"])  # a map outlives the checkpoint's closed files


def test_pickle_refusal_is_one_line_naming_the_file(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"w": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(InputModelError) as refused:
        open_checkpoint(tmp_path).info()
    message = str(refused.value)
    assert "\n" not in message, message
    assert message.startswith(f"{tmp_path / 'pytorch_model.bin'}: refused by torch.load(weights_only=True)")
    assert "posix.system" in message or "nt.system" in message
    assert not (tmp_path / "pwned").exists()


def test_missing_local_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    for ref in ("./models/base", "models/base", str(tmp_path / "models" / "base"), "nothing-here"):
        with pytest.raises(InputModelError, match=f"^model path {re.escape(ref)} does not exist"):
            open_checkpoint(ref)


# --------------------------------------------------------------------------------------------- forged headers


def _forge(folder, header: dict, data: bytes, name: str = "model.safetensors"):
    """A safetensors file with exactly this header (no checks) and data section."""
    import json
    import struct

    folder.mkdir(parents=True, exist_ok=True)
    raw = json.dumps(header).encode()
    (folder / name).write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return folder


F32_2x2 = {"dtype": "F32", "shape": [2, 2]}  # 16 bytes


@pytest.mark.parametrize(
    ("entries", "data_bytes", "blamed", "why"),
    [
        ({"a": [0, 16], "b": [0, 16]}, 32, "b", "starts at byte 0"),  # b overlaps a, the last 16 bytes unused
        ({"a": [0, 16], "b": [8, 24]}, 24, "b", "starts at byte 8"),  # partial overlap
        ({"a": [0, 16], "b": [-16, 0]}, 16, "b", "non-negative"),  # would read the header's JSON as weights
        ({"a": [0, 16], "b": [-(2**62), -(2**62) + 16]}, 16, "b", "non-negative"),  # was a raw OverflowError
        ({"a": [0, 16], "b": [32, 48]}, 48, "b", "starts at byte 32"),  # a gap
        ({"a": [16, 32], "b": [32, 48]}, 48, "a", "the first must start at 0"),
        ({"a": [0, 16], "b": [16, 32]}, 40, None, "cover 32 bytes of a 40-byte data section"),  # trailing bytes
        ({"a": [0, 16], "b": [16.0, 32.0]}, 32, "b", "non-negative integers"),
        ({"a": [0, 16], "b": [16, 32, 48]}, 32, "b", "two non-negative integers"),
    ],
)
def test_forged_offsets_are_refused_naming_file_and_tensor(tmp_path, entries, data_bytes, blamed, why):
    from mergescale.evaluate.loading import folder_hash

    header = {name: {**F32_2x2, "data_offsets": offsets} for name, offsets in entries.items()}
    folder = _forge(tmp_path / "forged", header, bytes(range(data_bytes)))
    (folder / "config.json").write_text("{}")
    for check in (lambda: open_checkpoint(folder).info(), lambda: folder_hash(folder)):
        with pytest.raises(InputModelError) as refused:
            check()
        message = str(refused.value)
        assert "\n" not in message and message.startswith(str(folder / "model.safetensors")), message
        assert why in message, message
        if blamed is not None:
            assert f"tensor {blamed!r}" in message, message


def test_header_checks_agree_with_the_safetensors_library(tmp_path):
    """Whatever the safetensors library refuses, we refuse; what it accepts (offsets in any key order), we read
    the same."""
    from safetensors import SafetensorError, safe_open

    cases = {
        "reversed_keys": ({"b": [16, 32], "a": [0, 16]}, 32),
        "overlap": ({"a": [0, 16], "b": [0, 16]}, 32),
        "gap": ({"a": [0, 16], "b": [20, 36]}, 36),
        "trailing": ({"a": [0, 16], "b": [16, 32]}, 33),
        "short": ({"a": [0, 16], "b": [16, 32]}, 31),
        "wrong_size": ({"a": [0, 12], "b": [12, 28]}, 28),
    }
    for label, (entries, n) in cases.items():
        header = {name: {**F32_2x2, "data_offsets": offsets} for name, offsets in entries.items()}
        folder = _forge(tmp_path / label, header, bytes(range(n)))
        try:
            with safe_open(folder / "model.safetensors", framework="pt") as f:
                theirs = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except SafetensorError:
            theirs = None
        if theirs is None:
            with pytest.raises(InputModelError):
                open_checkpoint(folder).info()
        else:
            ours = dict(iter_tensors(open_checkpoint(folder)))
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), label


@pytest.mark.parametrize(
    "shard", ["../other/model.safetensors", "{other}/model.safetensors", "sub/../../other/model.safetensors"]
)
def test_index_whose_shard_leaves_the_model_folder_is_refused(tmp_path, shard):
    other = tmp_path / "other"
    other.mkdir()
    save_file({"w": torch.ones(2)}, other / "model.safetensors")  # a readable file outside the model folder
    model = tmp_path / "model"
    model.mkdir()
    shard = shard.format(other=other)
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(InputModelError, match=r"tensor 'w': shard path .* leaves the model folder; refused"):
        open_checkpoint(model).info()


@pytest.mark.parametrize("populate", [True, False])
def test_populated_maps_equal_read_tensors(tmp_path, populate):
    from mergescale.io.checkpoint import populate_map

    tensors = {"a": torch.randn(300, 100), "b": torch.randn(7).to(torch.bfloat16), "empty": torch.empty(0)}
    save_file(tensors, tmp_path / "model.safetensors")
    before = (tmp_path / "model.safetensors").read_bytes()
    ckpt = open_checkpoint(tmp_path)
    for name, want in tensors.items():
        got = ckpt.map(name, populate=populate)
        populate_map(got)  # again, or for the first time: it only fills page tables
        assert torch.equal(got, want) and torch.equal(got, ckpt.read(name)), name
    ckpt.close()
    assert (tmp_path / "model.safetensors").read_bytes() == before
