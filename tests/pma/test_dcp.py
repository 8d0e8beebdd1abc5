"""Reading torch.distributed.checkpoint folders one tensor at a time, safely."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp

from mergescale.errors import InputModelError
from mergescale.io.checkpoint import open_checkpoint
from mergescale.io.dcp import DCPCheckpoint


def test_trainer_style_model_group_is_stripped_and_optimizer_ignored(tmp_path):
    from pma_helpers import tiny_llama

    model = tiny_llama(3)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["model.norm.weight"] = sd["model.norm.weight"].bfloat16()  # mixed dtypes survive
    opt = torch.optim.AdamW(model.parameters())
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    opt.step()
    dcp.save({"model": sd, "optim": opt.state_dict(), "step": 7}, checkpoint_id=str(tmp_path), no_dist=True)
    src = open_checkpoint(tmp_path)
    assert isinstance(src, DCPCheckpoint)
    info = src.info()
    assert set(info) == set(sd)  # HF names, no optimizer state, no "model." group prefix
    assert info["model.norm.weight"].dtype == torch.bfloat16
    for name, t in sd.items():
        got = src.read(name)
        assert got.dtype == t.dtype and torch.equal(got, t)
    assert DCPCheckpoint(tmp_path, strip_prefix="").info().keys() == {f"model.{k}" for k in sd}


def test_flat_torchtitan_layout_keeps_names(tmp_path):
    state = {"tok_embeddings.weight": torch.randn(8, 4), "layers.0.attention.wq.weight": torch.randn(4, 4),
             "optimizer": {"state": {"tok_embeddings.weight": {"exp_avg": torch.zeros(8, 4)}}},
             "lr_scheduler": {"last_epoch": 3}, "train_state": {"step": 10}}  # fmt: skip
    dcp.save(state, checkpoint_id=str(tmp_path), no_dist=True)
    src = DCPCheckpoint(tmp_path)
    assert set(src.info()) == {"tok_embeddings.weight", "layers.0.attention.wq.weight"}
    assert torch.equal(src.read("tok_embeddings.weight"), state["tok_embeddings.weight"])


def test_metadata_pickle_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(
        InputModelError,
        match=r"\.metadata: not a readable torch.distributed.checkpoint metadata file .*system is not allowed",
    ):
        DCPCheckpoint(tmp_path)
    assert not marker.exists()


def test_truncated_shard_is_a_clear_error(tmp_path):
    dcp.save({"model": {"w": torch.randn(64, 64)}}, checkpoint_id=str(tmp_path), no_dist=True)
    shard = next(tmp_path.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    src = DCPCheckpoint(tmp_path)
    with pytest.raises(InputModelError, match=r"distcp: cannot read tensor 'w'"):
        src.read("w")
