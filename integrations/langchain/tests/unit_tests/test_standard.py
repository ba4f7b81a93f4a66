"""LangChain's standard unit tests for ChatBelleVL and the four tools (nothing is loaded: models load lazily)."""

from __future__ import annotations

from typing import Any

from langchain_tests.unit_tests import ChatModelUnitTests, ToolsUnitTests

from langchain_belle_vl import (
    BelleVLDescribeImageTool,
    BelleVLLocateObjectsTool,
    BelleVLReadTextTool,
    BelleVLVisualQATool,
)

from ..standard_params import BelleVLToolCase, ChatBelleVLFlags

CHECKPOINT = "BELLE-2/BELLE-VL"  # named, never loaded by these tests


class TestChatBelleVLUnit(ChatBelleVLFlags, ChatModelUnitTests):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": CHECKPOINT}


class _ToolTests(BelleVLToolCase, ToolsUnitTests):
    picture = "image_1"

    @property
    def tool_constructor_params(self) -> dict[str, Any]:
        return {"model": CHECKPOINT}


class TestDescribeImageToolUnit(_ToolTests):
    tool_class = BelleVLDescribeImageTool


class TestVisualQAToolUnit(_ToolTests):
    tool_class = BelleVLVisualQATool


class TestLocateObjectsToolUnit(_ToolTests):
    tool_class = BelleVLLocateObjectsTool


class TestReadTextToolUnit(_ToolTests):
    tool_class = BelleVLReadTextTool
