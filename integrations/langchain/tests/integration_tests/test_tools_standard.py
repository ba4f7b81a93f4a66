"""LangChain's standard integration tests for the four Belle-VL tools, running the tiny checkpoint on a real file."""

from __future__ import annotations

from typing import Any

from belle_vl_tools import ImagePolicy
from langchain_tests.integration_tests import ToolsIntegrationTests

from langchain_belle_vl import (
    BelleVLDescribeImageTool,
    BelleVLLocateObjectsTool,
    BelleVLReadTextTool,
    BelleVLVisualQATool,
)

from ..standard_params import BelleVLToolCase
from .conftest import SHARED


class _ToolTests(BelleVLToolCase, ToolsIntegrationTests):
    @property
    def tool_constructor_params(self) -> dict[str, Any]:
        folder = SHARED["pictures"]["red"].parent
        return {"model": SHARED["model"], "policy": ImagePolicy.restricted(folder), "generation": {"max_new_tokens": 6}}

    @property
    def picture(self) -> str:
        return str(SHARED["pictures"]["red"])


class TestDescribeImageTool(_ToolTests):
    tool_class = BelleVLDescribeImageTool


class TestVisualQATool(_ToolTests):
    tool_class = BelleVLVisualQATool


class TestLocateObjectsTool(_ToolTests):
    tool_class = BelleVLLocateObjectsTool


class TestReadTextTool(_ToolTests):
    tool_class = BelleVLReadTextTool
