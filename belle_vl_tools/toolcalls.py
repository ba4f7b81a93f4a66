"""Former name of :mod:`belle_vl_tools.react` (the tool-call session); kept so older imports keep working."""

from .react import *  # noqa: F403
from .react import __all__  # noqa: F401
