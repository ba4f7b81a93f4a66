"""LoRA / QLoRA fine-tuning of a Belle-VL / Qwen-VL checkpoint on TRL's ``SFTTrainer`` and PEFT.

``SFTTrainer`` runs the loop (progress bar, evaluation, checkpoints, resuming, seeding); its own dataset
preparation is skipped (``skip_prepare_dataset``), because the examples come labelled from
:mod:`belle_vl_tools.finetune.data` exactly as Qwen-VL's reference fine-tuning labels them, with the pictures loaded
under an image policy, which TRL's vision collator (``apply_chat_template`` on raw messages, its own masking)
cannot do. The collator here pads on the right, as the reference does.

The adapter written to ``out`` is a standard PEFT LoRA adapter (``adapter_config.json`` +
``adapter_model.safetensors``, ``task_type`` CAUSAL_LM, module names of the published checkpoint), so anything
that loads PEFT adapters onto this architecture can use it.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint_checks import check_checkpoint_folder
from ..errors import CheckpointError
from ..images import ImagePolicy
from ..modeling_qwen_vl import QWenLMHeadModel
from ..processing_qwen_vl import QWenVLProcessor
from .data import IGNORE_INDEX, BadRecord, Example, FinetuneDataError, LabelMask, OnBad, load_data

#: The reference fine-tuning's LoRA targets: the language model's attention and MLP input projections.
LM_TARGETS: tuple[str, ...] = ("c_attn", "attn.c_proj", "w1", "w2")
#: Files of a checkpoint folder other than the weights and config.json, copied into a merged checkpoint.
_CHECKPOINT_FILES = ("generation_config.json", "qwen.tiktoken", "tokenizer_config.json", "special_tokens_map.json")


def _checkpointing_name() -> str:
    from transformers import TrainingArguments

    fields = getattr(TrainingArguments, "__dataclass_fields__", {})
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


class FinetuneError(CheckpointError):
    """Fine-tuning cannot start or go on (bad settings, a missing GPU for QLoRA, a bad adapter)."""


def _model_dir(model: str | Path | None) -> str:
    if model is None:
        from ..demo import default_model_path

        return str(default_model_path())
    return str(model)


def load_base(
    model: str | Path | None = None, *, device: str | None = None, qlora: bool = False, dtype: str | None = None
) -> tuple[Any, QWenVLProcessor]:
    """The base checkpoint (default: the shipped demo model) and its processor, for training.

    ``qlora=True`` loads the language model in bitsandbytes 4-bit NF4 (a CUDA GPU is needed); the vision tower
    stays unquantized. Without it the weights are float32 on a CPU and the checkpoint's precision on a GPU.
    """
    path = _model_dir(model)
    check_checkpoint_folder(path)
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype)
    elif device is None or str(device).startswith("cpu"):
        kwargs["dtype"] = torch.float32
    if qlora:
        if not torch.cuda.is_available():
            raise FinetuneError(
                "QLoRA (qlora=True, --qlora) needs a CUDA GPU for bitsandbytes 4-bit weights; train plain LoRA on "
                "this machine (leave --qlora out)."
            )
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            llm_int8_skip_modules=["visual", "lm_head"],
        )
        kwargs["device_map"] = device or "cuda"
    elif device is not None:
        kwargs["device_map"] = str(device)
    model_obj = QWenLMHeadModel.from_pretrained(path, **kwargs)
    model_obj.config.use_cache = False
    return model_obj, QWenVLProcessor.from_pretrained(path)


def lora_targets(model: Any, train_vision: bool = False) -> list[str]:
    """Names of the linear layers LoRA adapts: the reference's language-model targets, plus every linear layer of
    the vision tower and its resampler with ``train_vision``."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        in_vision = ".visual." in f".{name}."
        if in_vision and train_vision:
            names.append(name)
        elif not in_vision and any(name == t or name.endswith("." + t) for t in LM_TARGETS):
            names.append(name)
    return names


