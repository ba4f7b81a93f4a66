"""Ask a question about a picture, fully offline, and watch the answer stream in.

    python examples/quickstart.py                      # the shipped demo model, examples/pictures/red_circle.png
    python examples/quickstart.py --image examples/pictures/blue_square.png --question "What color is the square?"
    python examples/quickstart.py --model /path/to/BELLE-VL --image photo.jpg --question "What is this?"

With no --model the shipped demo model answers (a tiny model of the Belle-VL architecture that knows colored
circles, squares and triangles and a few printed words; see the README). Point --model at a Belle-VL or
Qwen-VL-Chat folder for real pictures. Runs from any folder: the default picture is found next to this file.

Needs: pip install -e ".[local]" (the README's set-up command).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PICTURES = Path(__file__).resolve().parent / "pictures"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder or Hub id (default: the shipped demo model)")
    parser.add_argument("--image", type=Path, default=PICTURES / "red_circle.png", help="picture to ask about")
    parser.add_argument("--question", default="What color is the circle?")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    try:
        from belle_vl_tools import BelleVL, BelleVLError
    except ImportError as exc:
        return f"error: {exc.name} is missing: run the README's set-up command (pip install -e '.[local]')."
    try:
        runtime = BelleVL.from_pretrained(args.model)  # None: the shipped demo model
        print(f"Model: {runtime.model_name}\nPicture: {args.image}")
        messages = [
            {
                "role": "user",
                "content": [{"type": "image", "image": args.image}, {"type": "text", "text": args.question}],
            }
        ]
        print(f"Q: {args.question}\nA: ", end="", flush=True)
        for chunk in runtime.stream(messages, temperature=0, max_new_tokens=args.max_new_tokens):
            print(chunk.delta, end="", flush=True)
            if chunk.usage is not None:
                print(
                    f"\n[{chunk.finish_reason}; {chunk.usage.prompt_tokens} prompt tokens incl. "
                    f"{chunk.usage.images} image(s), {chunk.usage.completion_tokens} generated]"
                )
    except BelleVLError as exc:  # a bad picture or checkpoint: one line, no traceback
        return f"error: {exc}"
    return 0


if __name__ == "__main__":
    sys.exit(main())
