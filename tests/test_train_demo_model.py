"""The demo model's trainer: batches are a function of the step (so worker processes may draw them), and a short
run writes a checkpoint in the published layout that loads as any checkpoint does."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from belle_vl_tools import BelleVL
from belle_vl_tools.demo_data import make_sample

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_demo_model.py"


@pytest.fixture(scope="module")
def trainer():
    spec = importlib.util.spec_from_file_location("train_demo_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--hidden", "128", "--layers", "1", "--heads", "2", "--intermediate", "256", "--vision-layers", "1"]


def test_batches_depend_on_the_step_alone(trainer, processor):
    args = trainer.parse_args(["--batch-size", "3", "--steps", "4", "--warm-steps", "2", "--max-turns", "3"])
    batches = trainer.ChatBatches(processor, args)
    again = trainer.ChatBatches(processor, args)
    for step in (3, 0):  # any order
        one, two = batches[step], again[step]
        assert torch.equal(one["input_ids"], two["input_ids"]) and torch.equal(one["labels"], two["labels"])
        assert one["scenes"] == two["scenes"]
    assert not torch.equal(batches[0]["pixel_values"], batches[1]["pixel_values"])
    # the labels cover the assistant's answers only
    first = batches[0]
    answer_ids = first["labels"][first["labels"] != -100]
    assert 0 < answer_ids.numel() < (first["attention_mask"] == 1).sum()
    # drawn by worker processes: the same batches in the same order
    args.workers = 1
    drawn = list(trainer.batches(batches, args))
    assert len(drawn) == 4
    assert all(torch.equal(d["input_ids"], batches[i]["input_ids"]) for i, d in enumerate(drawn))


def test_a_short_run_writes_a_loadable_published_checkpoint(trainer, tmp_path, capsys):
    out = tmp_path / "demo"
    common = ["--steps", "3", "--batch-size", "4", "--vision-steps", "2", "--warm-steps", "1", "--warmup", "1"]
    code = trainer.main(
        [*common, *TINY, "--out", str(out), "--workers", "1", "--eval-samples", "2", "--mme-images", "0"]
        + ["--heldout-pictures", "2"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "held-out skills (2 pictures" in printed and "| **overall** |" in printed
    assert "held-out accuracy (2 samples" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["visual"]["n_queries"] == 16 and config["num_hidden_layers"] == 1
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "qwen.tiktoken", "model.safetensors"} <= names
    runtime = BelleVL.from_pretrained(out)
    picture = tmp_path / "p.png"
    make_sample(5, 0)["image"].save(picture)
    assert runtime.ask(picture, "What color is the circle?", max_new_tokens=2, do_sample=False).usage.completion_tokens
    # a time budget ends the chat training early and still saves
    resumed = tmp_path / "resumed"
    code = trainer.main(
        [*common, "--resume", str(out), "--out", str(resumed), "--steps", "1000", "--train-minutes", "0.001"]
        + ["--vision-steps", "0", "--eval-samples", "0", "--mme-images", "0", "--heldout-pictures", "0"]
    )
    assert code == 0 and "time budget reached" in capsys.readouterr().out
    assert (resumed / "model.safetensors").is_file()


def test_reading_pretraining_labels_the_letters_and_trains_the_tower_alone(trainer, processor, tmp_path, capsys):
    from safetensors.torch import load_file

    from belle_vl_tools.demo_data import WORDS

    args = trainer.parse_args(["--batch-size", "6", "--sample-offset", "7"])
    batch = trainer.ReadBatches(processor, args, 12)[3]
    assert torch.equal(batch["letters"], trainer.ReadBatches(processor, args, 12)[3]["letters"])
    # the stream kept beside the chat training draws other pictures
    assert not torch.equal(batch["pixel_values"], trainer.ReadBatches(processor, args, 12, stream=1)[3]["pixel_values"])
    assert batch["pixel_values"].shape[0] == 12 and (batch["words"] > 0).any() and (batch["words"] == 0).any()
    for word, letters in zip(batch["words"].tolist(), batch["letters"], strict=True):
        marked = {chr(ord("A") + i - 1) for i in letters[letters > 0].tolist()}
        if word == 0:
            assert not marked
        else:  # letters of a small word may share a patch (the last one labels it)
            assert marked and marked <= set(WORDS[word - 1]) and 1 <= int((letters > 0).sum()) <= 3

    out = tmp_path / "demo"
    common = ["--batch-size", "4", "--vision-steps", "0", "--warm-steps", "0", "--warmup", "1", "--eval-samples", "0"]
    common += ["--mme-images", "0", "--heldout-pictures", "0"]
    assert trainer.main([*common, *TINY, "--steps", "1", "--out", str(out)]) == 0
    read = tmp_path / "read"
    resumed = ["--resume", str(out), "--out", str(read), "--steps", "0", "--read-minutes", "0.02"]
    assert trainer.main([*common, *resumed]) == 0
    assert "read step     0" in capsys.readouterr().out
    before, after = load_file(out / "model.safetensors"), load_file(read / "model.safetensors")
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved and all(name.startswith("transformer.visual.") for name in moved)


def test_reading_loss_beside_the_chat_training_moves_the_tower(trainer, tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "demo"
    common = ["--batch-size", "4", "--vision-steps", "0", "--warm-steps", "0", "--warmup", "1", "--eval-samples", "0"]
    common += ["--mme-images", "0", "--heldout-pictures", "0", "--save-dtype", "float32"]
    assert trainer.main([*common, *TINY, "--steps", "1", "--out", str(out)]) == 0
    runs = {}
    for weight in ("0", "1"):
        runs[weight] = tmp_path / f"aux{weight}"
        resumed = ["--resume", str(out), "--out", str(runs[weight]), "--steps", "2", "--log-every", "1"]
        assert trainer.main([*common, *resumed, "--read-aux", weight]) == 0
        printed = capsys.readouterr().out
        assert ("| reading: word" in printed) == (weight == "1")
    plain, aux = load_file(runs["0"] / "model.safetensors"), load_file(runs["1"] / "model.safetensors")
    assert any(not torch.equal(plain[n], aux[n]) for n in plain if n.startswith("transformer.visual."))


def test_augmented_pictures_are_a_function_of_the_step_and_keep_their_size(trainer, processor):
    import random

    from belle_vl_tools.demo_data import random_scene, render

    picture = render(random_scene(random.Random(1), 112, word=True, free=True))
    changed = trainer.augment(picture, random.Random(2))
    assert changed.size == picture.size and changed.mode == "RGB"
    assert changed.tobytes() != picture.tobytes()
    assert changed.tobytes() == trainer.augment(picture, random.Random(2)).tobytes()
    plain = trainer.parse_args(["--batch-size", "4", "--free-layout", "0.6"])
    rough = trainer.parse_args(["--batch-size", "4", "--free-layout", "0.6", "--augment", "1"])
    one, two = trainer.ChatBatches(processor, rough)[0], trainer.ChatBatches(processor, rough)[0]
    assert torch.equal(one["pixel_values"], two["pixel_values"]) and torch.equal(one["labels"], two["labels"])
    clean = trainer.ChatBatches(processor, plain)[0]
    assert torch.equal(one["labels"], clean["labels"]) and not torch.equal(one["pixel_values"], clean["pixel_values"])
    read_clean, read_rough = trainer.ReadBatches(processor, plain, 6)[2], trainer.ReadBatches(processor, rough, 6)[2]
    assert torch.equal(read_clean["letters"], read_rough["letters"])
    assert not torch.equal(read_clean["pixel_values"], read_rough["pixel_values"])


def test_react_batches_train_the_calls_and_answers_not_the_tool_results(trainer, processor):
    args = trainer.parse_args(["--react-every", "2", "--react-batch", "2"])
    batches = trainer.ReactBatches(processor, args, steps=4)
    batch = batches[1]
    assert batch == batches[1]  # a function of the step
    for ids, mask in batch["rows"]:
        trained = processor.tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
        assert "Action: " in trained and "Action Input: {" in trained and "Final Answer: " in trained
        text = processor.tokenizer.decode(ids)
        assert "Answer the following questions as best you can." in text  # the tool instruction is in the prompt
        observation = text.split("Observation: ")[1].split("<|im_end|>")[0].split("\nThought:")[0]
        assert observation and observation not in trained.split("Final Answer: ")[0]
        assert "Answer the following questions" not in trained


def test_the_react_loss_with_the_shared_instruction_run_once_is_the_whole_rows_loss(trainer, runtime, processor):
    args = trainer.parse_args(["--react-every", "2", "--react-batch", "2"])
    batch = trainer.ReactBatches(processor, args, steps=1)[0]
    model = runtime.model
    with torch.no_grad():
        shared = trainer.react_loss(model, batch).item()
        total, count = 0.0, 0
        for ids, mask in batch["rows"]:
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            labels = torch.tensor([t if m else -100 for t, m in zip(ids, mask, strict=True)])[1:]
            total += torch.nn.functional.cross_entropy(logits, labels, reduction="sum", ignore_index=-100).item()
            count += int((labels >= 0).sum())
    assert shared == pytest.approx(total / count, rel=1e-4)
