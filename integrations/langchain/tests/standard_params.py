"""What LangChain's standard tests need to know about ChatBelleVL and the four tools, shared by the unit and the
integration suites (each suite adds how to build the model or the tool, and which picture the examples name)."""

from __future__ import annotations

from typing import Any, ClassVar

from langchain_core.tools import BaseTool

from langchain_belle_vl import (
    BelleVLDescribeImageTool,
    BelleVLLocateObjectsTool,
    BelleVLReadTextTool,
    BelleVLVisualQATool,
    ChatBelleVL,
)

#: The arguments of an example call of each tool, besides ``image``.
TOOL_EXAMPLES: dict[type[BaseTool], dict[str, Any]] = {
    BelleVLDescribeImageTool: {"detail": "brief", "language": "en"},
    BelleVLVisualQATool: {"question": "What shape is it?"},
    BelleVLLocateObjectsTool: {"description": "the red circle"},
    BelleVLReadTextTool: {},
}


class ChatBelleVLFlags:
    """ChatBelleVL's class and capability flags, mixed in before ``ChatModelUnitTests`` or
    ``ChatModelIntegrationTests``."""

    @property
    def chat_model_class(self) -> type[ChatBelleVL]:
        return ChatBelleVL

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
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False  # one ChatBelleVL serves one loaded checkpoint

    @property
    def has_tool_choice(self) -> bool:
        return True


class BelleVLToolCase:
    """One tool's class (``tool_class``) and an example call on ``picture``, mixed in before ``ToolsUnitTests`` or
    ``ToolsIntegrationTests``."""

    tool_class: ClassVar[type[BaseTool]]
    picture: str

    @property
    def tool_constructor(self) -> type[BaseTool]:
        return self.tool_class

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"image": self.picture, **TOOL_EXAMPLES[self.tool_class]}
