"""The OpenAI-compatible server: official clients, LangChain and LlamaIndex against it, errors, batching, limits."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from belle_vl_tools.backend import ChatResult, StreamChunk, Usage  # noqa: E402
from belle_vl_tools.server import background_server, create_app  # noqa: E402

MODEL = "tiny-vl"
TOKENS = 10
MAX_IMAGE_BYTES = 150_000


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_turn(url: str, text: str) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}],
        }
    ]


def local_turn(path: Path, text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def app(runtime):
    return create_app(
        runtime,
        model_name=MODEL,
        max_batch_size=16,
        max_queue=128,
        max_image_bytes=MAX_IMAGE_BYTES,
        max_request_bytes=2_000_000,
    )


@pytest.fixture(scope="module")
def base_url(app):
    with background_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def local(runtime, pictures):
    """Greedy answers of the local runtime to the image questions the tests ask."""

    def answer(color: str, text: str = "What is in the picture?") -> str:
        return runtime.chat(local_turn(pictures[color], text), temperature=0, max_new_tokens=TOKENS).text

    return answer


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert {"message", "type", "param", "code"} <= set(body["error"]), body
    assert body["error"]["message"]
    return body["error"]


# --- the official openai client ------------------------------------------------------------------------------------
def test_openai_client_matches_the_local_runtime(base_url, pictures, local):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused")
    texts = {}
    for color in ("red", "blue"):
        reply = client.chat.completions.create(
            model=MODEL,
            messages=image_turn(data_url(pictures[color]), "What is in the picture?"),
            temperature=0,
            max_tokens=TOKENS,
        )
        texts[color] = reply.choices[0].message.content
        assert texts[color] == local(color)
        assert reply.usage.completion_tokens == TOKENS and reply.choices[0].finish_reason == "length"
        assert reply.usage.prompt_tokens > 256  # the picture's 256 positions are in the prompt
    assert texts["red"] != texts["blue"]  # the picture reached the model

    stream = client.chat.completions.create(
        model=MODEL,
        messages=image_turn(data_url(pictures["red"]), "What is in the picture?"),
        temperature=0,
        max_tokens=TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    deltas, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            deltas.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(deltas) == texts["red"]
    assert len([d for d in deltas if d]) > 1  # it really streamed
    assert usage.completion_tokens == TOKENS and finish == "length"


def test_async_openai_client_matches_the_local_runtime(base_url, pictures, local):
    openai = pytest.importorskip("openai")

    async def main() -> tuple[str, str]:
        client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused")
        messages = image_turn(data_url(pictures["green"]), "Describe it.")
        reply = await client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=TOKENS)
        stream = await client.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=TOKENS, stream=True
        )
        parts = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
        await client.close()
        return reply.choices[0].message.content, "".join(parts)

    text, streamed = asyncio.run(main())
    assert text == streamed == local("green", "Describe it.")


def test_system_prompt_stop_and_seed(base_url, runtime):
    client = httpx.Client(base_url=base_url, timeout=60)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]
    expected = runtime.chat(messages, temperature=0, max_new_tokens=TOKENS)
    reply = client.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": TOKENS}
    ).json()
    assert reply["choices"][0]["message"]["content"] == expected.text
    assert reply["usage"]["prompt_tokens"] == expected.usage.prompt_tokens
    # a stop string cuts the answer where the local runtime cuts it
    stop = expected.text.strip()[3:6]
    cut = runtime.chat(messages, temperature=0, max_new_tokens=TOKENS, stop=[stop]).text
    reply = client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": TOKENS, "stop": stop},
    ).json()
    assert reply["choices"][0]["message"]["content"] == cut != expected.text
    # sampling with a seed reproduces
    sampled = [
        client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": messages, "temperature": 1.0, "top_p": 0.9, "seed": 7, "max_tokens": 8},
        ).json()["choices"][0]["message"]["content"]
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]


# --- LangChain and LlamaIndex, unchanged --------------------------------------------------------------------------
def test_langchain_chat_openai_against_the_server(base_url, pictures, local):
    chat_openai = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage

    llm = chat_openai.ChatOpenAI(
        base_url=f"{base_url}/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=TOKENS
    )
    message = HumanMessage(
        content=[
            {"type": "image_url", "image_url": {"url": data_url(pictures["blue"])}},
            {"type": "text", "text": "What is in the picture?"},
        ]
    )
    reply = llm.invoke([message])
    assert reply.content == local("blue")
    assert reply.usage_metadata["output_tokens"] == TOKENS
    assert "".join(chunk.content for chunk in llm.stream([message])) == local("blue")


def test_llamaindex_openai_like_against_the_server(base_url, runtime):
    openai_like = pytest.importorskip("llama_index.llms.openai_like")
    from llama_index.core.llms import ChatMessage

    llm = openai_like.OpenAILike(
        model=MODEL,
        api_base=f"{base_url}/v1",
        api_key="unused",
        is_chat_model=True,
        temperature=0,
        max_tokens=TOKENS,
        context_window=2048,
    )
    question = "Name three colors."
    expected = runtime.chat([{"role": "user", "content": question}], temperature=0, max_new_tokens=TOKENS).text
    assert llm.chat([ChatMessage(role="user", content=question)]).message.content == expected
    assert "".join(r.delta for r in llm.stream_chat([ChatMessage(role="user", content=question)])) == expected
    assert llm.complete(question).text == expected


# --- bad requests -------------------------------------------------------------------------------------------------
def noisy_png(size: int) -> bytes:
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_requests_get_openai_shaped_errors_and_the_server_keeps_serving(base_url, pictures, local):
    client = httpx.Client(base_url=base_url, timeout=60)
    url = "/v1/chat/completions"
    ok = {"model": MODEL, "temperature": 0, "max_tokens": TOKENS}

    response = client.post(
        url, content=b'{"model": "tiny-vl", "messages": [', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and error_of(response)["code"] == "invalid_json"

    response = client.post(url, json={**ok, "model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 404 and error_of(response)["code"] == "model_not_found"

    big = noisy_png(260)
    assert MAX_IMAGE_BYTES < len(big) < 1_000_000
    big_url = "data:image/png;base64," + base64.b64encode(big).decode()
    response = client.post(url, json={**ok, "messages": image_turn(big_url, "hi")})
    assert response.status_code == 400 and error_of(response)["code"] == "image_too_large"

    response = client.post(url, json={**ok, "messages": image_turn("data:image/png;base64,@@not base64@@", "hi")})
    assert response.status_code == 400 and error_of(response)["code"] == "invalid_image"

    response = client.post(url, json={**ok, "messages": image_turn("https://example.com/cat.png", "hi")})
    error = error_of(response)
    assert response.status_code == 400 and error["code"] == "image_url_not_allowed"
    assert "allow_urls" in error["message"]

    response = client.post(url, json={**ok, "messages": image_turn(str(pictures["red"]), "hi")})
    assert response.status_code == 400 and error_of(response)["code"] == "invalid_image_url"  # no local paths

    response = client.post(url, json={**ok, "messages": [{"role": "user", "content": "hi"}], "temperature": 5})
    assert response.status_code == 400 and error_of(response)["param"] == "temperature"

    response = client.post(url, json={**ok, "messages": []})
    assert response.status_code == 400 and error_of(response)["param"] == "messages"

    response = client.post(url, json={**ok, "messages": [{"role": "wizard", "content": "hi"}]})
    assert response.status_code == 400 and "role" in error_of(response)["message"]

    response = client.post(url, content=b"x" * 2_100_000, headers={"content-type": "application/json"})
    assert response.status_code == 413 and error_of(response)["code"] == "request_too_large"

    response = client.get("/v1/nothing-here")
    assert response.status_code == 404 and error_of(response)["code"] == "not_found"

    # still serving
    response = client.post(
        url, json={**ok, "messages": image_turn(data_url(pictures["red"]), "What is in the picture?")}
    )
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == local("red")


def test_models_and_health(base_url):
    client = httpx.Client(base_url=base_url, timeout=10)
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL


# --- many clients at once -----------------------------------------------------------------------------------------
def test_64_concurrent_requests_each_get_their_own_answer(base_url, app, runtime):
    prompts = [f"Request number {i}: say something about {i * 7} apples." for i in range(64)]
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    expected = []
    for start in range(0, 64, 16):
        batch = runtime.generate_batch(conversations[start : start + 16], temperature=0, max_new_tokens=6)
        expected += [r.text for r in batch]
    assert len(set(expected)) > 32  # the prompts give different answers, so a swap would show
    before = app.state.scheduler.stats["batches"]

    async def main() -> list[str]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:

            async def one(messages: list[dict[str, Any]]) -> str:
                body = {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 6}
                response = await client.post("/v1/chat/completions", json=body)
                assert response.status_code == 200, response.text
                return response.json()["choices"][0]["message"]["content"]

            return await asyncio.gather(*(one(c) for c in conversations))

    assert asyncio.run(main()) == expected
    scheduler = app.state.scheduler
    assert scheduler.stats["batches"] - before < 64  # requests were batched
    assert scheduler.stats["largest_batch"] > 1


# --- a scripted backend for queueing, tools and formats -----------------------------------------------------------
class Scripted:
    """A backend that records what it is asked and answers with a fixed text, optionally after a gate opens."""

    model_name = "scripted"

    def __init__(self, reply: str = "ok", gate: threading.Event | None = None) -> None:
        self.reply = reply
        self.gate = gate
        self.calls: list[tuple[list[dict[str, Any]], dict[str, Any]]] = []
        self.started = threading.Semaphore(0)

    def _answer(self, messages: Any, generation: dict[str, Any]) -> ChatResult:
        self.calls.append((messages, generation))
        self.started.release()
        if self.gate is not None:
            assert self.gate.wait(30)
        return ChatResult(self.reply, "stop", Usage(5, 2), self.model_name)

    def chat(self, messages: Any, **generation: Any) -> ChatResult:
        return self._answer(messages, generation)

    def generate_batch(self, conversations: Any, **generation: Any) -> list[ChatResult]:
        return [self._answer(c, generation) for c in conversations]

    def stream(self, messages: Any, **generation: Any):
        result = self._answer(messages, generation)
        yield StreamChunk(result.text, "stop", result.usage)

    async def achat(self, messages: Any, **generation: Any) -> ChatResult:
        return self.chat(messages, **generation)

    async def astream(self, messages: Any, **generation: Any):
        for chunk in self.stream(messages, **generation):
            yield chunk


def test_a_full_queue_answers_503_and_a_gone_client_frees_its_place():
    gate = threading.Event()
    backend = Scripted(gate=gate)
    app = create_app(backend, max_batch_size=1, max_queue=2, batch_wait_ms=0)
    body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}]}
    with background_server(app) as base:
        results: list[int] = []

        def post(timeout: float = 30) -> None:
            try:
                results.append(httpx.post(f"{base}/v1/chat/completions", json=body, timeout=timeout).status_code)
            except httpx.TimeoutException:
                results.append(-1)

        running = threading.Thread(target=post)
        running.start()
        assert backend.started.acquire(timeout=10)  # one request holds the model
        waiting = [threading.Thread(target=post) for _ in range(2)]
        for thread in waiting:
            thread.start()
        scheduler = app.state.scheduler
        deadline = time.monotonic() + 10
        while scheduler.waiting < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert scheduler.waiting == 2

        response = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=10)
        assert response.status_code == 503 and error_of(response)["code"] == "queue_full"
        assert response.headers["retry-after"] == "1"

        gate.set()
        running.join(10)
        for thread in waiting:
            thread.join(10)
        assert results.count(200) == 3

        # a client that gives up frees its place in the queue, and its request never reaches the model
        gate.clear()
        while backend.started.acquire(blocking=False):  # forget the starts of the requests above
            pass
        blocker = threading.Thread(target=post)
        blocker.start()
        assert backend.started.acquire(timeout=10)
        impatient = threading.Thread(target=post, kwargs={"timeout": 0.5})
        impatient.start()
        impatient.join(10)
        assert results[-1] == -1
        deadline = time.monotonic() + 5
        while scheduler.waiting and time.monotonic() < deadline:
            time.sleep(0.02)
        assert scheduler.waiting == 0 and scheduler.stats["cancelled"] == 1
        gate.set()
        blocker.join(10)
        assert len(backend.calls) == 4  # the impatient request never reached the model


def test_a_stream_whose_client_leaves_stops_generating(runtime):
    app = create_app(runtime, model_name=MODEL)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Go on forever."}], "temperature": 0}
    with background_server(app) as base:
        with httpx.stream(
            "POST", f"{base}/v1/chat/completions", json={**body, "max_tokens": 4000, "stream": True}
        ) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        scheduler = app.state.scheduler
        deadline = time.monotonic() + 10
        while scheduler.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scheduler.running == 0  # the generation of 4000 tokens was stopped
        reply = httpx.post(f"{base}/v1/chat/completions", json={**body, "max_tokens": 3}, timeout=30)
        assert reply.status_code == 200


# --- tools and response formats -----------------------------------------------------------------------------------
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_tools_are_answered_as_openai_tool_calls():
    openai = pytest.importorskip("openai")
    backend = Scripted('Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "Paris"}')
    with background_server(create_app(backend)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        messages: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Paris?"}]
        reply = client.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER])
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
        prompt, generation = backend.calls[-1]
        assert (
            "get_weather: Call this tool" in prompt[0]["content"]
            and "Question: Weather in Paris?" in prompt[0]["content"]
        )
        assert "Observation:" in generation["stop"]

        # the tool's result goes back as an observation in the assistant's text; the final answer is content
        backend.reply = "Thought: I now know the final answer\nFinal Answer: It is sunny."
        messages += [
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "22 C and sunny"},
        ]
        reply = client.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER])
        assert reply.choices[0].message.content == "It is sunny."
        assert reply.choices[0].finish_reason == "stop" and not reply.choices[0].message.tool_calls
        prompt, _ = backend.calls[-1]
        assert prompt[-1]["role"] == "assistant" and "Observation: 22 C and sunny" in prompt[-1]["content"]

        # streamed, the call arrives as tool_calls deltas
        backend.reply = 'Action: get_weather\nAction Input: {"city": "Rome"}'
        chunks = list(
            client.chat.completions.create(model="scripted", messages=messages[:1], tools=[WEATHER], stream=True)
        )
        deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
        assert json.loads(deltas[0][0].function.arguments) == {"city": "Rome"}

        # tool_choice "none": no tool instruction
        client.chat.completions.create(model="scripted", messages=messages[:1], tools=[WEATHER], tool_choice="none")
        prompt, _ = backend.calls[-1]
        assert prompt == [{"role": "user", "content": "Weather in Paris?"}]


def test_response_format_json_object():
    backend = Scripted('Here you go: {"color": "red", "count": 2} Hope this helps.')
    with background_server(create_app(backend)) as base:
        client = httpx.Client(base_url=base, timeout=10)
        body = {
            "model": "scripted",
            "messages": [{"role": "user", "content": "Colors?"}],
            "response_format": {"type": "json_object"},
        }
        reply = client.post("/v1/chat/completions", json=body).json()
        assert json.loads(reply["choices"][0]["message"]["content"]) == {"color": "red", "count": 2}
        prompt, _ = backend.calls[-1]
        assert prompt[0]["role"] == "system" and "JSON object" in prompt[0]["content"]


def test_api_key_is_required_when_set():
    from fastapi.testclient import TestClient

    with TestClient(create_app(Scripted(), api_key="sesame")) as client:
        body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}]}
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 401 and error_of(response)["code"] == "invalid_api_key"
        response = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong"})
        assert response.status_code == 401
        response = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer sesame"})
        assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "ok"
        assert client.get("/v1/models").status_code == 401
        assert client.get("/health").status_code == 200


def test_urls_are_fetched_only_when_enabled(monkeypatch, pictures):
    fetched: list[str] = []

    def fetcher(url: str, policy: Any) -> bytes:
        fetched.append(url)
        return pictures["red"].read_bytes()

    from belle_vl_tools.images import ImagePolicy

    backend = Scripted()
    from fastapi.testclient import TestClient

    app = create_app(backend, image_policy=ImagePolicy(fetcher=fetcher), allow_urls=True)
    with TestClient(app) as client:
        body = {"model": "scripted", "messages": image_turn("https://images.example.com/a.png", "hi")}
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        assert fetched == ["https://images.example.com/a.png"]
        part = backend.calls[-1][0][0]["content"][0]
        assert isinstance(part["image"], Image.Image) and part["image"].size == (96, 80)


# --- the CLI ------------------------------------------------------------------------------------------------------
def test_cli_serve_passes_its_options(monkeypatch):
    from typer.testing import CliRunner

    import belle_vl_tools.server as server
    from belle_vl_tools.cli import app as cli

    seen: dict[str, Any] = {}
    monkeypatch.setattr(server, "serve", lambda *args, **kwargs: seen.update(args=args, kwargs=kwargs))
    result = CliRunner().invoke(
        cli, ["serve", "--model", "/models/x", "--port", "8123", "--api-key", "k", "--max-batch-size", "4"]
    )
    assert result.exit_code == 0, result.output
    kwargs = seen["kwargs"]
    assert seen["args"] == ("/models/x",) or kwargs.get("model_path") == "/models/x"
    assert kwargs["port"] == 8123 and kwargs["host"] == "127.0.0.1"
    assert kwargs["api_key"] == "k" and kwargs["max_batch_size"] == 4 and kwargs["allow_urls"] is False