class Collator:
    """Right-pads examples into a batch: ``input_ids`` (pad: ``<|endoftext|>``), ``labels`` (pad: -100),
    ``attention_mask`` and the ``pixel_values`` of their pictures, in order."""

    def __init__(self, processor: QWenVLProcessor) -> None:
        self.processor = processor
        tok = processor.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eod_id

    def __call__(self, batch: Sequence[Example]) -> dict[str, torch.Tensor]:
        width = max(len(x) for x in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, x in enumerate(batch):
            ids[row, : len(x)] = torch.tensor(x.input_ids)
            labels[row, : len(x)] = torch.tensor(x.labels)
            mask[row, : len(x)] = 1
        out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        images = [im for x in batch for im in x.images]
        if images:
            out["pixel_values"] = self.processor.pixel_values(images)
        return out


class _IndexedCollator(Collator):
    """A :class:`Collator` over rows of a ``datasets.Dataset`` that hold only an example's position (TRL takes a
    ``datasets`` dataset; the examples, with their PIL pictures, stay in memory here instead of in Arrow)."""

    def __init__(self, processor: QWenVLProcessor, train: Sequence[Example], held: Sequence[Example]) -> None:
        super().__init__(processor)
        self.pools = {"train": list(train), "eval": list(held)}

    def __call__(self, batch: Sequence[Any]) -> dict[str, torch.Tensor]:
        return super().__call__([self.pools[row["split"]][row["row"]] for row in batch])


def _rows(split: str, n: int) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"split": [split] * n, "row": list(range(n))})


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete ``checkpoint-N`` folder in ``out`` (one a kill interrupted while it was written, which
    lacks its trainer state or weights, is passed over), or None."""
    found = []
    for folder in Path(out).glob("checkpoint-*"):
        step = folder.name.rpartition("-")[2]
        complete = (folder / "trainer_state.json").is_file() and (folder / "adapter_model.safetensors").is_file()
        if step.isdigit() and complete and (folder / "optimizer.pt").is_file():
            found.append((int(step), folder))
    return max(found)[1] if found else None


@dataclass
class FinetuneResult:
    """What a run left: the adapter folder, the steps, the last losses, the records left out, where it resumed."""

    adapter: Path
    global_step: int
    train_loss: float | None
    eval_loss: float | None
    train_examples: int
    eval_examples: int
    bad_records: list[BadRecord]
    resumed_from: Path | None = None
    #: The step this run started from (the resumed checkpoint's; 0 for a fresh run).
    start_step: int = 0
    merged: Path | None = None


def _start_step_callback() -> Any:
    from transformers import TrainerCallback

    class StartStep(TrainerCallback):
        step = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.step = int(state.global_step)

    return StartStep()


def finetune(
    data: str | Path,
    out: str | Path,
    *,
    model: str | Path | None = None,
    eval_data: str | Path | None = None,
    eval_fraction: float = 0.0,
    epochs: float = 1.0,
    max_steps: int = -1,
    batch_size: int = 4,
    grad_accum: int = 1,
    learning_rate: float = 1e-4,
    lora_r: int = 64,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    train_vision: bool = False,
    train_embeddings: bool = False,
    qlora: bool = False,
    max_length: int = 2048,
    on_bad: OnBad = "skip",
    label_mask: LabelMask = "reference",
    image_policy: ImagePolicy | None = None,
    save_steps: int = 50,
    save_total_limit: int | None = 2,
    eval_steps: int | None = None,
    logging_steps: int = 10,
    seed: int = 0,
    resume: bool = False,
    device: str | None = None,
    merge: str | Path | None = None,
    progress: bool = True,
    report: Callable[[BadRecord], None] | None = None,
) -> FinetuneResult:
    """Train a LoRA adapter on ``data`` and write it to ``out`` (checkpoints in ``out/checkpoint-N``).

    ``data`` / ``eval_data``: Qwen-VL conversation JSON or chat messages (see :mod:`belle_vl_tools.finetune.data`);
    without ``eval_data``, ``eval_fraction`` of the records (drawn with ``seed``) are held out for evaluation.
    LoRA defaults are the reference fine-tuning's (r 64, alpha 16, dropout 0.05, targets c_attn, attn.c_proj, w1,
    w2); the vision tower stays frozen unless ``train_vision``; ``train_embeddings`` also trains the whole token
    embedding and ``lm_head``, as the reference's LoRA does (needed for tokens the base rarely wrote).
    ``resume=True`` continues from the newest complete checkpoint in ``out`` (after a crash or a kill) with the
    same data and settings; without it, an ``out`` holding checkpoints is refused. ``label_mask="assistant"``
    counts only the assistant content (see :func:`~belle_vl_tools.finetune.data.label_ids`). ``merge`` also
    writes base + adapter as one checkpoint in the published layout there.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from trl import SFTConfig, SFTTrainer

    out = Path(out)
    if not 0.0 <= eval_fraction < 1.0:
        raise FinetuneError(f"eval_fraction={eval_fraction}: give a share of the records from 0 to below 1.")
    if eval_data is not None and eval_fraction:
        raise FinetuneError("Give eval_data or eval_fraction (--eval-data or --eval-fraction), not both.")
    for name, value in (("batch_size", batch_size), ("grad_accum", grad_accum), ("lora_r", lora_r),
                        ("save_steps", save_steps), ("logging_steps", logging_steps)):  # fmt: skip
        if value < 1:
            raise FinetuneError(f"{name}={value}: must be at least 1.")
    resume_from = latest_checkpoint(out) if out.exists() else None
    if resume and resume_from is None:
        raise FinetuneError(f"resume: {out} holds no complete checkpoint-N folder to continue from; start without it.")
    if not resume and resume_from is not None:
        raise FinetuneError(
            f"{out} already holds checkpoints ({resume_from.name}): continue with resume=True (--resume), or name "
            "another output folder."
        )
    base_model, processor = load_base(model, device=device, qlora=qlora)
    train = load_data(
        data,
        processor,
        image_policy=image_policy,
        on_bad=on_bad,
        max_length=max_length,
        report=report,
        label_mask=label_mask,
    )
    bad = list(train.bad)
    examples = train.examples
    held: list[Example] = []
    if eval_data is not None:
        ev = load_data(
            eval_data,
            processor,
            image_policy=image_policy,
            on_bad=on_bad,
            max_length=max_length,
            report=report,
            label_mask=label_mask,
        )
        held, bad = ev.examples, bad + ev.bad
    elif eval_fraction:
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(examples) * eval_fraction))
        if n_eval >= len(examples):
            raise FinetuneError(f"eval_fraction={eval_fraction} leaves no training record of {len(examples)}.")
        held = [examples[i] for i in sorted(order[:n_eval])]
        examples = [examples[i] for i in sorted(order[n_eval:])]

    if qlora and train_embeddings:
        raise FinetuneError("train_embeddings (--train-embeddings) does not go with QLoRA's 4-bit weights.")
    if qlora:
        base_model = prepare_model_for_kbit_training(base_model, use_gradient_checkpointing=False)
    lora = LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=lora_targets(base_model, train_vision),
        bias="none",
        task_type="CAUSAL_LM",
        modules_to_save=["wte", "lm_head"] if train_embeddings else None,
    )
    peft_model = get_peft_model(base_model, lora)
    no_checkpointing: dict[str, Any] = {_checkpointing_name(): False}
    on_cpu = not torch.cuda.is_available() or (device is not None and str(device).startswith("cpu"))
    args = SFTConfig(
        output_dir=str(out),
        num_train_epochs=epochs,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        weight_decay=0.1,
        adam_beta2=0.95,
        logging_steps=logging_steps,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=save_total_limit,
        eval_strategy="steps" if held else "no",
        eval_steps=eval_steps or save_steps,
        seed=seed,
        data_seed=seed,
        report_to="none",
        disable_tqdm=not progress,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        use_cpu=on_cpu,
        bf16=not on_cpu and qlora and torch.cuda.is_bf16_supported(),
        dataloader_num_workers=0,
        max_length=None,
        **no_checkpointing,
    )
    trainer = SFTTrainer(
        model=peft_model,
        args=args,
        train_dataset=_rows("train", len(examples)),
        eval_dataset=_rows("eval", len(held)) if held else None,
        data_collator=_IndexedCollator(processor, examples, held),
        processing_class=processor.tokenizer,
    )
    start = _start_step_callback()
    trainer.add_callback(start)
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume else None)
    trainer.save_model(str(out))
    processor.save_pretrained(out / "processor")
    eval_loss = None
    if held:
        eval_loss = float(trainer.evaluate()["eval_loss"])
    summary = {
        "base_model": _model_dir(model),
        "train_examples": len(examples),
        "eval_examples": len(held),
        "bad_records": [str(b) for b in bad],
        "global_step": trainer.state.global_step,
        "train_loss": output.training_loss,
        "eval_loss": eval_loss,
    }
    (out / "finetune_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(out / "processor", ignore_errors=True)  # the processor is the base's; the adapter needs no copy
    merged = None
    if merge is not None:
        merged = merge_adapter(_model_dir(model), out, merge)
    train_loss = output.training_loss
    return FinetuneResult(
        adapter=out,
        global_step=trainer.state.global_step,
        train_loss=None if train_loss is None or math.isnan(train_loss) else float(train_loss),
        eval_loss=eval_loss,
        train_examples=len(examples),
        eval_examples=len(held),
        bad_records=bad,
        resumed_from=resume_from if resume else None,
        start_step=start.step,
        merged=merged,
    )


def merge_adapter(model: str | Path | None, adapter: str | Path, out: str | Path) -> Path:
    """Write base ``model`` + LoRA ``adapter`` as one checkpoint in the published layout (config.json,
    generation_config.json, the tokenizer files, model.safetensors in the base's stored precision) to ``out``.

    Its weights are exactly those of ``BelleVL.from_pretrained(model, adapter=adapter)``, so it answers the same."""
    from .adapters import apply_adapter, stored_dtype

    path = Path(_model_dir(model))
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FinetuneError(f"{out} is not empty: name a new folder for the merged checkpoint.")
    check_checkpoint_folder(str(path))
    stored = stored_dtype(path) or "float32"
    base = QWenLMHeadModel.from_pretrained(str(path), dtype=torch.float32)
    merged = apply_adapter(base, adapter, precision=stored).to(getattr(torch, stored))
    merged.config.use_cache = True
    merged.save_pretrained(out, safe_serialization=True)
    for name in _CHECKPOINT_FILES:
        if (path / name).is_file():
            shutil.copy2(path / name, out / name)
    return out


__all__ = [
    "Collator",
    "FinetuneDataError",
    "FinetuneError",
    "FinetuneResult",
    "LM_TARGETS",
    "finetune",
    "latest_checkpoint",
    "load_base",
    "lora_targets",
    "merge_adapter",
]
