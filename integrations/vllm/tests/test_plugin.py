"""Belle-VL through vLLM with the plugin: the same greedy answers and prompt logprobs as belle-vl-tools' runtime,
and vLLM's OpenAI server on the demo model."""

from __future__ import annotations

import base64
import json
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"

CASES = ["text_only", "one_picture", "two_pictures", "picture_after_text", "two_turns"]
#: largest allowed gap between vLLM's prompt logprobs and the runtime's (fp32)
TOLERANCE = 1e-3


def _strip_stop(ids: list[int], stops: set[int]) -> list[int]:
    for n, token in enumerate(ids):
        if token in stops:
            return list(ids[:n])
    return list(ids)


def _stops(eod: int) -> set[int]:
    return {eod, eod + 1, eod + 2}


def _max_logprob_gap(prompt: list[int], vllm_logprobs: list[Any], reference: list[float]) -> float:
    """Largest |vLLM - runtime| prompt logprob over positions 1.. (position 0 has none)."""
    assert vllm_logprobs[0] is None and len(vllm_logprobs) == len(prompt) == len(reference) + 1
    gaps = []
    for position in range(1, len(prompt)):
        entry = vllm_logprobs[position]
        token = prompt[position]
        value = entry[token] if isinstance(entry, dict) and token in entry else entry[str(token)]
        value = value.logprob if hasattr(value, "logprob") else value["logprob"]
        gaps.append(abs(value - reference[position - 1]))
    return max(gaps)


def test_entry_point_registers_the_architecture() -> None:
    names = [ep.value for ep in entry_points(group="vllm.general_plugins")]
    assert "vllm_belle_vl:register" in names
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    assert "QWenLMHeadModel" in ModelRegistry.get_supported_archs()


def test_chat_stop_tokens_come_from_the_generation_config() -> None:
    from vllm_belle_vl import chat_stop_token_ids

    assert chat_stop_token_ids({"eos_token_id": 151643}) == [151643, 151645, 151644]
    assert chat_stop_token_ids({"pad_token_id": 743}) == [743, 745, 744]
    assert chat_stop_token_ids({}) is None


# --- the tiny random checkpoint, offline engine -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_outputs(tiny_llm: Any, reference: dict[str, Any]) -> dict[str, Any]:
    from vllm import SamplingParams

    cases = reference["tiny"]["cases"]
    params = SamplingParams(temperature=0, max_tokens=cases[CASES[0]]["max_tokens"], prompt_logprobs=0)
    outputs = tiny_llm.chat([cases[name]["messages"] for name in CASES], params, use_tqdm=False)
    return dict(zip(CASES, outputs, strict=True))


@pytest.mark.parametrize("case", CASES)
def test_tiny_checkpoint_matches_the_runtime(case: str, tiny_outputs: dict[str, Any], reference: dict) -> None:
    ref = reference["tiny"]["cases"][case]
    out = tiny_outputs[case]
    assert out.prompt_token_ids == ref["prompt_ids"], "prompt layout differs from the processor's"
    stops = _stops(151643)  # the published vocabulary's <|endoftext|> (the tiny checkpoint uses it)
    assert _strip_stop(list(out.outputs[0].token_ids), stops) == ref["answer_ids"]
    assert _max_logprob_gap(out.prompt_token_ids, out.prompt_logprobs, ref["prompt_logprobs"]) < TOLERANCE


# --- LoRA adapters on the tiny checkpoint (the same engine) -------------------------------------------------------

LORA_CASES = ["text_only", "one_picture"]


