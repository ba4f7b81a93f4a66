"""The Belle-VL vision tools as LangChain tools, and a toolkit that builds them over one model.

Each tool wraps a core tool of :mod:`belle_vl_tools.tools`: the argument schema, the prompts, the image policy
and the image store all live there. A failing call (a refused path, a bad image, an unknown ``image_N`` handle,
a backend error) raises :class:`~langchain_core.tools.ToolException`, which these tools hand back to the agent
as an error message (``handle_tool_error=True``) instead of ending its run.
"""

from __future__ import annotations

import base64
import io
from typing import Any, ClassVar, Literal

from belle_vl_tools.backend import load_backend
from belle_vl_tools.tools import (
    TOOL_NAMES,
    BelleVLTool,
    DescribeImageInput,
    ImageStore,
    LocateObjectsInput,
    ReadTextInput,
    ToolResult,
    VisualQAInput,
)
from langchain_core.callbacks import AsyncCallbackManagerForToolRun, CallbackManagerForToolRun
from langchain_core.tools import BaseTool, BaseToolkit, ToolException
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

__all__ = [
    "BelleVLDescribeImageTool",
    "BelleVLLocateObjectsTool",
    "BelleVLReadTextTool",
    "BelleVLToolkit",
    "BelleVLVisualQATool",
]


#: How the agent may name a picture; the end of every tool's description.
_IMAGE_ARGUMENT = "The image argument is a picture handle such as image_1, a file path, or a data URL."


def _backend(model: Any) -> Any:
    """A backend from what the user passed: a loaded backend, a ChatBelleVL, a checkpoint folder or Hub id (None:
    the demo model); the core's one rule, :func:`belle_vl_tools.backend.load_backend`."""
    return load_backend(model)


def _validation_message(error: Exception) -> str:
    """The agent-facing text for arguments that do not fit the schema: which field, and what is wrong."""
    errors = getattr(error, "errors", None)
    if callable(errors):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'arguments'}: {e['msg']}" for e in errors())
        return f"Error: invalid arguments ({problems}). Fix them and call the tool again."
    return f"Error: invalid arguments ({error}). Fix them and call the tool again."


