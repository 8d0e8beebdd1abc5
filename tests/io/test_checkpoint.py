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
