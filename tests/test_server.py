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

from belle_vl_tools.backend import Usage  # noqa: E402
from belle_vl_tools.messages import parse_messages  # noqa: E402
from belle_vl_tools.server import background_server, create_app  # noqa: E402
from belle_vl_tools.testing import ScriptedBackend  # noqa: E402

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
    assert "belle-vl serve --allow-urls" in error["message"] and "ImagePolicy" not in error["message"]

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
class Scripted(ScriptedBackend):
    """The shared scripted backend, answering in one piece, optionally after a gate opens."""

    def __init__(self, reply: str = "ok", gate: threading.Event | None = None) -> None:
        super().__init__(reply, gate=gate, usage=Usage(5, 2), chunk=1 << 20)


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
        assert "get_weather: Call this tool" in prompt[0].text and "Question: Weather in Paris?" in prompt[0].text
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
        assert prompt[-1].role == "assistant" and "Observation: 22 C and sunny" in prompt[-1].text

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
        assert prompt == parse_messages([{"role": "user", "content": "Weather in Paris?"}])


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
        assert prompt[0].role == "system" and "JSON object" in prompt[0].text


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
        [picture] = backend.pictures()
        assert isinstance(picture, Image.Image) and picture.size == (96, 80)


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
    assert kwargs["max_context_tokens"] is None  # the checkpoint's window
    result = CliRunner().invoke(cli, ["serve", "--max-context-tokens", "4096"])
    assert result.exit_code == 0, result.output
    assert seen["kwargs"]["max_context_tokens"] == 4096


def test_a_prompt_past_the_demo_models_window_is_a_400_naming_the_limit_and_the_flag():
    from fastapi.testclient import TestClient

    from belle_vl_tools import BelleVL
    from belle_vl_tools.errors import CheckpointError

    demo = BelleVL.from_pretrained()  # max_window_size 6144, seq_length 2048
    assert demo.max_context_tokens == 6144
    long = " ".join(["red"] * 7000)
    assert len(demo.tokenizer.encode(long)) >= 7000
    with TestClient(create_app(demo)) as client:
        response = client.post(
            "/v1/chat/completions", json={"model": demo.model_name, "messages": [{"role": "user", "content": long}]}
        )
    error = error_of(response)
    assert response.status_code == 400 and error["code"] == "context_length_exceeded", error
    assert "6144" in error["message"] and "belle-vl serve --max-context-tokens" in error["message"]
    assert "max_tokens" in error["message"] and "max_context_tokens (" not in error["message"]
    lowered = BelleVL(demo.model, demo.processor, max_context_tokens=1000)
    with TestClient(create_app(lowered)) as client:
        response = client.post(
            "/v1/chat/completions",
            json={"model": lowered.model_name, "messages": [{"role": "user", "content": " ".join(["red"] * 900)}]},
        )
    assert response.status_code == 400 and "of 1000 tokens" in error_of(response)["message"]
    with pytest.raises(CheckpointError, match="6144"):
        BelleVL(demo.model, demo.processor, max_context_tokens=32768)


# --- every documented field works or is refused -------------------------------------------------------------------
TEXT = [{"role": "user", "content": "Tell me a story about a small robot."}]


