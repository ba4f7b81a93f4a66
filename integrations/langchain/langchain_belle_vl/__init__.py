"""LangChain integration of Belle-VL: a multimodal chat model, vision tools and an image-caption loader."""

from langchain_belle_vl.chat_models import ChatBelleVL
from langchain_belle_vl.document_loaders import BelleVLImageLoader
from langchain_belle_vl.tools import (
    BelleVLDescribeImageTool,
    BelleVLLocateObjectsTool,
    BelleVLReadTextTool,
    BelleVLToolkit,
    BelleVLVisualQATool,
)

__version__ = "0.1.0"

__all__ = [
    "BelleVLDescribeImageTool",
    "BelleVLImageLoader",
    "BelleVLLocateObjectsTool",
    "BelleVLReadTextTool",
    "BelleVLToolkit",
    "BelleVLVisualQATool",
    "ChatBelleVL",
    "__version__",
]
