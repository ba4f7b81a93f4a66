"""The synthetic demo data: seeded, right about the pictures it draws, MME files, and the demo vocabulary."""

from __future__ import annotations

import base64
import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest

from belle_vl_tools import demo_data as dd
from belle_vl_tools.grounding import parse_boxes
from belle_vl_tools.prompts import PROMPT_TEMPLATES, YES_NO_SUFFIXES


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _samples(kind: str, n: int = 40, seed: int = 5) -> list[dict]:
    return dd.generate_samples(n, seed, kinds=[kind])


def test_same_seed_same_samples_other_seed_differs():
    a, b, c = dd.generate_samples(25, 11), dd.generate_samples(25, 11), dd.generate_samples(25, 12)
    assert [s["messages"][1] for s in a] == [s["messages"][1] for s in b]
    assert [s["question"] for s in a] == [s["question"] for s in b]
    assert all(x["image"].tobytes() == y["image"].tobytes() for x, y in zip(a, b, strict=True))
    assert [s["answer"] for s in a] != [s["answer"] for s in c]


def test_sample_is_a_chat_in_the_processor_format():
    sample = dd.make_sample(0, 0)
    user, assistant = sample["messages"]
    assert user["role"] == "user" and assistant["role"] == "assistant"
    assert user["content"][0] == {"type": "image", "image": sample["image"]}
    assert user["content"][1] == {"type": "text", "text": sample["question"]}
    assert assistant["content"] == [{"type": "text", "text": sample["answer"]}]
    assert sample["image"].size == (dd.DEFAULT_SIZE, dd.DEFAULT_SIZE) and sample["image"].mode == "RGB"


def test_color_answers_name_the_drawn_color():
    for s in _samples("color"):
        scene, answer = s["scene"], s["answer"]
        named = [c for c in dd.COLORS if f" {c}." in answer or dd.COLORS[c][1] in answer]
        assert len(named) == 1, answer
        mask = dd.shape_mask(s["image"], named[0])
        kind = next(k for k in dd.SHAPES if k in s["question"] or dd.SHAPES[k] in s["question"])
        shape = next(sh for sh in scene.shapes if sh.kind == kind)
        x1, y1, x2, y2 = shape.box
        assert mask[y1:y2, x1:x2].sum() > 0.4 * (x2 - x1) * (y2 - y1)  # the named color fills that shape's box


def _fill_ratio(mask: np.ndarray) -> float:
    x1, y1, x2, y2 = _mask_box(mask)
    return float(mask[y1:y2, x1:x2].mean())


def test_shape_answers_match_the_drawn_outline():
    expected = {"circle": (0.7, 0.86), "square": (0.97, 1.01), "triangle": (0.4, 0.62)}
    for s in _samples("shape", 60):
        color = next(c for c in dd.COLORS if c in s["question"] or dd.COLORS[c][1] in s["question"])
        if not s["scene"].unique_color(color):
            continue
        kind = next(k for k in dd.SHAPES if k in s["answer"] or dd.SHAPES[k] in s["answer"])
        low, high = expected[kind]
        assert low <= _fill_ratio(dd.shape_mask(s["image"], color)) <= high, (s["answer"], s["scene"])


