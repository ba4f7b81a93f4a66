"""An agent built with langchain.agents.create_agent: a scripted reasoning model calls the real Belle-VL tools,
which run the tiny checkpoint on real image files."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from belle_vl_tools import ImagePolicy
from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from pydantic import Field

from langchain_belle_vl import BelleVLToolkit


class ScriptedReasoner(FakeMessagesListChatModel):
    """A reasoning model that plays back fixed messages and accepts tools (it does not read them)."""

    seen: list[list[Any]] = Field(default_factory=list)

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> ScriptedReasoner:
        return self

    def _generate(self, messages: list[Any], *args: Any, **kwargs: Any) -> Any:
        self.seen.append(list(messages))
        return super()._generate(messages, *args, **kwargs)


def _agent(tiny_model, folder, script: list[AIMessage]):
    toolkit = BelleVLToolkit(model=tiny_model, policy=ImagePolicy.restricted(folder), generation={"max_new_tokens": 6})
    reasoner = ScriptedReasoner(responses=script)
    return create_agent(reasoner, toolkit.get_tools(), system_prompt="Use the vision tools."), reasoner, toolkit


def test_agent_gets_the_tool_results(tiny_model, pictures) -> None:
    folder = pictures["red"].parent
    script = [
        AIMessage(
            "",
            tool_calls=[
                {"name": "describe_image", "args": {"image": str(pictures["red"])}, "id": "call_a"},
                {"name": "visual_qa", "args": {"image": str(pictures["blue"]), "question": "Shape?"}, "id": "call_b"},
            ],
        ),
        AIMessage("Done looking."),
    ]
    agent, reasoner, _ = _agent(tiny_model, folder, script)
    result = agent.invoke({"messages": [HumanMessage("What do these pictures show?")]})
    tool_messages = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    assert [m.tool_call_id for m in tool_messages] == ["call_a", "call_b"]
    assert all(m.status == "success" for m in tool_messages)
    # the answers are the model's own: the same calls made directly give the same text
    expected = tiny_model.describe(str(pictures["red"]), temperature=0, max_new_tokens=6).text.strip()
    assert tool_messages[0].content == expected
    # and the reasoning model saw them on its second turn
    second_turn = reasoner.seen[1]
    assert [m.content for m in second_turn if isinstance(m, ToolMessage)] == [m.content for m in tool_messages]
    assert result["messages"][-1].content == "Done looking."


def test_agent_gets_errors_it_can_act_on(tiny_model, pictures, tmp_path) -> None:
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(pictures["red"].read_bytes())
    script = [
        AIMessage("", tool_calls=[{"name": "describe_image", "args": {"image": str(outside)}, "id": "c1"}]),
        AIMessage("", tool_calls=[{"name": "describe_image", "args": {"image": "image_1"}, "id": "c2"}]),
        AIMessage("Sorry."),
    ]
    agent, _, _ = _agent(tiny_model, pictures["red"].parent, script)
    result = agent.invoke({"messages": [HumanMessage("Describe it.")]})
    errors = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    assert [m.status for m in errors] == ["error", "error"]
    assert "outside the folders" in errors[0].content and "image_1" in errors[1].content
    assert result["messages"][-1].content == "Sorry."


def test_agent_uses_picture_handles(tiny_model, pictures) -> None:
    script = [
        AIMessage("", tool_calls=[{"name": "read_text", "args": {"image": "image_1"}, "id": "c1"}]),
        AIMessage("ok"),
    ]
    agent, _, toolkit = _agent(tiny_model, pictures["red"].parent, script)
    handle = toolkit.add_image(str(pictures["blue"]))
    result = agent.invoke({"messages": [HumanMessage(f"Read the text in {handle}.")]})
    [message] = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    assert message.status == "success"
    assert message.content == tiny_model.read_text(str(pictures["blue"]), temperature=0, max_new_tokens=6).text.strip()
