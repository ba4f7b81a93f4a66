"""Grammar work is bounded: hostile schemas are refused before compiling, compiling has a deadline off every loop,
matching has a budget, and the grammar library's own messages never reach the user."""

from __future__ import annotations

import concurrent.futures
import json
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
import torch

from belle_vl_tools import constrained
from belle_vl_tools.constrained import (
    LIMITS,
    Grammar,
    GrammarLimitError,
    RowProcessor,
    check_schema,
    compile_grammar,
    grammar_from,
    set_limits,
)
from belle_vl_tools.errors import PromptError

RECURSIVE = {
    "$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}, "required": ["next"]}},
    "$ref": "#/$defs/n",
}
PATTERN = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(a{1000}){1000}"}}, "required": ["a"]}
WIDE = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(20_000)}}
TREE = {"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}}, "$ref": "#/$defs/n"}
ATTACKS = {"recursive": RECURSIVE, "pattern": PATTERN, "wide": WIDE}
LIMIT_OF = {"recursive": "max_shortest_output", "pattern": "max_pattern_size", "wide": "max_schema_chars"}


def _optional(count: int, tag: str) -> dict[str, Any]:
    """An object of ``count`` optional string properties (compile time grows with their square)."""
    return {"type": "object", "properties": {f"{tag}{i}": {"type": "string"} for i in range(count)}}


@pytest.fixture
def limits() -> Iterator[None]:
    previous = LIMITS
    yield
    set_limits(previous)


# --- checks before compiling ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_each_attack_is_refused_before_compiling_naming_its_limit(name: str) -> None:
    started = time.monotonic()
    with pytest.raises(GrammarLimitError) as caught:
        grammar_from({"type": "json_schema", "json_schema": {"name": "x", "schema": ATTACKS[name]}})
    assert time.monotonic() - started < 2  # a walk of the schema, nothing compiled (milliseconds; generous)
    assert caught.value.limit == LIMIT_OF[name] and caught.value.param == "response_format"
    assert isinstance(caught.value, PromptError)  # a client's mistake: a 400, never a 500
    with pytest.raises(GrammarLimitError) as as_tool:
        Grammar.tool_call([("f", ATTACKS[name])])
    assert as_tool.value.param == "tools"


@pytest.mark.parametrize(
    ("schema", "limit", "where"),
    [
        (_optional(501, "p"), "max_properties", "#/properties"),
        ({"type": "string", "enum": [str(i) for i in range(1001)]}, "max_enum_values", "#/enum"),
        ({"type": "string", "minLength": 100_000}, "max_shortest_output", "#"),
        (
            {
                "type": "object",
                "properties": {"x": {"anyOf": [{"type": "string"}, {"$ref": "#/$defs/n"}]}},
                "$defs": RECURSIVE["$defs"],
            },
            "max_shortest_output",
            "#/properties/x/anyOf/1",
        ),
        ({"type": "string", "pattern": "a" * 1001}, "max_pattern_chars", "#/pattern"),
    ],
)
def test_the_refusal_names_the_limit_and_where(schema: dict, limit: str, where: str) -> None:
    with pytest.raises(GrammarLimitError) as caught:
        check_schema(schema)
    assert caught.value.limit == limit
    assert where in str(caught.value)


def test_nesting_and_doubling_references_are_refused() -> None:
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(40):
        deep = {"type": "object", "properties": {"a": deep}, "required": ["a"]}
    with pytest.raises(GrammarLimitError) as caught:
        check_schema(deep)
    assert caught.value.limit == "max_depth"
    # each level requires the next twice: the shortest instance doubles 40 times
    defs = {
        f"d{i}": {
            "type": "object",
            "properties": {"a": {"$ref": f"#/$defs/d{i + 1}"}, "b": {"$ref": f"#/$defs/d{i + 1}"}},
            "required": ["a", "b"],
        }
        for i in range(40)
    }
    with pytest.raises(GrammarLimitError) as caught:
        check_schema({"$defs": {**defs, "d40": {"type": "string"}}, "$ref": "#/$defs/d0"})
    assert caught.value.limit == "max_shortest_output"


def test_limits_hold_for_all_the_tools_together() -> None:
    half = _optional(300, "q")
    Grammar.tool_call([("a", half)])
    with pytest.raises(GrammarLimitError, match="500 object properties"):
        Grammar.tool_call([("a", half), ("b", half)])


def test_ordinary_and_optional_recursive_schemas_still_work(tokenizer) -> None:
    grammar = grammar_from(TREE)
    processor = RowProcessor(grammar, tokenizer, vocab_size=151936, max_new_tokens=20)
    logits = torch.zeros(151936)
    ids: list[int] = []
    for _ in range(20):
        token = int(torch.argmax(processor(ids, logits.clone())))
        if token >= 151643:  # an end token: the answer is complete
            break
        ids.append(token)
    value = json.loads(tokenizer.decode(ids))  # closed in time: the recursion is optional
    assert isinstance(value, dict)


def test_a_bad_reference_and_the_compilers_messages_are_our_own(tokenizer) -> None:
    with pytest.raises(PromptError, match="names nothing") as caught:
        grammar_from({"$ref": "#/nowhere"})
    assert ".cc" not in str(caught.value)
    # a schema xgrammar itself refuses: its message without its C++ source path and log stamp
    with pytest.raises(PromptError) as compiled:
        compile_grammar(Grammar.json_schema({"type": "string", "format": "no-such-format", "pattern": "("}), tokenizer)
    message = str(compiled.value)
    assert "Cannot build a grammar" in message
    assert ".cc" not in message and "/project/" not in message


# --- budgets ------------------------------------------------------------------------------------------------------


def test_a_compile_past_its_deadline_fails_and_is_refused_from_then_on(tokenizer, limits) -> None:
    compile_grammar(Grammar.json_object(), tokenizer, 151936)  # the tokenizer's tables, built once
    set_limits(replace(LIMITS, compile_seconds=0.01))
    slow = Grammar.json_schema(_optional(450, f"slow{time.monotonic_ns()}"))  # ~0.1-1 s to compile
    started = time.monotonic()
    with pytest.raises(GrammarLimitError) as caught:
        compile_grammar(slow, tokenizer, 151936)
    assert caught.value.limit == "compile_seconds" and "compile" in str(caught.value)
    assert time.monotonic() - started < 2  # the caller is free at the deadline, the thread finishes on its own
    started = time.monotonic()
    with pytest.raises(GrammarLimitError, match="compile"):
        compile_grammar(slow, tokenizer, 151936)  # remembered: refused at once
    assert time.monotonic() - started < 1
    kit = constrained._kit(tokenizer, 151936)
    deadline = time.monotonic() + 60
    while kit.overdue and time.monotonic() < deadline:  # the late thread is counted until it really ends
        time.sleep(0.05)
    assert kit.overdue == 0 and slow not in kit.compiled


def test_the_async_compile_serves_a_cached_grammar_at_once(tokenizer) -> None:
    import asyncio

    grammar = Grammar.json_schema({"type": "object", "properties": {"cached": {"type": "integer"}}})

    async def twice() -> tuple[Any, Any]:
        first = await constrained.compile_grammar_async(grammar, tokenizer, 151936)
        return first, await constrained.compile_grammar_async(grammar, tokenizer, 151936)

    first, second = asyncio.run(twice())
    assert first is second


def test_matching_past_its_budget_fails_the_answer(tokenizer, limits) -> None:
    processor = RowProcessor(Grammar.json_object(), tokenizer, vocab_size=151936, max_new_tokens=10)
    set_limits(replace(LIMITS, matcher_seconds=0.0))
    with pytest.raises(GrammarLimitError) as caught:
        processor([], torch.zeros(151936))
    assert caught.value.limit == "matcher_seconds"


def test_the_python_api_refuses_the_attacks_at_once(runtime) -> None:
    question = [{"role": "user", "content": "Answer."}]
    for name, schema in ATTACKS.items():
        started = time.monotonic()
        with pytest.raises(GrammarLimitError):
            runtime.chat(question, response_format={"type": "json_schema", "json_schema": {"schema": schema}})
        assert time.monotonic() - started < 2, name


# --- through the server -------------------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


class _PeakRSS:
    """The highest resident size seen (sampled every 20 ms) while the block runs, less the size before it."""

    def __enter__(self) -> _PeakRSS:
        self.base = self.peak = _rss()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()
        self.growth = self.peak - self.base


@pytest.fixture(scope="module")
def server(runtime) -> Iterator[str]:
    pytest.importorskip("fastapi")
    from belle_vl_tools.server import background_server, create_app

    app = create_app(runtime, model_name="tiny", max_batch_size=8, max_request_bytes=4_000_000)
    with background_server(app) as url:
        yield url


def _attack_body(name: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    if name == "pattern":  # as a tool's parameters with a forced call
        body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": PATTERN}}]
        body["tool_choice"] = "required"
    else:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": ATTACKS[name]}}
    return body


@pytest.mark.skipif(sys.platform != "linux", reason="reads the resident size from /proc")
def test_server_attacks_get_400s_while_an_ordinary_request_answers(server: str) -> None:
    ordinary = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0}
    with httpx.Client(base_url=server, timeout=60) as client:
        client.post("/v1/chat/completions", json=ordinary).raise_for_status()  # warm
        with _PeakRSS() as rss, concurrent.futures.ThreadPoolExecutor(4) as pool:
            plain = pool.submit(client.post, "/v1/chat/completions", json=ordinary)
            for name in ATTACKS:
                for body in (_attack_body(name), {**_attack_body(name), "stream": True}):
                    started = time.monotonic()
                    reply = client.post("/v1/chat/completions", json=body)
                    assert time.monotonic() - started < 2, name
                    assert reply.status_code == 400, (name, reply.text)
                    error = reply.json()["error"]
                    assert error["code"] == "grammar_too_complex"
                    assert error["param"] == ("tools" if name == "pattern" else "response_format")
                    assert ".cc" not in error["message"]
            assert plain.result().status_code == 200
        assert rss.growth < 100 * 2**20, rss.growth
        assert client.post("/v1/chat/completions", json=ordinary).status_code == 200


def test_health_answers_while_a_wide_schema_is_sent_and_a_grammar_compiles(server: str, limits) -> None:
    """The schema checks and compiling run off the event loop's critical path: /health stays quick."""
    set_limits(replace(LIMITS, max_properties=1_000))
    slow = _optional(900, f"h{time.monotonic_ns()}")  # passes the checks, compiles for a second or more
    bodies = [
        _attack_body("wide"),
        {
            **_attack_body("wide"),
            "response_format": {"type": "json_schema", "json_schema": {"name": "slow", "schema": slow}},
        },
    ]
    latencies: list[float] = []
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=server, timeout=30) as client:
            while not done.is_set():
                started = time.monotonic()
                assert client.get("/health").status_code == 200
                latencies.append(time.monotonic() - started)
                time.sleep(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    with httpx.Client(base_url=server, timeout=60) as client:
        statuses = [client.post("/v1/chat/completions", json=body).status_code for body in bodies]
    done.set()
    poller.join(timeout=30)
    assert statuses[0] == 400 and statuses[1] in (200, 400)
    assert latencies and max(latencies) < 1.0, max(latencies)
