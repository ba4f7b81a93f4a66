"""ChatBelleVL's translation: LangChain messages in, core messages out; replies back as AIMessages.

A scripted backend stands in for the model, so these tests pin the protocol on literal model output.
"""

from __future__ import annotations

from typing import Any

import pytest
from belle_vl_tools.backend import Usage
from belle_vl_tools.errors import PromptError
from belle_vl_tools.messages import ToolCall
from belle_vl_tools.testing import ScriptedBackend as CoreScriptedBackend
from belle_vl_tools.tools import ImageStore
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from pydantic import BaseModel

from langchain_belle_vl import ChatBelleVL
from langchain_belle_vl.chat_models import to_core_messages

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
DATA_URL = f"data:image/png;base64,{PNG}"


def ScriptedBackend(*answers: str) -> CoreScriptedBackend:  # noqa: N802 - reads as the backend it builds
    """The shared scripted backend, giving out ``answers`` in turn (streams come in pieces of 5 characters)."""
    return CoreScriptedBackend(list(answers), usage=Usage(30, 7, 0))


def get_weather(city: str) -> str:
    """Get the weather in a city."""
    return "sunny"


class Person(BaseModel):
    """A person."""

    name: str
    age: int


CALL = 'Thought: I should check.\nAction: get_weather\nAction Input: {"city": "北京"}'


# --- messages ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "block",
    [
        {"type": "image", "base64": PNG, "mime_type": "image/png"},
        {"type": "image", "source_type": "base64", "data": PNG, "mime_type": "image/png"},
        {"type": "image_url", "image_url": {"url": DATA_URL}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
    ],
    ids=["v1", "source_type", "openai", "anthropic"],
)
def test_every_image_form_becomes_an_image_part(block: dict[str, Any]) -> None:
    [message] = to_core_messages([HumanMessage(content=[{"type": "text", "text": "What is it?"}, block])])
    assert message == {
        "role": "user",
        "content": [{"type": "text", "text": "What is it?"}, {"type": "image", "image": DATA_URL}],
    }


def test_image_url_and_plain_strings() -> None:
    core = to_core_messages(
        [
            HumanMessage(content=[{"type": "image", "url": "https://example.com/cat.png"}]),
            HumanMessage("plain"),
        ]
    )
    assert core[0]["content"] == [{"type": "image", "image": "https://example.com/cat.png"}]
    assert core[1] == {"role": "user", "content": "plain"}


def test_system_messages_are_merged_first() -> None:
    core = to_core_messages([SystemMessage("Be brief."), HumanMessage("hi"), SystemMessage("Answer in Chinese.")])
    assert core[0] == {"role": "system", "content": "Be brief.\n\nAnswer in Chinese."}
    assert [m["role"] for m in core] == ["system", "user"]


def test_tool_calls_and_tool_images() -> None:
    core = to_core_messages(
        [
            HumanMessage("draw"),
            AIMessage("", tool_calls=[{"name": "paint", "args": {"x": 1}, "id": "c1"}]),
            ToolMessage(content=[{"type": "image", "base64": PNG, "mime_type": "image/png"}], tool_call_id="c1"),
        ]
    )
    assert core[1] == {"role": "assistant", "content": "", "tool_calls": [ToolCall("paint", {"x": 1}, "c1")]}
    assert core[2]["role"] == "tool" and core[2]["content"] == [{"type": "image", "image": DATA_URL}]


def test_unsupported_blocks_are_refused() -> None:
    audio = {"type": "audio", "base64": "AAAA", "mime_type": "audio/wav"}
    with pytest.raises(PromptError, match="text and images only"):
        to_core_messages([HumanMessage(content=[audio])])
    with pytest.raises(PromptError, match="file_id"):
        to_core_messages([HumanMessage(content=[{"type": "image", "file_id": "file-123"}])])


# --- replies -----------------------------------------------------------------------------------------------------


def test_plain_answer_with_usage_and_metadata() -> None:
    chat = ChatBelleVL(model=ScriptedBackend("A red circle."), temperature=0, max_tokens=20, stop=["END"])
    message = chat.invoke("What is it?")
    assert message.content == "A red circle."
    assert message.usage_metadata == {"input_tokens": 30, "output_tokens": 7, "total_tokens": 37}
    assert message.response_metadata["model_name"] == "scripted"
    assert message.response_metadata["finish_reason"] == "stop"
    _, generation = chat.client.calls[0]
    assert generation == {"temperature": 0, "max_new_tokens": 20, "stop": ["END"]}