def greedy_reference(runtime, messages: list[dict[str, Any]], steps: int, top: int) -> list[tuple[float, list[float]]]:
    """Greedy decoding by hand with the model's forward (no cache, no engine): each step's chosen log-probability
    and the ``top`` best log-probabilities."""
    import torch

    ids = list(runtime.prepare(messages).input_ids)
    out = []
    with torch.inference_mode():
        for _ in range(steps):
            logits = runtime.model(input_ids=torch.tensor([ids], device=runtime.device)).logits[0, -1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            token = int(torch.argmax(logprobs))
            out.append((float(logprobs[token]), torch.topk(logprobs, top).values.tolist()))
            ids.append(token)
    return out


def test_logprobs_are_the_models_own_streamed_too(base_url, runtime):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused")
    reference = greedy_reference(runtime, TEXT, TOKENS, 3)
    reply = client.chat.completions.create(
        model=MODEL, messages=TEXT, temperature=0, max_tokens=TOKENS, logprobs=True, top_logprobs=3
    )
    entries = reply.choices[0].logprobs.content
    assert len(entries) == TOKENS
    assert "".join(e.token for e in entries) == reply.choices[0].message.content
    for entry, (chosen, best) in zip(entries, reference, strict=True):
        assert entry.logprob == pytest.approx(chosen, abs=1e-3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(best, abs=1e-3)
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token

    stream = client.chat.completions.create(
        model=MODEL, messages=TEXT, temperature=0, max_tokens=TOKENS, logprobs=True, top_logprobs=1, stream=True
    )
    streamed = [e for chunk in stream for c in chunk.choices if c.logprobs for e in c.logprobs.content]
    assert [e.logprob for e in streamed] == pytest.approx([c for c, _ in reference], abs=1e-3)

    plain = client.chat.completions.create(model=MODEL, messages=TEXT, temperature=0, max_tokens=TOKENS)
    assert plain.choices[0].logprobs is None


def test_penalties_logit_bias_n_and_token_limits_change_the_answer(base_url, runtime):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused")
    greedy = {"model": MODEL, "messages": TEXT, "temperature": 0, "max_tokens": 12}
    plain = client.chat.completions.create(**greedy, logprobs=True)
    tokens = [e.token for e in plain.choices[0].logprobs.content]
    repeats = max(tokens.count(t) for t in tokens)
    assert repeats > 1  # the tiny random model repeats itself, so penalties have something to change

    for penalty in ("presence_penalty", "frequency_penalty"):
        reply = client.chat.completions.create(**greedy, logprobs=True, **{penalty: 2.0})
        penalised = [e.token for e in reply.choices[0].logprobs.content]
        assert penalised[0] == tokens[0] and penalised != tokens, penalty  # nothing to penalise before token 1
        assert max(penalised.count(t) for t in penalised) < repeats, penalty

    token_id = runtime.tokenizer.encode("Paris")[0]
    reply = client.chat.completions.create(**greedy, logit_bias={str(token_id): 100})
    assert reply.choices[0].message.content == "Paris" * 12

    reply = client.chat.completions.create(
        model=MODEL, messages=TEXT, temperature=1.0, seed=11, n=3, max_completion_tokens=5
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) > 1  # seeds 11, 12, 13
    assert reply.usage.completion_tokens == 15
    again = client.chat.completions.create(
        model=MODEL, messages=TEXT, temperature=1.0, seed=11, n=3, max_completion_tokens=5
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices]

    # user and metadata are accepted and, as in the OpenAI API, leave the answer alone
    tagged = client.chat.completions.create(**greedy, user="user-42", metadata={"team": "vision"})
    assert tagged.choices[0].message.content == plain.choices[0].message.content

    # n > 1 streamed: the choices arrive interleaved, each with its own finish
    stream = client.chat.completions.create(
        model=MODEL,
        messages=TEXT,
        temperature=0,
        max_tokens=4,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, finishes, usage = ["", ""], [None, None], None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    expected = runtime.chat(TEXT, temperature=0, max_new_tokens=4).text
    assert texts == [expected, expected] and finishes == ["length", "length"] and usage.completion_tokens == 8


def test_unsupported_and_bad_values_get_a_400_naming_them_never_a_500(base_url):
    client = httpx.Client(base_url=base_url, timeout=60)
    url = "/v1/chat/completions"
    hi = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    def status_of(body: Any = None, raw: bytes | None = None) -> tuple[int, dict[str, Any]]:
        content = raw if raw is not None else json.dumps(body).encode()
        response = client.post(url, content=content, headers={"content-type": "application/json"})
        assert response.status_code < 500, response.text
        return response.status_code, error_of(response) if response.status_code >= 400 else {}

    cases: dict[str, Any] = {
        "audio": {**hi, "audio": {"voice": "alloy", "format": "wav"}},
        "functions": {**hi, "functions": [{"name": "f"}]},
        "reasoning_effort": {**hi, "reasoning_effort": "high"},
        "web_search_options": {**hi, "web_search_options": {}},
        "store": {**hi, "store": True},
        "modalities": {**hi, "modalities": ["text", "audio"]},
        "service_tier": {**hi, "service_tier": "flex"},
        "frobnicate": {**hi, "frobnicate": 1},
        "seed": {**hi, "seed": 2**80},
        "n": {**hi, "n": 9},
        "top_logprobs": {**hi, "top_logprobs": 2},
        "logit_bias": {**hi, "logit_bias": {"not-a-token": 5}},
        "max_tokens": {**hi, "max_tokens": 10**9},
        "presence_penalty": {**hi, "presence_penalty": 3},
        "stream_options": {**hi, "stream_options": {"include_usage": True}},
        "messages[0].content[0].image_url.detail": {
            **hi,
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,x", "detail": "low"}}]}
            ],
        },
        "messages[0].content[0]": {
            **hi,
            "messages": [
                {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}
            ],
        },
        "messages[0].audio": {**hi, "messages": [{"role": "assistant", "content": "x", "audio": {"id": "a"}}]},
    }
    for param, body in cases.items():
        status, error = status_of(body)
        assert status == 400 and error["param"].startswith(param), (param, error)
        assert param.split(".")[0].split("[")[0] in error["message"], error

    nan = b'{"model": "tiny-vl", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'
    status, error = status_of(raw=nan)
    assert status == 400 and "NaN" in error["message"]
    deep = b'{"model": "tiny-vl", "messages": [{"role": "user", "content": "hi"}], "metadata": ' + b"[" * 5000
    deep += b"]" * 5000 + b"}"
    status, error = status_of(raw=deep)
    assert status == 400 and error["code"] == "json_too_deep"
    status, error = status_of(raw=b"[" * 100_000)
    assert status == 400
    status, error = status_of(raw=b'{"model": "tiny-vl", "seed": 1' + b"0" * 5000 + b"}")
    assert status == 400 and error["code"] == "invalid_json"
    # explicit nulls are "not given", and neutral values of unsupported parameters are fine
    status, _ = status_of({**hi, "audio": None, "store": False, "modalities": ["text"], "parallel_tool_calls": False})
    assert status == 200


def test_completions_endpoint(base_url, runtime):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused")
    prompt = "Name three colors."
    expected = runtime.chat([{"role": "user", "content": prompt}], temperature=0, max_new_tokens=TOKENS).text
    reply = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=TOKENS, logprobs=2)
    choice = reply.choices[0]
    assert choice.text == expected and reply.usage.completion_tokens == TOKENS
    assert "".join(choice.logprobs.tokens) == expected and len(choice.logprobs.top_logprobs[0]) == 2
    assert len(client.completions.create(model=MODEL, prompt="hi").choices[0].text) > 0  # max_tokens 16 by default
    streamed = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=TOKENS, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected
    two = client.completions.create(model=MODEL, prompt=[prompt, "hi"], temperature=0, max_tokens=3)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text != two.choices[1].text
    for bad in ({"echo": True}, {"suffix": "x"}, {"best_of": 3}):
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, **bad)
        assert caught.value.param == next(iter(bad))


