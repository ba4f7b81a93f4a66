"""Checkpoint sanity checks: absurd configs are refused before anything is built, damaged weights on request."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from belle_vl_tools.checkpoint_checks import (
    LIMITS,
    MAX_PARAMETERS,
    check_checkpoint_folder,
    check_config,
    check_finite_weights,
    estimate_parameters,
)
from belle_vl_tools.configuration_qwen_vl import QWenConfig
from belle_vl_tools.errors import CheckpointError
from belle_vl_tools.testing import BELLE_VL_CONFIG as BELLE_VL

DEMO = Path(__file__).resolve().parents[1] / "belle_vl_tools" / "demo" / "model"

QWEN_VL_CHAT = {
    **BELLE_VL,
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "intermediate_size": 22016,
    "vocab_size": 151936,
    "visual": {**BELLE_VL["visual"], "output_dim": 4096},
}


def test_published_and_test_configs_pass():
    for config in (BELLE_VL, QWEN_VL_CHAT, json.loads((DEMO / "config.json").read_text())):
        check_config(config)
        check_config(QWenConfig(**config))
    assert 9.5e9 < estimate_parameters(QWEN_VL_CHAT) < 9.8e9  # Qwen-VL-Chat has 9.6 billion parameters
    assert 15e9 < estimate_parameters(BELLE_VL) < 17e9
    QWenConfig()  # the defaults (Qwen-VL-Chat's text sizes)
    assert check_checkpoint_folder(DEMO)["hidden_size"] == 256


def test_published_config_dicts_pass_check_config():
    from belle_vl_tools.testing import published_config

    check_config(published_config())
    check_config(published_config(visual=False))


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("num_hidden_layers", 1_000_000, "num_hidden_layers=1,000,000"),
        ("num_hidden_layers", 0, "num_hidden_layers=0"),
        ("hidden_size", 10**7, "hidden_size="),
        ("num_attention_heads", 100_000, "num_attention_heads="),
        ("kv_channels", 1 << 16, "kv_channels="),
        ("kv_channels", 3, "rotary dimension"),
        ("intermediate_size", 1 << 30, "intermediate_size="),
        ("intermediate_size", 11001, "intermediate_size=11,001"),
        ("vocab_size", 10**9, "vocab_size="),
        ("seq_length", 10**12, "seq_length="),
        ("max_position_embeddings", -1, "max_position_embeddings=-1"),
        ("num_hidden_layers", 1e6, "num_hidden_layers=1000000.0"),
        ("hidden_size", "5120", "hidden_size='5120'"),
        ("num_hidden_layers", True, "num_hidden_layers=True"),
        ("visual.image_size", 1_000_000, "visual.image_size=1,000,000"),
        ("visual.image_size", 4000, "grid of 285 patches"),
        ("visual.patch_size", 999, "visual.patch_size=999"),
        ("visual.width", 1 << 20, "visual.width="),
        ("visual.width", 1665, "multiple of the number of heads"),
        ("visual.layers", 10_000, "visual.layers="),
        ("visual.heads", 0, "visual.heads=0"),
        ("visual.n_queries", 1 << 20, "visual.n_queries="),
        ("visual.n_queries", 250, "perfect square"),
        ("visual.output_dim", 4096, "visual.output_dim=4096"),
        ("visual.mlp_ratio", 1e9, "visual.mlp_ratio"),
        ("visual.image_start_id", 152063, "inside the vocabulary"),
        ("visual", [1, 2], "visual=[1, 2]"),
    ],
)
def test_absurd_values_raise_checkpoint_error_naming_the_key(key, value, named):
    config = json.loads(json.dumps(BELLE_VL))
    if key.startswith("visual."):
        config["visual"][key.split(".", 1)[1]] = value
    else:
        config[key] = value
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=named.replace("(", r"\(").replace("[", r"\[")):
        check_config(config)
    with pytest.raises(CheckpointError):
        QWenConfig(**config)
    # Milliseconds normally; the (generous, shared-machine) bound catches work that grows with the absurd value.
    assert time.monotonic() - start < 10


def test_every_size_is_bounded():
    for key, (low, high) in LIMITS.items():
        for bad in (low - 1, high + 1):
            config = {**BELLE_VL, key: bad}
            with pytest.raises(CheckpointError, match=key):
                check_config(config)


def test_huge_combinations_are_refused_by_the_parameter_count():
    config = {**BELLE_VL, "num_hidden_layers": 1024, "hidden_size": 65536, "intermediate_size": 1 << 20}
    config["visual"] = {**BELLE_VL["visual"], "output_dim": 65536}
    assert estimate_parameters(config) > MAX_PARAMETERS
    with pytest.raises(CheckpointError, match="parameters"):
        check_config(config)


@pytest.fixture()
def nothing_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building a decoder layer or the vision tower fails the test: a refusal must come before any allocation."""
    from belle_vl_tools import modeling_qwen_vl

    def built(*args, **kwargs):
        raise AssertionError("the model was being built before the config was refused")

    monkeypatch.setattr(modeling_qwen_vl.QWenBlock, "__init__", built)
    monkeypatch.setattr(modeling_qwen_vl.VisionTransformer, "__init__", built)


@pytest.fixture()
def demo_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(DEMO, folder)
    return folder


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if key.startswith("visual__"):
            config["visual"][key.split("__", 1)[1]] = value
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"num_hidden_layers": 1_000_000}, "num_hidden_layers"),
        ({"visual__image_size": 1_000_000}, "visual.image_size"),
        ({"vocab_size": 900}, "vocab_size=900"),  # the demo tokenizer produces more ids than that
    ],
)
def test_loading_an_absurd_checkpoint_fails_fast(demo_copy, nothing_built, changes, named):
    from belle_vl_tools import BelleVL

    _edit_config(demo_copy, **changes)
    with pytest.raises(CheckpointError, match=named):
        BelleVL.from_pretrained(demo_copy)


def test_the_model_class_checks_the_config_too(demo_copy, nothing_built):
    from belle_vl_tools.modeling_qwen_vl import QWenLMHeadModel

    _edit_config(demo_copy, num_hidden_layers=1_000_000)
    with pytest.raises(CheckpointError, match="num_hidden_layers=1,000,000"):
        QWenLMHeadModel.from_pretrained(demo_copy)


def test_unreadable_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        check_checkpoint_folder(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="object"):
        check_checkpoint_folder(tmp_path)
    assert check_checkpoint_folder(tmp_path / "absent") is None  # a Hub id: the config class checks later


def test_check_weights_refuses_non_finite_weights(demo_copy):
    import torch
    from safetensors.torch import load_file, save_file

    from belle_vl_tools import BelleVL

    weights = load_file(demo_copy / "model.safetensors")
    name = next(k for k in sorted(weights) if k.endswith("mlp.c_proj.weight"))
    weights[name][0, 0] = float("nan")
    save_file(weights, demo_copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        BelleVL.from_pretrained(demo_copy, check_weights=True)
    loaded = BelleVL.from_pretrained(demo_copy)  # opt-in: without the flag the damaged weights load
    assert torch.isnan(dict(loaded.model.named_parameters())[name]).any()
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        check_finite_weights(loaded.model)
    ok = BelleVL.from_pretrained(DEMO, check_weights=True)
    check_finite_weights(ok.model)


def test_module_imports_without_torch():
    code = "import sys, belle_vl_tools.checkpoint_checks; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
