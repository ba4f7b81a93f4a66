"""The ``belle-vl`` command: ask about, describe, locate in and read pictures, chat, caption folders, run MME.

Starting is cheap: this module imports neither torch nor transformers, so ``--help``, ``--version``, ``eval mme
--results`` and a ``caption`` run whose pictures are all cached answer at once. Every command that needs the model
loads it only when it has work for it, and a bad picture, a bad ``--model`` or a bad ``--device`` fails before any
loading. The CLI reads any local file its user names; pictures also come from stdin (``-``), as data URLs, and as
http(s) URLs with ``--allow-urls`` (public addresses only, fetched under the image policy's guards).

Exit codes: 0 success, 1 bad input or a failure with a typed error (one ``error: ...`` line on stderr, no
traceback), 2 wrong usage (unknown option, missing argument), 130 interrupted.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from . import __version__
from .errors import BelleVLError, CheckpointError, ImageAccessDeniedError, ImageNotFoundError
from .finetune.command import finetune_command
from .prompts import Detail, Language

if TYPE_CHECKING:
    from rich.status import Status

    from .backend import ChatResult
    from .images import ImagePolicy
    from .messages import Message

F = TypeVar("F", bound=Callable[..., Any])

MODEL_PANEL = "Model options"
GENERATION_PANEL = "Generation options"
PICTURE_PANEL = "Picture options"


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Quantize(str, Enum):
    int8 = "int8"


# --- options shared by the commands (accepted before the command name too) ----------------------------------------
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Checkpoint folder or Hub id. [default: the shipped demo model]",
        rich_help_panel=MODEL_PANEL,
        show_default=False,
    ),
]
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        help='Where to run the model: "cpu", "cuda", "cuda:1", ... [default: cpu]', rich_help_panel=MODEL_PANEL
    ),
]
DTypeOpt = Annotated[
    DType | None,
    typer.Option(
        help="Weights' precision. [default: auto, from the checkpoint's flags; with none, bfloat16 on a CPU that "
        "computes it natively, else float32 on a CPU] float32 gives the reference's exact numbers.",
        rich_help_panel=MODEL_PANEL,
        show_default=False,
    ),
]
QuantizeOpt = Annotated[
    Quantize | None,
    typer.Option(
        help="Store the language model's linear weights as int8 (torchao weight-only; the vision tower keeps its "
        "precision). [default: none]",
        rich_help_panel=MODEL_PANEL,
        show_default=False,
    ),
]
AdapterOpt = Annotated[
    str | None,
    typer.Option(
        "--adapter",
        help="A LoRA adapter folder (what `belle-vl finetune --out` wrote), merged into the model as it loads.",
        rich_help_panel=MODEL_PANEL,
        show_default=False,
    ),
]
RemoteOpt = Annotated[
    str | None,
    typer.Option(help="Use a `belle-vl serve` server at this URL instead of a local model.", show_default=False),
]
RemoteKeyOpt = Annotated[
    str | None,
    typer.Option(envvar="BELLE_VL_REMOTE_API_KEY", help="The --remote server's API key.", show_default=False),
]
MaxNewTokensOpt = Annotated[
    int | None,
    typer.Option("--max-new-tokens", min=1, help="Most tokens to generate per answer.", rich_help_panel=MODEL_PANEL),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        help="Show the libraries' warnings and progress bars while the model loads.",
        show_default=False,
    ),
]
TemperatureOpt = Annotated[
    float | None,
    typer.Option(
        min=0.0,
        help="Sampling temperature; 0 answers greedily (the same answer every time). [default: the model's]",
        rich_help_panel=GENERATION_PANEL,
        show_default=False,
    ),
]
TopPOpt = Annotated[
    float | None,
    typer.Option(
        "--top-p",
        max=1.0,
        help="Sample from the smallest set of tokens whose probabilities add up to this. [default: the model's]",
        rich_help_panel=GENERATION_PANEL,
        show_default=False,
    ),
]
SeedOpt = Annotated[
    int | None,
    typer.Option(help="Seed of the sampler, for answers that repeat.", rich_help_panel=GENERATION_PANEL),
]
AllowUrlsOpt = Annotated[
    bool,
    typer.Option(
        "--allow-urls",
        help="Fetch pictures given as http(s) URLs (public addresses only).",
        rich_help_panel=PICTURE_PANEL,
        show_default=False,
    ),
]
MaxPixelsOpt = Annotated[
    int | None,
    typer.Option(
        "--max-pixels",
        min=1,
        help="Largest picture accepted, in pixels (width x height). [default: 40,000,000]",
        rich_help_panel=PICTURE_PANEL,
        show_default=False,
    ),
]
MaxImageBytesOpt = Annotated[
    int | None,
    typer.Option(
        "--max-image-bytes",
        min=1,
        help="Largest picture file accepted, in bytes. [default: 20 MiB]",
        rich_help_panel=PICTURE_PANEL,
        show_default=False,
    ),
]


@dataclass
class Settings:
    model: str | None = None
    device: str | None = None
    dtype: DType | None = None
    quantize: Quantize | None = None
    max_new_tokens: int | None = None
    json: bool = False
    verbose: bool = False
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    allow_urls: bool = False
    max_pixels: int | None = None
    max_image_bytes: int | None = None
    adapter: str | None = None

    def merged(self, **local: Any) -> Settings:
        """These settings with the options given to the command itself taking precedence (an option left out,
        None or False, keeps the earlier value; 0 is a value)."""
        values = {k: v for k, v in local.items() if v is not None and v is not False}
        return Settings(**{**self.__dict__, **values})

    @property
    def generation(self) -> dict[str, Any]:
        """The generation arguments the user set (the model's own defaults hold for the others)."""
        names = ("max_new_tokens", "temperature", "top_p", "seed")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    @property
    def image_policy(self) -> ImagePolicy:
        """What the CLI may read: any local file; http(s) URLs only with ``--allow-urls``."""
        from .images import ImagePolicy

        limits = {"max_pixels": self.max_pixels, "max_bytes": self.max_image_bytes}
        return ImagePolicy.trusted(allow_urls=self.allow_urls, **{k: v for k, v in limits.items() if v is not None})


# Options every model command takes besides the model ones; added to each command's signature by
# ``_with_options`` (and taken by the root too), gathered into the root's Settings before the command runs.
_PICTURE_OPTIONS: dict[str, Any] = {
    "allow_urls": (AllowUrlsOpt, False),
    "max_pixels": (MaxPixelsOpt, None),
    "max_image_bytes": (MaxImageBytesOpt, None),
}
_GENERATION_OPTIONS: dict[str, Any] = {
    "temperature": (TemperatureOpt, None),
    "top_p": (TopPOpt, None),
    "seed": (SeedOpt, None),
}
_VERBOSE_OPTION: dict[str, Any] = {"verbose": (VerboseOpt, False)}
#: The model-loading options every command that loads a local model takes (besides --model, --device, --dtype).
_LOAD_OPTIONS: dict[str, Any] = {"quantize": (QuantizeOpt, None), "adapter": (AdapterOpt, None)}


def _with_options(*groups: dict[str, Any]) -> Callable[[F], F]:
    """Add the options of ``groups`` to a command (keyword-only, after its own); their values are merged into the
    root's :class:`Settings` (so ``_settings`` sees them) instead of being passed to the command."""
    extra = {name: spec for group in groups for name, spec in group.items()}

    def decorate(func: F) -> F:
        signature = inspect.signature(func, eval_str=True)
        params = list(signature.parameters.values())
        params += [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
            for name, (annotation, default) in extra.items()
        ]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {name: kwargs.pop(name, None) for name in extra}
            ctx = kwargs.get("ctx")
            if ctx is not None and hasattr(ctx, "find_root"):
                root = ctx.find_root()
                base = root.obj if isinstance(root.obj, Settings) else Settings()
                root.obj = base.merged(**values)
            return func(*args, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {
            **{p.name: p.annotation for p in params},
            "return": signature.return_annotation,
        }
        return wrapper  # type: ignore[return-value]

    return decorate


app = typer.Typer(
    name="belle-vl",
    help="Ask Belle-VL / Qwen-VL about pictures: answers, descriptions, boxes, text, captions and MME scores.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
eval_app = typer.Typer(help="Run benchmarks and score their answers.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(eval_app, name="eval")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"belle-vl {__version__}")
        raise typer.Exit()


@app.callback()
@_with_options(_GENERATION_OPTIONS, _PICTURE_OPTIONS, _VERBOSE_OPTION, _LOAD_OPTIONS)
def _root(
    ctx: typer.Context,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DTypeOpt = None,
    max_new_tokens: MaxNewTokensOpt = None,
    json_output: JsonOpt = False,
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """Ask Belle-VL / Qwen-VL about pictures: answers, descriptions, boxes, text, captions and MME scores.

    The model options may come before the command or after it: belle-vl --model DIR ask photo.jpg "Who is there?"
    """
    base = ctx.obj if isinstance(ctx.obj, Settings) else Settings()
    ctx.obj = base.merged(model=model, device=device, dtype=dtype, max_new_tokens=max_new_tokens, json=json_output)


def _settings(ctx: typer.Context, **local: Any) -> Settings:
    root = ctx.find_root().obj
    return (root if isinstance(root, Settings) else Settings()).merged(**local)


# --- errors ----------------------------------------------------------------------------------------------------------
def _one_line(message: str, limit: int = 600) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {_one_line(message)}", err=True)
    raise typer.Exit(code)


# The image loader's hints speak to Python callers (ImagePolicy fields); on the command line they name flags.
_HINTS: tuple[tuple[str, str], ...] = (
    (r"ImagePolicy\.max_pixels=([\d,]+)", r"--max-pixels \1"),
    (r"raise both that limit and ImagePolicy\.max_pixels", "use a smaller picture"),
    (r"raise max_pixels", "raise --max-pixels"),
    (r"or lower max_new_tokens\.", "or lower --max-new-tokens."),
    (r"ImagePolicy\.max_bytes=([\d,]+)", r"--max-image-bytes \1"),
    (r"raise max_bytes", "raise --max-image-bytes"),
    (r"enable URLs with ImagePolicy\(allow_urls=True\)", "add --allow-urls to fetch it"),
    (r"\(if you configure the tool\) ", ""),
    (r", or add the format to ImagePolicy\(allowed_formats=\.\.\.\)", ""),
    (r" If it is another format Pillow can read, allow it with ImagePolicy\(allowed_formats=None\)\.", ""),
    (
        r"; to allow this host, configure ImagePolicy\([^;]*?\) or ImagePolicy\([^)]*\)\.",
        ", or download it and pass the file.",
    ),
    (
        r"pass the image as a URL or base64 data",
        "pass '-' with the picture on stdin, a data URL, or an http(s) URL with --allow-urls",
    ),
    (r"Pass a local path or base64 data instead", "Pass a local path or a data URL instead"),
    (r"a data URL or base64 data", "a data URL or '-' (stdin)"),
    (r" \(local paths are checked against ImagePolicy\.allowed_roots\)", ""),
    (r"or use another cache file", "or name another one with --cache PATH"),
)


def _cli_hints(message: str) -> str:
    """``message`` with the hints that name Python settings rewritten to name the CLI's flags; any sentence still
    naming a Python setting is left out."""
    for pattern, replacement in _HINTS:
        message = re.sub(pattern, replacement, message)
    if "ImagePolicy" in message:
        sentences = re.split(r"(?<=[.!?])\s+", message)
        kept = [s for s in sentences if "ImagePolicy" not in s]
        message = " ".join(kept) if kept else message.replace("ImagePolicy.", "the limit ")
    return message


class _Interrupts:
    """Ctrl-C, the same for every command: the first one raises KeyboardInterrupt where the command is (chat catches
    it to stop an answer), and the command ends with one ``interrupted`` line and exit code 130.

    Python drops a KeyboardInterrupt that arrives while a finalizer or a generator's clean-up runs ("Exception
    ignored in ..."), and the command would then go on and exit 0: :func:`main` remembers the interrupt and exits 130
    all the same. A second Ctrl-C while the first is handled (threads joining, say), or one while the process shuts
    down, ends the process at once, with the same line and code.
    """

    def __init__(self) -> None:
        self.pending = 0  # interrupts not yet handled by the command
        self.closing = False  # the command is over: the process only shuts down
        self._said = False

    def install(self) -> None:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGINT, self._on_signal)
        default_hook = sys.unraisablehook

        def hook(unraisable: Any) -> None:  # a dropped KeyboardInterrupt: counted above, no "Exception ignored"
            if not isinstance(unraisable.exc_value, KeyboardInterrupt):
                default_hook(unraisable)

        sys.unraisablehook = hook

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.pending += 1
        if self.pending > 1 or self.closing:
            self.exit_now()
        raise KeyboardInterrupt

    def handled(self) -> None:
        """The command dealt with the interrupt and goes on (the chat after a stopped answer)."""
        self.pending = 0

    def say(self) -> None:
        if not self._said:
            self._said = True
            # In a terminal the line ends what was on screen (a partial answer, the echoed ^C) first.
            typer.echo(f"{chr(10) if sys.stderr.isatty() else ''}interrupted", err=True)

    def exit_now(self) -> None:
        self.say()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(130)


_interrupts = _Interrupts()


def _handles_errors(func: F) -> F:
    """Turn the package's typed errors (and file system errors) into one ``error: ...`` line and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except BelleVLError as exc:
            _fail(_cli_hints(str(exc)))
        except OSError as exc:
            _fail(f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}")
        except KeyboardInterrupt:
            _interrupts.say()
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


# --- model and pictures ----------------------------------------------------------------------------------------------
# A Hub id: "name" or "owner/name" of letters, digits, "-", "_" and "." (no "--" or ".." runs, at most 96 long).
_HUB_ID = re.compile(r"^(?!.*(?:--|\.\.))[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(?:/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")


def _check_model(model: str | None) -> None:
    """Fail early (no torch import) when ``--model`` names neither a folder nor a possible Hub id."""
    if model is None:
        return
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            _fail(f"--model {model}: this is a file, not a checkpoint folder (config.json, weights) or a Hub id.")
        return
    if not _HUB_ID.match(model):
        _fail(
            f"--model {model}: no such folder, and not a Hub id (owner/name) either. Name a checkpoint folder "
            "(config.json, weights) or a Hub id, or leave --model out for the shipped demo model."
        )


def _check_adapter(adapter: str | None) -> None:
    """Fail early (no torch import) when ``--adapter`` names no adapter folder."""
    if adapter is None:
        return
    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").is_file():
        what = "no such folder" if not path.exists() else "no adapter_config.json in it"
        _fail(
            f"--adapter {adapter}: {what}. Name the folder `belle-vl finetune --out` wrote "
            "(adapter_config.json, adapter_model.safetensors)."
        )


def _available_devices(torch: Any) -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def _check_device(device: str | None, torch: Any) -> None:
    """Fail with the devices this machine has when ``--device`` names one it lacks."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        _fail(f"--device {device}: not a device name. Use cpu, cuda, cuda:N or mps.")
    available = _available_devices(torch)
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            _fail(f"--device {device}: {why}. Available here: {', '.join(available)}.")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            _fail(f"--device {device}: there is no such CUDA device. Available here: {', '.join(available)}.")
    elif parsed.type == "mps" and "mps" not in available:
        _fail(f"--device {device}: MPS is not available here. Available here: {', '.join(available)}.")
    elif parsed.type not in ("cpu", "cuda", "mps", "meta"):
        _fail(f"--device {device}: not supported by the CLI. Available here: {', '.join(available)}.")


def _model_path(settings: Settings) -> str:
    if settings.model:
        return settings.model
    from .demo import default_model_path

    return str(default_model_path())


def _load_backend(settings: Settings) -> Any:
    """The local runtime for the settings' model (imports torch only now). Every failure is one CheckpointError."""
    _check_model(settings.model)
    _check_adapter(settings.adapter)
    try:
        import torch

        from .runtime import BelleVL
    except ImportError as exc:
        raise CheckpointError(
            f"The local runtime needs torch and transformers ({exc}): pip install 'belle-vl-tools[local]'."
        ) from None
    _check_device(settings.device, torch)
    dtype = settings.dtype.value if settings.dtype not in (None, DType.auto) else None
    shown = settings.model or "the demo model"
    with _status(f"Loading {shown}"):
        try:
            # No path for the demo model, so it keeps its published name (belle-vl-demo) in answers.
            return BelleVL.from_pretrained(
                settings.model,
                device=settings.device,
                dtype=dtype,
                image_policy=settings.image_policy,
                verbose=settings.verbose,
                quantize=settings.quantize.value if settings.quantize is not None else None,
                adapter=settings.adapter,
            )
        except BelleVLError:
            raise
        except Exception as exc:  # a loader's own error of any kind: one line, never a traceback
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise CheckpointError(
                f"Could not load the model {shown!r} ({type(exc).__name__}: {_one_line(detail, 300)})."
            ) from None


class _status:
    """A spinner on stderr while something slow runs (only when stderr is a terminal)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._status: Status | None = None

    def __enter__(self) -> _status:
        from .captions import ProgressBar

        if sys.stderr.isatty() and not ProgressBar.active:
            from rich.console import Console

            self._status = Console(stderr=True).status(self.text)
            self._status.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._status is not None:
            self._status.__exit__(*exc)


_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _picture(image: str, settings: Settings | None = None) -> Any:
    """Load the picture a command names: a file path, ``-`` (the bytes on stdin), a data URL, or an http(s) URL
    (with ``--allow-urls``)."""
    from .images import load_image

    settings = settings or Settings()
    policy = settings.image_policy
    if image == "-":
        data = sys.stdin.buffer.read()
        if not data:
            raise ImageNotFoundError("No picture on stdin: pipe the picture's bytes in, e.g. belle-vl ask - Q < x.png.")
        return load_image(data, policy)
    if image[:5].lower() == "data:":
        return load_image(image, policy)
    match = _URL_SCHEME.match(image)
    if match:
        scheme = match.group(1).lower()
        if scheme not in ("http", "https"):
            raise ImageAccessDeniedError(
                f"{scheme}:// URLs are not read: give a file path, '-' for stdin, a data URL, or an http(s) URL "
                "with --allow-urls."
            )
        if not settings.allow_urls:
            raise ImageAccessDeniedError(f"{image} is a URL: add --allow-urls to fetch it (public addresses only).")
        return load_image(image, policy)
    return load_image(Path(image), policy)


def _model_key(settings: Settings) -> str:
    """The model part of the caption cache key: :func:`~belle_vl_tools.captions.checkpoint_key` of the checkpoint
    (a Hub id as it is), with the generation settings that change the captions when they are set."""
    from .captions import checkpoint_key

    key = checkpoint_key(Path(_model_path(settings)))
    if settings.adapter:
        key += f" adapter={checkpoint_key(Path(settings.adapter))}"
    for name, value in settings.generation.items():
        if name != "temperature" or value != 0:  # captions are greedy unless a temperature says otherwise
            key += f" {name}={value}"
    return key


# --- output --------------------------------------------------------------------------------------------------------
def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, ensure_ascii=False))


def _result_dict(result: ChatResult) -> dict[str, Any]:
    return {
        "text": result.text,
        "finish_reason": result.finish_reason,
        "usage": result.usage.as_dict(),
        "model": result.model,
    }


def _answer(backend: Any, messages: Sequence[Message | dict[str, Any]], settings: Settings, **extra: Any) -> str:
    """Print the answer (streamed as text, or one JSON object) and return its text."""
    generation = {**settings.generation, **extra}
    if settings.json:
        result = backend.chat(messages, **generation)
        _print_json(_result_dict(result))
        return result.text
    text = []
    for chunk in backend.stream(messages, **generation):
        if chunk.delta:
            sys.stdout.write(chunk.delta)
            sys.stdout.flush()
            text.append(chunk.delta)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(text)


# --- commands ------------------------------------------------------------------------------------------------------
ImageArg = Annotated[
    str,
    typer.Argument(
        help="The picture: a file path, - (its bytes on stdin), a data URL, or an http(s) URL with --allow-urls.",
        show_default=False,
    ),
]
MODEL_OPTIONS = (_GENERATION_OPTIONS, _PICTURE_OPTIONS, _VERBOSE_OPTION, _LOAD_OPTIONS)
LanguageOpt = Annotated[Language, typer.Option(help="Language of the prompt (and so of the answer).")]


@app.command()
@_handles_errors
@_with_options(*MODEL_OPTIONS)
def ask(
    ctx: typer.Context,
    image: ImageArg,
    question: Annotated[str, typer.Argument(help="The question about the picture.", show_default=False)],
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DTypeOpt = None,
    max_new_tokens: MaxNewTokensOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Answer a question about a picture."""
    from .tasks import get_task

    settings = _settings(ctx, model=model, device=device, dtype=dtype, max_new_tokens=max_new_tokens, json=json_output)
    messages = get_task("ask").messages(_picture(image, settings), question=question)
    _answer(_load_backend(settings), messages, settings)


@app.command()
@_handles_errors
@_with_options(*MODEL_OPTIONS)
def describe(
    ctx: typer.Context,
    image: ImageArg,
    detail: Annotated[Detail, typer.Option(help="A short or a detailed description.")] = "brief",
    language: LanguageOpt = "en",
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DTypeOpt = None,
    max_new_tokens: MaxNewTokensOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Describe a picture."""
    from .tasks import get_task

    settings = _settings(ctx, model=model, device=device, dtype=dtype, max_new_tokens=max_new_tokens, json=json_output)
    messages = get_task("describe").messages(_picture(image, settings), detail=detail, language=language)
    _answer(_load_backend(settings), messages, settings)


@app.command("read-text")
@_handles_errors
@_with_options(*MODEL_OPTIONS)
def read_text(
    ctx: typer.Context,
    image: ImageArg,
    language: LanguageOpt = "en",
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DTypeOpt = None,
    max_new_tokens: MaxNewTokensOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Read out the text visible in a picture."""
    from .tasks import get_task

    settings = _settings(ctx, model=model, device=device, dtype=dtype, max_new_tokens=max_new_tokens, json=json_output)
    messages = get_task("read_text").messages(_picture(image, settings), language=language)
    _answer(_load_backend(settings), messages, settings)


def _check_image_out(path: Path | None) -> None:
    if path is None:
        return
    from PIL import Image

    if path.suffix.lower() not in Image.registered_extensions():
        raise typer.BadParameter(
            f"{str(path)!r} has no picture file ending Pillow can write; use e.g. boxes.png or boxes.jpg.",
            param_hint="--out",
        )


@app.command()
@_handles_errors
@_with_options(*MODEL_OPTIONS)
def locate(
    ctx: typer.Context,
    image: ImageArg,
    phrase: Annotated[str, typer.Argument(help='What to find, e.g. "the red car".', show_default=False)],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Save the picture with the boxes drawn on it here.")
    ] = None,
    language: LanguageOpt = "en",
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DTypeOpt = None,
    max_new_tokens: MaxNewTokensOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Find what a phrase names in a picture: boxes in pixels, optionally drawn onto a copy of the picture."""
    settings = _settings(ctx, model=model, device=device, dtype=dtype, max_new_tokens=max_new_tokens, json=json_output)
    from .tasks import get_task

    _check_image_out(out)
    picture = _picture(image, settings)
    get_task("locate").prompt(phrase=phrase, language=language)  # a bad phrase fails before the model loads
    result = _load_backend(settings).locate(picture, phrase, language=language, **settings.generation)
    if out is not None:
        from .grounding import draw_boxes

        out.parent.mkdir(parents=True, exist_ok=True)
        draw_boxes(picture, result.boxes).save(out)
    if settings.json:
        _print_json(
            {
                "phrase": result.phrase,
                "text": result.text,
                "image_size": list(result.image_size),
                "boxes": [box.as_dict() for box in result.boxes],
                "out": str(out) if out is not None else None,
            }
        )
        return
    if not result.boxes:
        typer.echo(f"No box in the answer: {result.text}")
    for box in result.boxes:
        typer.echo(f"{box.label}\t({box.x1:.0f}, {box.y1:.0f}) - ({box.x2:.0f}, {box.y2:.0f})")
    if out is not None:
        typer.echo(f"Saved the boxes to {out}", err=True)


#: The chat's commands, as its help and its refusal of an unknown command list them.
CHAT_COMMANDS = {
    "/image PATH": "attach a picture to the next message",
    "/reset": "forget the conversation and the attached pictures",
    "/help": "show this list",
    "/exit": "quit (so does the end of the input)",
}
CHAT_HELP = (
    "Type a message and press Enter; Ctrl-C stops an answer. "
    + "; ".join(f"{name}: {what}" for name, what in CHAT_COMMANDS.items())
    + ". A message that starts with / is sent as it is after a second /: //etc."
)
_CHAT_COMMAND = re.compile(r"^/([A-Za-z][\w-]*)(?:\s+(.*))?$", re.DOTALL)
NO_PICTURE_DEMO = (
    "no picture is attached, and the demo model only answers questions about pictures: attach one with /image PATH "
    "(e.g. /image examples/pictures/red_circle.png), then ask again."
)


def _say(message: str) -> None:
    """A chat's own line (a confirmation or a note), on stderr so stdout holds only the answers."""
    typer.echo(message, err=True)


def _picture_label(picture: Any, path: str) -> str:
    size = getattr(picture, "size", None)
    return f"{path} ({size[0]}x{size[1]})" if size else path


@app.command()
@_handles_errors
@_with_options(*MODEL_OPTIONS)
def chat(
    ctx: typer.Context,
    image: Annotated[
        list[str] | None,
        typer.Option("--image", "-i", help="A picture for the first message (repeat for several).", show_default=False),
    ] = None,
    system: Annotated[str | None, typer.Option(help="A system prompt instead of the default one.")] = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DTypeOpt = None,
    max_new_tokens: MaxNewTokensOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Chat about pictures: reads one message per line from stdin and keeps the conversation.

    /image PATH attaches a picture to the next message, /reset forgets the conversation, /help lists the commands,
    /exit or the end of the input quits. Each command says what it did on stderr; an unknown /command is refused.
    Ctrl-C during an answer stops that answer and the chat goes on; Ctrl-C at the prompt quits (exit code 130).
    With no picture in the conversation the question is asked as a text question, except on the demo model, which
    only knows pictures: it asks for one instead.
    """
    from .demo import DEMO_MODEL_NAME

    settings = _settings(ctx, model=model, device=device, dtype=dtype, max_new_tokens=max_new_tokens, json=json_output)
    if "-" in (image or []):
        _fail("--image -: stdin carries the chat's messages; give the picture as a file, a data URL or a URL.")
    attached = [_picture(path, settings) for path in image or []]
    interactive = sys.stdin.isatty()
    if interactive:
        _say(CHAT_HELP)
    from .messages import ImagePart, Message, count_images

    history: list[Message] = []
    backend = None
    demo = settings.model is None  # the shipped demo model answers only questions about pictures
    while True:
        if interactive:
            typer.echo("> ", err=True, nl=False)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        command = _CHAT_COMMAND.match(text)
        if command is not None:
            name, argument = command.group(1).lower(), (command.group(2) or "").strip()
            if name in ("exit", "quit"):
                break
            if name == "reset":
                forgotten = len(history) // 2
                history.clear()
                attached.clear()
                _say(f"Conversation cleared ({forgotten} exchange{'s' if forgotten != 1 else ''} forgotten).")
                continue
            if name == "help":
                _say(CHAT_HELP)
                continue
            if name == "image":
                if not argument:
                    _say("error: /image needs a picture: /image PATH (a file, a data URL, or a URL with --allow-urls).")
                    continue
                try:
                    if argument == "-":
                        raise ImageAccessDeniedError(
                            "/image -: stdin carries the chat's messages; give a file or a URL."
                        )
                    attached.append(_picture(argument, settings))
                except BelleVLError as exc:
                    _say(f"error: {_one_line(_cli_hints(str(exc)))}")
                    continue
                count = len(attached)
                _say(
                    f"Attached {_picture_label(attached[-1], argument)}: it goes with your next message"
                    + (f" ({count} pictures attached)." if count > 1 else ".")
                )
                continue
            _say(f"error: unknown command /{command.group(1)}. The commands are: {', '.join(CHAT_COMMANDS)}.")
            continue
        if text.startswith("//"):
            text = text[1:]
        has_picture = bool(attached) or count_images(history) > 0
        if not has_picture and demo:
            _say(f"error: {NO_PICTURE_DEMO}")
            continue
        history.append(Message.user(*(ImagePart(picture) for picture in attached), text))
        try:
            if backend is None:
                backend = _load_backend(settings)
                demo = str(getattr(backend, "model_name", "")) == DEMO_MODEL_NAME
                if not has_picture and demo:
                    history.pop()
                    _say(f"error: {NO_PICTURE_DEMO}")
                    continue
            if not has_picture:
                _say("(No picture attached: asked as a text question. /image PATH attaches one.)")
            answer = _answer(backend, history, settings, **({"system": system} if system else {}))
        except BelleVLError as exc:
            history.pop()
            _say(f"error: {_one_line(_cli_hints(str(exc)))}")
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this answer; the chat goes on without this turn
            _interrupts.handled()
            history.pop()
            sys.stdout.write("\n")
            sys.stdout.flush()
            kept = f" ({len(attached)} attached picture{'s' if len(attached) != 1 else ''} kept)" if attached else ""
            _say(f"(Answer stopped; that message is not kept in the conversation{kept}.)")
            continue
        attached = []
        history.append(Message.assistant(answer))


@app.command()
@_handles_errors
@_with_options(*MODEL_OPTIONS)
def caption(
    ctx: typer.Context,
    folder: Annotated[Path, typer.Argument(help="A folder of pictures.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="The JSON Lines file to write.")] = Path("captions.jsonl"),
    cache: Annotated[
        Path | None,
        typer.Option(
            help="The caption cache (SQLite). [default: beside --out, e.g. captions.cache.sqlite]", show_default=False
        ),
    ] = None,
    detail: Annotated[Detail, typer.Option(help="Short or detailed captions.")] = "brief",
    language: LanguageOpt = "en",
    prompt: Annotated[str | None, typer.Option(help="A captioning prompt of your own instead.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Pictures captioned together.")] = 8,
    recursive: Annotated[bool, typer.Option(help="Look into subfolders too.")] = True,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DTypeOpt = None,
    max_new_tokens: MaxNewTokensOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Caption every picture of a folder into a JSON Lines file (one {"path", "caption", ...} per line).

    Captions are kept in a cache as they are made: an interrupted run picks up where it stopped, and a run over
    pictures that are all cached does not load the model. Pictures are keyed by their pixels, the model and the
    prompt; pictures that cannot be read are skipped with a warning.
    """
    from .captions import CaptionCache, caption_images, clean_partial_files, find_images, partial_path

    settings = _settings(ctx, model=model, device=device, dtype=dtype, max_new_tokens=max_new_tokens, json=json_output)
    paths = find_images(folder, recursive=recursive)
    if not paths:
        _fail(f"No pictures in {str(folder)!r} (looked for .png, .jpg, .jpeg, .webp, ... files).")
    cache_path = cache if cache is not None else out.with_name(out.stem + ".cache.sqlite")
    key = _model_key(settings)
    counts = {"captions": 0, "cached": 0, "new": 0}
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_partial_files(out)  # what killed runs left behind
    tmp = partial_path(out)
    store = CaptionCache(cache_path)  # a damaged or unwritable cache fails here, before any model loads
    try:
        with open(tmp, "x", encoding="utf-8") as f, store:
            records = caption_images(
                paths,
                lambda: _load_backend(settings),
                cache=store,
                model_name=key,
                prompt=prompt,
                detail=detail,
                language=language,
                batch_size=batch_size,
                progress=True,
                on_error="skip",
                image_policy=settings.image_policy,
                **settings.generation,
            )
            for record in records:
                row = {
                    "path": record.path,
                    "caption": record.caption,
                    "width": record.width,
                    "height": record.height,
                    "digest": record.digest,
                }
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                counts["captions"] += 1
                counts["cached" if record.cached else "new"] += 1
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    summary = {
        "out": str(out),
        "cache": str(cache_path),
        **counts,
        "skipped": len(paths) - counts["captions"],
    }
    if settings.json:
        _print_json(summary)
    else:
        skipped = f", {summary['skipped']} skipped" if summary["skipped"] else ""
        typer.echo(
            f"Wrote {counts['captions']} captions to {out} ({counts['cached']} from the cache, "
            f"{counts['new']} new{skipped}).",
            err=True,
        )


@app.command()
@_handles_errors
@_with_options(_LOAD_OPTIONS)
def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="BELLE_VL_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 requests.", show_default=False
        ),
    ] = None,
    served_model_name: Annotated[
        str | None, typer.Option(help="The model id clients name. [default: the folder's name]", show_default=False)
    ] = None,
    allow_urls: Annotated[
        bool, typer.Option("--allow-urls", help="Fetch http(s) image URLs (public addresses only).")
    ] = False,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Most requests answered in one batch.")] = 8,
    max_queue: Annotated[int, typer.Option(min=1, help="Most requests waiting; more get 503.")] = 64,
    max_image_bytes: Annotated[int, typer.Option(min=1, help="Largest image in a request, in bytes.")] = 16 << 20,
    max_request_bytes: Annotated[int, typer.Option(min=1, help="Largest request body, in bytes.")] = 32 << 20,
    max_images: Annotated[int, typer.Option(min=1, help="Most images in one request.")] = 8,
    max_context_tokens: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Most tokens of prompt and answer together; longer requests get a 400. [default: the checkpoint's "
            "window, max_window_size, which it cannot exceed]",
            show_default=False,
        ),
    ] = None,
    max_request_pixels: Annotated[
        int, typer.Option(min=1, help="Pixels (width x height) of all the images of one request; more get 413.")
    ] = 80_000_000,
    max_server_pixels: Annotated[
        int, typer.Option(min=1, help="Pixels of the images of all requests in flight; past it, 503 until some end.")
    ] = 200_000_000,
    log_level: Annotated[str, typer.Option(help="uvicorn's log level.")] = "info",
    compile: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="Decode with static caches through torch.compile (CUDA graphs on a GPU; the first request of each "
            "cache size compiles). Requests are batched per batch, not between decoding steps.",
        ),
    ] = False,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DTypeOpt = None,
    max_new_tokens: MaxNewTokensOpt = None,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (POST /v1/chat/completions, GET /v1/models, /health).

    Concurrent requests are batched onto the model. Images come as data URLs (http(s) URLs only with
    --allow-urls); the server never reads local files named in a request.
    """
    settings = _settings(ctx, model=model, device=device, dtype=dtype, max_new_tokens=max_new_tokens)
    try:
        from . import server as server_module
    except ImportError as exc:
        _fail(f"The server needs FastAPI and uvicorn ({exc}): pip install 'belle-vl-tools[serve]'.")
    dtype_name = settings.dtype.value if settings.dtype not in (None, DType.auto) else None
    _check_adapter(settings.adapter)
    server_module.serve(
        settings.model,
        host=host,
        port=port,
        device=settings.device,
        dtype=dtype_name,
        log_level=log_level,
        model_name=served_model_name,
        api_key=api_key,
        allow_urls=allow_urls,
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        max_image_bytes=max_image_bytes,
        max_request_bytes=max_request_bytes,
        max_images_per_request=max_images,
        max_request_pixels=max_request_pixels,
        max_server_pixels=max_server_pixels,
        default_max_tokens=settings.max_new_tokens,
        compile=compile,
        max_context_tokens=max_context_tokens,
        quantize=settings.quantize.value if settings.quantize is not None else None,
        adapter=settings.adapter,
    )


def _default_caption_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "belle-vl" / "mcp-captions.sqlite"


@app.command("mcp")
@_handles_errors
@_with_options(_LOAD_OPTIONS)
def mcp_command(
    ctx: typer.Context,
    http: Annotated[
        bool, typer.Option("--http", help="Serve streamable HTTP at http://HOST:PORT/mcp instead of stdio.")
    ] = False,
    host: Annotated[str, typer.Option(help="With --http: the address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="With --http: the port to listen on.")] = 8765,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="BELLE_VL_API_KEY",
            help="With --http: require 'Authorization: Bearer KEY' from MCP clients.",
            show_default=False,
        ),
    ] = None,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            help="With --http: another name clients reach the server by (a DNS name, a proxy); the Host and Origin "
            "headers must name the bind address or one of these. Repeatable.",
            show_default=False,
        ),
    ] = None,
    allow_root: Annotated[
        list[Path] | None,
        typer.Option(
            "--allow-root",
            help="A folder the tools may read pictures from (repeat for several). [default: the current folder]",
            show_default=False,
        ),
    ] = None,
    allow_urls: Annotated[
        bool, typer.Option("--allow-urls", help="Let the tools fetch http(s) image URLs (public addresses only).")
    ] = False,
    remote: RemoteOpt = None,
    remote_api_key: RemoteKeyOpt = None,
    cache: Annotated[
        Path | None,
        typer.Option(
            help="The caption cache of caption_folder (SQLite). [default: ~/.cache/belle-vl/mcp-captions.sqlite]",
            show_default=False,
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="With --http: uvicorn's log level.")] = "info",
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DTypeOpt = None,
    max_new_tokens: MaxNewTokensOpt = None,
) -> None:
    """Serve the vision tools to MCP hosts (Claude Desktop, IDE agents, LangChain, LlamaIndex, ...).

    Tools: describe_image, visual_qa, locate_objects, read_text, add_image and caption_folder. Pictures are read
    only inside the --allow-root folders (narrowed to the roots the host declares), URLs only with --allow-urls.
    The model loads on the first call that needs it.
    """

    def given(name: str) -> bool:  # on the command line, not from the environment
        source = ctx.get_parameter_source(name)
        return source is not None and source.name == "COMMANDLINE"

    settings = _settings(ctx, model=model, device=device, dtype=dtype, max_new_tokens=max_new_tokens)
    if not http and given("api_key"):
        raise typer.BadParameter(
            "--api-key protects the --http transport; the key of a --remote server is --remote-api-key.",
            param_hint="--api-key",
        )
    if not http and allowed_host:
        raise typer.BadParameter("--allowed-host applies to the --http transport.", param_hint="--allowed-host")
    local_only = (("--model", settings.model), ("--device", settings.device), ("--dtype", settings.dtype))
    for name, value in (*local_only, ("--quantize", settings.quantize), ("--adapter", settings.adapter)):
        if remote is not None and value is not None:
            raise typer.BadParameter(f"{name} applies to a local model, not to a --remote server.", param_hint=name)
    if remote is None and given("remote_api_key"):
        raise typer.BadParameter("--remote-api-key needs --remote URL.", param_hint="--remote-api-key")
    try:
        from .mcp_server import VisionMCPServer
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] not in ("mcp", "anyio", "starlette", "uvicorn", "httpx"):
            raise
        _fail(f"The MCP server needs the mcp package ({exc}): pip install 'belle-vl-tools[mcp]'.")
    if remote is not None:
        from .backends.remote import RemoteBelleVL

        backend: Any = RemoteBelleVL(remote, api_key=remote_api_key)
        model_key: Any = lambda: f"{backend.base_url} {backend.resolve_model()}"  # noqa: E731
    else:
        backend = functools.partial(_load_backend, settings)
        model_key = _model_key(settings)
    server = VisionMCPServer(
        backend,
        allowed_roots=allow_root or [Path.cwd()],
        allow_urls=allow_urls,
        caption_cache=cache if cache is not None else _default_caption_cache(),
        model_key=model_key,
        generation=settings.generation,
    )
    if http:
        server.serve_http(
            host=host, port=port, api_key=api_key, log_level=log_level, allowed_hosts=tuple(allowed_host or ())
        )
    else:
        import anyio

        anyio.run(server.run_stdio)


def _login(value: str | None) -> tuple[str, str] | None:
    """``--auth USER:PASSWORD`` as Gradio's (user, password) pair."""
    if value is None:
        return None
    user, colon, password = value.partition(":")
    if not colon or not user.strip() or not password:
        raise typer.BadParameter("give the login as USER:PASSWORD, e.g. --auth alice:s3cret.", param_hint="--auth")
    return user.strip(), password


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@app.command("ui")
@_handles_errors
@_with_options(_LOAD_OPTIONS)
def ui_command(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 7860,
    share: Annotated[
        bool, typer.Option("--share", help="Also publish the page through a public Gradio share link.")
    ] = False,
    auth: Annotated[
        str | None,
        typer.Option(
            envvar="BELLE_VL_UI_AUTH",
            help="Require this login (USER:PASSWORD) for the page and its API.",
            show_default=False,
        ),
    ] = None,
    remote: RemoteOpt = None,
    remote_api_key: RemoteKeyOpt = None,
    max_image_bytes: Annotated[
        int | None,
        typer.Option(min=1, help="Largest uploaded picture, in bytes. [default: 20 MiB]", show_default=False),
    ] = None,
    max_pixels: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Largest uploaded picture, in pixels (width x height). [default: 40 million]",
            show_default=False,
        ),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Model calls run at once; more wait in the queue. [default: 1 for a local model, 8 with --remote]",
            show_default=False,
        ),
    ] = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DTypeOpt = None,
    max_new_tokens: MaxNewTokensOpt = None,
) -> None:
    """Chat about pictures in a web page (Gradio): upload, paste or drop pictures, ask, describe, read, locate.

    Each browser keeps its own conversation. The page also offers /ask, /describe, /read_text and /locate to
    scripts (gradio_client). Needs the `ui` extra: pip install 'belle-vl-tools[ui]'.
    """
    settings = _settings(ctx, model=model, device=device, dtype=dtype, max_new_tokens=max_new_tokens)
    local_only = (("--model", settings.model), ("--device", settings.device), ("--dtype", settings.dtype))
    for name, value in (*local_only, ("--quantize", settings.quantize), ("--adapter", settings.adapter)):
        if remote is not None and value is not None:
            raise typer.BadParameter(f"{name} applies to a local model, not to a --remote server.", param_hint=name)
    unused = {
        "--top-p": settings.top_p is not None,
        "--seed": settings.seed is not None,
        "--json": settings.json,
        "--allow-urls": settings.allow_urls,
    }
    for name, given in unused.items():
        if given:
            raise typer.BadParameter(
                f"{name} does not apply to the web chat: its side panel sets the temperature and max new tokens, "
                "and pictures are uploaded.",
                param_hint=name,
            )
    key_source = ctx.get_parameter_source("remote_api_key")  # typer's own click: compare by name
    if remote is None and key_source is not None and key_source.name == "COMMANDLINE":
        raise typer.BadParameter("--remote-api-key needs --remote URL.", param_hint="--remote-api-key")
    login = _login(auth)
    try:
        from . import ui as ui_module
    except ImportError as exc:
        _fail(f"The web chat needs Gradio ({exc}): pip install 'belle-vl-tools[ui]'.")
    policy = ui_module.upload_policy(
        max_bytes=max_image_bytes or settings.max_image_bytes or ui_module.DEFAULT_MAX_BYTES,
        max_pixels=max_pixels or settings.max_pixels or ui_module.DEFAULT_MAX_PIXELS,
    )
    if remote is not None:
        from .backends.remote import RemoteBelleVL

        backend: Any = RemoteBelleVL(remote, api_key=remote_api_key)
    else:
        backend = _load_backend(settings)
    if login is None and (share or not _is_loopback(host)):
        typer.echo("warning: the page is reachable from other machines and has no login; consider --auth.", err=True)
    ui_module.launch(
        backend,
        host=host,
        port=port,
        share=share,
        auth=login,
        image_policy=policy,
        concurrency_limit=concurrency or (8 if remote is not None else 1),
        max_new_tokens=settings.max_new_tokens or 512,
        temperature=settings.temperature,  # None: the model's own default, as the other commands use it
    )