@pytest.fixture(scope="module")
def tiny_lora_outputs(tiny_llm: Any, reference: dict[str, Any]) -> dict[str, Any]:
    """The LORA_CASES through the random adapter and, in the same batch, the first one without it."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    lora = reference["tiny_lora"]
    adapter = LoRARequest("tiny-lora", 1, lora["path"])
    params = SamplingParams(temperature=0, max_tokens=lora["cases"][LORA_CASES[0]]["max_tokens"], prompt_logprobs=0)
    conversations = [lora["cases"][name]["messages"] for name in LORA_CASES] + [
        lora["cases"][LORA_CASES[0]]["messages"]
    ]
    outputs = tiny_llm.chat(conversations, params, lora_request=[adapter, adapter, None], use_tqdm=False)
    return {**dict(zip(LORA_CASES, outputs[:-1], strict=True)), "base": outputs[-1]}


@pytest.mark.parametrize("case", LORA_CASES)
def test_lora_adapter_matches_the_runtime_with_it(case: str, tiny_lora_outputs: dict, reference: dict) -> None:
    ref = reference["tiny_lora"]["cases"][case]
    out = tiny_lora_outputs[case]
    assert out.prompt_token_ids == ref["prompt_ids"]
    answer = _strip_stop(list(out.outputs[0].token_ids), _stops(151643))
    assert answer == ref["answer_ids"]
    assert answer != reference["tiny"]["cases"][case]["answer_ids"], "the adapter did not change the answer"
    assert _max_logprob_gap(out.prompt_token_ids, out.prompt_logprobs, ref["prompt_logprobs"]) < TOLERANCE


def test_request_without_the_adapter_in_the_same_batch_gets_the_base(tiny_lora_outputs: dict, reference: dict) -> None:
    out = tiny_lora_outputs["base"]
    assert (
        _strip_stop(list(out.outputs[0].token_ids), _stops(151643))
        == reference["tiny"]["cases"]["text_only"]["answer_ids"]
    )


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("vision", "adapts the vision tower.*--train-vision"),
        ("embeddings", r"modules_to_save.*\['wte', 'lm_head'\]"),
    ],
)
def test_adapters_vllm_cannot_apply_are_refused(kind: str, message: str, tiny_llm: Any, reference: dict) -> None:
    from vllm.lora.request import LoRARequest

    adapter = LoRARequest(f"tiny-{kind}", 2, reference["lora_refused"][kind])
    with pytest.raises(Exception, match=message):
        tiny_llm.llm_engine.add_lora(adapter)


def test_prompt_beyond_the_trained_window_is_refused(tiny_llm: Any) -> None:
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="maximum context length is 2048"):
        tiny_llm.generate({"prompt_token_ids": [100] * 2049}, SamplingParams(max_tokens=1), use_tqdm=False)


# --- the demo model, vllm serve and the openai client -----------------------------------------------------------


def _demo_chat(client: Any, messages: list[dict], max_tokens: int, **extra: Any) -> Any:
    return client.chat.completions.create(
        model="belle-vl-demo",
        messages=messages,
        temperature=0,
        max_tokens=max_tokens,
        extra_body={"return_token_ids": True, "prompt_logprobs": 0, **extra},
    )


@pytest.mark.parametrize("case", CASES)
def test_demo_model_matches_the_runtime(case: str, demo_server: Any, reference: dict[str, Any]) -> None:
    ref = reference["demo"]["cases"][case]
    response = _demo_chat(demo_server, ref["messages"], ref["max_tokens"])
    extra = response.model_extra or {}
    assert extra["prompt_token_ids"] == ref["prompt_ids"]
    choice = response.choices[0]
    eod = 743  # the demo vocabulary's <|endoftext|> (its generation_config.json eos_token_id)
    assert _strip_stop(choice.model_extra["token_ids"], _stops(eod)) == ref["answer_ids"]
    assert choice.message.content == ref["answer_text"]
    assert _max_logprob_gap(ref["prompt_ids"], extra["prompt_logprobs"], ref["prompt_logprobs"]) < TOLERANCE


def _red_circle_messages() -> list[dict]:
    data = base64.b64encode((EXAMPLES / "pictures" / "red_circle.png").read_bytes()).decode()
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
                {"type": "text", "text": "What color is the circle?"},
            ],
        }
    ]


def test_demo_server_names_the_red_circle_and_streams(demo_server: Any) -> None:
    messages = _red_circle_messages()
    answer = demo_server.chat.completions.create(model="belle-vl-demo", messages=messages, temperature=0, max_tokens=24)
    text = answer.choices[0].message.content
    assert "red" in text.lower()
    assert answer.choices[0].finish_reason == "stop"  # stopped at <|im_end|> / <|endoftext|>, not the length
    stream = demo_server.chat.completions.create(
        model="belle-vl-demo", messages=messages, temperature=0, max_tokens=24, stream=True
    )
    deltas = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len([d for d in deltas if d]) > 1
    assert "".join(deltas) == text


def test_demo_server_json_schema(demo_server: Any) -> None:
    import jsonschema

    schema = {
        "type": "object",
        "properties": {
            "color": {"type": "string", "enum": ["red", "blue", "green"]},
            "shape": {"type": "string", "enum": ["circle", "square", "triangle"]},
        },
        "required": ["color", "shape"],
        "additionalProperties": False,
    }
    answer = demo_server.chat.completions.create(
        model="belle-vl-demo",
        messages=_red_circle_messages(),
        temperature=0,
        max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
    )
    jsonschema.validate(json.loads(answer.choices[0].message.content), schema)


def test_demo_server_refuses_what_it_cannot_do(demo_server: Any) -> None:
    import openai

    too_long = [{"role": "user", "content": "red " * 2100}]
    with pytest.raises(openai.BadRequestError, match="2048"):
        demo_server.chat.completions.create(model="belle-vl-demo", messages=too_long, max_tokens=4)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError):
        demo_server.chat.completions.create(
            model="belle-vl-demo", messages=[{"role": "user", "content": "hi"}], tools=[tool], max_tokens=4
        )