def test_metrics(base_url):
    client = httpx.Client(base_url=base_url, timeout=60)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 3}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    text = client.get("/metrics").text
    assert 'belle_vl_requests_total{route="/v1/chat/completions",status="200"}' in text
    for name in ("completion_tokens_total", "prompt_tokens_total", "queue_depth", "batch_size_bucket"):
        assert f"belle_vl_{name}" in text, name
    assert "belle_vl_request_seconds_bucket" in text
    completion_tokens = [line for line in text.splitlines() if line.startswith("belle_vl_completion_tokens_total")]
    assert float(completion_tokens[0].split()[-1]) >= 3


def test_docs_and_metrics_need_the_key_and_exposed_servers_warn(caplog):
    from fastapi.testclient import TestClient

    from belle_vl_tools.server import warn_if_exposed

    with TestClient(create_app(Scripted(), api_key="sesame")) as client:
        for path in ("/docs", "/redoc", "/openapi.json", "/metrics", "/v1/models"):
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers={"Authorization": "Bearer sesame"}).status_code == 200, path
        assert client.get("/health").status_code == 200
    with TestClient(create_app(Scripted())) as client:
        assert client.get("/openapi.json").status_code == 200

    with caplog.at_level("WARNING", logger="belle_vl_tools.server"):
        assert warn_if_exposed("0.0.0.0", None) and "without an API key" in caplog.text
        caplog.clear()
        assert not warn_if_exposed("0.0.0.0", "key") and not warn_if_exposed("127.0.0.1", None)
        assert not warn_if_exposed("::1", None) and not warn_if_exposed("localhost", None)
        assert caplog.text == ""


