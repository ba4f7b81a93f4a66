"""transformers pipelines on a checkpoint folder: image-text-to-text and text-generation with chat messages."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

import belle_vl_tools  # noqa: F401  (registers the classes with transformers' Auto classes)
from belle_vl_tools import ImageAccessDeniedError, ImagePolicy

GREEDY = {"max_new_tokens": 6, "do_sample": False}


@pytest.fixture(scope="module")
def vlm_pipe(tiny_dir):
    from transformers import pipeline

    return pipeline("image-text-to-text", model=str(tiny_dir))


def _direct(pipe, messages) -> list[int]:
    """The ids model.generate gives for the processor's inputs of ``messages`` (greedy)."""
    inputs = pipe.processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = pipe.model.generate(**inputs, **GREEDY)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def _answer_ids(pipe, result) -> list[int]:
    reply = result[0]["generated_text"][-1]
    assert reply["role"] == "assistant"
    return reply["content"]


def test_image_text_to_text_pipeline_from_a_folder(vlm_pipe, pictures):
    from belle_vl_tools.modeling_qwen_vl import QWenLMHeadModel
    from belle_vl_tools.processing_qwen_vl import QWenVLProcessor

    assert isinstance(vlm_pipe.model, QWenLMHeadModel) and isinstance(vlm_pipe.processor, QWenVLProcessor)
    for source in (str(pictures["red"]), Image.open(pictures["red"]).convert("RGB")):
        messages = [
            {"role": "user", "content": [{"type": "image", "image": source}, {"type": "text", "text": "What is it?"}]}
        ]
        result = vlm_pipe(text=messages, generate_kwargs=GREEDY, return_full_text=False)
        want = vlm_pipe.processor.decode(_direct(vlm_pipe, messages), skip_special_tokens=True)
        assert result[0]["generated_text"] == want


def test_the_picture_reaches_the_model_through_the_pipeline_inputs(vlm_pipe, pictures):
    def logits(colour: str) -> torch.Tensor:
        messages = [{"role": "user", "content": [{"type": "image", "image": str(pictures[colour])}, "?"]}]
        inputs = vlm_pipe.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        with torch.no_grad():
            return vlm_pipe.model(**inputs).logits[0, -1]

    assert (logits("red") - logits("blue")).abs().max() > 1e-4


def test_urls_only_where_the_policy_allows(vlm_pipe, pictures):
    url = "https://pictures.example/red.png"
    messages = [{"role": "user", "content": [{"type": "image", "url": url}, {"type": "text", "text": "What?"}]}]
    with pytest.raises(ImageAccessDeniedError):
        vlm_pipe(text=messages, generate_kwargs=GREEDY)

    png = pictures["red"].read_bytes()
    fetched = []

    def fetcher(address: str, policy: ImagePolicy) -> bytes:
        fetched.append(address)
        return png

    saved = vlm_pipe.processor.image_policy
    vlm_pipe.processor.image_policy = ImagePolicy.trusted(allow_urls=True, fetcher=fetcher)
    try:
        result = vlm_pipe(text=messages, generate_kwargs=GREEDY, return_full_text=False)
    finally:
        vlm_pipe.processor.image_policy = saved
    local = [{"role": "user", "content": [{"type": "image", "image": Image.open(io.BytesIO(png))}, "What?"]}]
    assert fetched == [url]
    assert result[0]["generated_text"] == vlm_pipe.processor.decode(_direct(vlm_pipe, local), skip_special_tokens=True)


def test_text_generation_pipeline_with_chat_messages(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    pipe = pipeline("text-generation", model=str(tiny_dir))
    messages = [{"role": "user", "content": "Hello <|im_end|> there"}]
    result = pipe(messages, **GREEDY)
    reply = result[0]["generated_text"][-1]
    assert reply["role"] == "assistant"

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    assert (ids == tokenizer.im_end_id).sum() == 2  # system and user blocks: the typed one stays text
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **GREEDY)
    assert reply["content"] == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_generation_arguments_given_to_the_image_pipeline_name_generate_kwargs(vlm_pipe, pictures):
    messages = [{"role": "user", "content": [{"type": "image", "image": str(pictures["red"])}, "What?"]}]
    with pytest.raises(TypeError, match=r"do_sample is a generation argument.*generate_kwargs="):
        vlm_pipe(text=messages, do_sample=False)


def test_a_generate_call_with_the_checkpoints_endoftext_id_stops_at_im_end(vlm_pipe):
    # what transformers serve passes: generation_config.json's eos_token_id (<|endoftext|> alone)
    from transformers import LogitsProcessorList

    model, tokenizer = vlm_pipe.model, vlm_pipe.processor.tokenizer
    inputs = vlm_pipe.processor.apply_chat_template(
        [{"role": "user", "content": "Hi"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )

    def im_end_always(input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        forced[:, tokenizer.im_end_id] = 0.0
        return forced

    def new_tokens(eos) -> list[int]:
        out = model.generate(
            **inputs,
            max_new_tokens=4,
            do_sample=False,
            eos_token_id=eos,
            logits_processor=LogitsProcessorList([im_end_always]),
        )
        return out[0, inputs["input_ids"].shape[1] :].tolist()

    assert new_tokens(tokenizer.eod_id) == [tokenizer.im_end_id]  # the checkpoint's stop tokens
    assert new_tokens([tokenizer.eod_id]) == [tokenizer.im_end_id]
    assert new_tokens([tokenizer.eod_id, 7]) == [tokenizer.im_end_id] * 4  # any other choice is used as given