def test_bound_tools_give_tool_calls() -> None:
    backend = ScriptedBackend(CALL)
    message = ChatBelleVL(model=backend).bind_tools([get_weather]).invoke("Weather in Beijing?")
    assert message.content == ""
    [call] = message.tool_calls
    assert call["name"] == "get_weather" and call["args"] == {"city": "北京"} and call["id"].startswith("call_")
    assert message.response_metadata["finish_reason"] == "tool_calls"
    sent, generation = backend.calls[0]
    assert "get_weather: Call this tool" in sent[0].text and sent[0].text.endswith("Weather in Beijing?")
    assert "Observation:" in generation["stop"]


def test_malformed_call_becomes_invalid_tool_call() -> None:
    backend = ScriptedBackend("Action: get_weather\nAction Input: {city: Beijing", "Action: launch\nAction Input: {}")
    chat = ChatBelleVL(model=backend).bind_tools([get_weather])
    bad_json = chat.invoke("hi")
    assert bad_json.tool_calls == [] and "not valid JSON" in bad_json.invalid_tool_calls[0]["error"]
    unknown = chat.invoke("hi")
    assert (
        unknown.invalid_tool_calls[0]["name"] == "launch" and "Unknown tool" in unknown.invalid_tool_calls[0]["error"]
    )


def test_agent_history_is_rendered() -> None:
    backend = ScriptedBackend("Thought: I now know the final answer\nFinal Answer: It is sunny.")
    history = [
        HumanMessage("Weather in Beijing?"),
        AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Beijing"}, "id": "c1"}]),
        ToolMessage("sunny", tool_call_id="c1", name="get_weather"),
    ]
    message = ChatBelleVL(model=backend).bind_tools([get_weather]).invoke(history)
    assert message.content == "It is sunny." and message.tool_calls == []
    sent, _ = backend.calls[0]
    assert sent[-1].role == "assistant" and sent[-1].text.endswith("Observation: sunny")


def test_streaming_text_and_tool_call_chunks() -> None:
    tokens: list[str] = []

    class Collect(BaseCallbackHandler):
        def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            tokens.append(token)

    chat = ChatBelleVL(model=ScriptedBackend("Plain words here.", CALL), callbacks=[Collect()])
    chunks = list(chat.stream("hi"))
    assert "".join(c.content for c in chunks) == "Plain words here." == "".join(tokens)
    assert chunks[-1].chunk_position == "last" and chunks[-1].usage_metadata["total_tokens"] == 37
    assert sum(1 for c in chunks if c.usage_metadata) == 1

    full = None
    for chunk in chat.bind_tools([get_weather]).stream("Weather?"):
        full = chunk if full is None else full + chunk
    assert full.content == ""
    assert full.tool_call_chunks[0]["name"] == "get_weather"
    assert full.tool_calls[0]["args"] == {"city": "北京"}


async def test_async_paths() -> None:
    chat = ChatBelleVL(model=ScriptedBackend("one", CALL))
    assert (await chat.ainvoke("hi")).content == "one"
    full = None
    async for chunk in chat.bind_tools([get_weather]).astream("hi"):
        full = chunk if full is None else full + chunk
    assert full.tool_calls[0]["name"] == "get_weather"


def test_streaming_flag_uses_the_stream() -> None:
    backend = ScriptedBackend("streamed answer")
    message = ChatBelleVL(model=backend, streaming=True).invoke("hi")
    assert message.content == "streamed answer" and message.usage_metadata["output_tokens"] == 7


def test_structured_output_through_tool_calling() -> None:
    backend = ScriptedBackend('Action: Person\nAction Input: {"name": "Li Lei", "age": 12}')
    person = ChatBelleVL(model=backend).with_structured_output(Person).invoke("Who?")
    assert person == Person(name="Li Lei", age=12)
    assert "must call one of the tools" in backend.calls[0][0][0].text


