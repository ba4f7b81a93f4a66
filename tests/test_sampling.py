"""The one model of generation settings: checked once, the same rules and errors for the runtime, engine and server."""

from __future__ import annotations

import subprocess
import sys

import pytest

from belle_vl_tools.errors import PromptError, SamplingError
from belle_vl_tools.sampling import ENGINE_ONLY, SamplingParams


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", 0),
        ("max_new_tokens", True),
        ("temperature", -1),
        ("temperature", float("nan")),
        ("top_p", 0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("top_k", 2.0),
        ("seed", 2**80),
        ("seed", "7"),
        ("presence_penalty", 3),
        ("frequency_penalty", float("inf")),
        ("repetition_penalty", 0),
        ("logit_bias", [1]),
        ("logit_bias", {-1: 1}),
        ("logit_bias", {5: 101}),
        ("stop", [""]),
        ("stop", [1]),
        ("logprobs", 1),
        ("top_logprobs", 21),
        ("processors", [1]),
    ],
)
def test_a_bad_value_is_a_typed_error_naming_its_field(field, value):
    extra = {"logprobs": True} if field == "top_logprobs" else {}
    with pytest.raises(SamplingError, match=field) as caught:
        SamplingParams(**{field: value, **extra})
    assert caught.value.param == field
    assert isinstance(caught.value, PromptError) and isinstance(caught.value, ValueError)


def test_top_logprobs_needs_logprobs():
    with pytest.raises(SamplingError, match="needs logprobs") as caught:
        SamplingParams(top_logprobs=2)
    assert caught.value.param == "top_logprobs"
    assert SamplingParams(logprobs=True, top_logprobs=2).top_logprobs == 2


def test_stop_and_processors_are_normalised_to_lists():
    params = SamplingParams(stop="END", processors=(print,))
    assert params.stop == ["END"] and params.processors == [print]


def test_from_kwargs_splits_the_settings_from_the_rest():
    params, rest = SamplingParams.from_kwargs(
        {"max_tokens": 5, "temperature": 0, "seed": None, "num_beams": 2, "do_sample": False}
    )
    assert params == SamplingParams(max_new_tokens=5, temperature=0)
    assert rest == {"num_beams": 2, "do_sample": False}
    both, _ = SamplingParams.from_kwargs({"max_new_tokens": 3, "max_tokens": 9})
    assert both.max_new_tokens == 3  # the field's own name wins over its alias, in any order
    both, _ = SamplingParams.from_kwargs({"max_tokens": 9, "max_new_tokens": 3})
    assert both.max_new_tokens == 3
    with pytest.raises(SamplingError, match="max_new_tokens"):
        SamplingParams.from_kwargs({"max_tokens": 0})


def test_engine_only_names_what_generate_cannot_do():
    assert SamplingParams(temperature=0.5, stop=["x"], repetition_penalty=1.1).engine_only() == []
    params = SamplingParams(frequency_penalty=0.5, logit_bias={3: 1.0}, logprobs=True)
    assert params.engine_only() == ["frequency_penalty", "logit_bias", "logprobs"]
    assert set(params.engine_only()) <= set(ENGINE_ONLY)


def test_as_kwargs_holds_only_what_is_given():
    assert SamplingParams().as_kwargs() == {}
    fmt = {"type": "json_object"}
    params = SamplingParams(max_new_tokens=4, temperature=0, top_k=0, stop="\n", response_format=fmt)
    kwargs = params.as_kwargs()
    assert kwargs == {"max_new_tokens": 4, "temperature": 0, "top_k": 0, "stop": ["\n"], "response_format": fmt}
    kwargs["stop"].append("more")
    assert params.stop == ["\n"]  # a copy: the backend cannot change the request's settings
    assert SamplingParams.from_kwargs(kwargs)[0].stop == ["\n", "more"]


def test_choices_of_a_seeded_request_get_their_own_seeds():
    params = SamplingParams(temperature=1.0, seed=2**63 - 1, processors=[print])
    assert [params.for_choice(i).seed for i in range(3)] == [2**63 - 1, 0, 1]
    assert params.for_choice(1).processors is not params.processors
    assert SamplingParams(temperature=1.0).for_choice(2).seed is None


def test_replacing_a_field_checks_it_again():
    import dataclasses

    with pytest.raises(SamplingError, match="top_p"):
        dataclasses.replace(SamplingParams(), top_p=2.0)


def test_the_model_imports_without_torch():
    code = (
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers', 'fastapi', 'pydantic'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, _Block())\n"
        "from belle_vl_tools.sampling import SamplingParams\n"
        "print(SamplingParams(temperature=0).temperature)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0"]
