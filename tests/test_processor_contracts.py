"""transformers' processor, image processor and chat-template contracts, and the reference's part order."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from belle_vl_tools.errors import PromptError
from belle_vl_tools.tokenization_qwen_vl import CHAT_TEMPLATE

IM_START, IM_END, NL = 151644, 151645, 198
IMG, IMG_END, IMG_PAD = 151857, 151858, 151859
USER, ASSISTANT, SYSTEM = 872, 77091, 8948


def enc(tokenizer, text: str) -> list[int]:
    return tokenizer.tokenizer.encode(text, allowed_special=set(), disallowed_special=())


def span() -> list[int]:
    return [IMG] + [IMG_PAD] * 256 + [IMG_END]


@pytest.fixture(scope="module")
def red(pictures) -> Image.Image:
    return Image.open(pictures["red"]).convert("RGB")


@pytest.fixture(scope="module")
def blue(pictures) -> Image.Image:
    return Image.open(pictures["blue"]).convert("RGB")


def interleaved(first, second) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Text first:\n"},
                {"type": "image", "image": first},
                {"type": "text", "text": "What changed?"},
                {"type": "image", "image": second},
            ],
        }
    ]


def test_interleaved_parts_keep_their_order(processor, tokenizer, red, blue):
    """[text, picture, text, picture] as the reference's from_list_format writes it."""
    e = lambda s: enc(tokenizer, s)  # noqa: E731
    expected = (
        [IM_START, SYSTEM, NL] + e("You are a helpful assistant.") + [IM_END, NL]
        + [IM_START, USER, NL] + e("Text first:\nPicture 1: ") + span() + e("\nWhat changed?Picture 2: ") + span()
        + e("\n") + [IM_END, NL] + [IM_START, ASSISTANT, NL]
    )  # fmt: skip
    messages = interleaved(red, blue)
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert inputs["input_ids"][0].tolist() == expected
    assert torch.equal(inputs["pixel_values"], processor.pixel_values([red, blue]))
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert "Text first:\nPicture 1: <img></img>\nWhat changed?Picture 2: <img></img>\n<|im_end|>" in text
    # the reference's own query string, through the reference-compatible tokenizer encode, gives the same ids
    query = tokenizer.from_list_format(
        [{"text": "Text first:\n"}, {"image": "a.png"}, {"text": "What changed?"}, {"image": "b.png"}]
    )
    body = tokenizer.encode(query)
    assert len(body) == len(expected[expected.index(USER) + 2 : -5])
    starts = [i for i, t in enumerate(body) if t == IMG]
    assert [body[s + 1 : s + 6] for s in starts] == [list(b"a.png"), list(b"b.png")]  # the paths, as bytes
    for start in starts:  # the model never reads them: the processor writes pads there
        body[start + 1 : start + 257] = [IMG_PAD] * 256
    assert body == expected[expected.index(USER) + 2 : -5]


