"""The LangChain tools over a scripted backend: results, artifacts, and errors handed back to the agent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from belle_vl_tools import ImagePolicy
from belle_vl_tools.backend import Usage
from belle_vl_tools.testing import ScriptedBackend
from langchain_core.messages import ToolMessage
from PIL import Image

from langchain_belle_vl import BelleVLLocateObjectsTool, BelleVLToolkit


def Answer(text: str) -> ScriptedBackend:  # noqa: N802 - reads as the scripted answer it is
    """The shared scripted backend, answering one fixed text."""
    return ScriptedBackend(text, usage=Usage(1, 1, 1))


def _call(tool: Any, args: dict[str, Any]) -> ToolMessage:
    return tool.invoke({"type": "tool_call", "id": "call_1", "name": tool.name, "args": args})


def test_toolkit_shares_store_and_policy(tmp_path: Path) -> None:
    Image.new("RGB", (10, 10), "red").save(tmp_path / "red.png")
    backend = Answer("red")
    toolkit = BelleVLToolkit(model=backend, policy=ImagePolicy.restricted(tmp_path))
    tools = {tool.name: tool for tool in toolkit.get_tools()}
    assert list(tools) == ["describe_image", "visual_qa", "locate_objects", "read_text"]
    handle = toolkit.add_image(str(tmp_path / "red.png"))
    message = _call(tools["visual_qa"], {"image": handle, "question": "Color?"})
    assert message.content == "red" and message.status == "success"
    assert message.artifact["model"] == "scripted"
    assert backend.pictures()[0].getpixel((0, 0)) == (255, 0, 0)


def test_errors_reach_the_agent_as_messages(tmp_path: Path) -> None:
    toolkit = BelleVLToolkit(model=Answer("x"), policy=ImagePolicy.restricted(tmp_path))
    describe = toolkit.get_tools()[0]
    outside = _call(describe, {"image": "/etc/passwd"})
    assert outside.status == "error" and "outside the folders" in outside.content
    unknown = _call(describe, {"image": "image_7"})
    assert unknown.status == "error" and "image_7" in unknown.content
    invalid = _call(describe, {"image": "image_1", "detail": "extreme"})
    assert invalid.status == "error" and "detail" in invalid.content


def test_locate_artifact_and_optional_image_block(tmp_path: Path) -> None:
    Image.new("RGB", (100, 50), "white").save(tmp_path / "w.png")
    backend = Answer("<ref>cat</ref><box>(0,0),(500,1000)</box>")
    policy = ImagePolicy.restricted(tmp_path)
    tool = BelleVLLocateObjectsTool(model=backend, policy=policy)
    message = _call(tool, {"image": str(tmp_path / "w.png"), "description": "cat"})
    assert "[0, 0, 50, 50]" in message.content
    assert message.artifact["boxes"][0]["x2"] == 50 and isinstance(message.artifact["image"], Image.Image)
    with_image = BelleVLLocateObjectsTool(model=backend, policy=policy, return_image=True)
    blocks = _call(with_image, {"image": str(tmp_path / "w.png"), "description": "cat"}).content
    assert blocks[0]["type"] == "text" and blocks[1]["type"] == "image" and blocks[1]["mime_type"] == "image/png"
