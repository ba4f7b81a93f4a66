"""Ray: the server as a Ray Serve deployment, and captioning a folder with Ray Data (a local Ray on the CPU)."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

pytestmark = pytest.mark.ray

TOKENS = 8


@pytest.fixture(scope="session")
def local_ray():
    """One small local Ray instance for the session (2 CPUs, no dashboard)."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    if started:
        if "ray.serve" in sys.modules:
            sys.modules["ray.serve"].shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, pictures) -> Path:
    """A small folder of pictures, one of them in a subfolder, and a file that is not a picture."""
    root = tmp_path_factory.mktemp("collection")
    shutil.copy(pictures["red"], root / "red.png")
    shutil.copy(pictures["blue"], root / "blue.png")
    (root / "more").mkdir()
    shutil.copy(pictures["green"], root / "more" / "green.png")
    (root / "notes.txt").write_text("not a picture")
    return root


def test_caption_dataset_equals_the_local_runtime(local_ray, folder, tiny_dir, runtime, tmp_path):
    from belle_vl_tools.ray import caption_dataset

    out = tmp_path / "captions.jsonl"
    written = caption_dataset(  # float32 as the runtime fixture: the CPU default may be bfloat16
        folder, model=tiny_dir, batch_size=2, concurrency=1, max_new_tokens=TOKENS, output=out, dtype="float32"
    )
    assert written == str(out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(Path(r["path"]).name for r in rows) == ["blue.png", "green.png", "red.png"]
    captions = {}
    for row in rows:
        expected = runtime.describe(row["path"], temperature=0, max_new_tokens=TOKENS)
        assert row["caption"] == expected.text and row["error"] == ""
        assert row["completion_tokens"] == expected.usage.completion_tokens
        assert (row["width"], row["height"]) == (96, 80)
        captions[Path(row["path"]).name] = row["caption"]
    assert len(set(captions.values())) > 1  # different pictures, different captions

    # a broken file is reported in its row, and Parquet output comes as a folder of shards
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    shards = tmp_path / "parquet"
    caption_dataset(
        folder, model=tiny_dir, batch_size=4, max_new_tokens=TOKENS, output=shards, format="parquet", dtype="float32"
    )
    import pyarrow.parquet as pq

    table = pq.read_table(shards).to_pylist()
    by_name = {Path(r["path"]).name: r for r in table}
    assert set(by_name) == {"blue.png", "green.png", "red.png", "broken.png"}
    assert by_name["broken.png"]["caption"] == "" and by_name["broken.png"]["error"]
    assert {name: by_name[name]["caption"] for name in captions} == captions


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ray_serve_replicas_answer_like_the_local_runtime(local_ray, tiny_dir, runtime, pictures):
    openai = pytest.importorskip("openai")
    from ray import serve

    from belle_vl_tools.ray import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        app = build_app(tiny_dir, num_replicas=2, num_cpus=0.25, model_name="tiny-ray", max_batch_size=4)
        serve.run(app, name="belle-vl", route_prefix="/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        url = "data:image/png;base64," + base64.b64encode(pictures["red"].read_bytes()).decode()
        messages = [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}],
            }
        ]
        expected = runtime.chat(
            [{"role": "user", "content": [{"type": "image", "image": pictures["red"]}, {"type": "text", "text": "?"}]}],
            temperature=0,
            max_new_tokens=TOKENS,
        ).text
        for _ in range(3):
            reply = client.chat.completions.create(
                model="tiny-ray", messages=messages, temperature=0, max_tokens=TOKENS
            )
            assert reply.choices[0].message.content == expected
        stream = client.chat.completions.create(
            model="tiny-ray", messages=messages, temperature=0, max_tokens=TOKENS, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
        status = serve.status().applications["belle-vl"]
        (deployment,) = status.deployments.values()
        assert sum(deployment.replica_states.values()) == 2
    finally:
        serve.delete("belle-vl")


def test_ray_model_argument_is_a_folder_or_hub_id(tmp_path):
    from belle_vl_tools.errors import CheckpointError
    from belle_vl_tools.ray.data import check_model_path
    from belle_vl_tools.testing import ScriptedBackend

    check_model_path(str(tmp_path))  # a folder: fine
    check_model_path("BELLE-2/BELLE-VL")  # a Hub id: fine
    with pytest.raises(TypeError, match="cannot be copied into Ray's workers"):
        check_model_path(ScriptedBackend())
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        check_model_path(str(tmp_path / "missing"))
