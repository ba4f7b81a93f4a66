"""The registry of vision tasks: describe, ask, locate and read-text, each a prompt builder and an answer reader.

Every front end (the backends' ``describe`` / ``ask`` / ``locate`` / ``read_text``, the agent tools, the CLI,
captions, Ray, the MCP server and the web chat) builds its conversation and reads its answer here, so a task is
written once. A task's conversation is one user message: the picture, then the prompt.

This module imports neither torch nor transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from . import prompts
from .errors import PromptError
from .grounding import Box, parse_boxes
from .messages import ImagePart, Message, TextPart

TaskName = Literal["describe", "ask", "locate", "read_text"]


@dataclass(frozen=True)
class VisionTask:
    """One task: how to ask the model (``prompt``) and how to read its answer (``read``)."""

    name: TaskName
    #: One line saying what the task does (the agent tools' descriptions start from it).
    summary: str
    #: The prompt text from the task's arguments; raises PromptError on bad arguments.
    prompt: Callable[..., str]
    #: Reads the answer text for a picture of (width, height) pixels: text for most tasks, boxes for locate.
    read: Callable[[str, tuple[int, int], Mapping[str, Any]], Any]

    def messages(self, image: Any, **arguments: Any) -> list[Message]:
        """The one-turn conversation asking this task about ``image`` (a picture or a reference to one)."""
        return [Message("user", (ImagePart(image), TextPart(self.prompt(**arguments))))]


def _text(answer: str, size: tuple[int, int], arguments: Mapping[str, Any]) -> str:
    return answer.strip()


def _boxes(answer: str, size: tuple[int, int], arguments: Mapping[str, Any]) -> list[Box]:
    width, height = size
    return parse_boxes(answer, width, height, default_label=arguments.get("phrase") or "")


def _describe_prompt(detail: prompts.Detail = "brief", language: prompts.Language = "en") -> str:
    return prompts.describe_prompt(detail, language)


def _ask_prompt(question: str) -> str:
    return prompts.ask_prompt(question)


def _read_text_prompt(language: prompts.Language = "en") -> str:
    return prompts.read_text_prompt(language)


def _locate_prompt(phrase: str, language: prompts.Language | None = None) -> str:
    """``language`` None: the phrase's own language (Chinese when it is mostly CJK)."""
    if not isinstance(phrase, str):
        raise PromptError(f"The phrase to locate must be a string, not {type(phrase).__name__}.")
    return prompts.locate_prompt(phrase, language or prompts.detect_language(phrase))


TASKS: Mapping[str, VisionTask] = MappingProxyType(
    {
        "describe": VisionTask(
            "describe",
            "Describe a picture: what it shows, briefly or in detail, in English or Chinese.",
            _describe_prompt,
            _text,
        ),
        "ask": VisionTask(
            "ask",
            "Answer a question about a picture (what, how many, which color, where, ...).",
            _ask_prompt,
            _text,
        ),
        "locate": VisionTask(
            "locate",
            "Find something in a picture and return its bounding boxes in pixels, as [x1, y1, x2, y2].",
            _locate_prompt,
            _boxes,
        ),
        "read_text": VisionTask(
            "read_text",
            "Read the text visible in a picture (signs, documents, screenshots, labels).",
            _read_text_prompt,
            _text,
        ),
    }
)


def get_task(name: str) -> VisionTask:
    """The task called ``name``; a PromptError lists the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise PromptError(f"Unknown vision task {name!r}: use one of {', '.join(TASKS)}.") from None


__all__ = ["TASKS", "TaskName", "VisionTask", "get_task"]
