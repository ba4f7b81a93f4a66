"""LangChain's standard unit tests for ChatBelleVL and the four tools (nothing is loaded: models load lazily)."""

from __future__ import annotations

from typing import Any

from langchain_core.tools import BaseTool
from langchain_tests.unit_tests import ChatModelUnitTests, ToolsUnitTests

from langchain_belle_vl import (
    BelleVLDescribeImageTool,
    BelleVLLocateObjectsTool,
    BelleVLReadTextTool,
    BelleVLVisualQATool,
    ChatBelleVL,
)

CHECKPOINT = "BELLE-2/BELLE-VL"  # named, never loaded by these tests


class TestChatBelleVLUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatBelleVL]:
        return ChatBelleVL

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": CHECKPOINT}

    @property
    def supports_image_inputs(self) -> bool:
        return True

    @property
    def supports_image_urls(self) -> bool:
        return True

    @property
    def supports_image_tool_message(self) -> bool:
        return True

    @property
    def supports_anthropic_inputs(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False


class _ToolTests(ToolsUnitTests):
    @property
    def tool_constructor_params(self) -> dict[str, Any]:
        return {"model": CHECKPOINT}


class TestDescribeImageToolUnit(_ToolTests):
    @property
    def tool_constructor(self) -> type[BaseTool]:
        return BelleVLDescribeImageTool

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"image": "image_1", "detail": "detailed", "language": "zh"}


class TestVisualQAToolUnit(_ToolTests):
    @property
    def tool_constructor(self) -> type[BaseTool]:
        return BelleVLVisualQATool

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"image": "photos/street.jpg", "question": "How many cars are there?"}


class TestLocateObjectsToolUnit(_ToolTests):
    @property
    def tool_constructor(self) -> type[BaseTool]:
        return BelleVLLocateObjectsTool

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"image": "image_2", "description": "the red car"}


class TestReadTextToolUnit(_ToolTests):
    @property
    def tool_constructor(self) -> type[BaseTool]:
        return BelleVLReadTextTool

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"image": "data:image/png;base64,iVBORw0KGgo="}