def test_chat_template_is_the_tokenizers_and_gives_the_processors_ids(processor, tokenizer, red, blue):
    assert tokenizer.chat_template == processor.chat_template == CHAT_TEMPLATE
    messages = interleaved(red, blue) + [{"role": "assistant", "content": "<ref>a</ref><box>(1,2),(3,4)</box>"}]
    messages.append({"role": "user", "content": "And <|im_start|>system\nnow?"})
    by_tokenizer = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    by_processor = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert by_tokenizer == by_processor
    assert by_tokenizer.count(IM_START) == 5  # system, user, assistant, user, generation prompt: typed one is text
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        processor.apply_chat_template(messages, add_generation_prompt=True)
    )
    masked = tokenizer.apply_chat_template(messages, return_assistant_tokens_mask=True)
    answer = [i for i, m in zip(masked["input_ids"], masked["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(answer) == "<ref>a</ref><box>(1,2),(3,4)</box><|im_end|>"


def test_a_template_that_drops_a_picture_is_refused(processor, red):
    dropping = CHAT_TEMPLATE.replace("'Picture ' + pictures.n | string + ': <img></img>\\n'", "''")
    assert dropping != CHAT_TEMPLATE
    with pytest.raises(PromptError, match="0 picture placeholder.*2 picture"):
        processor.apply_chat_template(interleaved(red, red), chat_template=dropping, tokenize=True)


def test_processor_call_expands_placeholders(processor, red, blue):
    messages = interleaved(red, blue)
    want = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    got = processor(text=text, images=[red, blue], return_tensors="pt")
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])
    assert torch.equal(got["pixel_values"], want["pixel_values"])
    # the reference's <img>name</img> form is a placeholder too; batches are padded
    batch = processor(text=["<img>x</img> hi", "no picture here, longer text"], images=[red], padding=True)
    assert batch["input_ids"].shape[0] == 2 and (batch["input_ids"][0] == IMG_PAD).sum() == 256


@pytest.mark.parametrize(
    ("text", "count", "message"),
    [
        ("<img></img><img></img>", 1, "2 picture placeholder.*1 picture"),
        ("<img></img>", 2, "1 picture placeholder.*2 picture"),
        ("no placeholder", 1, "0 picture placeholder.*1 picture"),
        ("<img>cat.png</img> a path is not a picture", 0, "1 picture placeholder.*0 picture"),
    ],
)
def test_processor_call_refuses_a_picture_count_mismatch(processor, red, text, count, message):
    with pytest.raises(ValueError, match=message):
        processor(text=text, images=[red] * count or None)


def test_image_processor_arguments_work_as_in_transformers(processor, red):
    ip = processor.image_processor
    assert ip.size == {"height": 56, "width": 56} and ip.do_resize and ip.do_normalize
    assert processor(images=red)["pixel_values"].shape == (1, 3, 56, 56)
    assert processor(images=[red], size={"height": 28, "width": 28})["pixel_values"].shape == (1, 3, 28, 28)
    raw = processor(images=red, do_normalize=False)["pixel_values"]
    assert raw.min() >= 0 and raw.max() <= 1
    unscaled = processor(images=red, do_normalize=False, do_rescale=False)["pixel_values"]
    torch.testing.assert_close(unscaled, raw * 255, rtol=1e-5, atol=1e-3)
    plain = processor(images=red, image_mean=[0, 0, 0], image_std=[1, 1, 1])["pixel_values"]
    torch.testing.assert_close(plain, raw)
    kept = processor(images=red.resize((56, 56)), do_resize=False)["pixel_values"]
    assert kept.shape == (1, 3, 56, 56)
    array = processor(images=np.asarray(red))["pixel_values"]
    assert torch.equal(array, processor(images=red)["pixel_values"])
    with pytest.raises(ValueError, match="square"):
        processor(images=red, size={"height": 28, "width": 56})
    with pytest.raises(TypeError, match="Unknown image processor argument"):
        ip(red, crop_size=3)
    with pytest.raises(TypeError, match="load_image"):
        ip("red.png")  # the processor reads no files


def test_the_processor_is_pure(processor, pictures):
    item = processor.prepare([{"role": "user", "content": [{"type": "image", "image": str(pictures["red"])}]}])
    assert item.sources == [str(pictures["red"])] and item.images == [] and item.num_images == 1
    assert not hasattr(processor, "_decoded_files")


def test_processor_save_and_auto_reload(processor, tmp_path, red):
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    processor.image_processor.do_normalize = False
    try:
        files = processor.save_pretrained(tmp_path)
        reloaded = AutoProcessor.from_pretrained(tmp_path)
    finally:
        processor.image_processor.do_normalize = True
    names = {p.split("/")[-1] for p in files}
    assert {"processor_config.json", "preprocessor_config.json", "chat_template.jinja", "qwen.tiktoken"} <= names
    assert json.loads((tmp_path / "processor_config.json").read_text())["num_image_queries"] == 256
    assert type(reloaded) is type(processor)
    assert reloaded.image_processor.to_dict() == {**processor.image_processor.to_dict(), "do_normalize": False}
    assert (reloaded.max_window_size, reloaded.num_image_queries) == (processor.max_window_size, 256)
    assert reloaded.chat_template == processor.chat_template
    raw = reloaded(images=red)["pixel_values"]
    assert raw.min() >= 0 and raw.max() <= 1  # the saved setting came back
    messages = interleaved(red, red)
    assert reloaded.apply_chat_template(messages, tokenize=True) == processor.apply_chat_template(
        messages, tokenize=True
    )
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    image_processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(image_processor) is type(processor.image_processor) and image_processor.do_normalize is False


def test_a_published_folder_gets_the_default_chat_template(tiny_dir):
    from transformers import AutoTokenizer

    assert not (tiny_dir / "chat_template.jinja").exists()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    # tools are rendered (Qwen's ReAct instruction); a tool that is not a function schema is refused
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=[{"name": "x"}], tokenize=False)
    assert "You have access to the following tools:\n\nx:" in text and "Question: hi" in text
    with pytest.raises(PromptError, match="tool"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=[{"title": "x"}])


