"""Weight files: the one atomic writer, the encoder prefix, weights from any source."""

import errno

import pytest
import timm
import torch

from sparkmim.checkpoint import weights_state
from sparkmim.weights import (
    ENCODER_PREFIX,
    WriteError,
    atomic_write,
    encoder_weights,
    load_encoder_weights,
    save_encoder_weights,
)


def test_a_failed_write_leaves_the_old_file_and_no_partial_one(tmp_path):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"the old weights")

    def fill_the_disk(tmp):
        tmp.write_bytes(b"half of the new")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError, match=rf"could not write {target} \(about 2.0 MiB needed, .* MiB free\): "
                                         r".*No space left on device"):
        atomic_write(target, fill_the_disk, expected_bytes=2 * 2**20)
    assert target.read_bytes() == b"the old weights" and sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]
    atomic_write(target, lambda tmp: tmp.write_bytes(b"new"))
    assert target.read_bytes() == b"new" and not list(tmp_path.glob("*.tmp"))


def test_weights_come_from_a_run_folder_a_checkpoint_or_an_export_with_the_original_keys(tmp_path):
    backbone = timm.create_model("resnet10t", num_classes=0)
    state = backbone.state_dict()
    checkpoint = {"model": {ENCODER_PREFIX + k: v for k, v in state.items()} | {"decoder.head.weight": torch.ones(1)},
                  "step": 3}
    assert encoder_weights(checkpoint["model"]).keys() == state.keys()
    run = tmp_path / "run"
    run.mkdir()
    torch.save(checkpoint, run / "checkpoint-00000003.pth")
    exported = save_encoder_weights(backbone, tmp_path / "enc.safetensors")
    for source in (run, run / "checkpoint-00000003.pth", exported):
        got = weights_state(source)
        assert got.keys() == state.keys() and all(torch.equal(got[k], v) for k, v in state.items())
        load_encoder_weights(timm.create_model("resnet10t", num_classes=0), got, strict=True)
    with pytest.raises(FileNotFoundError, match="not found"):
        weights_state(tmp_path / "nothing.safetensors")