def test_the_backend_scheduler_refuses_what_only_the_engine_can_do():
    from fastapi.testclient import TestClient

    with TestClient(create_app(Scripted())) as client:
        body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}]}
        for extra in ({"logprobs": True}, {"presence_penalty": 1}, {"frequency_penalty": -1}, {"logit_bias": {"5": 1}}):
            response = client.post("/v1/chat/completions", json={**body, **extra})
            assert response.status_code == 400, extra
            assert error_of(response)["param"] == next(iter(extra)) and "Scripted" in error_of(response)["message"]
        reply = client.post("/v1/chat/completions", json={**body, "n": 2}).json()
        assert [c["message"]["content"] for c in reply["choices"]] == ["ok", "ok"]
        tool = {"type": "function", "function": {"name": "look", "parameters": {"type": "object"}}}
        response = client.post("/v1/chat/completions", json={**body, "tools": [tool], "tool_choice": "required"})
        assert response.status_code == 400 and error_of(response)["param"] == "tool_choice"
        assert "grammar-constrained decoding" in error_of(response)["message"]


def test_the_backend_gets_the_settings_and_the_request_own_response_format():
    from fastapi.testclient import TestClient

    backend = Scripted('{"a": 1}')
    with TestClient(create_app(backend)) as client:
        body = {
            "model": "scripted",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 7,
            "temperature": 0.5,
            "seed": 3,
            "stop": "END",
            "response_format": {"type": "json_object"},
        }
        reply = client.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == '{"a": 1}'
    generation = backend.calls[-1][1]
    assert generation == {
        "max_new_tokens": 7,
        "temperature": 0.5,
        "seed": 3,
        "stop": ["END"],
        "response_format": {"type": "json_object"},
    }


