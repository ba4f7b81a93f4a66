"""Sanity checks of checkpoints, run before any tensor is allocated.

A ``config.json`` decides how many modules and how large tensors the model builds. A damaged or hostile one
(``num_hidden_layers`` 1e6, ``visual.image_size`` 1e6, a vocabulary far larger than any tokenizer) would otherwise
spend minutes and gigabytes building the model, or load and fail on the first picture. :func:`check_config`
bounds every size by what the architecture admits, with room for every published Qwen-VL-architecture model
(Qwen-VL-Chat, Belle-VL's Qwen-14B sizes) and for tiny test models, and raises :class:`CheckpointError` naming the
key. :func:`check_checkpoint_folder` adds what needs the folder (the vocabulary against the tokenizer file) and
:func:`check_finite_weights` refuses weights holding NaN or infinities (opt-in, it reads every weight).

Only the standard library is imported at module level; torch is imported by :func:`check_finite_weights` alone.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import CheckpointError

__all__ = [
    "LIMITS",
    "MAX_PARAMETERS",
    "VISUAL_LIMITS",
    "check_checkpoint_files",
    "check_checkpoint_folder",
    "check_config",
    "check_finite_weights",
    "check_layers_match",
    "estimate_parameters",
    "weight_names",
]

#: Inclusive bounds of the language model's sizes: far above any published model (Belle-VL: hidden 5120, 40 layers,
#: vocabulary 152064), far below what would exhaust a machine while the model is built.
LIMITS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 1 << 20),
    "hidden_size": (1, 65_536),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 1024),
    "kv_channels": (2, 1024),
    "intermediate_size": (2, 1 << 20),
    "seq_length": (1, 1 << 22),
    "max_position_embeddings": (1, 1 << 22),
}

#: Inclusive bounds of the ``visual`` block (Qwen-VL-Chat and Belle-VL: width 1664, 48 layers, 16 heads,
#: image_size 448, patch_size 14, 256 queries).
VISUAL_LIMITS: dict[str, tuple[int, int]] = {
    "image_size": (1, 4096),
    "patch_size": (1, 4096),
    "width": (1, 16_384),
    "layers": (1, 256),
    "heads": (1, 256),
    "n_queries": (1, 4096),
    "output_dim": (1, 65_536),
}

#: Largest patch grid side (image_size // patch_size): 128, i.e. 16,384 patches per picture (published: 32).
MAX_PATCH_GRID = 128

#: Largest parameter count a configuration may describe (a trillion; Belle-VL has about 16 billion).
MAX_PARAMETERS = 1_000_000_000_000

#: Qwen-VL-Chat's sizes, used for keys a config.json leaves out (as the config class does).
_DEFAULTS: dict[str, int] = {
    "vocab_size": 151_936,
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "kv_channels": 128,
    "intermediate_size": 22_016,
}

#: Number of special tokens the tokenizer appends after the ranks of ``qwen.tiktoken``.
_NUM_SPECIAL_TOKENS = 3 + 205 + 9


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        value = config.get(key, default)
    else:
        value = getattr(config, key, default)
    return default if value is None else value


def _integer(value: Any, key: str, bounds: tuple[int, int] | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(
            f"The checkpoint's config has {key}={value!r}, which must be a whole number: the config.json is "
            "damaged or not a Qwen-VL-architecture config."
        )
    if bounds is not None:
        low, high = bounds
        if not low <= value <= high:
            raise CheckpointError(
                f"The checkpoint's config has {key}={value:,}, outside what this architecture admits "
                f"({low:,} to {high:,}): the config.json is damaged or not meant for this model. Fix the value."
            )
    return value


def _positive_number(value: Any, key: str, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= high:
        raise CheckpointError(f"The checkpoint's config has {key}={value!r}; it must be a number in (0, {high:g}].")
    return float(value)


def estimate_parameters(config: Any) -> int:
    """Parameters the configuration describes (language model, LM head and vision tower; biases and norms are
    counted roughly: the figure is for bounding, not bookkeeping). Call :func:`check_config` first."""
    hidden, layers, heads, kv_channels, intermediate, vocab = (
        int(_get(config, key, _DEFAULTS[key]))
        for key in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_channels",
            "intermediate_size",
            "vocab_size",
        )
    )
    projection = heads * kv_channels
    mlp = intermediate // 2
    total = 2 * vocab * hidden + layers * (4 * hidden * projection + 3 * hidden * mlp + 4 * hidden)
    visual = _get(config, "visual")
    if isinstance(visual, Mapping):
        width = int(visual.get("width", 1664))
        ratio = float(visual.get("mlp_ratio", 4.9231))
        grid = int(visual.get("image_size", 448)) // int(visual.get("patch_size", 14))
        patch = int(visual.get("patch_size", 14))
        out = int(visual.get("output_dim", hidden))
        queries = int(visual.get("n_queries", 256))
        total += int(visual.get("layers", 48)) * (4 * width * width + 2 * width * int(width * ratio))
        total += 3 * patch * patch * width + grid * grid * width + width * out
        total += 4 * out * out + (queries + 256) * out
    return total


def check_config(config: Any) -> None:
    """Raise :class:`CheckpointError` (naming the key) when a configuration's sizes are not whole numbers within
    what the architecture admits, or describe more than :data:`MAX_PARAMETERS` parameters.

    ``config`` is a ``QWenConfig`` or a ``config.json`` dict; missing keys are left to the defaults. Nothing is
    allocated: this runs in microseconds.
    """
    for key, bounds in LIMITS.items():
        value = _get(config, key)
        if value is not None:
            _integer(value, key, bounds)
    kv_channels = _get(config, "kv_channels")
    rotary_pct = _get(config, "rotary_pct", 1.0)
    if rotary_pct is not None:
        _positive_number(rotary_pct, "rotary_pct", 1.0)
        if kv_channels is not None and (int(kv_channels * rotary_pct) < 2 or int(kv_channels * rotary_pct) % 2):
            raise CheckpointError(
                f"The checkpoint's config has kv_channels={kv_channels} and rotary_pct={rotary_pct}: the rotary "
                "dimension (their product) must be an even number of at least 2."
            )
    intermediate = _get(config, "intermediate_size")
    if intermediate is not None and intermediate % 2:
        raise CheckpointError(
            f"The checkpoint's config has intermediate_size={intermediate:,}, which must be even (the MLP's width "
            "is half of it)."
        )
    visual = _get(config, "visual")
    if visual is not None:
        if not isinstance(visual, Mapping):
            raise CheckpointError(f"The checkpoint's config has visual={visual!r}; it must be an object (or absent).")
        _check_visual(visual, _get(config, "hidden_size"), _get(config, "vocab_size"))
    parameters = estimate_parameters(config)
    if parameters > MAX_PARAMETERS:
        raise CheckpointError(
            f"The checkpoint's config describes about {parameters:,} parameters, over {MAX_PARAMETERS:,}: "
            "check num_hidden_layers, hidden_size, intermediate_size, vocab_size and the visual block."
        )


def _check_visual(visual: Mapping[str, Any], hidden_size: Any, vocab_size: Any) -> None:
    for key, bounds in VISUAL_LIMITS.items():
        value = visual.get(key)
        if value is not None:
            _integer(value, f"visual.{key}", bounds)
    if visual.get("mlp_ratio") is not None:
        _positive_number(visual["mlp_ratio"], "visual.mlp_ratio", 64.0)
    image_size, patch_size = visual.get("image_size"), visual.get("patch_size")
    if image_size is not None and patch_size is not None:
        if patch_size > image_size:
            raise CheckpointError(
                f"The checkpoint's config has visual.patch_size={patch_size} larger than visual.image_size="
                f"{image_size}: a picture must hold at least one patch."
            )
        if image_size // patch_size > MAX_PATCH_GRID:
            raise CheckpointError(
                f"The checkpoint's config has visual.image_size={image_size:,} and visual.patch_size={patch_size}: "
                f"a grid of {image_size // patch_size:,} patches a side, over {MAX_PATCH_GRID} (published models: "
                "448 and 14, a grid of 32)."
            )
    width, heads = visual.get("width"), visual.get("heads")
    if width is not None and heads is not None and width % heads:
        raise CheckpointError(
            f"The checkpoint's config has visual.width={width} and visual.heads={heads}: the width must be a "
            "multiple of the number of heads."
        )
    output_dim = visual.get("output_dim")
    if output_dim is not None and hidden_size is not None and output_dim != hidden_size:
        raise CheckpointError(
            f"The checkpoint's config has visual.output_dim={output_dim} but hidden_size={hidden_size}: they must "
            "be equal (the vision features are inserted into the language model's embedding sequence)."
        )
    n_queries = visual.get("n_queries")
    if n_queries is not None and math.isqrt(n_queries) ** 2 != n_queries:
        raise CheckpointError(
            f"The checkpoint's config has visual.n_queries={n_queries}, which must be a perfect square (the "
            "resampler's queries form a grid)."
        )
    start = visual.get("image_start_id")
    if start is not None:
        _integer(start, "visual.image_start_id", (0, 1 << 20))
        if isinstance(vocab_size, int) and start + 2 >= vocab_size:
            raise CheckpointError(
                f"The checkpoint's config has visual.image_start_id={start:,}, but <img>, </img> and <imgpad> "
                f"(ids {start:,} to {start + 2:,}) must lie inside the vocabulary (vocab_size={vocab_size:,})."
            )


def _count_ranks(vocab_file: Path) -> int:
    with open(vocab_file, "rb") as handle:
        return sum(1 for line in handle if line.strip())


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".tiktoken", ".model", ".txt", ".py")
_MAX_SAFETENSORS_HEADER = 256 << 20
_DECODER_LAYER = re.compile(r"^transformer\.h\.(\d+)\.")
_VISUAL_LAYER = re.compile(r"^transformer\.visual\.transformer\.resblocks\.(\d+)\.")


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_checkpoint_files(
    folder: str | os.PathLike[str], allowed_folders: tuple[str | os.PathLike[str], ...] = ()
) -> None:
    """Every file of the checkpoint folder is a regular file that lies inside it (or inside one of
    ``allowed_folders``, e.g. a shared weights folder its links point into), symbolic links resolved: a link to a
    file elsewhere on the machine, or to a device such as ``/dev/zero``, is a :class:`CheckpointError` naming it."""
    base = Path(folder).resolve()
    roots = [base, *(Path(extra).resolve() for extra in allowed_folders)]
    if base.parent.name == "snapshots" and base.parent.parent.name.startswith("models--"):
        roots.append(base.parent.parent / "blobs")  # the Hub cache: a snapshot's files link to the repo's blobs
    for entry in sorted(Path(folder).iterdir()):
        if not entry.name.endswith(_WEIGHT_SUFFIXES):
            continue
        target = entry.resolve()
        try:
            info = target.stat()
        except OSError as exc:
            raise CheckpointError(f"The checkpoint's {entry.name} cannot be read ({exc.strerror}).") from exc
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(
                f"The checkpoint's {entry.name} is not a regular file (a device, pipe, socket or folder): replace it "
                "with the file itself."
            )
        if not any(_is_within(target, root) for root in roots):
            raise CheckpointError(
                f"The checkpoint's {entry.name} is a link to a file outside the checkpoint folder: copy the file into "
                "the folder, or name the folder it lies in as a shared weights folder "
                "(BelleVL.from_pretrained(..., weights_folders=[...]))."
            )


def _safetensors_names(file: Path) -> list[str]:
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise CheckpointError(f"The checkpoint's {file.name} is too short to be a safetensors file.")
        size = int.from_bytes(head, "little")
        if size > _MAX_SAFETENSORS_HEADER:
            raise CheckpointError(f"The checkpoint's {file.name} declares a {size:,}-byte header: it is damaged.")
        try:
            header = json.loads(handle.read(size))
        except ValueError as exc:
            raise CheckpointError(f"The checkpoint's {file.name} has a damaged header ({exc}).") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"The checkpoint's {file.name} has a damaged header.")
    return [name for name in header if name != "__metadata__"]


def weight_names(folder: str | os.PathLike[str]) -> list[str] | None:
    """The tensor names the checkpoint's weight files hold, read from their headers or index (no tensor is read);
    ``None`` for a layout whose names cannot be listed without loading it (a single ``pytorch_model.bin``)."""
    path = Path(folder)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            try:
                weight_map = json.loads((path / index).read_text(encoding="utf-8")).get("weight_map")
            except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
                raise CheckpointError(f"The checkpoint's {index} cannot be read as JSON ({exc}).") from exc
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"The checkpoint's {index} has no weight_map.")
            return list(weight_map)
    if (path / "model.safetensors").is_file():
        return _safetensors_names(path / "model.safetensors")
    return None


def _layer_mismatch(names: list[str], pattern: re.Pattern[str], declared: int) -> str | None:
    found = {int(m.group(1)) for m in map(pattern.match, names) if m}
    missing = sorted(set(range(declared)) - found)
    extra = sorted(found - set(range(declared)))
    if not missing and not extra:
        return None
    parts = []
    if missing:
        parts.append(f"no weights for layer{'s' if len(missing) > 1 else ''} {_ranges(missing)}")
    if extra:
        parts.append(f"weights for undeclared layer{'s' if len(extra) > 1 else ''} {_ranges(extra)}")
    return f"declares {declared} but its weight files hold {len(found)} ({'; '.join(parts)})"


def _ranges(numbers: list[int]) -> str:
    spans: list[str] = []
    start = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        spans.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(spans)


def check_layers_match(config: Mapping[str, Any], folder: str | os.PathLike[str]) -> None:
    """The weight files hold exactly the decoder and vision layers ``config.json`` declares (checked from the
    files' headers, before anything is allocated): a model built from a config that declares more layers than
    its file holds would allocate weights that are then never loaded."""
    names = weight_names(folder)
    if names is None:
        return
    problem = _layer_mismatch(names, _DECODER_LAYER, int(config.get("num_hidden_layers", 0)))
    if problem:
        raise CheckpointError(f"The checkpoint's config.json num_hidden_layers {problem}: config and weights differ.")
    visual = config.get("visual")
    if isinstance(visual, Mapping) and "layers" in visual:
        problem = _layer_mismatch(names, _VISUAL_LAYER, int(visual["layers"]))
        if problem:
            raise CheckpointError(f"The checkpoint's config.json visual.layers {problem}: config and weights differ.")


def check_checkpoint_folder(
    folder: str | os.PathLike[str], weights_folders: tuple[str | os.PathLike[str], ...] = ()
) -> dict[str, Any] | None:
    """Check a local checkpoint folder before loading it: its files with :func:`check_checkpoint_files` (regular
    files inside the folder or ``weights_folders``), its ``config.json`` with :func:`check_config` and against the
    layers its weight files hold (:func:`check_layers_match`), and its ``vocab_size`` against the tokenizer file
    (``qwen.tiktoken``): the embedding must hold a row for every token the tokenizer can produce, its ranks and its
    special tokens.

    Returns the parsed ``config.json``, or ``None`` when ``folder`` is not a local folder with one (a Hub id:
    the config class checks the values when it is built). Raises :class:`CheckpointError`.
    """
    path = Path(folder)
    config_file = path / "config.json"
    if not config_file.is_file():
        return None
    check_checkpoint_files(path, weights_folders)
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"The checkpoint's config.json cannot be read as JSON ({exc}).") from exc
    if not isinstance(raw, dict):
        raise CheckpointError("The checkpoint's config.json must hold a JSON object.")
    check_config(raw)
    check_layers_match(raw, path)
    vocab_file = path / "qwen.tiktoken"
    vocab_size = raw.get("vocab_size")
    if vocab_file.is_file() and isinstance(vocab_size, int):
        tokens = _count_ranks(vocab_file) + _NUM_SPECIAL_TOKENS
        if vocab_size < tokens:
            raise CheckpointError(
                f"The checkpoint's config has vocab_size={vocab_size:,}, but its tokenizer (qwen.tiktoken) produces "
                f"{tokens:,} token ids: the embedding would have no row for the last {tokens - vocab_size:,}. The "
                "config.json and the tokenizer file belong to different models."
            )
    return raw


def check_finite_weights(model: Any) -> None:
    """Raise :class:`CheckpointError` naming the first parameter or buffer that holds NaN or an infinity.

    Reads every weight once (chunk by chunk, so no second copy of a large tensor is made); meant for loading
    untrusted checkpoints, enabled by ``BelleVL.from_pretrained(..., check_weights=True)``.
    """
    import torch

    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.device.type == "meta":
                continue
            flat = tensor.detach().reshape(-1)
            for start in range(0, flat.numel(), 1 << 24):
                chunk = flat[start : start + (1 << 24)]
                if not bool(torch.isfinite(chunk).all()):
                    raise CheckpointError(
                        f"The checkpoint's weight {name!r} (shape {tuple(tensor.shape)}) holds NaN or infinite "
                        "values: the weights are damaged. Download or convert the checkpoint again."
                    )
