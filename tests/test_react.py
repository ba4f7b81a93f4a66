"""The ReAct tool-call protocol: rendering conversations with tools, and parsing literal model outputs."""

from __future__ import annotations

import json

import pytest

from belle_vl_tools.errors import PromptError
from belle_vl_tools.messages import ImagePart, Message, TextPart, parse_messages
from belle_vl_tools.react import (
    STOP_SEQUENCES,
    InvalidToolCall,
    ReplyStreamParser,
    ToolCall,
    ToolSession,
    ToolSpec,
    parse_reply,
    react_instruction,
    render_tool_messages,
    tool_description,
)

DESCRIBE = ToolSpec(
    "describe_image",
    "Describe a picture.",
    {"type": "object", "properties": {"image": {"type": "string"}}, "required": ["image"]},
)
ASK = ToolSpec(
    "visual_qa",
    "Answer a question about a picture.",
    {
        "type": "object",
        "title": "VisualQAInput",
        "properties": {"image": {"type": "string", "title": "Image"}, "question": {"type": "string"}},
        "required": ["image", "question"],
    },
)
TOOLS = [DESCRIBE, ASK]


# --- parsing literal outputs -------------------------------------------------------------------------------------


def test_well_formed_call() -> None:
    reply = parse_reply(
        'Thought: I need to see the picture first.\nAction: describe_image\nAction Input: {"image": "image_1"}',
        TOOLS,
    )
    assert reply.content == ""
    assert reply.thought == "I need to see the picture first."
    assert reply.invalid_tool_calls == []
    [call] = reply.tool_calls
    assert (call.name, call.arguments) == ("describe_image", {"image": "image_1"})
    assert call.id.startswith("call_") and len(call.id) > 10


def test_final_answer() -> None:
    reply = parse_reply("Thought: I now know the final answer\nFinal Answer: A red circle on white.", TOOLS)
    assert reply.content == "A red circle on white."
    assert reply.tool_calls == [] and reply.invalid_tool_calls == []
    assert reply.thought == "I now know the final answer"


def test_plain_text_without_action_is_the_answer() -> None:
    text = "The picture shows a red circle.\nIt is on a white background."
    reply = parse_reply(text, TOOLS)
    assert reply.content == text
    assert not reply.has_calls


def test_unknown_tool_is_invalid() -> None:
    reply = parse_reply('Thought: x\nAction: magic_function\nAction Input: {"input": 3}', TOOLS)
    assert reply.tool_calls == []
    [bad] = reply.invalid_tool_calls
    assert bad.name == "magic_function"
    assert bad.arguments == '{"input": 3}'
    assert "Unknown tool 'magic_function'" in bad.error and "describe_image" in bad.error


def test_without_tools_any_name_is_accepted() -> None:
    reply = parse_reply('Action: magic_function\nAction Input: {"input": 3}')
    assert reply.tool_calls[0].arguments == {"input": 3}


def test_bad_json_is_invalid() -> None:
    reply = parse_reply('Action: visual_qa\nAction Input: {"image": "image_1", "question": ', TOOLS)
    [bad] = reply.invalid_tool_calls
    assert bad.name == "visual_qa"
    assert bad.arguments.startswith('{"image"')
    assert "not valid JSON" in bad.error
    assert reply.content == ""


def test_missing_action_input_is_invalid() -> None:
    reply = parse_reply("Thought: look\nAction: describe_image\n", TOOLS)
    [bad] = reply.invalid_tool_calls
    assert bad.name == "describe_image" and bad.arguments is None
    assert "no Action Input" in bad.error


def test_action_input_that_is_not_an_object() -> None:
    reply = parse_reply('Action: visual_qa\nAction Input: ["image_1", "what?"]', TOOLS)
    [bad] = reply.invalid_tool_calls
    assert "JSON object" in bad.error


