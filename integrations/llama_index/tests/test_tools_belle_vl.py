"""BelleVLToolSpec: the core tools for LlamaIndex agents, under the image policy."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from belle_vl_tools.images import ImagePolicy
from belle_vl_tools.tools import make_tools
from helpers_belle_vl import ScriptedBackend
from llama_index.core.agent.workflow import FunctionAgent, ReActAgent, ToolCallResult
from llama_index.core.base.llms.types import ChatMessage, ImageBlock, TextBlock, ToolCallBlock
from llama_index.core.llms import MockFunctionCallingLLM
from llama_index.core.tools.tool_spec.base import BaseToolSpec

from llama_index.llms.belle_vl import BelleVL
from llama_index.tools.belle_vl import BelleVLToolSpec, ToolErrorText

NAMES = ["describe_image", "visual_qa", "locate_objects", "read_text"]
SHORT = {"max_new_tokens": 8}  # the tiny random model never stops by itself


@pytest.fixture(scope="module")
def policy(pictures: dict[str, Path]) -> ImagePolicy:
    return ImagePolicy.restricted(pictures["red"].parent)


@pytest.fixture(scope="module")
def spec(runtime: Any, policy: ImagePolicy) -> BelleVLToolSpec:
    return BelleVLToolSpec(runtime, image_policy=policy, generation=SHORT)


def test_class_mro() -> None:
    assert BaseToolSpec.__name__ in [cls.__name__ for cls in BelleVLToolSpec.__mro__]


def test_tools_carry_the_core_descriptions_and_schemas(spec: BelleVLToolSpec) -> None:
    tools = spec.to_tool_list()
    assert [t.metadata.name for t in tools] == NAMES
    for tool in tools:
        core = spec.core_tools[tool.metadata.name]
        assert tool.metadata.description == core.description
        assert tool.metadata.fn_schema is core.args_schema
        assert tool.async_fn is not None
    parameters = tools[0].metadata.get_parameters_dict()
    assert parameters["required"] == ["image"]
    assert set(parameters["properties"]) == {"image", "detail", "language"}


def test_a_subset_of_tools(runtime: Any) -> None:
    chosen = BelleVLToolSpec(runtime, tools=["read_text", "visual_qa"])
    assert [t.metadata.name for t in chosen.to_tool_list()] == ["visual_qa", "read_text"]


def test_tools_answer_like_the_core_tools(spec: BelleVLToolSpec, runtime: Any, pictures: dict[str, Path]) -> None:
    core = make_tools(runtime, spec.image_policy, generation=SHORT)
    image = str(pictures["red"])
    assert spec.describe_image(image) == core["describe_image"].run(image=image).text
    assert spec.visual_qa(image, "What color?") == core["visual_qa"].run(image=image, question="What color?").text
    assert spec.read_text(image) == core["read_text"].run(image=image).text
    assert spec.describe_image(image) != spec.describe_image(str(pictures["blue"]))
    assert asyncio.run(spec.adescribe_image(image)) == spec.describe_image(image)


def test_locate_can_return_the_drawn_picture(runtime: Any, policy: ImagePolicy, pictures: dict[str, Path]) -> None:
    with_images = BelleVLToolSpec(runtime, image_policy=policy, return_images=True, generation=SHORT)
    text, picture = with_images.locate_objects(str(pictures["red"]), "the red circle")
    assert isinstance(text, TextBlock) and "the red circle" in text.text
    assert isinstance(picture, ImageBlock) and picture.image_mimetype == "image/png"
    plain = BelleVLToolSpec(runtime, image_policy=policy, generation=SHORT).locate_objects(
        str(pictures["red"]), "the red circle"
    )
    assert plain == text.text


def test_the_policy_guards_the_tools(spec: BelleVLToolSpec, tmp_path: Path) -> None:
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"not even a picture")
    refused = spec.describe_image(str(outside))
    assert isinstance(refused, ToolErrorText) and "outside the folders" in refused
    assert "URL" in spec.read_text("https://pictures.example/cat.png")


def test_a_refused_path_is_an_error_output_of_the_function_tool(spec: BelleVLToolSpec, tmp_path: Path) -> None:
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"not even a picture")
    tools = {tool.metadata.name: tool for tool in spec.to_tool_list()}
    output = tools["visual_qa"].call(image=str(outside), question="What is it?")
    assert output.is_error and "outside the folders" in output.content
    output = asyncio.run(tools["read_text"].acall(image="https://pictures.example/cat.png"))
    assert output.is_error and "URL" in output.content


def test_the_llm_takes_a_loaded_backend_as_model(runtime: Any) -> None:
    llm = BelleVL(model=runtime)
    assert llm.backend is runtime
    assert BelleVL(model=llm).backend is runtime  # an adapter holding one counts too
    assert BelleVL(backend=runtime).backend is runtime
    with pytest.raises(TypeError, match="not both"):
        BelleVL(model=runtime, backend=runtime)
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        BelleVL(model="no/such/folder/here")


def test_the_llm_is_accepted_in_place_of_a_backend(llm: BelleVL, policy: ImagePolicy) -> None:
    from_llm = BelleVLToolSpec(llm, image_policy=policy)
    assert from_llm.core_tools["describe_image"].model is llm.backend


# --- agents -----------------------------------------------------------------------------------------------------


def _calls_then_answers(tool_name: str, arguments: dict[str, Any]) -> Any:
    """A scripted function-calling LLM: one tool call, then an answer quoting the tool's output."""

    def respond(messages: list[ChatMessage], *args: Any, **kwargs: Any) -> ChatMessage:
        results = [m for m in messages if m.role == "tool"]
        if not results:
            block = ToolCallBlock(tool_call_id="call_1", tool_name=tool_name, tool_kwargs=arguments)
            return ChatMessage(role="assistant", blocks=[block])
        return ChatMessage(role="assistant", content=f"The tool said: {results[-1].content}")

    return MockFunctionCallingLLM(response_generator=respond)


