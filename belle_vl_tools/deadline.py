"""One total deadline for an operation made of many steps: connecting, the TLS handshake, the response headers,
every read and write, the pauses between retries.

A :class:`Deadline` is a point on the monotonic clock. Before each step the caller asks :meth:`Deadline.timeout`
how long that step may wait: the step's own timeout cut to the time left, or an error once the deadline has
passed, so that a peer trickling one byte at a time cannot stretch the operation past it. The image fetcher
(:func:`belle_vl_tools.images.fetch_url`) and the remote client (:class:`belle_vl_tools.RemoteBelleVL`) both bound
their sockets with it. Standard library only.
"""

from __future__ import annotations

import time

__all__ = ["Deadline", "DeadlineExceeded"]


class DeadlineExceeded(TimeoutError):
    """The deadline passed before the operation finished."""


class Deadline:
    """A deadline ``seconds`` from now on the monotonic clock, with an optional timeout for each step.

    Args:
        seconds: The whole operation's time.
        per_operation: The timeout of one step (connect, one read, one write) when :meth:`timeout` is given none;
            ``None``: a step may use all the time left.
        error: The exception class :meth:`timeout` raises once the deadline has passed; a caller whose stack
            treats some exceptions specially (e.g. retries timeouts) gives a class of its own.
    """

    __slots__ = ("at", "error", "per_operation")

    def __init__(
        self, seconds: float, per_operation: float | None = None, *, error: type[Exception] = DeadlineExceeded
    ) -> None:
        self.at = time.monotonic() + seconds
        self.per_operation = per_operation
        self.error = error

    def remaining(self) -> float:
        """Seconds left before the deadline (0 once it has passed)."""
        return max(0.0, self.at - time.monotonic())

    def expired(self, slack: float = 0.0) -> bool:
        """Whether the deadline has passed, or is at most ``slack`` seconds away."""
        return time.monotonic() >= self.at - slack

    def timeout(self, per_operation: float | None = None) -> float:
        """Seconds the next step may wait: ``per_operation`` (default: this deadline's own) cut to the time left.

        Raises :attr:`error` once the deadline has passed.
        """
        remaining = self.at - time.monotonic()
        if remaining <= 0:
            raise self.error("the deadline has passed")
        step = self.per_operation if per_operation is None else per_operation
        return remaining if step is None else min(step, remaining)