def test_tool_choice_forms() -> None:
    backend = ScriptedBackend("x", "y", "z")
    chat = ChatBelleVL(model=backend)
    chat.bind_tools([get_weather, Person], tool_choice="get_weather").invoke("hi")
    chat.bind_tools([get_weather], tool_choice="none").invoke("hi")
    chat.bind_tools([get_weather], tool_choice="any").invoke("hi")
    first, second, third = (call[0][0].text for call in backend.calls)
    assert "must call the get_weather tool" in first and "Person:" not in first
    assert second == "hi"
    assert "must call one of the tools" in third


def test_images_get_handles_for_tools() -> None:
    store = ImageStore()
    chat = ChatBelleVL(model=ScriptedBackend("ok"), image_store=store)
    chat.invoke([HumanMessage(content=[{"type": "image", "url": "a.png"}, {"type": "image", "url": "b.png"}])])
    assert store.get("image_1") == "a.png" and store.get("image_2") == "b.png"


def test_model_override_is_refused_and_ls_params() -> None:
    chat = ChatBelleVL(model=ScriptedBackend("x"), temperature=0.2, max_tokens=5)
    with pytest.raises(PromptError, match="cannot switch"):
        chat.invoke("hi", model="other-model")
    params = chat._get_ls_params(stop=["a"])
    assert params["ls_provider"] == "belle_vl" and params["ls_model_name"] == "scripted"
    assert params["ls_temperature"] == 0.2 and params["ls_max_tokens"] == 5 and params["ls_stop"] == ["a"]


def test_construction_does_not_load() -> None:
    chat = ChatBelleVL(model="/no/such/checkpoint", device="cpu")
    assert chat.client is None and chat.model_label == "checkpoint"


def test_structured_output_methods_send_a_grammar() -> None:
    backend = ScriptedBackend('{"name": "Li Lei", "age": 12}', '{"name": "Han Mei", "age": 13}', "{}")
    chat = ChatBelleVL(model=backend)
    assert chat.with_structured_output(Person, method="json_schema").invoke("Who?") == Person(name="Li Lei", age=12)
    as_dict = chat.with_structured_output(Person.model_json_schema(), method="json_schema").invoke("Who?")
    assert as_dict == {"name": "Han Mei", "age": 13}
    assert chat.with_structured_output(method="json_mode").invoke("Who?") == {}
    schema_format, dict_format, json_mode = (generation["response_format"] for _, generation in backend.calls)
    assert schema_format.kind == dict_format.kind == "json_schema" and json_mode.kind == "json_object"
    assert "Observation:" not in backend.calls[0][1].get("stop", [])  # no tools: no ReAct stop
    with pytest.raises(PromptError, match="method"):
        chat.with_structured_output(Person, method="xml")


def test_structured_output_include_raw_and_forced_calls_use_the_grammar() -> None:
    backend = ScriptedBackend('Action: Person\nAction Input: {"name": "Li Lei", "age": 12}', "not json")
    chat = ChatBelleVL(model=backend)
    out = chat.with_structured_output(Person, include_raw=True).invoke("Who?")
    assert out["parsed"] == Person(name="Li Lei", age=12) and out["parsing_error"] is None
    grammar = backend.calls[0][1]["response_format"]
    assert grammar.kind == "tool_call" and [name for name, _ in grammar.tools] == ["Person"]
    failed = chat.with_structured_output(Person, method="json_schema", include_raw=True).invoke("Who?")
    assert failed["parsed"] is None and failed["parsing_error"] is not None and failed["raw"].content == "not json"


def test_response_format_bound_directly_is_applied() -> None:
    backend = ScriptedBackend('{"a": 1}')
    message = ChatBelleVL(model=backend).bind(response_format={"type": "json_object"}).invoke("hi")
    assert message.content == '{"a": 1}' and backend.calls[0][1]["response_format"].kind == "json_object"
    with pytest.raises(PromptError, match="response_format"):
        ChatBelleVL(model=ScriptedBackend("x")).bind(response_format={"type": "yaml"}).invoke("hi")


def test_model_follows_the_cores_one_rule() -> None:
    from langchain_belle_vl.chat_models import ChatBelleVL as Chat

    backend = ScriptedBackend("A red circle.")
    assert Chat(model=backend).backend is backend
    assert Chat(model=Chat(model=backend)).backend is backend  # an adapter holding a backend
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        _ = Chat(model="no/such/folder/here").backend
    with pytest.raises(ValueError, match="URL"):
        _ = Chat(model="http://gpu-box:8000/v1").backend
    with pytest.raises(TypeError):
        _ = Chat(model=object()).backend
