"""A checkpoint folder's files lie inside it and hold the layers its config declares, checked before loading."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from belle_vl_tools.checkpoint_checks import check_checkpoint_folder, weight_names
from belle_vl_tools.errors import CheckpointError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from belle_vl_tools.testing import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def _copy(tiny: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny, folder)
    return folder


def test_a_plain_checkpoint_passes_and_its_names_are_read_from_the_header(tiny):
    assert check_checkpoint_folder(tiny) is not None
    names = weight_names(tiny)
    assert "transformer.wte.weight" in names and any(n.startswith("transformer.h.0.") for n in names)


def test_weights_linked_outside_the_folder_are_refused_unless_that_folder_is_named(tiny, tmp_path):
    folder = _copy(tiny, tmp_path)
    shared = tmp_path / "shared"
    shared.mkdir()
    (folder / "model.safetensors").rename(shared / "model.safetensors")
    (folder / "model.safetensors").symlink_to(shared / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors is a link to a file outside the checkpoint folder"):
        check_checkpoint_folder(folder)
    assert check_checkpoint_folder(folder, (shared,)) is not None


def test_a_weights_link_to_a_device_is_named_as_such(tiny, tmp_path):
    folder = _copy(tiny, tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(os.devnull)
    with pytest.raises(CheckpointError, match="model.safetensors is not a regular file"):
        check_checkpoint_folder(folder, (Path(os.devnull).parent,))


def test_the_hub_cache_layout_may_link_into_its_blobs(tiny, tmp_path):
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    shutil.copytree(tiny, snapshot)
    (repo / "blobs").mkdir()
    (snapshot / "model.safetensors").rename(repo / "blobs" / "f00d")
    (snapshot / "model.safetensors").symlink_to(Path("../../blobs/f00d"))
    assert check_checkpoint_folder(snapshot) is not None


@pytest.mark.parametrize(
    ("key", "declared", "expected"),
    [
        (
            "num_hidden_layers",
            1024,
            r"num_hidden_layers declares 1024 but its weight files hold 2 \(no weights for layers 2-1023\)",
        ),
        (
            "num_hidden_layers",
            1,
            r"num_hidden_layers declares 1 but its weight files hold 2 \(weights for undeclared layer 1\)",
        ),
        ("visual.layers", 9, r"visual.layers declares 9 but its weight files hold"),
    ],
)
def test_a_config_declaring_other_layers_than_the_file_holds_fails_before_loading(
    tiny, tmp_path, key, declared, expected
):
    folder = _copy(tiny, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 2  # the tiny checkpoint's size, which the messages above name
    if key == "visual.layers":
        config["visual"]["layers"] = declared
    else:
        config[key] = declared
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=expected):
        check_checkpoint_folder(folder)


def test_from_pretrained_refuses_the_outside_link_in_one_line(tiny, tmp_path):
    from belle_vl_tools import BelleVL

    folder = _copy(tiny, tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    (folder / "model.safetensors").rename(outside)
    (folder / "model.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError) as caught:
        BelleVL.from_pretrained(folder)
    assert "\n" not in str(caught.value)
    assert BelleVL.from_pretrained(folder, weights_folders=[tmp_path]) is not None
