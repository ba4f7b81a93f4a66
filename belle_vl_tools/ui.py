"""The web chat behind ``belle-vl ui``: talk with Belle-VL about pictures in a browser (Gradio).

The page is a multimodal chat. Pictures are uploaded, pasted or dropped into the message box, questions are asked
in English or Chinese, and answers stream in. Each browser session keeps its own conversation, in which pictures
stay pictures in later turns. Buttons describe the picture (brief or detailed), read its text, or locate a phrase;
a located phrase is shown as the picture with the boxes drawn, and the boxes are listed. "New chat" forgets the
conversation. The side panel holds the generation settings (temperature, most new tokens) and the page names the
model and where it runs.

Scripts use the same app through ``gradio_client``: ``/ask`` (picture, question) -> answer, ``/describe``
(picture, detail, language) -> description, ``/read_text`` (picture, language) -> text, and ``/locate``
(picture, phrase, language) -> boxes and the picture with the boxes drawn.

This module only translates between the page and the core: the backend interface (a local :class:`BelleVL` or a
:class:`RemoteBelleVL`), the task prompts of :mod:`belle_vl_tools.tasks` (the task registry), the task methods of
:class:`~belle_vl_tools.backend.VisionTasks`, the image loader and the box drawing of
:mod:`belle_vl_tools.grounding`. Uploads are read under an :class:`ImagePolicy` (Gradio's upload folder only,
byte and pixel limits), so a corrupt file or a decompression bomb becomes a readable message in the page. Every
error the package raises is shown in the page; the app keeps running.

Gradio is imported here, so import this module only where the web chat is wanted (``pip install
'belle-vl-tools[ui]'``).
"""

from __future__ import annotations

import dataclasses
import html
import logging
import re
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.utils import get_upload_folder
from PIL import Image

from . import prompts
from .backend import Backend, LocateResult, VisionTasks
from .demo import DEMO_MODEL_NAME
from .errors import (
    BelleVLError,
    ImageAccessDeniedError,
    ImageDecodeError,
    ImageError,
    ImageNotFoundError,
    ImageTooLargeError,
    UnsupportedImageError,
)
from .grounding import Box, draw_boxes, parse_boxes, strip_grounding
from .images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImagePolicy, load_image
from .messages import TextPart, parse_messages
from .tasks import get_task

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_PIXELS", "DEFAULT_PORT", "WebChat", "build_app", "launch", "upload_policy"]

logger = logging.getLogger(__name__)

DEFAULT_PORT = 7860
"""The port ``belle-vl ui`` listens on unless told otherwise (Gradio's usual one)."""

ATTACH = "attach one with the paper clip in the message box (or paste or drop it there)"
NO_PICTURE = f"Attach a picture first: {ATTACH}."
NO_PICTURE_FOR = {
    "brief": f"There is no picture to describe yet: {ATTACH}, then press Describe again.",
    "detailed": f"There is no picture to describe yet: {ATTACH}, then press Describe again.",
    "read_text": f"There is no picture to read yet: {ATTACH}, then press Read text again.",
    "locate": f"There is no picture to look in yet: {ATTACH}, then press Locate again.",
}
NO_PICTURE_DEMO = (
    "There is no picture in this conversation yet, and this model only answers questions about pictures: "
    f"{ATTACH}, then ask again."
)
TEXT_ONLY_NOTE = "(No picture in this conversation: answered as a text question.)"
MODEL_FAILED = (
    "The model could not answer this (an internal error, written to the server's log). Try again, or start a new chat."
)
LANGUAGE_CHOICES = [("Auto (from your words)", "auto"), ("English", "en"), ("中文", "zh")]
BOX_HEADERS = ["label", "x1", "y1", "x2", "y2"]

Message = dict[str, Any]
Shown = list[dict[str, Any]]


