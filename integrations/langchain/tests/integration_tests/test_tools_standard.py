"""LangChain's standard integration tests for the four Belle-VL tools, running the tiny checkpoint on a real file."""

from __future__ import annotations

from typing import Any

from belle_vl_tools import ImagePolicy
from langchain_core.tools import BaseTool
from langchain_tests.integration_tests import ToolsIntegrationTests

from langchain_belle_vl import (
    BelleVLDescribeImageTool,
    BelleVLLocateObjectsTool,
    BelleVLReadTextTool,
    BelleVLVisualQATool,
)

from .conftest import SHARED


class _ToolTests(ToolsIntegrationTests):
    @property
    def tool_constructor_params(self) -> dict[str, Any]:
        folder = SHARED["pictures"]["red"].parent
        return {"model": SHARED["model"], "policy": ImagePolicy.restricted(folder), "generation": {"max_new_tokens": 6}}

    @property
    def picture(self) -> str:
        return str(SHARED["pictures"]["red"])


class TestDescribeImageTool(_ToolTests):
    @property
    def tool_constructor(self) -> type[BaseTool]:
        return BelleVLDescribeImageTool

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"image": self.picture, "detail": "brief", "language": "en"}


class TestVisualQATool(_ToolTests):
    @property
    def tool_constructor(self) -> type[BaseTool]:
        return BelleVLVisualQATool

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"image": self.picture, "question": "What shape is it?"}


class TestLocateObjectsTool(_ToolTests):
    @property
    def tool_constructor(self) -> type[BaseTool]:
        return BelleVLLocateObjectsTool

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"image": self.picture, "description": "the red circle"}


class TestReadTextTool(_ToolTests):
    @property
    def tool_constructor(self) -> type[BaseTool]:
        return BelleVLReadTextTool

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"image": self.picture}
