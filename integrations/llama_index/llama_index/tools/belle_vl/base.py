"""Belle-VL's vision tools as a LlamaIndex tool spec: describe_image, visual_qa, locate_objects, read_text.

The tools are the core ones (:mod:`belle_vl_tools.tools`): the same argument schemas, descriptions and image
policy. An agent chooses the ``image`` argument, so pictures are read only where the policy allows (by default
files under the current folder and no URLs).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any, Literal

from belle_vl_tools.backend import load_backend
from belle_vl_tools.errors import BelleVLError
from belle_vl_tools.images import ImagePolicy
from belle_vl_tools.tools import BelleVLTool, ImageStore, ToolResult, make_tools
from llama_index.core.base.llms.types import ImageBlock, TextBlock
from llama_index.core.tools import FunctionTool
from llama_index.core.tools.tool_spec.base import BaseToolSpec
from llama_index.core.tools.types import ToolMetadata, ToolOutput

__all__ = ["BelleVLToolError", "BelleVLToolSpec", "ToolErrorText"]


class BelleVLToolError(BelleVLError):
    """A Belle-VL tool could not do its work. The tools no longer raise it: a refused path, a bad picture or an
    unknown handle comes back as an error output (:class:`ToolErrorText`); the name stays for code that imports
    it."""


class ToolErrorText(str):
    """What a tool returns when it could not do its work: the message (why, and what to change), with
    ``is_error = True``. As a ``FunctionTool`` of :meth:`BelleVLToolSpec.to_tool_list` it becomes a ``ToolOutput``
    with ``is_error=True``, which agents show to the model, as the LangChain tools and MCP do."""

    is_error = True


def _error_output(tool_name: str) -> Any:
    def callback(raw_output: Any) -> ToolOutput | None:
        if isinstance(raw_output, ToolErrorText):
            return ToolOutput(
                content=str(raw_output), tool_name=tool_name, raw_input={}, raw_output=raw_output, is_error=True
            )
        return None

    return callback


class BelleVLToolSpec(BaseToolSpec):
    """The Belle-VL vision tools for LlamaIndex agents.

    Args:
        model: A core backend (a loaded :class:`belle_vl_tools.BelleVL` or a remote client), the ``BelleVL`` LLM
            of ``llama_index.llms.belle_vl``, a checkpoint folder or a Hub id (None: the demo model).
        image_policy: What pictures the tools may read; default ``ImagePolicy()``: files under the current folder
            only, no URLs.
        store: Pictures an agent may name by handle (``image_1``, ...); one is made when not given.
        tools: Which tools to offer (default: all four).
        generation: Generation settings for the tools (default: greedy, at most 512 new tokens).
        return_images: Whether ``locate_objects`` also returns the picture with the boxes drawn (as an
            ``ImageBlock``), for LLMs that read pictures in tool results, such as ``BelleVL``.
    """

    spec_functions = [
        ("describe_image", "adescribe_image"),
        ("visual_qa", "avisual_qa"),
        ("locate_objects", "alocate_objects"),
        ("read_text", "aread_text"),
    ]

    def __init__(
        self,
        model: Any = None,
        *,
        image_policy: ImagePolicy | None = None,
        store: ImageStore | None = None,
        tools: Sequence[str] | None = None,
        generation: dict[str, Any] | None = None,
        return_images: bool = False,
    ) -> None:
        backend = load_backend(model)
        self.image_policy = image_policy if image_policy is not None else ImagePolicy()
        self.store = store if store is not None else ImageStore()
        self.return_images = return_images
        self._tools: dict[str, BelleVLTool] = make_tools(
            backend, self.image_policy, self.store, names=tools, generation=generation
        )
        self.spec_functions = [pair for pair in type(self).spec_functions if pair[0] in self._tools]

    @property
    def core_tools(self) -> dict[str, BelleVLTool]:
        """The framework-neutral tools behind this spec, by name."""
        return dict(self._tools)

    def to_tool_list(
        self,
        spec_functions: list[Any] | None = None,
        func_to_metadata_mapping: dict[str, ToolMetadata] | None = None,
    ) -> list[FunctionTool]:
        """The tools as ``FunctionTool``s, described by the core tools' descriptions and argument schemas."""
        mapping = {
            name: ToolMetadata(name=name, description=tool.description, fn_schema=tool.args_schema)
            for name, tool in self._tools.items()
        }
        mapping.update(func_to_metadata_mapping or {})
        tools = []
        for spec in spec_functions or self.spec_functions:
            sync_name, async_name = (spec, None) if isinstance(spec, str) else spec
            metadata = mapping.get(sync_name) or self.get_metadata_from_fn_name(sync_name)
            # no metadata: FunctionTool names the tool after the method
            callback = _error_output(metadata.get_name() if metadata is not None else sync_name)

            async def async_callback(raw_output: Any, callback: Any = callback) -> ToolOutput | None:
                return callback(raw_output)

            tools.append(
                FunctionTool.from_defaults(
                    fn=getattr(self, sync_name),
                    async_fn=getattr(self, async_name) if async_name else None,
                    tool_metadata=metadata,
                    callback=callback,
                    async_callback=async_callback,
                )
            )
        return tools

    # --- results ----------------------------------------------------------------------------------------------------
    def _output(self, result: ToolResult) -> str | list[TextBlock | ImageBlock]:
        if result.is_error:
            return ToolErrorText(result.text)
        if self.return_images and result.artifact is not None:
            buffer = io.BytesIO()
            result.artifact.save(buffer, format="PNG")
            return [TextBlock(text=result.text), ImageBlock(image=buffer.getvalue(), image_mimetype="image/png")]
        return result.text

    def _run(self, name: str, **arguments: Any) -> Any:
        return self._output(self._tools[name].run(**arguments))

    async def _arun(self, name: str, **arguments: Any) -> Any:
        return self._output(await self._tools[name].arun(**arguments))

    # --- the tools --------------------------------------------------------------------------------------------------
    def describe_image(
        self, image: str, detail: Literal["brief", "detailed"] = "brief", language: Literal["en", "zh"] = "en"
    ) -> str:
        """Describe a picture: what it shows, briefly or in detail, in English or Chinese.

        Args:
            image: The picture: a handle such as image_1, a file path, a data URL or an allowed http(s) URL.
            detail: 'brief' or 'detailed'.
            language: Answer language: 'en' or 'zh'.
        """
        return self._run("describe_image", image=image, detail=detail, language=language)

    async def adescribe_image(
        self, image: str, detail: Literal["brief", "detailed"] = "brief", language: Literal["en", "zh"] = "en"
    ) -> str:
        """:meth:`describe_image` without blocking the event loop."""
        return await self._arun("describe_image", image=image, detail=detail, language=language)

    def visual_qa(self, image: str, question: str) -> str:
        """Answer a question about a picture (what, how many, which color, where, ...).

        Args:
            image: The picture: a handle such as image_1, a file path, a data URL or an allowed http(s) URL.
            question: The question about the picture.
        """
        return self._run("visual_qa", image=image, question=question)

    async def avisual_qa(self, image: str, question: str) -> str:
        """:meth:`visual_qa` without blocking the event loop."""
        return await self._arun("visual_qa", image=image, question=question)

    def locate_objects(self, image: str, description: str) -> str | list[TextBlock | ImageBlock]:
        """Find something in a picture and return its bounding boxes in pixels, as [x1, y1, x2, y2].

        Args:
            image: The picture: a handle such as image_1, a file path, a data URL or an allowed http(s) URL.
            description: What to find, e.g. 'the red car'.
        """
        return self._run("locate_objects", image=image, description=description)

    async def alocate_objects(self, image: str, description: str) -> str | list[TextBlock | ImageBlock]:
        """:meth:`locate_objects` without blocking the event loop."""
        return await self._arun("locate_objects", image=image, description=description)

    def read_text(self, image: str) -> str:
        """Read the text visible in a picture (signs, documents, screenshots, labels).

        Args:
            image: The picture: a handle such as image_1, a file path, a data URL or an allowed http(s) URL.
        """
        return self._run("read_text", image=image)

    async def aread_text(self, image: str) -> str:
        """:meth:`read_text` without blocking the event loop."""
        return await self._arun("read_text", image=image)
