"""The OpenAI-compatible server as a Ray Serve deployment: N replicas, each holding one model, behind one endpoint.

::

    from belle_vl_tools.ray import run_server

    run_server("/models/BELLE-VL", num_replicas=4, host="0.0.0.0", port=8000)   # one GPU per replica

or with Ray's own tooling (``serve run belle_vl_tools.ray.serve:app_builder model=/models/BELLE-VL
num_replicas=4``). Each replica runs :func:`belle_vl_tools.server.create_app` over its own
:class:`~belle_vl_tools.BelleVL`, so every replica batches the requests it gets; Ray's proxy spreads requests over
the replicas and their GPUs, on one node or many.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["app_builder", "build_app", "run_server"]

DEPLOYMENT_NAME = "belle-vl"


def _default_num_gpus() -> float:
    import ray

    if not ray.is_initialized():
        return 0.0
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def build_app(
    model_path: str | os.PathLike | None = None,
    *,
    num_replicas: int | str = 1,
    num_gpus: float | None = None,
    num_cpus: float = 1.0,
    device: str | None = None,
    dtype: str | None = None,
    max_ongoing_requests: int | None = None,
    runtime_kwargs: dict[str, Any] | None = None,
    **app_kwargs: Any,
) -> Any:
    """A Ray Serve application (``serve.run`` it) with ``num_replicas`` replicas of the OpenAI-compatible app.

    Args:
        model_path: Checkpoint folder or Hub id, readable on every node (default: the demo model).
        num_replicas: Replicas, each loading the model once (``"auto"`` for Ray's autoscaling).
        num_gpus: GPUs per replica (default: 1 when the cluster has GPUs, else 0); fractions share a GPU.
        num_cpus: CPUs per replica.
        device, dtype: How each replica loads the model (default device: "cuda" with GPUs, else the CPU).
        max_ongoing_requests: Requests Ray hands one replica at once (default: its queue plus one batch, so that
            the replica can batch them).
        runtime_kwargs: More arguments for ``BelleVL.from_pretrained`` (``attn_implementation``, ...).
        app_kwargs: Arguments for :func:`belle_vl_tools.server.create_app` (``api_key``, ``max_batch_size``, ...).
    """
    from ray import serve

    if num_gpus is None:
        num_gpus = _default_num_gpus()
    if device is None and num_gpus > 0:
        device = "cuda"
    if model_path is not None:
        from .data import check_model_path

        check_model_path(model_path)
    path = None if model_path is None else os.fspath(model_path)
    if max_ongoing_requests is None:
        max_ongoing_requests = int(app_kwargs.get("max_queue", 64)) + int(app_kwargs.get("max_batch_size", 8))
    extra = dict(runtime_kwargs or {})

    def build_asgi_app() -> Any:  # runs in each replica
        from belle_vl_tools.server import create_app, load_runtime, server_image_policy

        policy = server_image_policy(
            app_kwargs.get("image_policy"),
            allow_urls=app_kwargs.get("allow_urls", False),
            max_image_bytes=app_kwargs.get("max_image_bytes"),
        )
        runtime = load_runtime(path, device=device, dtype=dtype, image_policy=policy, **extra)
        return create_app(runtime, **app_kwargs)

    ingress = serve.ingress(build_asgi_app)()
    deployment = serve.deployment(
        ingress,
        name=DEPLOYMENT_NAME,
        num_replicas=num_replicas,
        ray_actor_options={"num_gpus": num_gpus, "num_cpus": num_cpus},
        max_ongoing_requests=max_ongoing_requests,
    )
    # ray types serve.deployment(target, **options) as the decorator form; given the class it is the Deployment
    return deployment.bind()  # type: ignore[attr-defined]


def app_builder(args: dict[str, str]) -> Any:
    """For ``serve run belle_vl_tools.ray.serve:app_builder model=DIR num_replicas=2 num_gpus=1 ...``."""
    numbers = {"num_gpus": float, "num_cpus": float, "max_batch_size": int, "max_queue": int}
    options: dict[str, Any] = {}
    for key, value in args.items():
        if key == "model":
            continue
        if key == "num_replicas":
            options[key] = value if value == "auto" else int(value)
        elif key == "allow_urls":
            options[key] = value.lower() in ("1", "true", "yes")
        else:
            options[key] = numbers[key](value) if key in numbers else value
    return build_app(args.get("model"), **options)


def run_server(
    model_path: str | os.PathLike | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    blocking: bool = True,
    **options: Any,
) -> Any:
    """Start Ray Serve on ``host:port`` and deploy :func:`build_app` there (connecting to a running Ray cluster
    when there is one, e.g. after ``ray start --head``); with ``blocking`` it serves until interrupted."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None)
    serve.start(http_options={"host": host, "port": port})
    handle = serve.run(build_app(model_path, **options), name=DEPLOYMENT_NAME, route_prefix="/", blocking=blocking)
    return handle