def test_bare_value_for_a_one_argument_tool() -> None:
    reply = parse_reply("Action: describe_image\nAction Input: image_1", TOOLS)
    assert reply.tool_calls[0].arguments == {"image": "image_1"}
    # ...but not for a tool with two arguments
    reply = parse_reply("Action: visual_qa\nAction Input: image_1", TOOLS)
    assert reply.tool_calls == [] and len(reply.invalid_tool_calls) == 1


def test_several_calls() -> None:
    text = (
        "Thought: compare both\n"
        'Action: describe_image\nAction Input: {"image": "a.png"}\n'
        "Thought: and the other one\n"
        'Action: visual_qa\nAction Input: {"image": "b.png", "question": "What color?"}'
    )
    reply = parse_reply(text, TOOLS)
    assert [(c.name, c.arguments) for c in reply.tool_calls] == [
        ("describe_image", {"image": "a.png"}),
        ("visual_qa", {"image": "b.png", "question": "What color?"}),
    ]
    assert len({c.id for c in reply.tool_calls}) == 2


def test_chinese_text() -> None:
    text = (
        "Thought: 我需要先看一下图片。\nAction: visual_qa\n"
        'Action Input: {"image": "图片1.png", "question": "图中有几个人？"}'
    )
    reply = parse_reply(text, TOOLS)
    assert reply.thought == "我需要先看一下图片。"
    assert reply.tool_calls[0].arguments == {"image": "图片1.png", "question": "图中有几个人？"}
    # full-width colons, as Chinese text writes them
    assert parse_reply("Thought：我知道了\nFinal Answer：图中有两个人。", TOOLS).content == "图中有两个人。"


def test_stray_text_after_the_arguments() -> None:
    reply = parse_reply('Action: describe_image\nAction Input: {"image": "image_1"} and then I will see.', TOOLS)
    assert reply.tool_calls[0].arguments == {"image": "image_1"}
    fenced = parse_reply('Action: describe_image\nAction Input: ```json\n{"image": "image_2"}\n```', TOOLS)
    assert fenced.tool_calls[0].arguments == {"image": "image_2"}


def test_invented_observation_and_answer_are_dropped() -> None:
    text = (
        'Thought: look\nAction: describe_image\nAction Input: {"image": "image_1"}\n'
        "Observation: a cat\nThought: I now know the final answer\nFinal Answer: a cat"
    )
    reply = parse_reply(text, TOOLS)
    assert [c.name for c in reply.tool_calls] == ["describe_image"]
    assert reply.content == ""


def test_final_answer_before_an_action_ends_the_reply() -> None:
    reply = parse_reply('Final Answer: done.\nAction: describe_image\nAction Input: {"image": "x"}', TOOLS)
    assert reply.content.startswith("done.") and not reply.has_calls


def test_keywords_count_only_at_line_starts() -> None:
    reply = parse_reply("I would use Action: describe_image here, but no.", TOOLS)
    assert reply.content == "I would use Action: describe_image here, but no." and not reply.has_calls


@pytest.mark.parametrize("value", [None, "", "   ", "Action:", "Action Input:", "Final Answer:", "\x00{{{"])
def test_parse_never_raises(value) -> None:
    reply = parse_reply(value, TOOLS)
    assert isinstance(reply.content, str)
    for bad in reply.invalid_tool_calls:
        assert isinstance(bad, InvalidToolCall) and bad.error


# --- tool specs --------------------------------------------------------------------------------------------------


def test_tool_spec_from_and_to_openai() -> None:
    openai = {"type": "function", "function": {"name": "f", "description": "d", "parameters": DESCRIBE.parameters}}
    spec = ToolSpec.from_openai(openai)
    assert spec == ToolSpec.from_openai(openai["function"])
    assert spec.to_openai() == openai
    with pytest.raises(PromptError, match="name"):
        ToolSpec.from_openai({"type": "function", "function": {"description": "no name"}})
    with pytest.raises(PromptError, match="not usable"):
        ToolSpec("has space", "d")


