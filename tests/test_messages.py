"""The one message model: every accepted outside form parses to the same messages, anything else is refused."""

from __future__ import annotations

import pytest

from belle_vl_tools.errors import PromptError
from belle_vl_tools.messages import (
    ImagePart,
    Message,
    TextPart,
    ToolCall,
    parse_messages,
    to_content_lists,
)


def test_transformers_and_openai_forms_parse_to_the_same_message():
    transformers_form = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Before "},
                {"type": "image", "image": "data:image/png;base64,AAAA"},
                {"type": "text", "text": "after"},
            ],
        }
    ]
    openai_form = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Before "},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                "after",
            ],
        }
    ]
    expected = Message("user", (TextPart("Before "), ImagePart("data:image/png;base64,AAAA"), TextPart("after")))
    assert parse_messages(transformers_form) == [expected]
    assert parse_messages(openai_form) == [expected]


def test_part_order_is_kept_and_text_and_images_are_read():
    [message] = parse_messages([{"role": "user", "content": ["a", {"type": "image", "path": "x.png"}, "b"]}])
    assert [type(p) for p in message.parts] == [TextPart, ImagePart, TextPart]
    assert message.text == "ab"
    assert message.images == ["x.png"]


def test_base64_key_keeps_its_mime_type():
    [message] = parse_messages(
        [{"role": "user", "content": [{"type": "image", "base64": "QUJD", "mime_type": "image/png"}]}]
    )
    assert message.images == [{"base64": "QUJD", "mime_type": "image/png"}]


def test_string_content_string_conversation_and_developer_role():
    assert parse_messages("hi") == [Message("user", (TextPart("hi"),))]
    [system] = parse_messages([{"role": "developer", "content": "be brief"}])
    assert system == Message("system", (TextPart("be brief"),))


def test_openai_tool_calls_and_tool_results():
    raw = [
        {"role": "user", "content": "look"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "visual_qa", "arguments": '{"q": 1}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "red"}]},
    ]
    user, assistant, tool = parse_messages(raw)
    assert assistant.tool_calls == (ToolCall("visual_qa", {"q": 1}, "call_1"),)
    assert assistant.parts == ()
    assert tool.tool_call_id == "call_1" and tool.text == "red"
    # And back to transformers' form, unchanged in meaning.
    assert parse_messages(to_content_lists([user, assistant, tool])) == [user, assistant, tool]


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ([{"role": "wizard", "content": "x"}], ["Unknown role 'wizard'", "message 0"]),
        ([{"role": "user"}], ["no 'content'"]),
        ([{"role": "user", "content": [{"type": "audio", "audio": "x"}]}], ["'audio'", "message 0, part 0"]),
        ([{"role": "user", "content": [{"type": "image"}]}], ["has no picture"]),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], ["image_url part"]),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], ["needs a string 'text'"]),
        ([{"role": "user", "content": 5}], ["must be a string or a list"]),
        (["just a string in a list"], ["must be a dict"]),
        ([{"role": "user", "content": "x", "tool_calls": [{"id": "a"}]}], ["Only assistant"]),
        (
            [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}],
            ["not JSON"],
        ),
        (42, ["Messages must be a list"]),
    ],
)
def test_bad_forms_raise_one_clear_prompt_error(raw, words):
    with pytest.raises(PromptError) as info:
        parse_messages(raw)
    for word in words:
        assert word in str(info.value)


def test_messages_module_imports_without_torch(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from belle_vl_tools.messages import parse_messages\n"
        "print(parse_messages('hi')[0].text)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "hi"
