"""Clear errors for checkpoints that cannot be loaded: a value that is not a tensor, an empty file."""

import pytest
import torch

import pvt
from pvt.cli import main


@pytest.fixture(scope="module")
def model():
    return pvt.create_model("pvt_v2_b0", num_classes=10)


def test_a_value_that_is_not_a_tensor_is_named(model, tmp_path):
    state_dict = dict(model.state_dict(), **{"head.weight": 3})
    with pytest.raises(TypeError, match="state dict entry 'head.weight' is int, not a tensor"):
        pvt.load_state_dict(model, {"model": state_dict})
    path = tmp_path / "bad.pt"
    torch.save(state_dict, path)
    with pytest.raises(TypeError, match=f"{path}: state dict entry 'head.weight'"):
        pvt.load_checkpoint(model, path)


def test_an_empty_checkpoint_file_is_named(model, tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    message = f"checkpoint file '{path}' is empty \\(0 bytes\\)"
    with pytest.raises(ValueError, match=message):
        pvt.load_checkpoint(model, path)
    with pytest.raises(ValueError, match=message):
        main(["train", "pvt_v2_b0", "--resume", str(path), "--no-progress"])
