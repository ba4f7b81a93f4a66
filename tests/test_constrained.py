"""Constrained decoding: response_format and forced tool calls hold by construction, even for a random model."""

from __future__ import annotations

import json
from typing import Literal

import pytest
import torch
from pydantic import BaseModel

from belle_vl_tools.constrained import (
    Grammar,
    GrammarError,
    RowProcessor,
    compile_grammar,
    grammar_from,
    logits_processor,
    parse_json_output,
)
from belle_vl_tools.errors import PromptError


class Item(BaseModel):
    name: str
    count: int
    kind: Literal["circle", "square"]
    tags: list[str]


class Box(BaseModel):
    label: str
    item: Item
    score: float | None = None


WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
ZOOM = {"type": "object", "properties": {"factor": {"type": "number"}}, "required": ["factor"]}


def _question() -> list[dict]:
    return [{"role": "user", "content": "Give me the answer."}]


# --- reading response_format ---------------------------------------------------------------------------------------


def test_grammar_from_accepts_the_documented_forms() -> None:
    assert grammar_from(None) is None
    assert grammar_from({"type": "text"}) is None
    assert grammar_from({"type": "json_object"}) == Grammar.json_object()
    openai_form = {"type": "json_schema", "json_schema": {"name": "Item", "schema": Item.model_json_schema()}}
    assert grammar_from(openai_form).schema == grammar_from(Item).schema
    assert grammar_from(Item).name == "Item"
    assert grammar_from(WEATHER).kind == "json_schema"
    tool = Grammar.tool_call([("get_weather", WEATHER)])
    assert grammar_from(tool) is tool
    assert Grammar.from_dict(tool.to_dict()) == tool
    assert Grammar.from_dict(grammar_from(Item).to_dict()) == grammar_from(Item)


@pytest.mark.parametrize(
    "bad",
    ["json", 3, {"type": "xml"}, {"type": "json_schema", "json_schema": {"name": "x"}}, {"type": "json_schema"}],
)
def test_grammar_from_refuses_other_forms_naming_response_format(bad: object) -> None:
    with pytest.raises(PromptError, match="response_format|schema"):
        grammar_from(bad)


def test_a_schema_the_engine_cannot_compile_is_a_prompt_error(tokenizer) -> None:
    with pytest.raises(PromptError, match="schema"):
        compile_grammar(Grammar.json_schema({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}), tokenizer)


def test_compiled_grammars_are_cached_per_tokenizer(tokenizer) -> None:
    first = compile_grammar(Grammar.json_schema(Item), tokenizer, 151936)
    assert compile_grammar(Grammar.json_schema(Item), tokenizer, 151936) is first


# --- the row processor (the batching engine's protocol) -------------------------------------------------------------


def test_row_processor_allows_exactly_the_grammar_and_ends_only_when_complete(tokenizer) -> None:
    processor = RowProcessor(Grammar.json_schema(WEATHER), tokenizer, vocab_size=151936)
    text_ids = tokenizer.encode('{"city": "Paris"}')
    stop = tokenizer.im_end_id
    generated: list[int] = []
    for token in text_ids:
        logits = processor(generated, torch.zeros(151936))
        assert logits[token] == 0, tokenizer.decode([token])
        assert logits[stop] == float("-inf")  # no end before the object is complete
        if not generated:
            assert logits[tokenizer.encode("x")[0]] == float("-inf")  # the first token must open the object
        generated.append(token)
    logits = processor(generated, torch.zeros(151936))
    assert logits[stop] == 0
    assert int((logits == 0).sum()) == 2  # only <|im_end|> and <|endoftext|>
    assert not processor.finished
    processor(generated + [stop], torch.zeros(151936))
    assert processor.finished


def test_row_processor_refuses_a_token_outside_the_grammar(tokenizer) -> None:
    processor = RowProcessor(Grammar.json_object(), tokenizer, vocab_size=151936)
    with pytest.raises(GrammarError):
        processor(tokenizer.encode("hello"), torch.zeros(151936))


