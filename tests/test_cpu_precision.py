"""CPU precision: the bfloat16 default on CPUs that compute it natively, and int8 weights for the language model."""

from __future__ import annotations

import pytest
import torch

from belle_vl_tools import BelleVL
from belle_vl_tools.errors import PromptError
from belle_vl_tools.runtime import cpu_has_native_bf16
from belle_vl_tools.testing import write_tiny_checkpoint


def _question(picture) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": "?"}]}]


def _prefill_logits(runtime: BelleVL, picture) -> torch.Tensor:
    """Last-position logits of a question about ``picture`` (vision tower, resampler and LM prefill)."""
    item = runtime.prepare(_question(picture))
    pixels = runtime.processor.pixel_values(item.images).to(runtime.model.dtype)
    with torch.inference_mode():
        out = runtime.model(input_ids=torch.tensor([item.input_ids]), pixel_values=pixels, logits_to_keep=1)
    return out.logits[0, -1].float()


@pytest.fixture(scope="module")
def int8(tiny_dir):
    pytest.importorskip("torchao")
    return BelleVL.from_pretrained(tiny_dir, dtype="float32", quantize="int8")


def test_the_cpu_default_is_bfloat16_where_the_cpu_computes_it(tiny_dir, tmp_path):
    """No dtype and no precision flag in the checkpoint: bfloat16 on a CPU with native bf16, float32 on others;
    dtype="float32" and the checkpoint's own fp32 flag keep float32."""
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    default = BelleVL.from_pretrained(tiny_dir)
    assert default.model.dtype == expected
    assert next(default.model.transformer.visual.parameters()).dtype == expected
    assert BelleVL.from_pretrained(tiny_dir, dtype="float32").model.dtype == torch.float32
    flagged = write_tiny_checkpoint(tmp_path / "fp32", seed=0, fp32=True)
    assert BelleVL.from_pretrained(flagged).model.dtype == torch.float32


def test_native_bf16_follows_the_cpu_flags(monkeypatch):
    """The answer is torch's where it says yes, else the flags of /proc/cpuinfo."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        flags = ""
    words = set(flags.split())
    assert cpu_has_native_bf16() == bool(words & {"avx512_bf16", "amx_bf16", "bf16"})


def test_bfloat16_answers_within_its_tolerance_of_float32(runtime, tiny_dir, pictures):
    """The whole model in bf16 (vision tower included) gives the fp32 logits within bf16 tolerance, and the
    picture still changes them beyond it."""
    half = BelleVL.from_pretrained(tiny_dir, dtype="bfloat16")
    assert next(half.model.transformer.visual.parameters()).dtype == torch.bfloat16
    want = _prefill_logits(runtime, pictures["red"])
    got = _prefill_logits(half, pictures["red"])
    tolerance = 0.03 * want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=0, atol=tolerance)
    other = _prefill_logits(half, pictures["blue"])
    assert (other - got).abs().max() > 3 * tolerance


def test_int8_quantizes_the_language_model_and_keeps_the_vision_tower(int8, runtime):
    from torchao.quantization import Int8Tensor

    model = int8.model
    linears = [m for m in [*model.transformer.h.modules(), model.lm_head] if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m.weight, Int8Tensor) for m in linears)
    assert not any(isinstance(p, Int8Tensor) for p in model.transformer.visual.parameters())
    assert not isinstance(model.transformer.wte.weight, Int8Tensor)
    want = dict(runtime.model.transformer.visual.named_parameters())
    for name, param in model.transformer.visual.named_parameters():
        torch.testing.assert_close(param, want[name], rtol=0, atol=0)


def test_int8_answers_within_its_tolerance_of_float32(int8, runtime, pictures):
    """int8 weights (one scale per output channel) give the fp32 logits within 2% of their range, the picture
    changing them beyond that; a greedy answer runs through generate."""
    want = _prefill_logits(runtime, pictures["red"])
    got = _prefill_logits(int8, pictures["red"])
    tolerance = 0.02 * want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=0, atol=tolerance)
    assert (_prefill_logits(int8, pictures["blue"]) - got).abs().max() > 3 * tolerance
    result = int8.chat(_question(pictures["red"]), do_sample=False, max_new_tokens=3, min_new_tokens=3)
    assert result.usage.completion_tokens == 3


def test_unknown_quantize_schemes_are_refused(tiny_dir):
    with pytest.raises(PromptError, match="quantize='int3'"):
        BelleVL.from_pretrained(tiny_dir, quantize="int3")
    with pytest.raises(PromptError, match="either quantize= or quantization_config="):
        BelleVL.from_pretrained(tiny_dir, quantize="int8", quantization_config=object())


def test_the_cli_loads_int8_weights(tiny_dir, pictures, monkeypatch):
    """--quantize int8 reaches the loader, before or after the command name."""
    pytest.importorskip("torchao")
    from typer.testing import CliRunner

    from belle_vl_tools import cli

    seen: list[dict] = []
    real = BelleVL.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(BelleVL, "from_pretrained", spy)
    for argv in (
        ["--model", str(tiny_dir), "--quantize", "int8", "describe", str(pictures["red"]), "--max-new-tokens", "2"],
        ["describe", str(pictures["red"]), "--model", str(tiny_dir), "--quantize", "int8", "--max-new-tokens", "2"],
    ):
        result = CliRunner().invoke(cli.app, argv)
        assert result.exit_code == 0, result.output
    assert [kw["quantize"] for kw in seen] == ["int8", "int8"]
