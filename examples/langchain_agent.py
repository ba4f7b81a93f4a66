"""A LangChain agent that sees, through the Belle-VL tools.

    python examples/langchain_agent.py                          # no agent: run each tool once and print results
    python examples/langchain_agent.py --model /models/BELLE-VL # ChatBelleVL on that checkpoint is the agent
    python examples/langchain_agent.py --openai-base-url http://localhost:8000/v1 --openai-model qwen2.5-7b

With a reasoning model named, ``langchain.agents.create_agent`` gets the four tools (describe_image, visual_qa,
locate_objects, read_text) and a question about a picture the example draws; the tools only read files under
the example's own picture folder. With none named, the tools run directly on the shipped demo model (which knows
colored shapes and a few printed words), so the example works offline with the core package alone.

Needs, for an agent (one line for every integration example; add langchain-openai for --openai-base-url):
    pip install -e ".[local]" -e integrations/langchain -e "integrations/llama_index[rag]" langchain
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from belle_vl_tools import BelleVL, ImagePolicy

INSTALL = 'pip install -e ".[local]" -e integrations/langchain -e "integrations/llama_index[rag]" langchain'


def draw_picture(folder: Path) -> Path:
    """A small street scene: a red car, a sign with text."""
    image = Image.new("RGB", (320, 200), (200, 225, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 140, 320, 200), fill=(90, 90, 90))
    draw.rectangle((40, 105, 150, 150), fill=(210, 30, 30))
    draw.ellipse((50, 140, 75, 165), fill="black")
    draw.ellipse((115, 140, 140, 165), fill="black")
    draw.rectangle((220, 40, 300, 80), fill="white", outline="black")
    draw.text((232, 52), "STOP", fill="black")
    path = folder / "street.png"
    image.save(path)
    return path


def default_model() -> tuple[BelleVL, str]:
    """The shipped demo model, and how to name it."""
    return BelleVL.from_pretrained(), "the shipped demo model (colored shapes and a few printed words)"


def run_tools_directly(vl: BelleVL, picture: Path, policy: ImagePolicy) -> None:
    from belle_vl_tools.tools import make_tools

    tools = make_tools(vl, policy, generation={"max_new_tokens": 48})
    handle = tools["describe_image"].store.add(str(picture))
    calls = [  # questions the demo model can answer about shapes_and_word.png
        ("describe_image", {"image": handle}),
        ("visual_qa", {"image": str(picture), "question": "How many shapes are there in the image?"}),
        ("locate_objects", {"image": handle, "description": "the red square"}),
        ("read_text", {"image": handle}),
        ("describe_image", {"image": "/etc/hostname"}),  # outside the allowed folder: an error the agent can read
    ]
    for name, arguments in calls:
        result = tools[name].run(**arguments)
        status = "error" if result.is_error else "ok"
        print(f"\n{name}({arguments}) [{status}]\n  {result.text}")
        if name == "locate_objects" and result.artifact is not None:
            out = picture.with_name(f"{picture.stem}-boxes.png")
            result.artifact.save(out)
            print(f"  boxes drawn: {out}")


def run_agent(chat_model, vl: BelleVL, picture: Path, policy: ImagePolicy) -> None:
    from langchain.agents import create_agent
    from langchain_belle_vl import BelleVLToolkit
    from langchain_core.messages import HumanMessage

    toolkit = BelleVLToolkit(model=vl, policy=policy)
    handle = toolkit.add_image(str(picture))
    agent = create_agent(
        chat_model,
        toolkit.get_tools(),
        system_prompt=f"You cannot see pictures yourself: use the tools. The user's picture is {handle}.",
    )
    question = f"What vehicle is in {handle}, where is it (in pixels), and what does the sign say?"
    result = agent.invoke({"messages": [HumanMessage(question)]})
    for message in result["messages"]:
        message.pretty_print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder or Hub id for ChatBelleVL as the reasoning model")
    parser.add_argument("--vision-model", help="checkpoint for the tools (default: --model, else the demo model)")
    parser.add_argument("--openai-base-url", help="an OpenAI-compatible server whose model reasons")
    parser.add_argument("--openai-model", default="default", help="model name on that server")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    if args.openai_base_url or args.model:  # an agent: check its packages before loading anything
        try:
            import langchain.agents  # noqa: F401
            import langchain_belle_vl  # noqa: F401

            if args.openai_base_url:
                import langchain_openai  # noqa: F401
        except ImportError as exc:
            extra = " langchain-openai" if args.openai_base_url else ""
            raise SystemExit(f"error: {exc.name} is missing; an agent needs: {INSTALL}{extra}") from None

    folder = Path(tempfile.mkdtemp(prefix="belle-vl-pictures-"))
    if args.openai_base_url or args.model:
        picture = draw_picture(folder)  # a street scene for a real model
    else:  # a picture of the demo model's world (found next to this file, whatever the working folder)
        picture = Path(shutil.copy(Path(__file__).resolve().parent / "pictures" / "shapes_and_word.png", folder))
    policy = ImagePolicy.restricted(folder)
    print(f"Picture: {picture} (the tools may read files under {folder} only)")

    if args.vision_model or args.model:
        vl = BelleVL.from_pretrained(args.vision_model or args.model, device=args.device)
        print(f"Vision model: {vl.model_name}")
    else:
        vl, note = default_model()
        print(f"Vision model: {note}")

    if args.openai_base_url:
        from langchain_openai import ChatOpenAI

        reasoner = ChatOpenAI(base_url=args.openai_base_url, model=args.openai_model, api_key="none")
        run_agent(reasoner, vl, picture, policy)
    elif args.model:
        from langchain_belle_vl import ChatBelleVL

        run_agent(ChatBelleVL(model=vl, temperature=0, max_tokens=512), vl, picture, policy)
    else:
        print("No reasoning model named: running each tool once.")
        run_tools_directly(vl, picture, policy)


if __name__ == "__main__":
    main()