def test_count_and_position_answers():
    for s in _samples("count", 20):
        n = len(s["scene"].shapes)
        drawn = sum(dd.shape_mask(s["image"], c).any() for c in {sh.color for sh in s["scene"].shapes})
        assert drawn == len({sh.color for sh in s["scene"].shapes})
        assert dd._en_count(n) in s["answer"] or dd._zh_count(n) in s["answer"]
    for s in _samples("position", 30):
        shape = next(sh for sh in s["scene"].shapes if sh.phrase(s["language"]).removeprefix("the ") in s["question"])
        x1, y1, x2, y2 = _mask_box(dd.shape_mask(s["image"], shape.color) & _box_mask(shape.box, s["image"].size))
        step = s["image"].size[0] / 3
        cell = (int((y1 + y2) / 2 // step), int((x1 + x2) / 2 // step))
        assert dd.POSITIONS[cell][0 if s["language"] == "en" else 1] in s["answer"]


def _box_mask(box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    mask = np.zeros((size[1], size[0]), bool)
    mask[box[1] : box[3], box[0] : box[2]] = True
    return mask


def test_grounding_boxes_match_the_drawn_shapes():
    for s in _samples("locate", 40):
        language = s["language"]
        assert s["question"] in {
            PROMPT_TEMPLATES["locate"][language].format(phrase=sh.phrase(language)) for sh in s["scene"].shapes
        }
        (box,) = parse_boxes(s["answer"], *s["image"].size)
        shape = next(sh for sh in s["scene"].shapes if sh.phrase(language) == box.label)
        assert s["answer"].startswith(f"<ref>{shape.phrase(language)}</ref><box>(")
        drawn = _mask_box(dd.shape_mask(s["image"], shape.color) & _box_mask(shape.box, s["image"].size))
        for got, want in zip((box.x1, box.y1, box.x2, box.y2), drawn, strict=True):
            assert abs(got - want) <= 1.0, (s["answer"], drawn)


def test_read_text_and_describe_use_the_module_prompts():
    prompts = {t for by_language in PROMPT_TEMPLATES.values() for t in by_language.values()}
    for kind in ("read_text", "describe_brief", "describe_detailed"):
        for s in _samples(kind, 20):
            assert s["question"] in prompts
            word = s["scene"].word
            if kind == "read_text" and word is not None:
                assert s["answer"] == word
                x1, y1, x2, y2 = s["scene"].word_box
                dark = np.asarray(s["image"].convert("L"))[y1:y2, x1:x2] < 80
                assert dark.sum() > 10  # the word is printed where the scene says
            if kind == "describe_detailed":
                assert all(sh.color in s["answer"] or dd.COLORS[sh.color][1] in s["answer"] for sh in s["scene"].shapes)


def test_yes_no_questions_are_balanced_and_mme_shaped():
    samples = _samples("yes_no", 300)
    answers = [s["answer"] for s in samples]
    assert set(answers) <= {"Yes", "No", "是", "否"}
    yes = sum(a in ("Yes", "是") for a in answers)
    assert 0.4 < yes / len(answers) < 0.6
    for s in samples:
        assert s["question"].endswith(YES_NO_SUFFIXES[s["language"]])
        assert (s["answer"] in ("Yes", "No")) == (s["language"] == "en")


def test_mme_set_format(tmp_path: Path):
    written = dd.generate_mme_set(tmp_path, seed=1, images_per_subtask=3)
    assert sorted(written) == sorted(dd.MME_SUBTASKS)
    for subtask, path in written.items():
        assert path == tmp_path / subtask / f"{subtask}.txt"
        lines = path.read_text(encoding="utf-8").splitlines()
        assert len(lines) == 6
        rows = [line.split("\t") for line in lines]
        assert all(len(row) == 3 for row in rows)
        for first, second in zip(rows[::2], rows[1::2], strict=True):
            assert first[0] == second[0] and (tmp_path / subtask / first[0]).is_file()
            assert {first[2], second[2]} == {"Yes", "No"}
            assert first[1].endswith(" Please answer yes or no.") and second[1].endswith(" Please answer yes or no.")
    again = dd.generate_mme_set(tmp_path / "again", seed=1, images_per_subtask=3)
    assert all(again[t].read_text() == written[t].read_text() for t in written)


@pytest.fixture(scope="module")
def demo_vocab(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return dd.build_demo_vocab(tmp_path_factory.mktemp("vocab") / "qwen.tiktoken")


def test_demo_vocab_keeps_segmentation_and_special_ids(demo_vocab: dict):
    from belle_vl_tools.tokenization_qwen_vl import QWenTokenizer, load_tiktoken_ranks, qwen_vocab_file

    full = QWenTokenizer(vocab_file=qwen_vocab_file())
    small = QWenTokenizer(vocab_file=demo_vocab["path"])
    n = demo_vocab["ranks"]
    assert 256 < n < 2000 and len(small.mergeable_ranks) == n
    assert small.eod_id == n and small.im_start_id == n + 1 and small.img_pad_id == n + 216
    # the file's ranks follow the original order, renumbered from 0
    lines = Path(demo_vocab["path"]).read_text().splitlines()
    full_ranks = load_tiktoken_ranks(qwen_vocab_file())
    originals = [full_ranks[base64.b64decode(line.split()[0])] for line in lines]
    assert originals == sorted(originals) and [int(line.split()[1]) for line in lines] == list(range(n))
    # texts of samples the vocabulary was not built from segment exactly as with the full vocabulary
    texts = list(dd.CHAT_TEXTS)
    for s in dd.generate_samples(150, seed=424242):
        texts += ["\n" + s["question"], s["answer"]]
    for text in texts:
        want = [full.decoder[i] for i in full.encode_text(text)]
        got = [small.decoder[i] for i in small.encode_text(text)]
        assert got == want, text


def test_a_conversation_asks_several_questions_about_one_picture():
    from belle_vl_tools.demo_data import make_conversation, make_sample

    conversation = make_conversation(3, 11, turns=4, kinds=["color", "count", "position"])
    first = make_sample(3, 11, kinds=["color", "count", "position"])
    messages = conversation["messages"]
    assert messages[0]["content"][1] == first["messages"][0]["content"][1]  # the first turn is the sample itself
    assert messages[1]["content"][0]["text"] == first["answer"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2) and len(messages) >= 4
    images = [p for m in messages for p in m["content"] if p["type"] == "image"]
    assert len(images) == 1 and messages[0]["content"][0]["type"] == "image"
    assert make_conversation(3, 11, turns=4, kinds=["color", "count", "position"])["messages"][2:] == messages[2:]


@pytest.mark.parametrize("subtask", dd.YES_NO_SUBTASKS)
def test_each_yes_no_subtask_is_right_about_the_scene(subtask):
    for s in _samples(f"yes_no:{subtask}", 40):
        scene, question, yes = s["scene"], s["question"], s["answer"] in ("Yes", "是")
        if subtask == "any_color":
            color = next(c for c in dd.COLORS if f" {c} " in question or dd.COLORS[c][1] in question)
            assert yes == any(sh.color == color for sh in scene.shapes), question
            assert yes == bool(dd.shape_mask(s["image"], color).any())
        elif subtask == "any_kind":
            kind = next(k for k in dd.SHAPES if f" {k} " in question or dd.SHAPES[k] in question)
            assert yes == any(sh.kind == kind for sh in scene.shapes), question
        elif subtask == "existence":
            color = next(c for c in dd.COLORS if f" {c} " in question or dd.COLORS[c][1] in question)
            kind = next(k for k in dd.SHAPES if f" {k} " in question or dd.SHAPES[k] in question)
            assert yes == any((sh.color, sh.kind) == (color, kind) for sh in scene.shapes), question
        elif subtask == "OCR":
            assert scene.word is not None
            assert yes == (f'"{scene.word}"' in question), question
        assert question.endswith(YES_NO_SUFFIXES[s["language"]])


def test_unknown_yes_no_subtask_is_refused():
    with pytest.raises(ValueError, match="yes_no:<subtask>"):
        dd.make_sample(0, 0, kinds=["yes_no:nonsense"])


def test_a_forced_word_is_drawn_again_when_it_found_no_place(monkeypatch):
    # a crowded free layout can leave no room for the word (about 1 picture in 10,000; which seeds do depends on the
    # fonts installed, so the first real scene here is stripped of its word): the picture is drawn again, so that an
    # OCR question always has its word
    real, drawn = dd._free_scene, []

    def first_without_word(*args):
        scene = real(*args)
        drawn.append(scene)
        return dataclasses.replace(scene, word=None, word_cell=None, word_box=None) if len(drawn) == 1 else scene

    monkeypatch.setattr(dd, "_free_scene", first_without_word)
    scene = dd.random_scene(random.Random(3), dd.DEFAULT_SIZE, word=True, free=True)
    assert len(drawn) == 2 and scene is drawn[1] and scene.word in dd.WORDS
    drawn.clear()  # the same through a sample whose question needs the word
    sample = dd.make_sample(3, 1, kinds=["yes_no:OCR"], with_image=False, free=1.0)
    assert len(drawn) >= 2 and sample["scene"].word is not None


@pytest.mark.parametrize("free", [False, True])
def test_letter_centers_lie_on_the_printed_letters_in_reading_order(free: bool):
    rng = random.Random(5)
    for _ in range(40):
        scene = dd.random_scene(rng, dd.DEFAULT_SIZE, word=True, free=free)
        centers = dd.letter_centers(scene)
        assert [letter for letter, _x, _y in centers] == list(scene.word)
        # the word's ink: where the picture differs from the same picture drawn without the word
        bare = dd.render(dataclasses.replace(scene, word=None, word_box=None))
        ink = np.abs(np.asarray(dd.render(scene), dtype=int) - np.asarray(bare, dtype=int)).max(axis=2) > 60
        ys, xs = np.nonzero(ink)
        left, right, top, bottom = xs.min(), xs.max(), ys.min(), ys.max()
        xs_c = [x for _l, x, _y in centers]
        assert xs_c == sorted(xs_c) and xs_c[0] < xs_c[-1]
        third = (right - left) / 3
        assert left <= xs_c[0] <= left + third + 1 and right - third - 1 <= xs_c[-1] <= right + 1
        for _letter, _x, y in centers:
            assert top - 1 <= y <= bottom + 1
    assert dd.letter_centers(dd.random_scene(rng, dd.DEFAULT_SIZE, word=False)) == []


# --- agent skills --------------------------------------------------------------------------------------------------
AGENT_MIX = ["color", "count", "absent", "describe_any", "json_schema", "json_object", "yes_no"]


def test_agent_conversations_are_seeded():
    from belle_vl_tools.demo_data import make_agent_conversation

    one = make_agent_conversation(0, 5, turns=3, kinds=AGENT_MIX, order=0.5, two_pictures=0.5)
    two = make_agent_conversation(0, 5, turns=3, kinds=AGENT_MIX, order=0.5, two_pictures=0.5)
    texts = [[p.get("text") for p in m["content"]] for m in one["messages"]]
    assert texts == [[p.get("text") for p in m["content"]] for m in two["messages"]]
    assert one["scenes"] == two["scenes"]
    other = make_agent_conversation(0, 6, turns=3, kinds=AGENT_MIX, order=0.5, two_pictures=0.5)
    assert other["scenes"] != one["scenes"]


def test_text_can_come_before_around_and_two_pictures_are_named():
    from belle_vl_tools.demo_data import make_agent_conversation

    orders, referenced = set(), 0
    for i in range(60):
        sample = make_agent_conversation(3, i, kinds=["color", "count"], order=1.0, two_pictures=0.5)
        parts = sample["messages"][0]["content"]
        kinds = [p["type"] for p in parts]
        assert kinds.count("image") == len(sample["scenes"]) and kinds[0] == "text" or kinds[-1] == "text"
        orders.add("before" if kinds[-1] == "image" else "around")
        if len(sample["scenes"]) == 2:
            n = sample["scenes"].index(sample["scene"]) + 1
            question = sample["question"]
            assert f"Picture {n}" in question or f"图{n}" in question or f"第{n}张图" in question
            referenced += 1
    assert orders == {"before", "around"} and 10 < referenced < 50


def test_absent_shapes_get_no_box_and_json_answers_carry_the_scene():
    import json

    from belle_vl_tools.demo_data import JSON_SCHEMA, agent_texts
    from belle_vl_tools.grounding import parse_boxes

    rng = random.Random(7)
    for _ in range(30):
        scene = dd.random_scene(rng, n=1)
        shape = scene.shapes[0]
        question, answer = agent_texts(scene, "absent", "en", rng)
        assert not parse_boxes(answer) and answer.startswith("There is no ")
        assert f"{shape.color} {shape.kind}" not in answer
        _q, text = agent_texts(scene, "json_schema", "en", rng)
        value = json.loads(text)
        assert list(value) == JSON_SCHEMA["required"]
        assert value == {"color": shape.color, "shape": shape.kind, "count": 1}
        question, text = agent_texts(scene, "json_object", "en", rng)
        value = json.loads(text)
        assert value and all(f'"{key}"' in question for key in value)
        assert value.get("color", shape.color) == shape.color and value.get("count", 1) == 1


def test_react_conversations_render_as_the_tool_session_writes_them():
    import json

    from belle_vl_tools.demo_data import make_react_conversation
    from belle_vl_tools.react import ToolSpec, parse_reply, render_tool_messages

    tools = [ToolSpec(n, "a vision tool") for n in ("describe_image", "visual_qa", "locate_objects", "read_text")]
    names = set()
    for i in range(100):
        conversation = make_react_conversation(0, i, turns=2)
        messages = conversation["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"] * 2
        call = messages[1]["tool_calls"][0]["function"]
        names.add(call["name"])
        handle = json.loads(call["arguments"])["image"]
        assert handle in conversation["scenes"] and handle in messages[0]["content"]
        rendered = render_tool_messages(messages[:2], tools)
        reply = parse_reply(rendered[-1].text, tools)
        assert reply.tool_calls[0].name == call["name"]
    assert names == {"describe_image", "visual_qa", "locate_objects", "read_text"}