def test_tool_description_wording_and_clean_schema() -> None:
    line = tool_description(ASK)
    assert line.startswith(
        "visual_qa: Call this tool to interact with the visual_qa API. What is the visual_qa API useful for? "
        "Answer a question about a picture. Parameters: "
    )
    assert line.endswith(" Format the arguments as a JSON object.")
    schema = json.loads(line.split("Parameters: ", 1)[1].rsplit(" Format", 1)[0])
    assert "title" not in schema and "title" not in schema["properties"]["image"]
    assert schema["required"] == ["image", "question"]


def test_instruction_lists_the_tools_and_the_format() -> None:
    text = react_instruction(TOOLS)
    assert text.startswith("Answer the following questions as best you can. You have access to the following tools:")
    assert "should be one of [describe_image,visual_qa]" in text
    assert "Final Answer: the final answer to the original input question" in text
    assert text.endswith("Begin!")
    assert "must call the visual_qa tool" in react_instruction(
        [ASK], {"type": "function", "function": {"name": "visual_qa"}}
    )
    assert STOP_SEQUENCES == ("Observation:",)


# --- rendering ---------------------------------------------------------------------------------------------------


def test_render_puts_the_instruction_before_the_first_question() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A circle."},
        {"role": "user", "content": "And its color?"},
    ]
    out = render_tool_messages(messages, TOOLS)
    assert out[0] == Message.system("Be brief.")
    assert out[1].role == "user"
    image_part, text_part = out[1].parts
    assert image_part == ImagePart("a.png")
    assert isinstance(text_part, TextPart) and text_part.text.startswith("Answer the following questions")
    assert text_part.text.endswith("Begin!\n\nQuestion: What is it?")
    assert out[2] == Message.assistant("A circle.")
    assert out[3] == Message.user("Question: And its color?")
    assert messages[1]["content"][1]["text"] == "What is it?"  # the input is not modified


def test_render_folds_calls_and_observations_into_assistant_text() -> None:
    messages = [
        {"role": "user", "content": "What is in image_1?"},
        {
            "role": "assistant",
            "content": "I should look at it.",
            "tool_calls": [{"name": "describe_image", "args": {"image": "image_1"}, "id": "call_1"}],
        },
        {"role": "tool", "content": "A red circle.", "tool_call_id": "call_1", "name": "describe_image"},
        {"role": "assistant", "content": "A red circle."},
    ]
    out = render_tool_messages(messages, TOOLS)
    assert [m.role for m in out] == ["user", "assistant"]
    assert out[1] == Message.assistant(
        'Thought: I should look at it.\nAction: describe_image\nAction Input: {"image": "image_1"}\n'
        "Observation: A red circle.\nThought: I now know the final answer\nFinal Answer: A red circle."
    )
    # the reply that answers it parses back to the same call
    call_text = out[1].text.split("\nObservation:")[0]
    assert parse_reply(call_text, TOOLS).tool_calls[0].arguments == {"image": "image_1"}


def test_render_accepts_every_call_form() -> None:
    forms = [
        ToolCall("visual_qa", {"image": "x.png", "question": "q"}, id="c"),
        {
            "id": "c",
            "type": "function",
            "function": {"name": "visual_qa", "arguments": '{"image": "x.png", "question": "q"}'},
        },
        {"id": "c", "name": "visual_qa", "args": {"image": "x.png", "question": "q"}},
    ]
    texts = set()
    for call in forms:
        messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
        texts.add(render_tool_messages(messages, TOOLS)[-1].text.replace(" ", ""))
    assert len(texts) == 1
    with pytest.raises(PromptError, match="Cannot read the tool call"):
        render_tool_messages([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [42]}], TOOLS)


