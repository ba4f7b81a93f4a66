"""Captioning image collections with Ray Data: read, preprocess on CPU workers, caption on model actors, write.

::

    from belle_vl_tools.ray import caption_dataset

    caption_dataset("s3://bucket/photos/", model="/models/BELLE-VL", batch_size=16, concurrency=8,
                    num_gpus=1, output="s3://bucket/captions/", format="parquet")

The pipeline streams: files are read as bytes (``ray.data.read_binary_files``), decoded, checked and resized to the
vision tower's input size by CPU tasks, and captioned in batches by a pool of actors that each hold one model
(``map_batches`` with ``concurrency`` actors, ``num_gpus`` each). Each result row holds ``path``, ``caption``,
``width``, ``height``, ``digest`` (:func:`belle_vl_tools.images.image_digest` of the picture, as the caption cache
keys it), ``completion_tokens``, ``finish_reason`` and ``error`` (the reason a picture could not be read; its
caption is then empty). Captions are greedy by default, so they are reproducible and equal to what
``BelleVL.describe`` gives for the same picture.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..captions import IMAGE_SUFFIXES
from ..errors import CheckpointError, ImageError
from ..images import ImagePolicy, image_digest, load_image
from ..tasks import get_task

__all__ = ["caption_dataset", "read_images"]

OutputFormat = Literal["jsonl", "parquet"]
COLUMNS = ("path", "caption", "width", "height", "digest", "completion_tokens", "finish_reason", "error")


def check_model_path(model: Any) -> None:
    """Ray's workers each load their own copy, so ``model=`` must be a checkpoint folder or Hub id they can read."""
    from ..backend import HUB_ID, is_backend

    if is_backend(model):
        raise TypeError(
            "model= for Ray takes a checkpoint folder or Hub id that every worker can read: a loaded backend cannot "
            "be copied into Ray's workers."
        )
    if not isinstance(model, str | os.PathLike):
        raise TypeError(
            f"model= takes a checkpoint folder or a Hub id (None: the demo model), not {type(model).__name__}."
        )
    text = os.fspath(model)
    if not os.path.isdir(text) and not HUB_ID.fullmatch(text):
        raise CheckpointError(
            f"model={text!r} is not a checkpoint folder and not a Hub id (owner/name): check the path."
        )


def _model_settings(model: str | os.PathLike | None) -> tuple[str, int | None]:
    """The checkpoint folder (the demo model when None) and its vision tower's input size (None: unknown, e.g. a
    Hub id; the actors then resize)."""
    if model is None:
        from ..demo import default_model_path

        model = default_model_path()
    check_model_path(model)
    path = Path(model)
    config = path / "config.json"
    if not config.is_file():
        if path.exists():
            raise CheckpointError(f"{path} has no config.json: point model= at a checkpoint folder.")
        return str(model), None
    visual = json.loads(config.read_text(encoding="utf-8")).get("visual") or {}
    return str(model), int(visual.get("image_size", 448))


def read_images(source: Any, *, recursive: bool = True) -> Any:
    """A Ray dataset of ``{"path", "bytes"}`` rows from a folder, a file, a list of them, or a dataset that has a
    ``bytes`` column (and optionally ``path``) already."""
    import ray.data

    if isinstance(source, ray.data.Dataset):
        if "bytes" not in source.schema().names:
            raise ImageError("The dataset needs a 'bytes' column of encoded image files (and optionally 'path').")
        return source
    paths = [os.fspath(source)] if isinstance(source, str | os.PathLike) else [os.fspath(p) for p in source]
    if not paths:
        raise ImageError("No pictures to caption: pass a folder, files or a dataset.")
    extensions = sorted({suffix.lstrip(".") for suffix in IMAGE_SUFFIXES})
    extensions += [e.upper() for e in extensions]
    return ray.data.read_binary_files(paths, include_paths=True, file_extensions=extensions)


class _Preprocess:
    """CPU stage: decode under a policy, measure, hash, and resize to the model's input size."""

    def __init__(self, image_size: int | None, policy: ImagePolicy) -> None:
        self.image_size = image_size
        self.policy = policy

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        from PIL import Image

        out = {"path": str(row.get("path") or ""), "width": 0, "height": 0, "digest": "", "error": ""}
        try:
            picture = load_image(bytes(row["bytes"]), self.policy)
        except ImageError as exc:
            out["error"] = " ".join(str(exc).split())
            out["pixels"] = np.zeros((1, 1, 3), np.uint8)
            return out
        out["width"], out["height"] = picture.size
        out["digest"] = image_digest(picture)
        if self.image_size is not None:  # the processor's own resize; it leaves a picture of this size untouched
            size = (self.image_size, self.image_size)
            picture = picture.resize(size, Image.Resampling.BICUBIC)
        out["pixels"] = np.asarray(picture, dtype=np.uint8)
        return out