class _BelleVLBaseTool(BaseTool):
    """Shared plumbing: the core tool is built on first use, so making a tool never loads a model."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    core_name: ClassVar[str]

    model: Any = Field(default=None, exclude=True)
    """A loaded ``BelleVL`` (or other backend), a ``ChatBelleVL``, or a checkpoint path; None: the demo model."""
    policy: Any = Field(default=None, exclude=True)
    """Which images the agent may make the tool read; default ``ImagePolicy()`` (current folder, no URLs)."""
    store: Any = Field(default=None, exclude=True)
    """Pictures of the conversation by handle (``image_1``, ...)."""
    generation: dict[str, Any] | None = None
    """Generation settings (default: greedy, 512 new tokens at most)."""

    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"
    handle_tool_error: bool | str | Any = True
    handle_validation_error: bool | str | Any = Field(default_factory=lambda: _validation_message)

    _core: BelleVLTool | None = PrivateAttr(default=None)

    def __init__(self, **kwargs: Any) -> None:
        core: BelleVLTool | None = kwargs.pop("core", None)
        if core is not None:
            kwargs.setdefault("model", core.model)
            kwargs.setdefault("policy", core.policy)
            kwargs.setdefault("store", core.store)
            kwargs.setdefault("generation", core.generation)
        super().__init__(**kwargs)
        if self.store is None:
            self.store = ImageStore()
        self._core = core

    @property
    def core(self) -> BelleVLTool:
        """The framework-neutral tool behind this one."""
        if self._core is None:
            self._core = BelleVLTool(
                self.core_name,
                _backend(self.model),
                policy=self.policy,
                store=self.store,
                generation=self.generation,
                description=self.description,
            )
        return self._core

    def _reply(self, result: ToolResult) -> tuple[str | list[dict[str, Any]], dict[str, Any]]:
        if result.is_error:
            raise ToolException(result.text)
        artifact = {**result.data, "text": result.text}
        if result.artifact is not None:
            artifact["image"] = result.artifact
        return result.text, artifact

    def _run(self, *args: Any, run_manager: CallbackManagerForToolRun | None = None, **kwargs: Any) -> Any:
        return self._reply(self.core.run(**kwargs))

    async def _arun(self, *args: Any, run_manager: AsyncCallbackManagerForToolRun | None = None, **kwargs: Any) -> Any:
        return self._reply(await self.core.arun(**kwargs))


class BelleVLDescribeImageTool(_BelleVLBaseTool):
    """Describe a picture with Belle-VL."""

    core_name: ClassVar[str] = "describe_image"
    name: str = "describe_image"
    description: str = (
        "Describe a picture: what it shows, briefly or in detail, in English or Chinese. " + _IMAGE_ARGUMENT
    )
    args_schema: type[BaseModel] = DescribeImageInput


class BelleVLVisualQATool(_BelleVLBaseTool):
    """Answer a question about a picture with Belle-VL."""

    core_name: ClassVar[str] = "visual_qa"
    name: str = "visual_qa"
    description: str = "Answer a question about a picture (what, how many, which color, where). " + _IMAGE_ARGUMENT
    args_schema: type[BaseModel] = VisualQAInput


class BelleVLLocateObjectsTool(_BelleVLBaseTool):
    """Find things in a picture with Belle-VL: boxes in pixels, and the picture with the boxes drawn."""

    core_name: ClassVar[str] = "locate_objects"
    name: str = "locate_objects"
    description: str = (
        "Find something in a picture and get its bounding boxes in pixels as [x1, y1, x2, y2]. " + _IMAGE_ARGUMENT
    )
    args_schema: type[BaseModel] = LocateObjectsInput
    return_image: bool = False
    """Also send the picture with the boxes drawn back to the agent's model, as an image block (only for a
    reasoning model that reads images). The drawing is always in the artifact, under "image"."""

    def _reply(self, result: ToolResult) -> tuple[str | list[dict[str, Any]], dict[str, Any]]:
        text, artifact = super()._reply(result)
        if not self.return_image or result.artifact is None:
            return text, artifact
        buffer = io.BytesIO()
        result.artifact.save(buffer, format="PNG")
        image = {"type": "image", "base64": base64.b64encode(buffer.getvalue()).decode(), "mime_type": "image/png"}
        return [{"type": "text", "text": result.text}, image], artifact


class BelleVLReadTextTool(_BelleVLBaseTool):
    """Read the text in a picture with Belle-VL."""

    core_name: ClassVar[str] = "read_text"
    name: str = "read_text"
    description: str = "Read the text visible in a picture (signs, documents, screenshots, labels). " + _IMAGE_ARGUMENT
    args_schema: type[BaseModel] = ReadTextInput


_TOOL_CLASSES: dict[str, type[_BelleVLBaseTool]] = {
    "describe_image": BelleVLDescribeImageTool,
    "visual_qa": BelleVLVisualQATool,
    "locate_objects": BelleVLLocateObjectsTool,
    "read_text": BelleVLReadTextTool,
}


class BelleVLToolkit(BaseToolkit):
    """The four Belle-VL tools over one model, one image policy and one image store.

    ``BelleVLToolkit(model=BelleVL.from_pretrained(...), policy=ImagePolicy.restricted("./photos"))``; ``model``
    may also be a ``ChatBelleVL`` or a checkpoint path (loaded on first use). :meth:`add_image` gives a picture a
    handle (``image_1``, ...) that the agent can pass as the ``image`` argument.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: Any = None
    policy: Any = None
    store: Any = Field(default_factory=ImageStore)
    generation: dict[str, Any] | None = None
    names: list[str] = Field(default_factory=lambda: list(TOOL_NAMES))
    """Which tools :meth:`get_tools` returns."""

    _tools: list[BaseTool] | None = PrivateAttr(default=None)

    def add_image(self, source: Any, handle: str | None = None) -> str:
        """Keep a picture (path, bytes, data URL, PIL image) and return the handle the agent can use."""
        return self.store.add(source, handle)

    def get_tools(self) -> list[BaseTool]:
        """The tools, sharing this toolkit's model, policy and store."""
        if self._tools is None:
            unknown = [name for name in self.names if name not in _TOOL_CLASSES]
            if unknown:
                raise ValueError(f"Unknown tool name(s) {unknown}: choose from {', '.join(TOOL_NAMES)}.")
            self._tools = [
                _TOOL_CLASSES[name](model=self.model, policy=self.policy, store=self.store, generation=self.generation)
                for name in self.names
            ]
        return list(self._tools)
