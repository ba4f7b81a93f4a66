"""transformers' own command line (``transformers serve``, ``transformers chat``, ...) with this package's classes
registered: ``python -m belle_vl_tools.transformers_cli serve /models/BELLE-VL``.

The plain ``transformers`` command cannot load the model: transformers has no plugin mechanism for outside model
classes, so only code that imports ``belle_vl_tools`` registers them, and ``transformers serve`` loads the model in
a freshly spawned process that imports nothing of ours. Run through this module instead, that process imports it
again as its main module (as Python's ``spawn`` start method does), so the classes are registered there too: the
config, the processor, the model class looked up by its ``architectures`` name, and the stop tokens of the
checkpoint.
"""

from __future__ import annotations

import sys

import belle_vl_tools  # noqa: F401  (installs the registration hook, in the spawned processes too)


def main(argv: list[str] | None = None) -> None:
    """Run transformers' command line with ``argv`` (default: this process's arguments)."""
    from transformers.cli.transformers import main as transformers_main

    sys.argv = ["transformers", *(sys.argv[1:] if argv is None else argv)]
    transformers_main()


if __name__ == "__main__":
    main()