# --- the media pool -----------------------------------------------------------------------------------------------
class SlowHeaders:
    """A loopback HTTP server that sends its headers one byte a second, for as long as the client listens."""

    def __init__(self) -> None:
        import socket

        self.stop = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/slow.png"
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: Any) -> None:
        with conn:
            try:
                for byte in b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nX-Slow: " + b"a" * 1000:
                    if self.stop.wait(1.0):
                        return
                    conn.sendall(bytes([byte]))
            except OSError:
                pass

    def __enter__(self) -> SlowHeaders:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def test_slow_image_urls_do_not_delay_inline_pictures(pictures):
    from belle_vl_tools.images import ImagePolicy

    policy = ImagePolicy(allow_urls=True, allow_private_urls=True, url_timeout=2, url_total_timeout=3)
    app = create_app(Scripted(), image_policy=policy, allow_urls=True, media_workers=8, max_fetches_per_client=8)
    inline = {"model": "scripted", "messages": image_turn(data_url(pictures["red"]), "hi")}
    with SlowHeaders() as slow, background_server(app) as base:
        client = httpx.Client(base_url=base, timeout=60)
        started = time.monotonic()
        assert client.post("/v1/chat/completions", json=inline).status_code == 200
        alone = time.monotonic() - started

        statuses: list[int] = []
        attack = {"model": "scripted", "messages": image_turn(slow.url, "hi")}

        def attacker() -> None:
            statuses.append(httpx.post(f"{base}/v1/chat/completions", json=attack, timeout=60).status_code)

        attackers = [threading.Thread(target=attacker) for _ in range(8)]
        for thread in attackers:
            thread.start()
        deadline = time.monotonic() + 5
        while app.state.media.stats()["fetch_busy"] < 8 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert app.state.media.stats()["fetch_busy"] == 8  # all eight are stuck in their downloads
        started = time.monotonic()
        assert client.post("/v1/chat/completions", json=inline).status_code == 200
        assert time.monotonic() - started < alone + 1.0

        for thread in attackers:
            thread.join(30)
        assert statuses == [400] * 8  # each download ended at its deadline (3 s + 1 s of grace)
        assert app.state.media.stats()["fetch_busy"] == 0  # and gave its slot back

        # one client may hold only so many downloads at once
        capped = create_app(Scripted(), image_policy=policy, allow_urls=True, max_fetches_per_client=2)
        with background_server(capped) as base2:
            codes: list[int] = []

            def fetch() -> None:
                codes.append(httpx.post(f"{base2}/v1/chat/completions", json=attack, timeout=60).status_code)

            threads = [threading.Thread(target=fetch) for _ in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            assert sorted(codes) == [400, 400, 429]


# --- structured output by construction ----------------------------------------------------------------------------
def test_structured_output_and_forced_tool_calls_hold_on_a_random_model(base_url):
    openai = pytest.importorskip("openai")
    from pydantic import BaseModel

    class Shape(BaseModel):
        color: str
        sides: int

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused")
    question = [{"role": "user", "content": "Describe a shape."}]
    parsed = client.chat.completions.parse(
        model=MODEL, messages=question, response_format=Shape, temperature=0, max_tokens=60
    )
    assert isinstance(parsed.choices[0].message.parsed, Shape)
    reply = client.chat.completions.create(
        model=MODEL, messages=question, response_format={"type": "json_object"}, temperature=0, max_tokens=40
    )
    assert isinstance(json.loads(reply.choices[0].message.content), dict)

    for seed in range(3):
        reply = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Weather?"}],
            tools=[WEATHER],
            tool_choice="required",
            temperature=1.0,
            seed=seed,
            max_tokens=60,
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls
        arguments = json.loads(call.function.arguments)
        assert call.function.name == "get_weather" and isinstance(arguments["city"], str)

    named = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather?"}],
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=60,
        stream=True,
    )
    calls = [c.choices[0].delta.tool_calls for c in named if c.choices and c.choices[0].delta.tool_calls]
    assert calls[0][0].function.name == "get_weather" and "city" in json.loads(calls[0][0].function.arguments)


def test_langchain_structured_output_against_the_server(base_url):
    chat_openai = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel

    class Shape(BaseModel):
        color: str
        sides: int

    llm = chat_openai.ChatOpenAI(base_url=f"{base_url}/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=60)
    for method in ("json_schema", "function_calling", "json_mode"):
        structured = llm.with_structured_output(
            Shape if method != "json_mode" else Shape.model_json_schema(), method=method
        )
        result = structured.invoke("Describe a shape as JSON with color and sides.")
        assert result is not None, method
        if method != "json_mode":
            assert isinstance(result, Shape), method
        else:
            assert isinstance(result, dict), method