@pytest.mark.parametrize("grammar", [Grammar.json_schema(Box), Grammar.json_object()])
@pytest.mark.parametrize("budget", [36, 64])
def test_random_logits_still_give_valid_json_within_the_budget(tokenizer, grammar: Grammar, budget: int) -> None:
    """The worst case: logits that know nothing. The output is closed before max_new_tokens runs out."""
    generator = torch.Generator().manual_seed(budget)
    processor = RowProcessor(grammar, tokenizer, vocab_size=151936, max_new_tokens=budget)
    generated: list[int] = []
    while len(generated) < budget:
        logits = processor(generated, torch.randn(151936, generator=generator))
        generated.append(int(logits.argmax()))
        if generated[-1] == tokenizer.im_end_id:
            break
    assert generated[-1] == tokenizer.im_end_id, tokenizer.decode(generated)
    value = parse_json_output(tokenizer.decode(generated[:-1]))
    if grammar.kind == "json_schema":
        Box.model_validate(value)
    else:
        assert isinstance(value, dict)


# --- through the runtime: a random tiny model with the real vocabulary ----------------------------------------------


def test_chat_without_constraint_is_not_json(runtime) -> None:
    text = runtime.chat(_question(), temperature=0, max_new_tokens=24).text
    with pytest.raises(ValueError):
        json.loads(text)


@pytest.mark.parametrize(
    "response_format",
    [Item, {"type": "json_schema", "json_schema": {"name": "Box", "schema": Box.model_json_schema()}}],
)
def test_chat_returns_schema_valid_json_from_a_random_model(runtime, response_format) -> None:
    result = runtime.chat(_question(), temperature=0, max_new_tokens=48, response_format=response_format)
    assert result.finish_reason == "stop"
    model = Item if response_format is Item else Box
    model.model_validate_json(result.text)


def test_json_object_and_sampling(runtime) -> None:
    for seed in (1, 2):
        result = runtime.chat(
            _question(), temperature=1.0, seed=seed, max_new_tokens=32, response_format={"type": "json_object"}
        )
        assert isinstance(json.loads(result.text), dict)


def test_stream_and_batch_follow_the_grammar(runtime) -> None:
    chunks = list(runtime.stream(_question(), temperature=0, max_new_tokens=40, response_format=Item))
    streamed = "".join(chunk.delta for chunk in chunks)
    assert streamed == runtime.chat(_question(), temperature=0, max_new_tokens=40, response_format=Item).text
    Item.model_validate_json(streamed)
    other = [{"role": "user", "content": "Something else, please."}]
    results = runtime.generate_batch([_question(), other], temperature=0, max_new_tokens=40, response_format=Item)
    for result in results:
        Item.model_validate_json(result.text)
    assert results[0].text == streamed  # greedy batch answers equal the single ones


def test_tool_call_grammar_names_an_allowed_tool_with_valid_arguments(runtime) -> None:
    from belle_vl_tools.react import parse_reply

    grammar = Grammar.tool_call([("get_weather", WEATHER), ("zoom", ZOOM)])
    result = runtime.chat(_question(), temperature=0, max_new_tokens=40, response_format=grammar)
    parsed = parse_reply(result.text)
    assert not parsed.invalid_tool_calls, result.text
    (call,) = parsed.tool_calls
    assert call.name in ("get_weather", "zoom")
    key = "city" if call.name == "get_weather" else "factor"
    assert list(call.arguments) == [key]


def test_generate_logits_processor_handles_a_batch_with_a_free_row(runtime, tokenizer) -> None:
    processor = logits_processor([Grammar.json_object(), None], tokenizer, vocab_size=runtime.model.config.vocab_size)
    scores = torch.zeros(2, runtime.model.config.vocab_size)
    ids = torch.tensor([tokenizer.encode("a b"), tokenizer.encode("a b")])
    out = processor(ids, scores)
    assert bool(torch.isinf(out[0]).any()) and not bool(torch.isinf(out[1]).any())
    with pytest.raises(GrammarError):
        logits_processor([Grammar.json_object()], tokenizer)(ids, torch.zeros(2, 8))


def test_vision_tasks_take_response_format_and_the_picture_still_counts(runtime, pictures) -> None:
    answers = [
        runtime.ask(pictures[color], "What is it?", temperature=0, max_new_tokens=48, response_format=Item).text
        for color in ("red", "blue")
    ]
    for text in answers:
        Item.model_validate_json(text)
    assert answers[0] != answers[1]  # the picture reached the model under the grammar too
