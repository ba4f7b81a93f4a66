"""Reference answers of belle-vl-tools' runtime, for the plugin's tests (run with the core's Python environment).

    python make_reference.py OUT_DIR

writes OUT_DIR/tiny (a tiny random checkpoint, ``belle_vl_tools.testing``) and OUT_DIR/reference.json: for the tiny
checkpoint and the shipped demo model, each test conversation's prompt ids (the processor's layout), greedy answer
ids and text (``BelleVL.chat``, checked against a greedy ``generate`` on the same inputs) and prompt logprobs in
fp32. The plugin's tests run in vLLM's environment (other torch and transformers pins) and read this file.

It also writes PEFT LoRA adapters for the tiny checkpoint (OUT_DIR/lora-*): ``language`` (random, nonzero lora_B, on
every linear layer of the language model), with the runtime's answers through it (``BelleVL.from_pretrained(...,
adapter=...)``) for the LORA_CASES; ``vision`` (LoRA on the vision tower too, as ``--train-vision`` trains) and
``embeddings`` (wte and lm_head saved whole, as ``--train-embeddings`` does), which vLLM must refuse.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PICTURES = Path(__file__).resolve().parents[3] / "examples" / "pictures"
#: max_new_tokens per model: the random checkpoint seldom stops by itself
NEW_TOKENS = {"tiny": 12, "demo": 24}
#: the conversations answered through the LoRA adapter (a text prompt and a picture prompt)
LORA_CASES = ("text_only", "one_picture")
LORA_RANK = 8


def conversations() -> dict[str, list[dict]]:
    """The test conversations in OpenAI form (image_url parts with file:// URLs of the example pictures)."""

    def image(name: str) -> dict:
        return {"type": "image_url", "image_url": {"url": (PICTURES / name).as_uri()}}

    def text(value: str) -> dict:
        return {"type": "text", "text": value}

    return {
        "text_only": [{"role": "user", "content": "Hello! What can you do?"}],
        "one_picture": [{"role": "user", "content": [image("red_circle.png"), text("What color is the circle?")]}],
        "two_pictures": [
            {
                "role": "user",
                "content": [image("red_circle.png"), image("blue_square.png"), text("What color is the square?")],
            }
        ],
        "picture_after_text": [
            {
                "role": "user",
                "content": [text("Look at this picture.\n"), image("blue_square.png"), text("What shape?")],
            }
        ],
        "two_turns": [
            {"role": "user", "content": [image("red_circle.png"), text("What color is the circle?")]},
            {"role": "assistant", "content": "The circle is red."},
            {
                "role": "user",
                "content": [image("shapes_and_word.png"), text("How many shapes are there in the image?")],
            },
        ],
    }


def core_messages(messages: list[dict]) -> list[dict]:
    """The same conversation with image parts naming local paths, as ``BelleVL.chat`` takes them."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [
                {"type": "image", "image": part["image_url"]["url"].removeprefix("file://")}
                if part["type"] == "image_url"
                else part
                for part in content
            ]
        out.append({**message, "content": content})
    return out


def reference(
    model_path: str | None, new_tokens: int, *, adapter: str | None = None, cases: tuple[str, ...] | None = None
) -> dict[str, dict]:
    import torch

    from belle_vl_tools import BelleVL

    vl = BelleVL.from_pretrained(model_path, dtype="float32", device="cpu", adapter=adapter)
    stops = sorted(vl.stop_ids)
    results = {}
    for name, messages in conversations().items():
        if cases is not None and name not in cases:
            continue
        msgs = core_messages(messages)
        answer = vl.chat(msgs, temperature=0, max_new_tokens=new_tokens)
        inputs = vl.processor.apply_chat_template(
            msgs, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        with torch.no_grad():
            generated = vl.model.generate(
                **inputs, do_sample=False, max_new_tokens=new_tokens, eos_token_id=stops, pad_token_id=stops[0]
            )[0, inputs["input_ids"].shape[1] :].tolist()
            logits = vl.model(**inputs).logits[0].float()
        ids = [i for i in generated]
        for n, token in enumerate(ids):
            if token in stops:
                ids = ids[:n]
                break
        text = vl.tokenizer.decode(ids, skip_special_tokens=True)
        if text.strip() != answer.text.strip():
            raise SystemExit(f"{name}: greedy generate gave {text!r} but BelleVL.chat {answer.text!r}")
        prompt = inputs["input_ids"][0].tolist()
        logprobs = torch.log_softmax(logits, dim=-1)[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
        results[name] = {
            "messages": messages,
            "prompt_ids": prompt,
            "answer_ids": ids,
            "answer_text": answer.text,
            "prompt_logprobs": logprobs.tolist(),
            "max_tokens": new_tokens,
        }
    return results


def write_adapter(base: Path, out: Path, kind: str) -> str:
    """A PEFT LoRA adapter of rank LORA_RANK for ``base`` in ``out``: ``language`` on every linear layer of the
    language model (c_attn, attn.c_proj, mlp.c_proj, w1, w2) with random lora_A and lora_B (PEFT starts lora_B at
    zero, which would change nothing); ``vision`` also on the vision tower's; ``embeddings`` with wte and lm_head
    whole (``modules_to_save``)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from belle_vl_tools import BelleVL
    from belle_vl_tools.finetune.train import lora_targets

    torch.manual_seed(1)
    model = BelleVL.from_pretrained(str(base), dtype="float32", device="cpu").model
    if kind == "language":
        targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".h." in f".{n}"]
    else:
        targets = lora_targets(model, train_vision=kind == "vision")
    config = LoraConfig(
        r=LORA_RANK,
        lora_alpha=16,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
        modules_to_save=["wte", "lm_head"] if kind == "embeddings" else None,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, weight in peft_model.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.1)
    peft_model.save_pretrained(str(out))
    return str(out)


def main(out_dir: str) -> None:
    from belle_vl_tools.demo import default_model_path
    from belle_vl_tools.testing import write_tiny_checkpoint

    out = Path(out_dir)
    tiny = write_tiny_checkpoint(out / "tiny")
    adapters = {kind: write_adapter(tiny, out / f"lora-{kind}", kind) for kind in ("language", "vision", "embeddings")}
    lora_cases = reference(str(tiny), NEW_TOKENS["tiny"], adapter=adapters["language"], cases=LORA_CASES)
    data = {
        "tiny": {"path": str(tiny), "cases": reference(str(tiny), NEW_TOKENS["tiny"])},
        "tiny_lora": {"path": adapters["language"], "rank": LORA_RANK, "cases": lora_cases},
        "lora_refused": {"vision": adapters["vision"], "embeddings": adapters["embeddings"]},
        "demo": {"path": str(default_model_path()), "cases": reference(None, NEW_TOKENS["demo"])},
    }
    (out / "reference.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1])