def _run(agent: Any, question: str) -> tuple[str, list[ToolCallResult]]:
    async def run() -> tuple[str, list[ToolCallResult]]:
        handler = agent.run(user_msg=question)
        results = [event async for event in handler.stream_events() if isinstance(event, ToolCallResult)]
        return str(await handler), results

    return asyncio.run(run())


def test_function_agent_calls_the_tools_on_a_real_picture(spec: BelleVLToolSpec, pictures: dict[str, Path]) -> None:
    image = str(pictures["green"])
    expected = spec.visual_qa(image, "What shape is it?")
    llm = _calls_then_answers("visual_qa", {"image": image, "question": "What shape is it?"})
    agent = FunctionAgent(tools=spec.to_tool_list(), llm=llm)
    answer, results = _run(agent, "What shape is in the picture?")
    assert [r.tool_name for r in results] == ["visual_qa"]
    assert not results[0].tool_output.is_error
    assert results[0].tool_output.content == expected
    assert answer == f"The tool said: {expected}"


def test_function_agent_sees_policy_refusals_as_tool_errors(spec: BelleVLToolSpec) -> None:
    llm = _calls_then_answers("describe_image", {"image": "/etc/passwd"})
    agent = FunctionAgent(tools=spec.to_tool_list(), llm=llm)
    answer, results = _run(agent, "Describe /etc/passwd")
    assert results[0].tool_output.is_error
    assert "passwd" in results[0].tool_output.content
    assert answer.startswith("The tool said: ")


def test_react_agent_with_a_scripted_llm(spec: BelleVLToolSpec, pictures: dict[str, Path]) -> None:
    image = str(pictures["blue"])
    expected = spec.describe_image(image)

    def script(messages: list[Any]) -> str:
        observations = [m for m in messages if "Observation:" in m.text and m.role != "system"]
        if not observations:
            arguments = json.dumps({"image": image, "detail": "brief"})
            return f"Thought: I should look at the picture.\nAction: describe_image\nAction Input: {arguments}"
        return "Thought: I can answer without using any more tools.\nAnswer: It shows a blue square."

    backend = ScriptedBackend(script)
    agent = ReActAgent(tools=spec.to_tool_list(), llm=BelleVL(backend=backend))
    answer, results = _run(agent, "What is in the picture?")
    assert [r.tool_name for r in results] == ["describe_image"]
    assert results[0].tool_output.content == expected
    assert answer == "It shows a blue square."
    # the observation went back to the model
    assert expected in str(backend.calls[-1][0])


def test_function_agent_with_belle_vl_and_its_own_tools(spec: BelleVLToolSpec, pictures: dict[str, Path]) -> None:
    image = str(pictures["red"])
    expected = spec.read_text(image)

    def script(messages: list[Any]) -> str:
        if messages[-1].role != "assistant":
            return f'Thought: read it.\nAction: read_text\nAction Input: {{"image": "{image}"}}'
        return (
            "Thought: I now know the final answer\nFinal Answer: " + messages[-1].text.split("Observation:")[-1].strip()
        )

    agent = FunctionAgent(tools=spec.to_tool_list(), llm=BelleVL(backend=ScriptedBackend(script)))
    answer, results = _run(agent, "What does the picture say?")
    assert [r.tool_name for r in results] == ["read_text"]
    assert answer == expected