def test_render_keeps_images_returned_by_tools() -> None:
    picture = {"type": "image", "base64": "iVBORw0KGgo=", "mime_type": "image/png"}
    messages = [
        {"role": "user", "content": "Box the cat in image_1."},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"name": "describe_image", "args": {"image": "image_1"}, "id": "a"}],
        },
        {"role": "tool", "content": [{"type": "text", "text": "Drawn."}, picture], "tool_call_id": "a"},
    ]
    out = render_tool_messages(messages, TOOLS)
    assert [m.role for m in out] == ["user", "assistant", "user"]
    source = {"base64": "iVBORw0KGgo=", "mime_type": "image/png"}
    assert out[2] == Message("user", (ImagePart(source), TextPart("Observation: Drawn.")))  # not a "Question:"


def test_render_tool_choice() -> None:
    messages = [{"role": "user", "content": "hi"}]
    assert render_tool_messages(messages, TOOLS, "none") == [Message.user("hi")]
    named = render_tool_messages(messages, TOOLS, {"type": "function", "function": {"name": "visual_qa"}})
    assert "describe_image" not in named[0].text and "must call the visual_qa tool" in named[0].text
    assert "must call one of the tools" in render_tool_messages(messages, TOOLS, "required")[0].text
    with pytest.raises(PromptError, match="not among the tools"):
        render_tool_messages(messages, TOOLS, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(PromptError, match="tool_choice"):
        render_tool_messages(messages, TOOLS, "sometimes")


def test_render_takes_openai_tool_dicts() -> None:
    out = render_tool_messages([{"role": "user", "content": "hi"}], [ASK.to_openai()])
    assert "visual_qa: Call this tool" in out[0].text


def test_render_output_is_accepted_by_the_processor(processor) -> None:
    messages = [
        {"role": "user", "content": "Describe image_1."},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"name": "describe_image", "args": {"image": "image_1"}, "id": "a"}],
        },
        {"role": "tool", "content": "A red circle.", "tool_call_id": "a"},
    ]
    item = processor.prepare(render_tool_messages(messages, TOOLS))  # pure: pictures are not loaded
    text = processor.render_text(item.input_ids)
    assert "Observation: A red circle." in text and "Question: Describe image_1." in text


# --- streaming ---------------------------------------------------------------------------------------------------


def _stream(pieces: list[str]) -> tuple[list[str], str, object]:
    parser = ReplyStreamParser(TOOLS)
    shown = [parser.feed(piece) for piece in pieces]
    rest, parsed = parser.finish()
    return shown, rest, parsed


def test_stream_plain_answer_passes_through() -> None:
    shown, rest, parsed = _stream(["A red ", "circle", " on white."])
    assert "".join(shown) + rest == "A red circle on white." == parsed.content
    assert shown[0] == "A red "  # shown as soon as it cannot be a keyword


def test_stream_holds_back_the_react_part() -> None:
    shown, rest, parsed = _stream(["Thought: I now ", "know the final answer\n", "Final Answer: two ", "cats."])
    assert shown[:2] == ["", ""]
    assert "".join(shown) + rest == "two cats." == parsed.content


def test_stream_call_shows_nothing() -> None:
    shown, rest, parsed = _stream(["Thought: look\nAct", "ion: describe_image\nAction Input: ", '{"image": "image_1"}'])
    assert "".join(shown) + rest == ""
    assert parsed.tool_calls[0].name == "describe_image"


# --- the session -------------------------------------------------------------------------------------------------


