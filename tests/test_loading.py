"""Loading checkpoints of the published layout: weight formats, Auto classes, remote code never run, text-only,
save/load round trip, quantization, default dtype."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import belle_vl_tools  # noqa: F401  (registers the Auto classes)
from belle_vl_tools import BelleVL, CheckpointError, QWenConfig, QWenLMHeadModel, QWenTokenizer
from belle_vl_tools.testing import write_tiny_checkpoint

REFERENCE_FILES = ("configuration_qwen.py", "modeling_qwen.py", "tokenization_qwen.py", "visual.py",
                   "qwen_generation_utils.py")  # fmt: skip


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    return {name: write_tiny_checkpoint(root / name, seed=3, layout=name) for name in ("safetensors", "sharded", "bin")}


def logits_of(model, processor, image) -> torch.Tensor:
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi"}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        return model(**inputs).logits


def test_all_layouts_load_to_the_same_logits(layouts, pictures):
    files = {name: sorted(p.name for p in path.iterdir()) for name, path in layouts.items()}
    assert "model.safetensors" in files["safetensors"]
    assert "model.safetensors.index.json" in files["sharded"]
    assert "pytorch_model.bin.index.json" in files["bin"] and "pytorch_model-00001-of-00003.bin" in files["bin"]
    reference = None
    for path in layouts.values():
        runtime = BelleVL.from_pretrained(path, dtype="float32")
        auto = AutoModelForCausalLM.from_pretrained(path)
        assert type(auto) is QWenLMHeadModel
        for model in (runtime.model, auto):
            got = logits_of(model, runtime.processor, pictures["red"])
            if reference is None:
                reference = got
            torch.testing.assert_close(got, reference, rtol=0, atol=0)


def test_auto_classes_and_published_names(tiny_dir):
    assert type(AutoConfig.from_pretrained(tiny_dir)) is QWenConfig
    assert type(AutoTokenizer.from_pretrained(tiny_dir)) is QWenTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    names = set(model.state_dict())
    assert {"transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.w2.weight",
            "transformer.visual.attn_pool.attn.in_proj_weight", "transformer.visual.proj",
            "transformer.visual.transformer.resblocks.1.attn.in_proj.weight", "lm_head.weight"} <= names  # fmt: skip
    from safetensors import safe_open

    with safe_open(str(tiny_dir / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == names  # nothing renamed, nothing missing, nothing extra


def test_reference_code_in_the_folder_is_never_run(tmp_path, pictures):
    folder = write_tiny_checkpoint(tmp_path / "with-code", seed=0)
    marker = tmp_path / "ran"
    for name in REFERENCE_FILES:
        (folder / name).write_text(
            f"open({str(marker)!r}, 'a').write({name!r})\nraise RuntimeError('reference code was imported')\n"
        )
    BelleVL.from_pretrained(folder, trust_remote_code=True).chat(
        [{"role": "user", "content": [{"type": "image", "image": pictures["red"]}, "Hi"]}], max_new_tokens=2
    )
    for trust in (None, False, True):
        kwargs = {} if trust is None else {"trust_remote_code": trust}
        AutoConfig.from_pretrained(folder, **kwargs)
        AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    AutoTokenizer.from_pretrained(folder)
    AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    assert not marker.exists()


def test_text_only_checkpoint(tmp_path, pictures):
    folder = write_tiny_checkpoint(tmp_path / "text-only", seed=0, visual=False)
    assert "visual" not in json.loads((folder / "config.json").read_text())
    runtime = BelleVL.from_pretrained(folder)
    assert runtime.model.transformer.visual is None
    assert not any("visual" in k for k in runtime.model.state_dict())
    result = runtime.chat([{"role": "user", "content": "hello"}], do_sample=False, max_new_tokens=4)
    assert result.usage.completion_tokens == 4
    with pytest.raises(belle_vl_tools.PromptError, match="text-only"):
        runtime.chat([{"role": "user", "content": [{"type": "image", "image": pictures["red"]}, "what?"]}])


def test_save_pretrained_round_trip(runtime, tmp_path, pictures):
    out = tmp_path / "saved"
    runtime.model.save_pretrained(out)
    runtime.processor.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen" and config["architectures"] == ["QWenLMHeadModel"]
    assert config["visual"]["image_start_id"] == 151857
    reloaded = BelleVL.from_pretrained(out, dtype="float32")
    torch.testing.assert_close(
        logits_of(reloaded.model, reloaded.processor, pictures["blue"]),
        logits_of(runtime.model, runtime.processor, pictures["blue"]),
        rtol=0,
        atol=0,
    )


def test_precision_flags_choose_the_default_dtype(tmp_path):
    folder = write_tiny_checkpoint(tmp_path / "bf16", seed=0, bf16=True, dtype=torch.bfloat16)
    assert AutoModelForCausalLM.from_pretrained(folder).dtype == torch.bfloat16
    assert BelleVL.from_pretrained(folder, dtype="float32").model.dtype == torch.float32
    plain = write_tiny_checkpoint(tmp_path / "auto", seed=0)  # no flag set: fp32 on a CPU, as the reference does
    assert AutoModelForCausalLM.from_pretrained(plain).dtype == torch.float32


def test_half_precision_runs_the_vision_tower(tiny_dir, pictures):
    """bf16 weights (how a GPU user loads the real model) go through the vision tower and the resampler, whose frozen
    position embedding transformers keeps in float32, and give the float32 model's image features."""
    full = BelleVL.from_pretrained(tiny_dir, dtype="float32")
    half = BelleVL.from_pretrained(tiny_dir, dtype="bfloat16")
    pixels = full.processor.pixel_values([Image.open(pictures["red"]).convert("RGB")])
    want = full.model.get_image_features(pixels).pooler_output
    got = half.model.get_image_features(pixels).pooler_output
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05 * want.abs().max().item())
    question = [
        {"role": "user", "content": [{"type": "image", "image": pictures["red"]}, {"type": "text", "text": "?"}]}
    ]
    assert half.chat(question, do_sample=False, max_new_tokens=3).usage.completion_tokens == 3


