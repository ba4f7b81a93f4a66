"""``transformers serve`` on the demo model folder, driven by the official ``openai`` client.

transformers' server is started through ``python -m belle_vl_tools.transformers_cli`` (see that module for why the
plain ``transformers`` command cannot register outside classes in the process that loads the model): one server for
the module, which loads the model in a process of its own.
"""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import belle_vl_tools  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DEMO = Path(belle_vl_tools.__file__).parent / "demo" / "model"
PICTURES = ROOT / "examples" / "pictures"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    port = _free_port()
    log = tmp_path_factory.mktemp("transformers-serve") / "serve.log"
    command = [sys.executable, "-m", "belle_vl_tools.transformers_cli", "serve", str(DEMO)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                pytest.fail(f"transformers serve exited ({process.returncode}):\n{log.read_text()[-4000:]}")
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline:
                    pytest.fail(f"transformers serve did not start:\n{log.read_text()[-4000:]}")
                time.sleep(1)
        yield client, str(DEMO), log
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _question(picture: str, text: str) -> list[dict]:
    data = base64.b64encode((PICTURES / picture).read_bytes()).decode()
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
                {"type": "text", "text": text},
            ],
        }
    ]


def test_an_image_question_is_answered_from_the_picture_and_ends_at_im_end(served):
    client, model, _ = served
    answers = {}
    for picture, shape in (("red_circle.png", "circle"), ("blue_square.png", "square")):
        reply = client.chat.completions.create(
            model=model, messages=_question(picture, f"What color is the {shape}?"), temperature=0, max_tokens=64
        )
        choice = reply.choices[0]
        answers[picture] = choice.message.content
        # ended by the model's <|im_end|>, not by the token budget: a short answer and "stop"
        assert choice.finish_reason == "stop", reply
        assert reply.usage.completion_tokens < 20, reply
    assert "red" in answers["red_circle.png"].lower()
    assert "blue" in answers["blue_square.png"].lower()  # the picture, not the question, decided the color


def test_the_answer_streams_and_equals_the_whole_answer(served):
    client, model, _ = served
    messages = _question("red_circle.png", "What color is the circle?")
    whole = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=64)
    deltas, finish = [], None
    stream = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=64, stream=True)
    for chunk in stream:
        if chunk.choices:
            deltas.extend([chunk.choices[0].delta.content] if chunk.choices[0].delta.content else [])
            finish = chunk.choices[0].finish_reason or finish
    assert len(deltas) > 1  # token by token, not one piece
    assert "".join(deltas) == whole.choices[0].message.content
    assert "red" in "".join(deltas).lower()
    assert finish == "stop"


def test_transformers_chat_talks_to_the_server(served):
    client, model, _ = served
    base = str(client.base_url).rstrip("/").removesuffix("/v1")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "belle_vl_tools.transformers_cli", "chat", model, base],
        input="What color is the circle?\n!exit\n",
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer = done.stdout.split(f"<{model}>:", 1)[-1]
    assert "tokens in" in answer and "Traceback" not in done.stdout + done.stderr, done.stdout[-3000:]
