"""Ask a question about a picture, fully offline.

    python examples/quickstart.py                      # a tiny random checkpoint, written on the fly
    python examples/quickstart.py --model /path/to/BELLE-VL --image photo.jpg --question "What is this?"

With no --model, a tiny checkpoint of the exact Belle-VL layout with random weights is written to a temporary
folder: the whole path (loading, tokenizer, chat layout, vision tower, generation, streaming) runs, but its answers
are noise. Point --model at a real Belle-VL or Qwen-VL-Chat folder for real answers.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from belle_vl_tools import BelleVL


def sample_picture(path: Path) -> Path:
    image = Image.new("RGB", (448, 448), "white")
    ImageDraw.Draw(image).ellipse((120, 120, 330, 330), fill="red")
    image.save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder or Hub id (default: a tiny random checkpoint)")
    parser.add_argument("--image", help="picture to ask about (default: a red circle)")
    parser.add_argument("--question", default="What color is the circle?")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from belle_vl_tools.testing import write_tiny_checkpoint

            model = write_tiny_checkpoint(Path(tmp) / "belle-vl-tiny")
            print(f"(no --model given: using a tiny random checkpoint at {model}; its answers are noise)")
        image = args.image or sample_picture(Path(tmp) / "red-circle.png")
        runtime = BelleVL.from_pretrained(model)
        messages = [
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": args.question}]}
        ]
        print(f"Q: {args.question}\nA: ", end="", flush=True)
        for chunk in runtime.stream(messages, do_sample=False, max_new_tokens=args.max_new_tokens):
            print(chunk.delta, end="", flush=True)
            if chunk.usage is not None:
                print(
                    f"\n[{chunk.finish_reason}; {chunk.usage.prompt_tokens} prompt tokens incl. "
                    f"{chunk.usage.images} image(s), {chunk.usage.completion_tokens} generated]"
                )


if __name__ == "__main__":
    main()
