"""Belle-VL for LlamaIndex: vision tools for agents."""

from llama_index.tools.belle_vl.base import BelleVLToolError, BelleVLToolSpec, ToolErrorText

__all__ = ["BelleVLToolError", "BelleVLToolSpec", "ToolErrorText"]
