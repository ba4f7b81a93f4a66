"""``belle-vl finetune``: train a LoRA adapter on conversation JSON, resume it, merge it (typer only at import)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

TRAIN_PANEL = "Training options"
LORA_PANEL = "LoRA options"


class LabelsChoice(str, Enum):
    reference = "reference"
    assistant = "assistant"


class OnBadChoice(str, Enum):
    skip = "skip"
    error = "error"


def finetune_command(
    ctx: typer.Context,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Training data: Qwen-VL conversation JSON or chat messages (.json list or .jsonl).", show_default=False
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Folder for the adapter and its checkpoints.", show_default=False)
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model", "-m", help="Base checkpoint folder. [default: the shipped demo model]", show_default=False
        ),
    ] = None,
    eval_data: Annotated[
        Path | None, typer.Option(help="Held-out data in the same formats.", show_default=False)
    ] = None,
    eval_fraction: Annotated[
        float, typer.Option(min=0.0, max=0.9, help="Without --eval-data: share of the records held out.")
    ] = 0.0,
    epochs: Annotated[float, typer.Option(min=0.0, help="Passes over the data.", rich_help_panel=TRAIN_PANEL)] = 1.0,
    max_steps: Annotated[
        int, typer.Option(help="Stop after this many steps (-1: run the epochs).", rich_help_panel=TRAIN_PANEL)
    ] = -1,
    batch_size: Annotated[int, typer.Option(min=1, rich_help_panel=TRAIN_PANEL)] = 4,
    grad_accum: Annotated[
        int, typer.Option(min=1, help="Batches per optimizer step.", rich_help_panel=TRAIN_PANEL)
    ] = 1,
    lr: Annotated[
        float, typer.Option(min=0.0, help="Peak learning rate (cosine).", rich_help_panel=TRAIN_PANEL)
    ] = 1e-4,
    save_steps: Annotated[
        int, typer.Option(min=1, help="Checkpoint (and evaluate) every this many steps.", rich_help_panel=TRAIN_PANEL)
    ] = 50,
    seed: Annotated[
        int,
        typer.Option(help="Seed of the weights' init, the data order and the eval split.", rich_help_panel=TRAIN_PANEL),
    ] = 0,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Continue from the newest complete checkpoint in --out.", rich_help_panel=TRAIN_PANEL
        ),
    ] = False,
    max_length: Annotated[
        int,
        typer.Option(
            min=8,
            help="Longest record in tokens; longer ones are bad records (never cut).",
            rich_help_panel=TRAIN_PANEL,
        ),
    ] = 2048,
    labels: Annotated[
        LabelsChoice,
        typer.Option(
            help="What the loss counts: reference = as Qwen-VL's finetune.py (assistant content and every turn's "
            "<|im_start|>, <|im_end|> and newline); assistant = the assistant content and its <|im_end|> only.",
            rich_help_panel=TRAIN_PANEL,
        ),
    ] = LabelsChoice.reference,
    on_bad: Annotated[
        OnBadChoice, typer.Option(help="A bad record: skip it (reported on stderr) or stop with its index.")
    ] = OnBadChoice.skip,
    image_root: Annotated[
        list[Path] | None,
        typer.Option(
            "--image-root",
            help="A folder pictures may be read from (repeat for several). [default: the data file's folder]",
            show_default=False,
        ),
    ] = None,
    lora_r: Annotated[int, typer.Option(min=1, rich_help_panel=LORA_PANEL)] = 64,
    lora_alpha: Annotated[int, typer.Option(min=1, rich_help_panel=LORA_PANEL)] = 16,
    lora_dropout: Annotated[float, typer.Option(min=0.0, max=0.9, rich_help_panel=LORA_PANEL)] = 0.05,
    train_vision: Annotated[
        bool,
        typer.Option(
            "--train-vision", help="Adapt the vision tower too (frozen by default).", rich_help_panel=LORA_PANEL
        ),
    ] = False,
    train_embeddings: Annotated[
        bool,
        typer.Option(
            "--train-embeddings",
            help="Also train the whole token embedding and lm_head, as the reference's LoRA does (for tokens the "
            "base model rarely wrote).",
            rich_help_panel=LORA_PANEL,
        ),
    ] = False,
    qlora: Annotated[
        bool,
        typer.Option(
            "--qlora", help="Base weights in bitsandbytes 4-bit (needs a CUDA GPU).", rich_help_panel=LORA_PANEL
        ),
    ] = False,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:1, ... [default: a GPU if there is one]", show_default=False)
    ] = None,
    merge: Annotated[
        Path | None,
        typer.Option(
            help="Also write base + adapter as one checkpoint (published layout) to this folder.", show_default=False
        ),
    ] = None,
    adapter: Annotated[
        Path | None,
        typer.Option(
            help="With --merge and no --data: merge this existing adapter instead of training.", show_default=False
        ),
    ] = None,
) -> None:
    """Fine-tune with LoRA (QLoRA with --qlora on a GPU): belle-vl finetune --data train.json --out adapter/

    Only assistant turns are learned (labels as Qwen-VL's reference fine-tuning masks them). Pictures are read
    relative to the data file, inside its folder (or the --image-root folders). Checkpoints go to
    --out/checkpoint-N; after a crash or a kill, the same command with --resume continues from the newest one.
    Use the adapter with --adapter on any command (ask, chat, serve, ...), or merge it with --merge DIR.
    """
    root = ctx.find_root().obj  # the model options given before the command name: belle-vl --model DIR finetune ...
    model = model or getattr(root, "model", None)
    device = device or getattr(root, "device", None)
    if data is None:
        if adapter is None or merge is None:
            raise typer.BadParameter("give --data FILE and --out DIR to train, or --adapter DIR --merge DIR to merge.")
        from .train import merge_adapter

        typer.echo(f"Merged checkpoint written to {merge_adapter(model, adapter, merge)}")
        return
    if adapter is not None:
        raise typer.BadParameter(
            "--adapter names an adapter to merge without training; leave out --data.", param_hint="--adapter"
        )
    if out is None:
        raise typer.BadParameter("name the adapter's folder with --out DIR.", param_hint="--out")
    if eval_data is not None and eval_fraction:
        raise typer.BadParameter("give --eval-data or --eval-fraction, not both.", param_hint="--eval-fraction")
    if qlora:
        import torch

        if not torch.cuda.is_available():
            raise typer.BadParameter(
                "--qlora needs a CUDA GPU (bitsandbytes 4-bit); leave it out to train plain LoRA.", param_hint="--qlora"
            )
    from ..images import ImagePolicy
    from .train import finetune

    policy = None
    if image_root:
        roots = [*image_root, data.resolve().parent]
        policy = ImagePolicy(allowed_roots=tuple(p.expanduser().resolve() for p in roots))
    result = finetune(
        data,
        out,
        model=model,
        eval_data=eval_data,
        eval_fraction=eval_fraction,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        learning_rate=lr,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        train_vision=train_vision,
        train_embeddings=train_embeddings,
        qlora=qlora,
        max_length=max_length,
        on_bad=on_bad.value,
        label_mask=labels.value,
        image_policy=policy,
        save_steps=save_steps,
        seed=seed,
        resume=resume,
        device=device,
        merge=merge,
        report=lambda bad: typer.echo(f"warning: skipped {bad}", err=True),
    )
    if result.resumed_from is not None:
        typer.echo(f"Resumed from {result.resumed_from.name} (step {result.start_step})", err=True)
    losses = f"train loss {result.train_loss:.4f}" if result.train_loss is not None else "no train loss"
    if result.eval_loss is not None:
        losses += f", eval loss {result.eval_loss:.4f}"
    skipped = f", {len(result.bad_records)} bad records skipped" if result.bad_records else ""
    typer.echo(
        f"Adapter written to {result.adapter} ({result.global_step} steps, {result.train_examples} training "
        f"records{skipped}; {losses})"
    )
    if result.merged is not None:
        typer.echo(f"Merged checkpoint written to {result.merged}")