class Captioner:
    """Model stage: one loaded model per actor, captioning batches of preprocessed pictures."""

    def __init__(
        self,
        model: str,
        prompt: str,
        generation: dict[str, Any],
        device: str | None = None,
        dtype: str | None = None,
    ) -> None:
        from ..runtime import BelleVL

        self.runtime = BelleVL.from_pretrained(model, device=device, dtype=dtype)
        self.prompt = prompt
        self.generation = generation

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from ..messages import ImagePart, Message

        n = len(batch["path"])
        captions, tokens, finish = [""] * n, [0] * n, [""] * n
        todo = [i for i in range(n) if not batch["error"][i]]
        if todo:
            conversations = [[Message.user(ImagePart(np.asarray(batch["pixels"][i])), self.prompt)] for i in todo]
            for i, result in zip(todo, self.runtime.generate_batch(conversations, **self.generation), strict=True):
                captions[i], tokens[i], finish[i] = result.text, result.usage.completion_tokens, result.finish_reason
        return {
            "path": list(batch["path"]),
            "caption": captions,
            "width": [int(w) for w in batch["width"]],
            "height": [int(h) for h in batch["height"]],
            "digest": list(batch["digest"]),
            "completion_tokens": tokens,
            "finish_reason": finish,
            "error": list(batch["error"]),
        }


def _default_num_gpus() -> float:
    import ray

    return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def caption_dataset(
    source: Any,
    model: str | os.PathLike | None = None,
    *,
    batch_size: int = 8,
    concurrency: int | tuple[int, int] = 1,
    num_gpus: float | None = None,
    num_cpus: float = 1.0,
    prompt: str | None = None,
    detail: Literal["brief", "detailed"] = "brief",
    language: Literal["en", "zh"] = "en",
    max_new_tokens: int | None = None,
    generation: dict[str, Any] | None = None,
    device: str | None = None,
    dtype: str | None = None,
    image_policy: ImagePolicy | None = None,
    output: str | os.PathLike | None = None,
    format: OutputFormat | None = None,
) -> Any:
    """Caption every picture of ``source`` with Ray Data; write the rows to ``output`` or return the dataset.

    Args:
        source: A folder (searched recursively), a file, a list of them (local paths or any filesystem Ray reads,
            e.g. ``s3://...``), or a Ray dataset with a ``bytes`` column (and optionally ``path``).
        model: A checkpoint folder or Hub id (default: the demo model).
        batch_size: Pictures per ``generate_batch`` call on an actor.
        concurrency: Model actors (one model each): a number, or ``(min, max)`` for an autoscaling pool.
        num_gpus: GPUs per actor (default: 1 when the cluster has GPUs, else 0).
        num_cpus: CPUs per actor.
        prompt: The captioning prompt (default: the describe prompt of ``detail`` and ``language``).
        max_new_tokens, generation: Generation arguments; ``temperature`` defaults to 0 (greedy).
        device, dtype: Where and in what precision each actor loads the model (default: "cuda" with GPUs).
        image_policy: What the CPU stage accepts (size and pixel limits); default: the trusted policy.
        output: Where to write: a ``.jsonl`` file (one file, written as results stream in), or a folder that
            receives Ray's shards (``format="jsonl"``: JSON Lines files, ``"parquet"``: Parquet files).
        format: "jsonl" or "parquet" (default: from the suffix of ``output``, else "jsonl").

    Returns:
        The output path when ``output`` is given, else the (lazy) Ray dataset of result rows.
    """
    import ray

    model_path, image_size = _model_settings(model)
    if num_gpus is None:
        num_gpus = _default_num_gpus()
    if device is None and num_gpus > 0:
        device = "cuda"
    settings = {"temperature": 0, **(generation or {})}
    if max_new_tokens is not None:
        settings["max_new_tokens"] = max_new_tokens
    text = prompt if prompt is not None else get_task("describe").prompt(detail=detail, language=language)
    policy = image_policy or ImagePolicy.trusted()

    images = read_images(source)
    prepared = images.map(_Preprocess(image_size, policy))
    captions = prepared.map_batches(
        Captioner,
        fn_constructor_kwargs={
            "model": model_path,
            "prompt": text,
            "generation": settings,
            "device": device,
            "dtype": dtype,
        },
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=concurrency,
        num_gpus=num_gpus,
        num_cpus=num_cpus,
    )
    if output is None:
        return captions
    return _write(captions, os.fspath(output), format, ray)


def _write(dataset: Any, output: str, format: OutputFormat | None, ray: Any) -> str:
    if format is None:
        format = "parquet" if output.endswith(".parquet") else "jsonl"
    if format not in ("jsonl", "parquet"):
        raise ValueError(f"format must be 'jsonl' or 'parquet', not {format!r}.")
    if format == "jsonl" and output.endswith(".jsonl") and "://" not in output:
        target = Path(output)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        with open(partial, "w", encoding="utf-8") as f:
            for batch in dataset.iter_batches(batch_format="pandas", batch_size=256):
                for row in batch.to_dict(orient="records"):
                    f.write(json.dumps({k: _plain(row[k]) for k in COLUMNS}, ensure_ascii=False) + "\n")
        os.replace(partial, target)
        return output
    if format == "parquet":
        dataset.write_parquet(output)
    else:
        dataset.write_json(output)
    return output


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
