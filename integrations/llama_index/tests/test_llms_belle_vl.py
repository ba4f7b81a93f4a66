"""The BelleVL LLM: pictures in messages, streaming and async forms, metadata, callbacks, tool calling."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path
from typing import Any, Literal

import pytest
from belle_vl_tools.errors import ImageAccessDeniedError, PromptError, ToolCallParseError
from belle_vl_tools.images import ImagePolicy
from helpers_belle_vl import ScriptedBackend, last_text
from llama_index.core.base.llms.base import BaseLLM
from llama_index.core.base.llms.types import ChatMessage, DocumentBlock, ImageBlock, TextBlock, ToolCallBlock
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import LLM
from llama_index.core.prompts import PromptTemplate
from llama_index.core.tools import FunctionTool
from pydantic import BaseModel

from llama_index.llms.belle_vl import BelleVL

QUESTION = "What is in the picture?"


def ask(image: ImageBlock, text: str = QUESTION) -> list[ChatMessage]:
    return [ChatMessage(role="user", blocks=[image, TextBlock(text=text)])]


def png_bytes(path: Path) -> bytes:
    return path.read_bytes()


# --- class and metadata -----------------------------------------------------------------------------------------


def test_class_mro() -> None:
    names = [cls.__name__ for cls in BelleVL.__mro__]
    assert FunctionCallingLLM.__name__ in names
    assert LLM.__name__ in names
    assert BaseLLM.__name__ in names
    assert issubclass(BelleVL, FunctionCallingLLM)
    assert BelleVL.class_name() == "BelleVL_llm"


def test_metadata_reads_the_checkpoints_window(llm: BelleVL, tiny_checkpoint: Path) -> None:
    published = json.loads((tiny_checkpoint / "generation_config.json").read_text())["max_window_size"]
    meta = llm.metadata
    assert meta.context_window == published
    assert meta.is_chat_model and meta.is_function_calling_model
    assert meta.num_output == llm.max_new_tokens
    assert meta.model_name == llm.backend.model_name


def test_metadata_follows_the_backend_and_the_override() -> None:
    backend = ScriptedBackend(lambda messages: "ok")
    backend.max_window_size = 1234  # type: ignore[attr-defined]
    assert BelleVL(backend=backend).metadata.context_window == 1234
    assert BelleVL(backend=backend, context_window=999).metadata.context_window == 999


def test_loads_a_checkpoint_by_path(tiny_checkpoint: Path) -> None:
    loaded = BelleVL(str(tiny_checkpoint), temperature=0, max_new_tokens=4)
    assert loaded.model == str(tiny_checkpoint)
    assert loaded.backend.model_name == tiny_checkpoint.name


def test_with_no_model_named_it_is_the_demo_model_that_sees(tmp_path: Path) -> None:
    """The shipped demo model is the default; its answer about a red circle it never saw says red."""
    from belle_vl_tools.demo_data import Scene, Shape, render

    path = tmp_path / "red.png"
    render(Scene(112, (Shape("circle", "red", (0, 1), (42, 6, 70, 34)),))).save(path)
    llm = BelleVL(temperature=0)
    assert llm.model == "belle-vl-demo"
    message = ChatMessage(role="user", blocks=[ImageBlock(path=path), TextBlock(text="What color is the circle?")])
    assert "red" in llm.chat([message]).message.content.lower()


def test_a_backend_must_be_a_backend() -> None:
    with pytest.raises(TypeError, match="backend"):
        BelleVL(backend=object())  # type: ignore[arg-type]


# --- pictures ---------------------------------------------------------------------------------------------------


def test_the_picture_changes_the_answer(llm: BelleVL, pictures: dict[str, Path]) -> None:
    red = llm.chat(ask(ImageBlock(path=pictures["red"])))
    blue = llm.chat(ask(ImageBlock(path=pictures["blue"])))
    assert red.message.content and blue.message.content
    assert red.message.content != blue.message.content
    assert red.additional_kwargs["images"] == 1


def test_every_image_form_gives_the_same_picture(llm: BelleVL, pictures: dict[str, Path]) -> None:
    data = png_bytes(pictures["red"])
    expected = llm.chat(ask(ImageBlock(path=pictures["red"]))).message.content
    encoded = base64.b64encode(data)
    forms = [
        ImageBlock(image=data),
        ImageBlock(image=encoded),
        ImageBlock(image=io.BytesIO(data)),
        ImageBlock(url="data:image/png;base64," + encoded.decode()),
    ]
    for block in forms:
        assert llm.chat(ask(block)).message.content == expected


def test_urls_are_read_only_under_the_policy(runtime: Any, pictures: dict[str, Path]) -> None:
    url = "https://pictures.example/red.png"
    closed = BelleVL(backend=runtime, temperature=0, max_new_tokens=8)
    with pytest.raises(ImageAccessDeniedError, match="URL"):
        closed.chat(ask(ImageBlock(url=url)))

    fetched: list[str] = []

    def fetcher(address: str, policy: ImagePolicy) -> bytes:
        fetched.append(address)
        return png_bytes(pictures["red"])

    policy = ImagePolicy.trusted(allow_urls=True, fetcher=fetcher)
    opened = BelleVL(backend=runtime, temperature=0, max_new_tokens=8, image_policy=policy)
    answer = opened.chat(ask(ImageBlock(url=url))).message.content
    assert fetched == [url]
    assert answer == closed.chat(ask(ImageBlock(path=pictures["red"]))).message.content


def test_paths_outside_a_restricted_policy_are_refused(runtime: Any, pictures: dict[str, Path], tmp_path: Path) -> None:
    confined = BelleVL(backend=runtime, image_policy=ImagePolicy.restricted(tmp_path), max_new_tokens=4)
    with pytest.raises(ImageAccessDeniedError):
        confined.chat(ask(ImageBlock(path=pictures["red"])))


def test_blocks_it_cannot_read_are_refused(llm: BelleVL) -> None:
    message = ChatMessage(role="user", blocks=[DocumentBlock(data=b"%PDF-1.4 hello"), TextBlock(text="Read it")])
    with pytest.raises(PromptError, match="text and images only"):
        llm.chat([message])


# --- sync, async and streaming agree ----------------------------------------------------------------------------


def test_sync_async_and_stream_agree(llm: BelleVL, pictures: dict[str, Path]) -> None:
    messages = ask(ImageBlock(path=pictures["green"]))
    expected = llm.chat(messages).message.content
    assert expected

    streamed = list(llm.stream_chat(messages))
    assert "".join(r.delta or "" for r in streamed) == expected
    assert streamed[-1].message.content == expected
    assert len(streamed) > 1

    async def run_async() -> tuple[str | None, str, str | None]:
        answer = await llm.achat(messages)
        chunks = [r async for r in await llm.astream_chat(messages)]
        return answer.message.content, "".join(r.delta or "" for r in chunks), chunks[-1].message.content

    assert asyncio.run(run_async()) == (expected, expected, expected)


def test_completion_forms_agree(llm: BelleVL) -> None:
    prompt = "Write one word."
    expected = llm.complete(prompt).text
    assert "".join(r.delta or "" for r in llm.stream_complete(prompt)) == expected

    async def run_async() -> tuple[str, str]:
        answer = await llm.acomplete(prompt)
        chunks = [r async for r in await llm.astream_complete(prompt)]
        return answer.text, "".join(r.delta or "" for r in chunks)

    assert asyncio.run(run_async()) == (expected, expected)
    assert expected == llm.chat([ChatMessage(role="user", content=prompt)]).message.content


def test_callbacks_and_events_fire(runtime: Any, pictures: dict[str, Path]) -> None:
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.instrumentation.event_handlers import BaseEventHandler
    from llama_index.core.instrumentation.events.llm import LLMChatEndEvent, LLMChatStartEvent

    seen: list[str] = []

    class Recorder(BaseEventHandler):
        def handle(self, event: Any, **kwargs: Any) -> None:
            if isinstance(event, (LLMChatStartEvent, LLMChatEndEvent)):
                seen.append(type(event).__name__)

    recorder = Recorder()
    dispatcher = get_dispatcher()
    dispatcher.add_event_handler(recorder)
    debug = LlamaDebugHandler()
    try:
        model = BelleVL(backend=runtime, max_new_tokens=4, callback_manager=CallbackManager([debug]))
        model.chat(ask(ImageBlock(path=pictures["red"])))
        list(model.stream_chat(ask(ImageBlock(path=pictures["red"]))))
    finally:
        dispatcher.event_handlers.remove(recorder)
    assert len(debug.get_event_pairs(CBEventType.LLM)) == 2
    assert seen.count("LLMChatStartEvent") == 2 and seen.count("LLMChatEndEvent") >= 2


# --- tool calling -----------------------------------------------------------------------------------------------


def _weather(city: str) -> str:
    """Tell the weather in a city.

    Args:
        city: The city.
    """
    return f"Sunny in {city}."


WEATHER = FunctionTool.from_defaults(fn=_weather, name="weather")


def test_tool_calls_are_parsed_from_the_reply() -> None:
    reply = 'Thought: I need the weather.\nAction: weather\nAction Input: {"city": "Paris"}'
    backend = ScriptedBackend(lambda messages: reply)
    model = BelleVL(backend=backend)
    response = model.chat_with_tools([WEATHER], user_msg="Weather in Paris?")
    calls = model.get_tool_calls_from_response(response)
    assert [(c.tool_name, c.tool_kwargs) for c in calls] == [("weather", {"city": "Paris"})]
    assert response.message.additional_kwargs["thought"] == "I need the weather."
    messages, generation = backend.calls[-1]
    assert "Observation:" in generation["stop"]
    prompt = last_text(messages)
    assert "weather: Call this tool to interact with the weather API" in prompt
    assert prompt.rstrip().endswith("Question: Weather in Paris?")


def test_tool_results_become_observations_and_the_final_answer_is_returned() -> None:
    replies = iter(
        [
            'Thought: I need the weather.\nAction: weather\nAction Input: {"city": "Paris"}',
            "Thought: I now know the final answer\nFinal Answer: It is sunny in Paris.",
        ]
    )
    backend = ScriptedBackend(lambda messages: next(replies))
    model = BelleVL(backend=backend)
    first = model.chat_with_tools([WEATHER], user_msg="Weather in Paris?")
    call = model.get_tool_calls_from_response(first)[0]
    history = [
        ChatMessage(role="user", content="Weather in Paris?"),
        first.message,
        ChatMessage(
            role="tool", content=WEATHER(**call.tool_kwargs).content, additional_kwargs={"tool_call_id": call.tool_id}
        ),
    ]
    second = model.chat_with_tools([WEATHER], chat_history=history)
    assert second.message.content == "It is sunny in Paris."
    assert model.get_tool_calls_from_response(second, error_on_no_tool_call=False) == []
    with pytest.raises(ToolCallParseError, match="calls no tool"):
        model.get_tool_calls_from_response(second)
    rendered = backend.calls[-1][0]
    assistant = rendered[-1]
    assert assistant.role == "assistant"
    assert "Action: weather" in assistant.text
    assert assistant.text.rstrip().endswith("Observation: Sunny in Paris.")


def test_streaming_with_tools_shows_only_the_answer() -> None:
    backend = ScriptedBackend(lambda messages: "Thought: I now know the final answer\nFinal Answer: Forty two.")
    model = BelleVL(backend=backend)
    chunks = list(model.stream_chat_with_tools([WEATHER], user_msg="What is six times seven?"))
    assert "".join(c.delta or "" for c in chunks) == "Forty two."
    assert chunks[-1].message.content == "Forty two."

    backend.reply = lambda messages: 'Thought: look it up\nAction: weather\nAction Input: {"city": "Oslo"}'
    chunks = list(model.stream_chat_with_tools([WEATHER], user_msg="Weather in Oslo?"))
    assert "".join(c.delta or "" for c in chunks) == ""
    blocks = [b for b in chunks[-1].message.blocks if isinstance(b, ToolCallBlock)]
    assert [(b.tool_name, b.tool_kwargs) for b in blocks] == [("weather", {"city": "Oslo"})]


def test_a_named_tool_choice_and_invalid_calls() -> None:
    backend = ScriptedBackend(lambda messages: 'Thought: hmm\nAction: weather\nAction Input: {"city": ')
    model = BelleVL(backend=backend)
    response = model.chat_with_tools([WEATHER], user_msg="Weather?", tool_choice="weather")
    assert "You must call the weather tool" in last_text(backend.calls[-1][0])
    (invalid,) = response.message.additional_kwargs["invalid_tool_calls"]
    assert "JSON" in invalid["error"]
    # handed on, so the agent's tool error tells the model what to fix
    assert [c.tool_name for c in model.get_tool_calls_from_response(response)] == ["weather"]


def test_a_picture_returned_by_a_tool_reaches_the_model(llm: BelleVL, pictures: dict[str, Path]) -> None:
    def answer(picture: Path) -> str | None:
        history = [
            ChatMessage(role="user", content="Show me the picture."),
            ChatMessage(
                role="assistant",
                blocks=[ToolCallBlock(tool_call_id="call_1", tool_name="show", tool_kwargs={})],
                additional_kwargs={"thought": "I should look."},
            ),
            ChatMessage(
                role="tool",
                blocks=[TextBlock(text="Here it is."), ImageBlock(image=png_bytes(picture))],
                additional_kwargs={"tool_call_id": "call_1"},
            ),
        ]
        return llm.chat(history).message.content

    assert answer(pictures["red"]) != answer(pictures["blue"])


def test_function_agent_uses_belle_vl_as_the_reasoning_model() -> None:
    from llama_index.core.agent.workflow import FunctionAgent

    def script(messages: list[Any]) -> str:
        if messages[-1].role != "assistant":  # no observation yet
            return 'Thought: I should check.\nAction: weather\nAction Input: {"city": "Rome"}'
        observation = messages[-1].text.split("Observation:")[-1].strip()
        return "Thought: I now know the final answer\nFinal Answer: The tool said: " + observation

    backend = ScriptedBackend(script)
    agent = FunctionAgent(tools=[WEATHER], llm=BelleVL(backend=backend), streaming=True)

    async def run() -> str:
        return str(await agent.run(user_msg="What is the weather in Rome?"))

    assert asyncio.run(run()) == "The tool said: Sunny in Rome."
    assert len(backend.calls) == 2


def test_two_pictures_in_one_message(llm: BelleVL, pictures: dict[str, Path]) -> None:
    two = [
        ChatMessage(
            role="user",
            blocks=[ImageBlock(path=pictures["red"]), ImageBlock(path=pictures["blue"]), TextBlock(text=QUESTION)],
        )
    ]
    assert llm.chat(two).additional_kwargs["images"] == 2


def test_system_messages_are_merged_and_later_ones_become_user_turns() -> None:
    backend = ScriptedBackend(lambda messages: "ok")
    model = BelleVL(backend=backend)
    model.chat(
        [
            ChatMessage(role="system", content="Be brief."),
            ChatMessage(role="system", content="Be kind."),
            ChatMessage(role="user", content="Hi"),
            ChatMessage(role="system", content="Stop now."),
        ]
    )
    messages = backend.calls[-1][0]
    assert [m.role for m in messages] == ["system", "user", "user"]
    assert messages[0].text == "Be brief.\nBe kind."
    assert messages[-1].text == "Stop now."


def test_generation_settings_reach_the_backend() -> None:
    backend = ScriptedBackend(lambda messages: "ok")
    model = BelleVL(backend=backend, temperature=0.5, top_p=0.9, max_new_tokens=7, stop=["END"], seed=3)
    model.chat([ChatMessage(role="user", content="Hi")], max_new_tokens=5)
    generation = backend.calls[-1][1]
    assert generation == {"max_new_tokens": 5, "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": ["END"]}


# --- structured output and forced calls (constrained decoding) ----------------------------------------------------


class Reading(BaseModel):
    city: str
    degrees: int
    sky: Literal["sunny", "cloudy", "rainy"]


def test_structured_predict_holds_for_a_random_model(llm: BelleVL) -> None:
    """The answer is generated under the class's schema, so even random weights give a valid object."""
    prompt = PromptTemplate("Read the weather report of {city}.")
    reading = llm.structured_predict(Reading, prompt, llm_kwargs={"max_new_tokens": 40}, city="Paris")
    assert isinstance(reading, Reading)
    again = asyncio.run(llm.astructured_predict(Reading, prompt, llm_kwargs={"max_new_tokens": 40}, city="Paris"))
    assert again == reading


def test_structured_predict_sends_the_schema_as_a_grammar() -> None:
    backend = ScriptedBackend(lambda messages: '{"city": "Oslo", "degrees": 3, "sky": "rainy"}')
    model = BelleVL(backend=backend)
    reading = model.structured_predict(Reading, PromptTemplate("Weather in {city}?"), city="Oslo")
    assert reading == Reading(city="Oslo", degrees=3, sky="rainy")
    messages, generation = backend.calls[-1]
    assert generation["response_format"].kind == "json_schema" and "Observation:" not in generation.get("stop", [])
    assert last_text(messages).endswith("Weather in Oslo?")


def test_a_required_tool_call_from_a_random_model_is_valid(llm: BelleVL) -> None:
    response = llm.chat_with_tools([WEATHER], user_msg="Weather?", tool_required=True, max_new_tokens=40)
    (call,) = llm.get_tool_calls_from_response(response)
    assert call.tool_name == "weather" and list(call.tool_kwargs) == ["city"]
    assert isinstance(call.tool_kwargs["city"], str)