def upload_policy(max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImagePolicy:
    """The policy uploads are read under: files only from Gradio's upload folder, no URLs, byte and pixel limits."""
    return ImagePolicy.restricted(get_upload_folder(), max_bytes=max_bytes, max_pixels=max_pixels)


def _device_label(backend: Backend) -> str:
    device = getattr(backend, "device", None)
    if device is not None:
        return str(device)
    base_url = getattr(backend, "base_url", None)
    if base_url:
        return f"a server at {base_url}"
    return "unknown"


class _Problem(Exception):
    """Something to tell the person in the conversation, in the page's words (no paths, no library names)."""


def _picture_problem(exc: ImageError, name: str, policy: ImagePolicy) -> str:
    """What was wrong with an uploaded picture and what to do, in the page's words."""
    text = str(exc)
    if isinstance(exc, ImageTooLargeError):
        if "pixels" in text:
            size = re.search(r"(\d+)x(\d+)", text)
            shown = f": {size.group(1)} x {size.group(2)} pixels" if size else ""
            return (
                f"{name} is too large{shown}. This page takes pictures of up to "
                f"{policy.max_pixels / 1e6:g} million pixels: use a smaller picture."
            )
        return (
            f"{name} is too large a file. This page takes files of up to {policy.max_bytes / 2**20:g} MB: use a "
            "smaller or more compressed picture."
        )
    if isinstance(exc, ImageDecodeError):
        return (
            f"{name} could not be read as a picture: the file is damaged, or it is not a picture. Try another "
            "file (PNG, JPEG, WEBP, GIF, BMP or TIFF)."
        )
    if isinstance(exc, UnsupportedImageError):
        return f"{name} is a kind of picture this page cannot use. Save it as PNG or JPEG and try again."
    if isinstance(exc, ImageNotFoundError | ImageAccessDeniedError):
        return f"{name} could not be opened here: upload it again."
    return f"{name} cannot be used as a picture. Try another file (PNG, JPEG, WEBP, GIF, BMP or TIFF)."


def _error(message: str) -> gr.Error:
    """An error shown in the page (a client's mistake or a failure already logged: no traceback in the log)."""
    return gr.Error(message, print_exception=False)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _gradio_message(exc: BaseException) -> str:
    """The text of a gr.Error (its ``message``) or of any other error."""
    message = getattr(exc, "message", None) if isinstance(exc, gr.Error) else None
    return " ".join(str(message).split()) if message else _one_line(exc)


def _files(message: Any) -> list[str]:
    """The paths of the files attached in the message box (Gradio hands them over as paths or file dicts)."""
    if not isinstance(message, dict):
        return []
    paths = []
    for item in message.get("files") or []:
        path = item.get("path") if isinstance(item, dict) else item
        if path:
            paths.append(str(path))
    return paths


def _text(message: Any) -> str:
    return (message.get("text") or "") if isinstance(message, dict) else ""


def _rows(boxes: Sequence[Box]) -> list[list[Any]]:
    return [[box.label, round(box.x1), round(box.y1), round(box.x2), round(box.y2)] for box in boxes]


def _listing(boxes: Sequence[Box], phrase: str, answer: str) -> str:
    if not boxes:
        return f"Nothing found for “{phrase}”. The model answered: {strip_grounding(answer) or answer or '(nothing)'}"
    lines = [f"Found {len(boxes)} box{'es' if len(boxes) != 1 else ''}:"]
    lines += [f"- {box.label or phrase}: ({box.x1:.0f}, {box.y1:.0f}) – ({box.x2:.0f}, {box.y2:.0f})" for box in boxes]
    return "\n".join(lines)


class WebChat:
    """The page's handlers over one backend; :func:`build_app` lays them out in a Gradio page.

    Args:
        backend: The model: a local :class:`~belle_vl_tools.runtime.BelleVL` or a
            :class:`~belle_vl_tools.backends.remote.RemoteBelleVL`.
        image_policy: What uploads may be (default: :func:`upload_policy`).
        drawn_dir: Where pictures with boxes drawn are written for the chat to show (default: a new temporary
            folder).
    """

    def __init__(
        self, backend: Backend, image_policy: ImagePolicy | None = None, drawn_dir: str | Path | None = None
    ) -> None:
        if not isinstance(backend, VisionTasks):
            raise TypeError(
                f"The web chat needs a backend with describe, ask, read_text and locate (a BelleVL, a RemoteBelleVL "
                f"or a subclass of belle_vl_tools.backend.VisionTasks); got {type(backend).__name__}."
            )
        self.backend = backend
        self.tasks: VisionTasks = backend  # the same object, typed for its describe/ask/read_text/locate
        self.image_policy = image_policy or upload_policy()
        self.drawn_dir = Path(drawn_dir) if drawn_dir is not None else Path(tempfile.mkdtemp(prefix="belle-vl-ui-"))
        self.drawn_dir.mkdir(parents=True, exist_ok=True)
        self.model_name = str(backend.model_name)
        self.device = _device_label(backend)

    # --- pictures ------------------------------------------------------------------------------------------------
    def load(self, paths: Sequence[str]) -> list[Image.Image]:
        """The uploaded pictures, read under the upload policy; a bad one stops everything with a Gradio error in
        the page's words (naming the file as the user named it, not where the server keeps it)."""
        try:
            return self._pictures(paths)
        except _Problem as exc:
            raise _error(str(exc)) from None

    def _pictures(self, paths: Sequence[str]) -> list[Image.Image]:
        pictures = []
        for path in paths:
            try:
                pictures.append(load_image(Path(path), self.image_policy))
            except ImageError as exc:
                logger.info("upload refused: %s", _one_line(exc))
                raise _Problem(_picture_problem(exc, Path(path).name, self.image_policy)) from None
        return pictures

    @property
    def pictures_only(self) -> bool:
        """Whether the model answers only questions about pictures (the shipped demo model): a question without
        one is refused politely instead of answered with an invented picture."""
        return self.model_name == DEMO_MODEL_NAME

    @staticmethod
    def _notice(
        shown: Shown, history: list[Message], message: str, user: Any = None, box_after: Any = None
    ) -> Iterator[tuple[Any, ...]]:
        """One message in the conversation that says what was wrong and what to do; nothing else changes (the
        model's conversation is untouched). Yields the page's outputs, as the handlers do."""
        shown_now = [*shown]
        if user:
            shown_now.append({"role": "user", "content": user})
        shown_now.append({"role": "assistant", "content": f"⚠️ {message}"})
        yield (box_after if box_after is not None else gr.skip()), shown_now, history, shown_now, gr.skip(), gr.skip()

    def _load_one(self, picture: Any) -> Image.Image:
        if not picture:
            raise _error("picture is missing: pass one, e.g. handle_file('photo.jpg') from gradio_client.")
        path = picture.get("path") if isinstance(picture, dict) else picture
        return self.load([str(path)])[0]

    def _save_drawn(self, picture: Image.Image) -> str:
        path = self.drawn_dir / f"located-{uuid.uuid4().hex}.png"
        picture.save(path)
        return str(path)

    @staticmethod
    def _latest_picture(history: Sequence[Message]) -> Image.Image | None:
        for message in reversed(parse_messages(list(history))):
            if message.images:
                return message.images[-1]
        return None

    @staticmethod
    def _language(choice: str, text: str) -> prompts.Language:
        if choice in prompts.LANGUAGES:
            return choice
        if choice != "auto":
            raise _error(f"language must be auto, en or zh; got {choice!r}.")
        return prompts.detect_language(text) if text.strip() else "en"

    @staticmethod
    def _last_user_text(history: Sequence[Message]) -> str:
        for message in reversed(parse_messages(list(history))):
            texts = [part.text for part in message.parts if isinstance(part, TextPart)]
            if message.role == "user" and texts:
                return texts[-1]
        return ""

    @staticmethod
    def generation(temperature: float, max_new_tokens: float) -> dict[str, Any]:
        """The generation settings from the side panel (temperature 0 is greedy decoding)."""
        try:
            temperature = float(temperature)
            tokens = int(max_new_tokens)
        except (TypeError, ValueError):
            raise _error(
                f"temperature must be a number >= 0 and max_new_tokens a whole number >= 1; got "
                f"{temperature!r} and {max_new_tokens!r}."
            ) from None
        if temperature < 0 or tokens < 1 or tokens != float(max_new_tokens):
            raise _error(
                f"temperature must be >= 0 and max_new_tokens a whole number >= 1; got {temperature} and "
                f"{max_new_tokens}."
            )
        return {"temperature": temperature, "max_new_tokens": tokens}

    # --- a streamed turn of the chat -----------------------------------------------------------------------------
    def _stream_turn(
        self,
        history: list[Message],
        shown: Shown,
        paths: Sequence[str],
        pictures: Sequence[Image.Image],
        text: str,
        box_after: dict[str, Any],
        generation: dict[str, Any],
    ) -> Iterator[tuple[Any, ...]]:
        """Send one user turn (pictures and text) with the conversation so far and stream the answer into the page.

        Yields the values of (message box, chatbot, history, shown, located picture, located boxes).
        """
        user: Message = {
            "role": "user",
            "content": [{"type": "image", "image": picture} for picture in pictures] + [{"type": "text", "text": text}],
        }
        shown_user = {"role": "user", "content": [{"path": path} for path in paths] + [text]}
        answer = ""
        shown_now = [*shown, shown_user, {"role": "assistant", "content": "…"}]
        yield box_after, shown_now, history, shown, gr.skip(), gr.skip()
        try:
            for chunk in self.backend.stream([*history, user], **generation):
                if chunk.delta:
                    answer += chunk.delta
                    shown_now[-1] = {"role": "assistant", "content": strip_grounding(answer) or "…"}
                    yield gr.skip(), shown_now, gr.skip(), gr.skip(), gr.skip(), gr.skip()
        except BelleVLError as exc:
            shown_now[-1] = self._error_message(exc)
            yield gr.skip(), shown_now, history, shown_now, gr.skip(), gr.skip()
            return
        except Exception as exc:  # the model failed: say so in the page and keep serving
            logger.exception("generation failed")
            shown_now[-1] = self._error_message(exc, unexpected=True)
            yield gr.skip(), shown_now, history, shown_now, gr.skip(), gr.skip()
            return
        new_history = [*history, user, {"role": "assistant", "content": answer}]
        located_image, located_rows = gr.skip(), gr.skip()
        reply: list[Any] = [strip_grounding(answer) or answer]
        picture = self._latest_picture(new_history)
        if picture is None:  # said in the page only: the model's conversation holds its answer as it was
            reply[0] = f"{reply[0]}\n\n{TEXT_ONLY_NOTE}"
        boxes = parse_boxes(answer, *picture.size) if picture is not None else []
        if boxes:  # an answer that points at regions: show them drawn on the latest picture
            drawn = draw_boxes(picture, boxes)
            reply.append({"path": self._save_drawn(drawn)})
            located_image, located_rows = drawn, _rows(boxes)
        shown_now[-1] = {"role": "assistant", "content": reply if len(reply) > 1 else reply[0]}
        yield gr.skip(), shown_now, new_history, shown_now, located_image, located_rows

    @staticmethod
    def _error_message(exc: BaseException, unexpected: bool = False) -> dict[str, Any]:
        what = MODEL_FAILED if unexpected else _one_line(exc)
        return {"role": "assistant", "content": f"⚠️ {what}\n\n(This turn is not kept in the conversation.)"}

    # --- handlers of the page ------------------------------------------------------------------------------------
    def submit(
        self, message: Any, history: list[Message], shown: Shown, temperature: float, max_new_tokens: float
    ) -> Iterator[tuple[Any, ...]]:
        """The user sent the message box: its pictures and question become a turn of the conversation. A problem
        (a bad upload, no question, no picture for a model that needs one) is one message in the conversation."""
        paths, typed = _files(message), _text(message).strip()
        names = "".join(f"📎 {Path(path).name}\n" for path in paths)
        if not typed:
            yield from self._notice(
                shown,
                history,
                "Type a question about the picture in the message box (or press Describe, Read text or Locate).",
            )
            return
        try:
            text = get_task("ask").prompt(question=typed)
            generation = self.generation(temperature, max_new_tokens)
            pictures = self._pictures(paths)
        except _Problem as exc:  # the question stays in the box; the bad picture is taken out of it
            yield from self._notice(shown, history, str(exc), names + typed, {"text": typed, "files": []})
            return
        except (BelleVLError, gr.Error) as exc:
            yield from self._notice(shown, history, _gradio_message(exc), names + typed, {"text": typed, "files": []})
            return
        if not pictures and self._latest_picture(history) is None and self.pictures_only:
            yield from self._notice(shown, history, NO_PICTURE_DEMO, typed, {"text": typed, "files": []})
            return
        yield from self._stream_turn(history, shown, paths, pictures, text, {"text": "", "files": []}, generation)

    def task(
        self,
        kind: str,
        message: Any,
        language: str,
        history: list[Message],
        shown: Shown,
        temperature: float,
        max_new_tokens: float,
    ) -> Iterator[tuple[Any, ...]]:
        """A task button ("brief", "detailed" description or "read_text"): the core's prompt about the pictures
        attached in the message box, or about the pictures already in the conversation. Typed text stays in the box."""
        paths = _files(message)
        box_after = {"text": _text(message), "files": []}
        try:
            generation = self.generation(temperature, max_new_tokens)
            pictures = self._pictures(paths)
            lang = self._language(language, self._last_user_text(history))
            text = (
                get_task("read_text").prompt(language=lang)
                if kind == "read_text"
                else get_task("describe").prompt(detail=kind, language=lang)
            )
        except _Problem as exc:
            yield from self._notice(shown, history, str(exc), None, box_after)
            return
        except (BelleVLError, gr.Error) as exc:
            yield from self._notice(shown, history, _gradio_message(exc), None, box_after)
            return
        if not pictures and self._latest_picture(history) is None:
            yield from self._notice(shown, history, NO_PICTURE_FOR[kind])
            return
        yield from self._stream_turn(history, shown, paths, pictures, text, box_after, generation)

    def locate(
        self,
        message: Any,
        phrase: str,
        language: str,
        history: list[Message],
        shown: Shown,
        temperature: float,
        max_new_tokens: float,
    ) -> Iterator[tuple[Any, ...]]:
        """Locate ``phrase`` in the picture attached in the message box, or else in the latest one of the
        conversation: the picture with the boxes drawn goes to the chat and to the located panel, with the list."""
        paths = _files(message)
        if len(paths) > 1:
            yield from self._notice(
                shown,
                history,
                f"Locate looks in one picture and {len(paths)} are attached: keep one, or send them first and locate "
                "in the latest.",
            )
            return
        phrase = phrase or ""
        if not phrase.strip():
            yield from self._notice(shown, history, "Type what to find next to Locate (e.g. the red circle).")
            return
        try:
            generation = self.generation(temperature, max_new_tokens)
            pictures = self._pictures(paths)
            lang = self._language(language, phrase)
            prompt = get_task("locate").prompt(phrase=phrase, language=lang)
        except _Problem as exc:
            yield from self._notice(shown, history, str(exc), None, {"text": _text(message), "files": []})
            return
        except (BelleVLError, gr.Error) as exc:
            yield from self._notice(shown, history, _gradio_message(exc))
            return
        picture = pictures[0] if pictures else self._latest_picture(history)
        if picture is None:
            yield from self._notice(shown, history, NO_PICTURE_FOR["locate"])
            return
        shown_user = {"role": "user", "content": [{"path": path} for path in paths] + [f"Locate: {phrase.strip()}"]}
        shown_now = [*shown, shown_user, {"role": "assistant", "content": "…"}]
        yield {"text": _text(message), "files": []}, shown_now, history, shown, gr.skip(), gr.skip()
        try:
            result: LocateResult = self.tasks.locate(picture, phrase, language=lang, **generation)
        except BelleVLError as exc:
            shown_now[-1] = self._error_message(exc)
            yield gr.skip(), shown_now, history, shown_now, gr.skip(), gr.skip()
            return
        except Exception as exc:  # the model failed: say so in the page and keep serving
            logger.exception("locate failed")
            shown_now[-1] = self._error_message(exc, unexpected=True)
            yield gr.skip(), shown_now, history, shown_now, gr.skip(), gr.skip()
            return
        drawn = draw_boxes(result.image if result.image is not None else picture, result.boxes)
        user: Message = {
            "role": "user",
            "content": [{"type": "image", "image": image} for image in pictures] + [{"type": "text", "text": prompt}],
        }
        new_history = [*history, user, {"role": "assistant", "content": result.text}]
        listing = _listing(result.boxes, phrase.strip(), result.text)
        shown_now[-1] = {"role": "assistant", "content": [{"path": self._save_drawn(drawn)}, listing]}
        yield gr.skip(), shown_now, new_history, shown_now, drawn, _rows(result.boxes)

    @staticmethod
    def new_chat() -> tuple[Any, ...]:
        """Forget the conversation of this browser session."""
        return {"text": "", "files": []}, [], [], [], None, []

    # --- endpoints for scripts -----------------------------------------------------------------------------------
    def _call(self, what: str, func: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except BelleVLError as exc:
            raise _error(_one_line(exc)) from None
        except Exception as exc:  # the model failed: a readable error for the client, and keep serving
            logger.exception("%s failed", what)
            raise _error(f"The model failed ({type(exc).__name__}): {_one_line(exc)}") from None

    def api_ask(self, picture: Any, question: str, temperature: float, max_new_tokens: float) -> str:
        """The answer to a question about a picture."""
        image = self._load_one(picture)
        generation = self.generation(temperature, max_new_tokens)
        return self._call("ask", self.tasks.ask, image, question or "", **generation).text

    def api_describe(self, picture: Any, detail: str, language: str, temperature: float, max_new_tokens: float) -> str:
        """A brief or detailed description of a picture."""
        image = self._load_one(picture)
        generation = self.generation(temperature, max_new_tokens)
        lang = self._language(language, "")
        describe = self.tasks.describe
        return self._call("describe", describe, image, detail=detail, language=lang, **generation).text

    def api_read_text(self, picture: Any, language: str, temperature: float, max_new_tokens: float) -> str:
        """The text visible in a picture."""
        image = self._load_one(picture)
        generation = self.generation(temperature, max_new_tokens)
        lang = self._language(language, "")
        read_text = self.tasks.read_text
        return self._call("read_text", read_text, image, language=lang, **generation).text

    def api_locate(
        self, picture: Any, phrase: str, language: str, temperature: float, max_new_tokens: float
    ) -> tuple[list[dict[str, Any]], Image.Image]:
        """Boxes (in pixels of the picture) around what ``phrase`` names, and the picture with them drawn."""
        image = self._load_one(picture)
        generation = self.generation(temperature, max_new_tokens)
        lang = self._language(language, phrase or "")
        locate = self.tasks.locate
        result: LocateResult = self._call("locate", locate, image, phrase or "", language=lang, **generation)
        boxes = [dataclasses.asdict(box) | {"grid": list(box.grid)} for box in result.boxes]
        return boxes, draw_boxes(result.image if result.image is not None else image, result.boxes)


CSS = """
#belle-vl-chat { flex-grow: 1; }
#belle-vl-model { opacity: 0.8; }
@media (max-width: 899px) { #belle-vl-title { padding-left: 1.5rem; } }  /* clear of the settings panel's arrow */
"""

#: The settings panel opens beside the page on a wide window; on a narrow one (a phone, a window of 420 px) it would
#: cover the conversation and the buttons, so it starts closed there (its arrow opens it).
NARROW_PX = 900
JS = f"""
() => {{
  if (window.innerWidth >= {NARROW_PX}) return;
  const close = (tries) => {{
    const panel = document.querySelector(".sidebar.open");
    const toggle = panel && panel.querySelector(".toggle-button");
    if (toggle) toggle.click();
    else if (tries > 0) setTimeout(() => close(tries - 1), 100);
  }};
  close(50);
}}
"""


def default_temperature(backend: Backend) -> float:
    """The temperature the page starts at: the one an answer of ``belle-vl ask`` uses when none is given, i.e. the
    checkpoint's generation_config.json (its temperature, 1.0 unless it names one, where it samples; its top_p and
    top_k apply as well), or 0 (greedy) where it does not sample or the backend does not say (a remote server)."""
    config = getattr(backend, "generation_config", None)
    if config is None or not getattr(config, "do_sample", False):
        return 0.0
    return float(getattr(config, "temperature", None) or 1.0)


def _temperature_info(backend: Backend, value: float) -> str:
    config = getattr(backend, "generation_config", None)
    top_p = getattr(config, "top_p", None) if config is not None else None
    if value > 0 and value == default_temperature(backend):
        nucleus = f", with top-p {top_p:g}" if top_p not in (None, 1.0) else ""
        return (
            f"Starts at the model's default, as on the command line ({value:g}{nucleus}). "
            "0 = greedy: the same answer every time."
        )
    return "0 = greedy: the same answer every time."


def build_app(
    backend: Backend,
    *,
    image_policy: ImagePolicy | None = None,
    concurrency_limit: int | None = 1,
    max_new_tokens: int = 512,
    temperature: float | None = None,
    title: str = "Belle-VL",
) -> gr.Blocks:
    """The web chat over ``backend`` as a Gradio app (not yet launched; see :func:`launch`).

    Args:
        backend: The model (local runtime or remote client).
        image_policy: What uploads may be (default: :func:`upload_policy`).
        concurrency_limit: Model calls run at once across all browsers and scripts; the others wait in Gradio's
            queue (1 suits a local model, which answers one at a time anyway; a server batches several).
        max_new_tokens: The side panel's initial "max new tokens".
        temperature: The side panel's initial temperature (0: greedy); None: :func:`default_temperature`, the
            model's own default, which ``belle-vl ask`` uses too.
        title: The page's title.
    """
    chat = WebChat(backend, image_policy)
    if temperature is None:
        temperature = default_temperature(backend)
    temperature_info = _temperature_info(backend, temperature)
    model = {"concurrency_limit": concurrency_limit, "concurrency_id": "belle-vl-model"}
    private = {"api_visibility": "private"}
    with gr.Blocks(title=title, analytics_enabled=False, fill_height=True) as app:
        history = gr.State([])  # the conversation as the model sees it (pictures as pictures)
        shown = gr.State([])  # the conversation as the page shows it
        with gr.Sidebar(label="Settings", open=True):
            temperature_slider = gr.Slider(
                0.0,
                max(2.0, temperature),
                value=temperature,
                step=0.05,
                label="Temperature",
                info=temperature_info,
            )
            tokens = gr.Slider(1, max(2048, max_new_tokens), value=max_new_tokens, step=1, label="Max new tokens")
            language = gr.Radio(
                LANGUAGE_CHOICES, value="auto", label="Language of Describe / Read text / Locate", elem_id="language"
            )
        gr.Markdown(f"## {html.escape(title)}\nAsk about pictures in English or 中文.", elem_id="belle-vl-title")
        gr.Markdown(f"**Model:** `{chat.model_name}` · **Device:** {chat.device}", elem_id="belle-vl-model")
        chatbot = gr.Chatbot(label="Conversation", elem_id="belle-vl-chat", height=460, buttons=["copy"])
        box = gr.MultimodalTextbox(
            file_types=["image"],
            file_count="multiple",
            placeholder="Ask about a picture… (upload, paste or drop pictures here)",
            show_label=False,
            sources=["upload"],
            elem_id="chat-input",
        )
        with gr.Row():
            brief = gr.Button("Describe (brief)", elem_id="describe-brief")
            detailed = gr.Button("Describe (detailed)", elem_id="describe-detailed")
            read = gr.Button("Read text", elem_id="read-text")
            new = gr.Button("New chat", elem_id="new-chat", variant="secondary")
        with gr.Row(equal_height=True):
            phrase = gr.Textbox(
                placeholder="What to find, e.g. the red circle", show_label=False, scale=4, elem_id="locate-phrase"
            )
            find = gr.Button("Locate", variant="primary", scale=1, elem_id="locate")
        with gr.Row():
            located = gr.Image(
                label="Located", type="pil", format="png", interactive=False, height=360, elem_id="located-image"
            )
            located_boxes = gr.Dataframe(
                headers=BOX_HEADERS, label="Boxes (pixels)", interactive=False, elem_id="located-boxes"
            )

        settings = [temperature_slider, tokens]
        outputs = [box, chatbot, history, shown, located, located_boxes]
        box.submit(chat.submit, [box, history, shown, *settings], outputs, api_name="chat_ask", **private, **model)
        for button, kind in ((brief, "brief"), (detailed, "detailed"), (read, "read_text")):

            def run_task(*args: Any, _kind: str = kind) -> Iterator[tuple[Any, ...]]:
                yield from chat.task(_kind, *args)

            button.click(
                run_task,
                [box, language, history, shown, *settings],
                outputs,
                api_name=f"chat_{kind}",
                **private,
                **model,
            )
        locate_inputs = [box, phrase, language, history, shown, *settings]
        find.click(chat.locate, locate_inputs, outputs, api_name="chat_locate", **private, **model)
        phrase.submit(chat.locate, locate_inputs, outputs, api_name="chat_locate_enter", **private, **model)
        new.click(chat.new_chat, None, outputs, api_name="chat_new", **private)
        chatbot.clear(chat.new_chat, None, outputs, api_name="chat_clear", **private)

        # Endpoints for scripts (gradio_client); their inputs are not shown in the page.
        with gr.Group(visible=False):
            api_picture = gr.File(file_types=["image"], type="filepath", label="picture")
            api_text = gr.Textbox(label="question")
            api_phrase = gr.Textbox(label="phrase")
            api_detail = gr.Radio(["brief", "detailed"], value="brief", label="detail")
            api_language = gr.Radio(["auto", "en", "zh"], value="auto", label="language")
            api_answer = gr.Textbox(label="answer")
            api_boxes = gr.JSON(label="boxes")
            api_drawn = gr.Image(type="pil", format="png", label="drawn")
            api_buttons = [gr.Button(visible=False) for _ in range(4)]
        api_buttons[0].click(chat.api_ask, [api_picture, api_text, *settings], api_answer, api_name="ask", **model)
        api_buttons[1].click(
            chat.api_describe,
            [api_picture, api_detail, api_language, *settings],
            api_answer,
            api_name="describe",
            **model,
        )
        api_buttons[2].click(
            chat.api_read_text, [api_picture, api_language, *settings], api_answer, api_name="read_text", **model
        )
        api_buttons[3].click(
            chat.api_locate,
            [api_picture, api_phrase, api_language, *settings],
            [api_boxes, api_drawn],
            api_name="locate",
            **model,
        )
    app.belle_vl_chat = chat
    return app


def _login_everywhere() -> dict[str, Any]:
    """FastAPI settings that put the routes Gradio's ``auth=`` leaves open behind the login (see ``ui_login``)."""
    from starlette.middleware import Middleware

    from .ui_login import LoginRequired

    return {"openapi_url": None, "middleware": [Middleware(LoginRequired)]}


def launch(
    backend: Backend,
    *,
    host: str = "127.0.0.1",
    port: int | None = DEFAULT_PORT,
    share: bool = False,
    auth: tuple[str, str] | None = None,
    image_policy: ImagePolicy | None = None,
    concurrency_limit: int | None = 1,
    max_new_tokens: int = 512,
    temperature: float | None = None,
    block: bool = True,
    quiet: bool = False,
) -> gr.Blocks:
    """Build the web chat and serve it at ``http://host:port`` (Gradio's queue serves several browsers at once).

    ``share`` asks Gradio for a public link; ``auth`` (user, password) puts a login in front of the page, the
    API and every other route of Gradio's that logging in does not need. Uploads larger than the policy's
    ``max_bytes`` are refused by Gradio before they are stored. With ``block=False`` the call returns once the
    server runs (close it with ``app.close()``).
    """
    policy = image_policy or upload_policy()
    app = build_app(
        backend,
        image_policy=policy,
        concurrency_limit=concurrency_limit,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
    )
    app.queue(default_concurrency_limit=concurrency_limit)
    app.launch(
        server_name=host,
        server_port=port,
        share=share,
        auth=auth,
        max_file_size=policy.max_bytes,
        show_error=True,
        ssr_mode=False,
        prevent_thread_lock=True,
        quiet=True,
        css=CSS,
        js=JS,
        allowed_paths=[str(app.belle_vl_chat.drawn_dir)],  # type: ignore[attr-defined]
        app_kwargs=_login_everywhere() if auth else None,
    )
    if not quiet:
        print(f"Belle-VL web chat ({app.belle_vl_chat.model_name}) at {app.local_url}", flush=True)  # type: ignore[attr-defined]
        if app.share_url:
            print(f"Public link: {app.share_url}", flush=True)
    if block:
        app.block_thread()
    return app
