"""The package's error hierarchy.

Every error the package raises on bad input derives from :class:`BelleVLError`, so callers (and agent
frameworks) can catch one type and show the message: each message says what was wrong and what to do next.
Errors about input values also derive from :class:`ValueError`, errors about access from
:class:`PermissionError`, so code that already catches the built-in types keeps working.
"""

from __future__ import annotations


class BelleVLError(Exception):
    """Base class of all errors raised by belle-vl-tools."""


# --- images -------------------------------------------------------------------------------------------------
class ImageError(BelleVLError, ValueError):
    """An image could not be used (base class of the image errors)."""


class ImageNotFoundError(ImageError, FileNotFoundError):
    """A path names no readable file."""


class ImageDecodeError(ImageError):
    """The data is not a readable image (corrupt, truncated, or not an image at all)."""


class UnsupportedImageError(ImageError):
    """The image has a form or mode the loader cannot turn into RGB pixels."""


class ImageTooLargeError(ImageError):
    """The image exceeds the byte or pixel limits of the image policy."""


class InvalidImageDataError(ImageError):
    """A base64 string or data URL is malformed."""


class ImageAccessDeniedError(ImageError, PermissionError):
    """The image policy forbids reading this path or fetching this URL."""


class ImageFetchError(ImageError):
    """An allowed URL could not be fetched (network error, timeout, bad status)."""


# --- model, checkpoint, prompts --------------------------------------------------------------------------------
class CheckpointError(BelleVLError, ValueError):
    """A checkpoint folder or configuration is missing something the model needs, or is damaged: a config value
    outside what the architecture admits (the message names the key), or weights holding NaN or infinities."""


class PromptError(BelleVLError, ValueError):
    """Messages or generation arguments are malformed (wrong roles, bad content parts, bad values)."""


class SamplingError(PromptError):
    """A generation setting has a value outside what it admits; ``param`` names the setting (as
    :class:`~belle_vl_tools.sampling.SamplingParams` calls it)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthError(PromptError):
    """The prompt and the answer asked for do not fit the model's context. ``prompt_tokens``, ``max_new_tokens``
    and ``limit`` (when known) let each front end say which of its own settings to change."""

    def __init__(
        self,
        message: str,
        *,
        prompt_tokens: int | None = None,
        max_new_tokens: int | None = None,
        limit: int | None = None,
    ) -> None:
        super().__init__(message)
        self.prompt_tokens, self.max_new_tokens, self.limit = prompt_tokens, max_new_tokens, limit


class ToolCallParseError(BelleVLError, ValueError):
    """Model output that should hold a tool call could not be parsed."""


class BackendError(BelleVLError, RuntimeError):
    """A backend (local runtime or remote server) failed to produce an answer."""
