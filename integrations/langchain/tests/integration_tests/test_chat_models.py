"""ChatBelleVL on the tiny checkpoint: pictures reach the model in every form, tool results included."""

from __future__ import annotations

import base64

from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

from langchain_belle_vl import ChatBelleVL


def _b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _ask(chat: ChatBelleVL, block: dict) -> str:
    return chat.invoke([HumanMessage(content=[{"type": "text", "text": "Describe it."}, block])]).content


def test_the_picture_changes_the_answer(tiny_model, pictures) -> None:
    chat = ChatBelleVL(model=tiny_model, temperature=0, max_tokens=6)
    red = _ask(chat, {"type": "image", "base64": _b64(pictures["red"]), "mime_type": "image/png"})
    blue = _ask(chat, {"type": "image", "base64": _b64(pictures["blue"]), "mime_type": "image/png"})
    assert red != blue
    # the other forms of the same picture give the same answer
    url = f"data:image/png;base64,{_b64(pictures['red'])}"
    assert _ask(chat, {"type": "image_url", "image_url": {"url": url}}) == red
    legacy = {"type": "image", "source_type": "base64", "data": _b64(pictures["red"]), "mime_type": "image/png"}
    assert _ask(chat, legacy) == red


def test_image_url_is_fetched_through_the_policy(tiny_model, image_server) -> None:
    chat = ChatBelleVL(model=tiny_model, temperature=0, max_tokens=6)
    message = chat.invoke([HumanMessage(content=[{"type": "image", "url": "https://pictures.example/p.png"}])])
    assert message.usage_metadata["input_tokens"] > 256  # the picture's 256 tokens are in the prompt


def test_a_picture_returned_by_a_tool_reaches_the_model(tiny_model, pictures) -> None:
    chat = ChatBelleVL(model=tiny_model, temperature=0, max_tokens=6)

    def history(name: str) -> list:
        return [
            HumanMessage("Show me a picture and describe it."),
            AIMessage("", tool_calls=[{"name": "random_image", "args": {}, "id": "1"}]),
            ToolMessage(
                content=[{"type": "image", "base64": _b64(pictures[name]), "mime_type": "image/png"}],
                tool_call_id="1",
            ),
        ]

    red = chat.invoke(history("red"))
    blue = chat.invoke(history("blue"))
    assert red.usage_metadata["input_tokens"] > 256
    assert red.content != blue.content


def test_async_stream_matches_invoke(tiny_model) -> None:
    import asyncio

    chat = ChatBelleVL(model=tiny_model, temperature=0, max_tokens=8)

    async def collect() -> str:
        return "".join([chunk.content async for chunk in chat.astream("Hello")])

    assert asyncio.run(collect()) == chat.invoke("Hello").content


def test_structured_output_holds_for_a_random_model(tiny_model) -> None:
    """Every method returns the schema's type: the answer is generated under its grammar."""
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    chat = ChatBelleVL(model=tiny_model, temperature=0, max_tokens=40)
    for method in ("function_calling", "json_schema"):
        assert isinstance(chat.with_structured_output(Person, method=method).invoke("Who is it?"), Person)
    assert isinstance(chat.with_structured_output(method="json_mode").invoke("Who is it?"), dict)