@eval_app.command("mme")
@_handles_errors
@_with_options(_LOAD_OPTIONS)
def eval_mme(
    ctx: typer.Context,
    data: Annotated[Path | None, typer.Option(help="The MME data folder (one folder per subtask).")] = None,
    results: Annotated[
        Path | None, typer.Option(help="Score the response files (SUBTASK.txt) in this folder; no model is loaded.")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the response files.")] = Path("mme_results"),
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N pictures of each subtask.")] = None,
    subtask: Annotated[
        list[str] | None, typer.Option(help="Only this subtask (repeat for several).", show_default=False)
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Questions answered together.")] = 8,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DTypeOpt = None,
    max_new_tokens: MaxNewTokensOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Run MME and print the scores (Category | Score, with the Perception and Cognition totals).

    With --data, the model answers every question greedily and the answers are written to --out as
    SUBTASK.txt files in the official four-column form (subtasks already answered there are kept). With
    --results, existing response files are scored as MME's own tool scores them.
    """
    from .eval.mme import run_mme, score_results

    settings = _settings(ctx, model=model, device=device, dtype=dtype, max_new_tokens=max_new_tokens, json=json_output)
    if results is None and data is None:
        raise typer.BadParameter("give --data DIR to run the benchmark, or --results DIR to score response files.")
    if results is not None:
        scores = score_results(results, subtasks=subtask)
    else:
        scores = run_mme(
            lambda: _load_backend(settings),
            data,  # type: ignore[arg-type]
            out,
            subtasks=subtask,
            limit=limit,
            batch_size=batch_size,
            progress=True,
            max_new_tokens=settings.max_new_tokens,
        )
        typer.echo(f"Responses written to {out}", err=True)
    if settings.json:
        _print_json(scores.as_dict())
    else:
        typer.echo(scores.table())


app.command("finetune")(_handles_errors(finetune_command))


def main() -> None:
    """The console script's entry point."""
    _interrupts.install()
    try:
        app(prog_name="belle-vl")
        code: Any = 0
    except SystemExit as exc:
        code = exc.code
    _interrupts.closing = True
    if _interrupts.pending and code in (0, None):  # an interrupt that Python dropped: still an interrupted command
        _interrupts.say()
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
