"""Prometheus metrics of one app (``GET /metrics``), on a registry of its own so that several apps can live in one
process (tests, notebooks)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """Requests, tokens, queue depth, batch sizes and latency histograms, prefixed ``belle_vl_``."""

    def __init__(self, waiting: Callable[[], float], running: Callable[[], float]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "belle_vl_requests", "Requests answered, by route and HTTP status.", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter("belle_vl_prompt_tokens", "Prompt tokens of answered requests.", registry=r)
        self.completion_tokens = Counter("belle_vl_completion_tokens", "Tokens generated.", registry=r)
        self.latency = Histogram(
            "belle_vl_request_seconds",
            "Seconds from a request's arrival to its last byte.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.first_token = Histogram(
            "belle_vl_time_to_first_token_seconds",
            "Seconds from a streamed request's arrival to its first token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "belle_vl_batch_size", "Requests in each batch (or decoding step) run.", buckets=_BATCH_BUCKETS, registry=r
        )
        queue = Gauge("belle_vl_queue_depth", "Requests waiting for the model.", registry=r)
        queue.set_function(waiting)
        running_gauge = Gauge("belle_vl_running", "Requests being generated now.", registry=r)
        running_gauge.set_function(running)

    def render(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
