"""Reference answers of belle-vl-tools' runtime, for the plugin's tests (run with the core's Python environment).

    python make_reference.py OUT_DIR

writes OUT_DIR/tiny (a tiny random checkpoint, ``belle_vl_tools.testing``) and OUT_DIR/reference.json: for the tiny
checkpoint and the shipped demo model, each test conversation's prompt ids (the processor's layout), greedy answer
ids and text (``BelleVL.chat``, checked against a greedy ``generate`` on the same inputs) and prompt logprobs in
fp32. The plugin's tests run in vLLM's environment (other torch and transformers pins) and read this file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PICTURES = Path(__file__).resolve().parents[3] / "examples" / "pictures"
#: max_new_tokens per model: the random checkpoint seldom stops by itself
NEW_TOKENS = {"tiny": 12, "demo": 24}


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


def reference(model_path: str | None, new_tokens: int) -> dict[str, dict]:
    import torch

    from belle_vl_tools import BelleVL

    vl = BelleVL.from_pretrained(model_path, dtype="float32", device="cpu")
    stops = sorted(vl.stop_ids)
    results = {}
    for name, messages in conversations().items():
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


def main(out_dir: str) -> None:
    from belle_vl_tools.demo import default_model_path
    from belle_vl_tools.testing import write_tiny_checkpoint

    out = Path(out_dir)
    tiny = write_tiny_checkpoint(out / "tiny")
    data = {
        "tiny": {"path": str(tiny), "cases": reference(str(tiny), NEW_TOKENS["tiny"])},
        "demo": {"path": str(default_model_path()), "cases": reference(None, NEW_TOKENS["demo"])},
    }
    (out / "reference.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1])