def test_session_reads_every_tool_choice_form() -> None:
    named = {"type": "function", "function": {"name": "visual_qa"}}
    cases = [(None, "auto"), ("auto", "auto"), ("any", "required"), (True, "required"), ("required", "required")]
    cases += [(False, "none"), ("none", "none"), ("visual_qa", named), (named, named)]
    for given, expected in cases:
        assert ToolSession.create(TOOLS, given).tool_choice == expected
    with pytest.raises(PromptError, match="tool_choice"):
        ToolSession.create(TOOLS, "sometimes")
    with pytest.raises(PromptError, match="not among the tools"):
        ToolSession.create(TOOLS, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(PromptError, match="needs tools"):
        ToolSession.create([], "required")


def test_session_one_stop_rule_and_grammar_per_tool_choice() -> None:
    messages = [{"role": "user", "content": "What is in image_1?"}]
    for choice in ("auto", "required", "visual_qa"):
        request = ToolSession.create(TOOLS, choice).prepare(messages, {"stop": ["Observation:", "END"]})
        assert request.generation["stop"] == ["Observation:", "END"]  # added once, whenever a call may come
        assert "Action Input" in request.messages[0].text
    request = ToolSession.create(TOOLS, "none").prepare(messages, {"temperature": 0})
    assert request.generation == {"temperature": 0} and request.messages == parse_messages(messages)

    assert "response_format" not in ToolSession.create(TOOLS, "auto").prepare(messages).generation
    forced = ToolSession.create(TOOLS, "required").prepare(messages).generation["response_format"]
    assert forced.kind == "tool_call" and [name for name, _ in forced.tools] == ["describe_image", "visual_qa"]
    named = ToolSession.create(TOOLS, "visual_qa").prepare(messages).generation["response_format"]
    assert [name for name, _ in named.tools] == ["visual_qa"]
    assert json.loads(named.tools[0][1])["required"] == ["image", "question"]
    either = ToolSession.create(TOOLS, "auto", {"type": "json_object"}).grammar()
    assert either.kind == "tool_call" and either.answer.kind == "json_object"
    plain = ToolSession.create(None, None, {"type": "json_object"}).prepare(messages)
    assert plain.generation["response_format"].kind == "json_object" and plain.messages == parse_messages(messages)
    with pytest.raises(PromptError, match="response_format"):
        ToolSession.create().prepare(messages, {"response_format": {"type": "json_object"}})


def test_session_parses_with_the_offered_tools_only() -> None:
    reply = 'Thought: x\nAction: describe_image\nAction Input: {"image": "image_1"}'
    assert ToolSession.create(TOOLS).parse(reply).tool_calls[0].name == "describe_image"
    assert ToolSession.create(TOOLS, "visual_qa").parse(reply).invalid_tool_calls[0].error.startswith("Unknown tool")
    assert ToolSession.create(TOOLS, "none").parse(reply).content == reply
    parser = ToolSession.create().stream_parser()
    assert parser.feed("Action: a") == "Action: a" and parser.finish()[1].content == "Action: a"


def test_session_accepts_core_messages() -> None:
    history = [
        Message.user("What is in image_1?"),
        Message.assistant("", [ToolCall("describe_image", {"image": "image_1"}, "c1")]),
        Message("tool", (TextPart("A red circle."),), tool_call_id="c1"),
    ]
    request = ToolSession.create(TOOLS).prepare(history)
    assert request.messages[1].text.endswith('Action Input: {"image": "image_1"}\nObservation: A red circle.')


def test_forced_calls_from_a_random_model_are_always_valid(runtime) -> None:
    """tool_choice="required" / named: whatever the weights, the reply is one call of an allowed tool whose
    arguments hold every required field."""
    question = [{"role": "user", "content": "What is in image_1?"}]
    for choice in ("required", "visual_qa"):
        session = ToolSession.create(TOOLS, choice)
        request = session.prepare(question, {"temperature": 0, "max_new_tokens": 48})
        reply = session.parse(runtime.chat(request.messages, **request.generation).text)
        assert not reply.invalid_tool_calls and len(reply.tool_calls) == 1
        call = reply.tool_calls[0]
        assert call.name in ([spec.name for spec in TOOLS] if choice == "required" else ["visual_qa"])
        spec = next(spec for spec in TOOLS if spec.name == call.name)
        assert set(spec.parameters["required"]) <= set(call.arguments)
        assert all(isinstance(value, str) for value in call.arguments.values())
