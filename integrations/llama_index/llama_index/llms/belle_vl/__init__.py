"""Belle-VL for LlamaIndex: a chat LLM that reads pictures and calls tools."""

from llama_index.llms.belle_vl.base import BelleVL

__all__ = ["BelleVL"]
