"""Belle-VL for LlamaIndex: a reader that captions pictures into documents."""

from llama_index.readers.belle_vl.base import BelleVLImageReader, checkpoint_key

__all__ = ["BelleVLImageReader", "checkpoint_key"]