@pytest.mark.parametrize("bits", [8, 4])
def test_bitsandbytes_quantization_keeps_the_vision_tower(tiny_dir, pictures, bits):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else BitsAndBytesConfig(load_in_4bit=True)
    runtime = BelleVL.from_pretrained(tiny_dir, quantization_config=config)
    c_attn = runtime.model.transformer.h[0].attn.c_attn
    assert type(c_attn).__name__ in ("Linear8bitLt", "Linear4bit")
    visual = runtime.model.transformer.visual
    assert type(visual.transformer.resblocks[0].attn.in_proj) is torch.nn.Linear
    assert visual.conv1.weight.dtype == torch.float32
    result = runtime.chat(
        [{"role": "user", "content": [{"type": "image", "image": pictures["red"]}, {"type": "text", "text": "What?"}]}],
        do_sample=False,
        max_new_tokens=3,
    )
    assert result.usage.completion_tokens == 3


def test_missing_checkpoint_gives_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        BelleVL.from_pretrained(tmp_path / "empty")


def test_lora_fine_tuning_with_peft(tiny_dir):
    peft = pytest.importorskip("peft")
    model = QWenLMHeadModel.from_pretrained(tiny_dir)
    lora = peft.get_peft_model(model, peft.LoraConfig(target_modules=["c_attn", "w1", "w2"], r=4))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.randint(0, 1000, (1, 10))
    loss = lora(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for n, p in lora.named_parameters() if p.requires_grad)


def test_light_modules_import_without_torch_or_transformers():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for name in ('torch', 'transformers', 'tiktoken', 'safetensors'):\n"
        "    sys.modules[name] = None\n"
        "import belle_vl_tools\n"
        "from belle_vl_tools import ImagePolicy, load_image, BelleVLError, ChatResult, Backend\n"
        "from belle_vl_tools import backend, images, errors, prompts, grounding\n"
        "assert belle_vl_tools.register_auto_classes() is False\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_visual_n_queries_sets_the_positions_per_image(tmp_path, pictures):
    """``visual.n_queries`` (a parameter of the reference vision tower, 256 when absent) sizes the resampler, and
    the processor writes as many ``<imgpad>`` positions; published checkpoints never set it."""
    folder = write_tiny_checkpoint(tmp_path / "q16", seed=3, visual={"n_queries": 16})
    runtime = BelleVL.from_pretrained(folder)
    assert runtime.model.config.num_image_queries == 16
    assert runtime.model.transformer.visual.attn_pool.query.shape[0] == 16
    item = runtime.prepare(
        [{"role": "user", "content": [{"type": "image", "image": pictures["red"]}, {"type": "text", "text": "What?"}]}]
    )
    assert item.input_ids.count(runtime.tokenizer.img_pad_id) == 16
    red = runtime.ask(pictures["red"], "What color?", do_sample=False, max_new_tokens=8).text
    blue = runtime.ask(pictures["blue"], "What color?", do_sample=False, max_new_tokens=8).text
    assert red != blue
    with pytest.raises(ValueError, match="perfect square"):
        QWenConfig(visual={"n_queries": 10, "output_dim": 4096})


def test_processor_and_model_must_agree_on_positions_per_image(tmp_path):
    from belle_vl_tools import QWenVLProcessor

    folder = write_tiny_checkpoint(tmp_path / "q16", seed=3, visual={"n_queries": 16})
    model = QWenLMHeadModel.from_pretrained(folder)
    processor = QWenVLProcessor.from_pretrained(folder)
    processor.num_image_queries = 256
    with pytest.raises(CheckpointError, match="n_queries"):
        BelleVL(model, processor)