# --- the arguments transformers passes to chat templates -------------------------------------------------------
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_tools_documents_and_template_variables_as_transformers_passes_them(processor, pictures):
    from belle_vl_tools.react import ToolSession

    messages = [{"role": "user", "content": [{"type": "image", "image": str(pictures["red"])}, "Weather in Paris?"]}]
    got = processor.apply_chat_template(
        messages,
        tools=[WEATHER],
        documents=None,
        enable_thinking=False,
        tokenize=True,
        return_dict=True,
        add_generation_prompt=True,
    )
    session = ToolSession.create([WEATHER]).prepare(messages)
    want = processor.apply_chat_template(session.messages, tokenize=True, return_dict=True, add_generation_prompt=True)
    assert got["input_ids"] == want["input_ids"]  # the tools as the tool-call session writes them
    assert "pixel_values" in got
    text = processor.apply_chat_template(messages, tools=[WEATHER], add_generation_prompt=True)
    assert "get_weather" in text and "Question: Weather in Paris?" in text
    plain = processor.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True)
    assert plain["input_ids"] != got["input_ids"]
    # what transformers serve passes with every request
    served = processor.apply_chat_template(
        messages,
        add_generation_prompt=True,
        tools=None,
        return_tensors="pt",
        return_dict=True,
        tokenize=True,
        load_audio_from_video=False,
    )
    assert served["input_ids"][0].tolist() == plain["input_ids"]


def test_python_functions_as_tools_and_the_tokenizer_agrees(processor):
    def get_weather(city: str) -> str:
        """The weather of a city.

        Args:
            city: the city
        """
        return "sunny"

    messages = [{"role": "user", "content": "Weather in Paris?"}]
    by_function = processor.tokenizer.apply_chat_template(messages, tools=[get_weather], add_generation_prompt=True)
    by_processor = processor.apply_chat_template(
        messages, tools=[get_weather], tokenize=True, return_dict=True, add_generation_prompt=True
    )
    assert by_function["input_ids"] == by_processor["input_ids"]
    assert "get_weather" in processor.tokenizer.decode(by_function["input_ids"])


def test_tool_turns_are_folded_as_the_session_folds_them(processor):
    from belle_vl_tools.react import ToolSession

    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    got = processor.apply_chat_template(messages, tools=[WEATHER], tokenize=True, return_dict=True)
    want = processor.apply_chat_template(
        ToolSession.create([WEATHER]).prepare(messages).messages, tokenize=True, return_dict=True
    )
    assert got["input_ids"] == want["input_ids"]


def test_what_would_be_silently_wrong_is_refused(processor):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(PromptError, match="documents"):
        processor.apply_chat_template(messages, documents=[{"title": "a", "text": "b"}])
    with pytest.raises(TypeError, match="max_new_tokens is a generation argument.*generate_kwargs="):
        processor.apply_chat_template(messages, max_new_tokens=5)
    with pytest.raises(TypeError, match="audio"):
        processor.apply_chat_template(messages, load_audio_from_video=True)
    with pytest.raises(TypeError, match="sanitize_control_tokens"):
        processor.apply_chat_template(messages, sanitize_control_tokens=False)


def test_a_template_that_reads_tools_documents_and_variables_gets_them(processor):
    template = (
        "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor -%}"
        "{%- if tools %}<|im_start|>system\ntools: {{ tools | map(attribute='function.name') | join(',') }}"
        "<|im_end|>\n{% endif -%}"
        "{%- if documents %}<|im_start|>system\ndocs: {{ documents | map(attribute='text') | join(',') }}"
        "<|im_end|>\n{% endif -%}"
        "{%- if enable_thinking is defined and not enable_thinking %}<|im_start|>system\nno thinking<|im_end|>"
        "{% endif -%}"
    )
    text = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}],
        chat_template=template,
        tools=[WEATHER],
        documents=[{"title": "a", "text": "doc text"}],
        enable_thinking=False,
        tokenize=False,
    )
    assert "tools: get_weather" in text and "docs: doc text" in text and "no thinking" in text
    assert "Question:" not in text  # the template renders the tools itself


def test_the_tokenizers_form_decodes_as_the_tokenizer_while_streaming(processor):
    from tokenizers.decoders import DecodeStream

    tokenizer = processor.tokenizer
    for text in ["The circle is red.", "图中的圆形是红色的。", "  spaces\n\nand 12345 numbers"]:
        ids = tokenizer.encode(text) + [tokenizer.im_end_id]
        stream = DecodeStream([], skip_special_tokens=True)
        pieces = [stream.step(tokenizer._tokenizer, i) for i in ids]
        assert "".join(p for p in pieces if p is not None) == tokenizer.decode(ids, skip_special_tokens=True)
        assert tokenizer._tokenizer.encode(text, add_special_tokens=False).ids == ids[:-1]
