"""A LlamaIndex FunctionAgent whose reasoning model is the shipped demo model: unforced, it chooses the vision
tool itself."""

from __future__ import annotations

import asyncio

import pytest
from belle_vl_tools.demo_data import Scene, Shape, render
from llama_index.core.agent.workflow import FunctionAgent, ToolCallResult

from llama_index.llms.belle_vl import BelleVL
from llama_index.tools.belle_vl import BelleVLToolSpec


@pytest.mark.xfail(
    strict=True,
    reason="issue 30: the shipped demo model does not call a tool unless the call is forced (it answers directly)",
)
def test_function_agent_over_the_demo_model_calls_visual_qa_itself() -> None:
    from belle_vl_tools import BelleVL as Runtime

    backend = Runtime.from_pretrained()  # the shipped demo model
    spec = BelleVLToolSpec(backend)
    spec.store.add(render(Scene(112, (Shape("circle", "blue", (0, 2), (80, 6, 106, 32)),))), "image_1")
    agent = FunctionAgent(tools=spec.to_tool_list(), llm=BelleVL(backend=backend, temperature=0))

    async def run() -> tuple[str, list[ToolCallResult]]:
        handler = agent.run(user_msg="What color is the shape in image_1?")
        results = [event async for event in handler.stream_events() if isinstance(event, ToolCallResult)]
        return str(await handler), results

    answer, results = asyncio.run(run())
    assert [r.tool_name for r in results] == ["visual_qa"]
    assert results[0].tool_kwargs["image"] == "image_1"
    assert "blue" in str(results[0].tool_output.content).lower()
    assert "blue" in answer.lower()
