"""Fine-tuning: data forms, bad records, labels against the reference's own algorithm, training, resume after a
kill, adapters everywhere a model loads, and merging."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("trl")

from belle_vl_tools.finetune.data import (  # noqa: E402
    IGNORE_INDEX,
    FinetuneDataError,
    label_ids,
    load_data,
    record_messages,
)

_IMG = re.compile(r"<img>(.*?)</img>", re.S)


def reference_labels(tokenizer, conversations, n_queries, system="You are a helpful assistant."):
    """Qwen-VL's finetune.py ``preprocess`` written out again from its description, on this tokenizer: each piece
    tokenized on its own (role, "\\n", the value with each <img>...</img> as one picture span), the frame tokens of
    every turn kept, role names and non-assistant content ignored. (The reference writes the path's bytes inside a
    picture span; the model overwrites those positions, so the pads of our layout stand for them.)"""
    im_start, im_end = tokenizer.im_start_id, tokenizer.im_end_id
    nl = tokenizer.encode_text("\n")

    def encode_value(value):
        ids, pos = [], 0
        for match in _IMG.finditer(value):
            ids += tokenizer.encode_text(value[pos : match.start()])
            ids += [tokenizer.img_start_id] + [tokenizer.img_pad_id] * n_queries + [tokenizer.img_end_id]
            pos = match.end()
        return ids + tokenizer.encode_text(value[pos:])

    role_ids = {r: [im_start] + tokenizer.encode_text(r) for r in ("system", "user", "assistant")}
    system_ids = role_ids["system"] + nl + tokenizer.encode_text(system) + [im_end] + nl
    input_ids = list(system_ids)
    target = [im_start] + [IGNORE_INDEX] * (len(system_ids) - 3) + [im_end] + nl
    for turn in conversations:
        role = role_ids[turn["from"]]
        ids = role + nl + encode_value(turn["value"]) + [im_end] + nl
        input_ids += ids
        if turn["from"] == "user":
            target += [im_start] + [IGNORE_INDEX] * (len(ids) - 3) + [im_end] + nl
        else:
            target += [im_start] + [IGNORE_INDEX] * len(role) + ids[len(role) + 1 : -2] + [im_end] + nl
    return input_ids, target


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, pictures):
    folder = tmp_path_factory.mktemp("ftdata")
    (folder / "img").mkdir()
    for name, path in pictures.items():
        (folder / "img" / f"{name}.png").write_bytes(Path(path).read_bytes())
    records = []
    for i in range(12):
        color = ("red", "blue", "green")[i % 3]
        records.append(
            {
                "id": f"r{i}",
                "conversations": [
                    {"from": "user", "value": f"Picture 1: <img>img/{color}.png</img>\nWhat color is it?"},
                    {"from": "assistant", "value": f"It is {color}."},
                ],
            }
        )
    (folder / "train.json").write_text(json.dumps(records), encoding="utf-8")
    return folder


CONVERSATIONS = [
    [
        {"from": "user", "value": "Picture 1: <img>img/red.png</img>\nWhat color is the circle?"},
        {"from": "assistant", "value": "The circle is red."},
    ],
    [
        {
            "from": "user",
            "value": "Look: Picture 1: <img>img/blue.png</img>\nand Picture 2: <img>img/red.png</img>\nSame?",
        },
        {"from": "assistant", "value": "No: one is <ref>blue</ref><box>(1,2),(3,4)</box>."},
        {"from": "user", "value": "多少个？ <|im_end|> is only text"},
        {"from": "assistant", "value": "两个。\n<|im_start|>"},
    ],
]


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["one-turn", "multi-turn"])
def test_labels_equal_the_reference_preprocess(processor, data_dir, conversation):
    messages = record_messages({"conversations": conversation})
    for message in messages:  # the pictures' paths as the loader resolves them
        if isinstance(message["content"], list):
            for part in message["content"]:
                if part["type"] == "image":
                    part["image"] = str(data_dir / part["image"])
    ids, labels, sources = label_ids(processor, messages)
    want_ids, want_labels = reference_labels(processor.tokenizer, conversation, processor.num_image_queries)
    assert ids == want_ids
    assert labels == want_labels
    assert len(sources) == sum(turn["value"].count("<img>") for turn in conversation)
    # what counts: the answers' text and the frame, nothing of the prompt
    kept = processor.tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    assert "The circle is red." in kept or "两个" in kept
    assert "What color" not in kept and "system" not in kept and "user" not in kept


def test_assistant_mask_counts_only_the_answers(processor, data_dir):
    record = {"conversations": CONVERSATIONS[1]}
    ref = load_data([record], processor, base_dir=data_dir).examples[0]
    own = load_data([record], processor, base_dir=data_dir, label_mask="assistant").examples[0]
    assert own.input_ids == ref.input_ids
    tok = processor.tokenizer
    kept = [t for t in own.labels if t != IGNORE_INDEX]
    assert kept.count(tok.im_end_id) == 2 and tok.im_start_id not in kept  # the two answers' closing <|im_end|>
    assert set(kept) < set(t for t in ref.labels if t != IGNORE_INDEX)
    with pytest.raises(FinetuneDataError, match="label_mask"):
        load_data([record], processor, base_dir=data_dir, label_mask="all")


def test_chat_messages_form_gives_the_same_labels(processor, data_dir):
    qwen = record_messages({"conversations": CONVERSATIONS[0]})
    chat = [
        {"role": "user", "content": [{"type": "image", "image": "img/red.png"},
                                     {"type": "text", "text": "What color is the circle?"}]},
        {"role": "assistant", "content": "The circle is red."},
    ]  # fmt: skip
    a = load_data([{"conversations": CONVERSATIONS[0]}], processor, base_dir=data_dir).examples[0]
    b = load_data([{"messages": chat}], processor, base_dir=data_dir).examples[0]
    assert a.input_ids == b.input_ids and a.labels == b.labels
    assert a.images[0].size == b.images[0].size and qwen[0]["role"] == "user"


def test_bad_records_are_reported_with_their_index_or_refused(processor, data_dir, tmp_path):
    good = {"conversations": CONVERSATIONS[0]}
    records = [
        good,
        {"id": "nope", "conversations": [{"from": "user", "value": "Picture 1: <img>img/missing.png</img>\nQ"},
                                         {"from": "assistant", "value": "A"}]},
        {"conversations": [{"from": "user", "value": "no answer"}]},
        {"conversations": [{"from": "robot", "value": "x"}]},
        {"something": "else"},
        {"conversations": [{"from": "user", "value": "Picture 1: <img>/etc/hostname</img>\nQ"},
                           {"from": "assistant", "value": "A"}]},
    ]  # fmt: skip
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    seen = []
    data = load_data(path, processor, base_dir=data_dir, report=seen.append)
    assert [e.index for e in data.examples] == [0]
    assert [b.index for b in data.bad] == [1, 2, 3, 4, 5] == [b.index for b in seen]
    assert data.bad[0].id == "nope" and "missing.png" in data.bad[0].reason
    assert "assistant" in data.bad[1].reason and "robot" in data.bad[2].reason
    assert "allowed" in data.bad[4].reason or "outside" in data.bad[4].reason or "folders" in data.bad[4].reason
    with pytest.raises(FinetuneDataError, match=r"record 1 \(id 'nope'\)"):
        load_data(path, processor, base_dir=data_dir, on_bad="error")
    with pytest.raises(FinetuneDataError, match="more than max_length"):
        load_data([good], processor, base_dir=data_dir, max_length=10, on_bad="error")


@pytest.fixture(scope="module")
def trained(tiny_dir, data_dir, tmp_path_factory):
    from belle_vl_tools.finetune import finetune

    out = tmp_path_factory.mktemp("adapter") / "adapter"
    options = {"max_steps": 3, "batch_size": 4, "learning_rate": 0.05, "lora_r": 4, "lora_alpha": 8, "seed": 1}
    return finetune(
        data_dir / "train.json",
        out,
        model=tiny_dir,
        save_steps=2,
        eval_fraction=0.25,
        progress=False,
        train_embeddings=True,  # the reference's LoRA: wte and lm_head trained whole, merged and rounded too
        **options,
    )


def test_training_writes_a_standard_peft_adapter_and_checkpoints(trained):
    out = trained.adapter
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    targets = set(config["target_modules"])
    assert set(config["modules_to_save"]) == {"wte", "lm_head"}
    assert targets and all(t.rsplit(".", 1)[-1] in ("c_attn", "c_proj", "w1", "w2") for t in targets)
    assert not any(".visual." in t for t in targets)  # the vision tower stays frozen by default
    assert (out / "adapter_model.safetensors").is_file()
    assert (out / "checkpoint-2" / "optimizer.pt").is_file()
    assert trained.global_step == 3 and trained.train_examples == 9 and trained.eval_examples == 3
    assert trained.eval_loss is not None and trained.eval_loss == trained.eval_loss


def test_adapter_loads_and_merged_checkpoint_answers_the_same(tiny_dir, trained, pictures, tmp_path):
    import torch

    from belle_vl_tools import BelleVL
    from belle_vl_tools.finetune import merge_adapter

    messages = [{"role": "user", "content": [{"type": "image", "image": str(pictures["red"])},
                                             {"type": "text", "text": "What color?"}]}]  # fmt: skip
    base = BelleVL.from_pretrained(tiny_dir, dtype="float32")  # exact: the CPU default may be bfloat16
    tuned = BelleVL.from_pretrained(tiny_dir, adapter=trained.adapter, dtype="float32")
    merged_dir = merge_adapter(tiny_dir, trained.adapter, tmp_path / "merged")
    assert {"config.json", "generation_config.json", "qwen.tiktoken", "model.safetensors"} <= {
        p.name for p in merged_dir.iterdir()
    }
    merged = BelleVL.from_pretrained(merged_dir, dtype="float32")
    inputs = tuned.processor.collate([_loaded(tuned, messages)])
    with torch.no_grad():
        logits = {
            name: vl.model(**inputs).logits for name, vl in (("base", base), ("tuned", tuned), ("merged", merged))
        }
    assert not torch.allclose(logits["base"], logits["tuned"], atol=1e-4)  # the adapter changed the model
    torch.testing.assert_close(logits["merged"], logits["tuned"], atol=1e-5, rtol=1e-5)
    greedy = {"temperature": 0, "max_new_tokens": 12}
    assert merged.chat(messages, **greedy).text == tuned.chat(messages, **greedy).text


def _loaded(vl, messages):
    item = vl.prepare(messages)
    item.images = [vl._load_image(s)[0] for s in item.sources]
    return item


def test_bad_adapter_is_a_checkpoint_error(tiny_dir, tmp_path):
    from belle_vl_tools import BelleVL
    from belle_vl_tools.errors import CheckpointError

    with pytest.raises(CheckpointError, match="adapter_config.json"):
        BelleVL.from_pretrained(tiny_dir, adapter=tmp_path)


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "belle_vl_tools.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=600, **kwargs)  # fmt: skip


def test_cli_adapter_option_on_model_commands(tiny_dir, trained, pictures, tmp_path):
    ask = _cli("--model", tiny_dir, "ask", pictures["red"], "What color?", "--adapter", trained.adapter,
               "--temperature", "0", "--max-new-tokens", "4", "--json")  # fmt: skip
    assert ask.returncode == 0, ask.stderr
    assert json.loads(ask.stdout)["text"] is not None
    bad = _cli("ask", pictures["red"], "Q", "--adapter", tmp_path / "nothing")
    assert bad.returncode == 1 and "--adapter" in bad.stderr and "Traceback" not in bad.stderr
    from typer.testing import CliRunner

    from belle_vl_tools.cli import app

    for command in (["describe"], ["locate"], ["read-text"], ["chat"], ["caption"], ["serve"], ["ui"], ["mcp"],
                    ["eval", "mme"]):  # fmt: skip
        shown = CliRunner().invoke(app, [*command, "--help"], terminal_width=200)
        assert "--adapter" in shown.output, command


def test_resume_after_kill_continues_from_the_last_checkpoint(tiny_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    args = ["finetune", "--model", tiny_dir, "--data", data_dir / "train.json", "--out", out, "--max-steps", "10",
            "--batch-size", "2", "--save-steps", "2", "--lora-r", "2", "--seed", "3"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "belle_vl_tools.cli", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    from belle_vl_tools.finetune.train import latest_checkpoint

    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            last = latest_checkpoint(out) if out.exists() else None
            if last is not None and int(last.name.split("-")[1]) >= 4:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    last = latest_checkpoint(out)
    assert last is not None and not (out / "adapter_model.safetensors").exists()
    step = int(last.name.split("-")[1])
    again = _cli(*args)
    assert again.returncode == 1 and "--resume" in again.stderr  # never overwrites a run silently
    resumed = _cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Resumed from checkpoint-{step} (step {step})" in resumed.stderr
    state = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())
    assert state["global_step"] == 10
    assert (out / "adapter_model.safetensors").is_file()


def test_merged_checkpoint_keeps_the_published_config(tiny_dir, trained, tmp_path):
    from belle_vl_tools.finetune import merge_adapter
    from belle_vl_tools.finetune.adapters import stored_dtype

    merged = merge_adapter(tiny_dir, trained.adapter, tmp_path / "merged")
    assert stored_dtype(merged) == stored_dtype(tiny_dir)  # written in the precision the base's weights are stored in
    base, out = (json.loads((d / "config.json").read_text()) for d in (Path(tiny_dir), merged))
    assert out["model_type"] == "qwen" and out["architectures"] == ["QWenLMHeadModel"]
    for key in ("visual", "bf16", "fp16", "fp32", "vocab_size", "hidden_size", "num_hidden_layers", "seq_length"):
        assert out[key] == base[key], key
    with pytest.raises(Exception, match="not empty"):
        merge_adapter(tiny_dir, trained.adapter, merged)


def test_integrations_take_the_adapter_in_load_kwargs(tiny_dir, trained):
    import torch

    from belle_vl_tools import BelleVL

    def weight(runtime):
        return runtime.model.transformer.h[0].attn.c_attn.weight

    tuned = BelleVL.from_pretrained(tiny_dir, adapter=trained.adapter)
    base = BelleVL.from_pretrained(tiny_dir)
    assert not torch.equal(weight(base), weight(tuned))
    langchain = pytest.importorskip("langchain_belle_vl")
    chat = langchain.ChatBelleVL(model=str(tiny_dir), load_kwargs={"adapter": str(trained.adapter)})
    assert torch.equal(weight(chat.backend), weight(tuned))
    llms = pytest.importorskip("llama_index.llms.belle_vl")
    llm = llms.BelleVL(str(tiny_dir), load_kwargs={"adapter": str(trained.adapter)})
    assert torch.equal(weight(llm.backend), weight(tuned))
