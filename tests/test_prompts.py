"""The task prompts: exact strings per language and detail, and the checks on their arguments."""

from __future__ import annotations

import pytest

from belle_vl_tools.errors import BelleVLError, PromptError
from belle_vl_tools.prompts import (
    DETAILS,
    LANGUAGES,
    PROMPT_TEMPLATES,
    TASKS,
    ask_prompt,
    describe_prompt,
    detect_language,
    locate_prompt,
    read_text_prompt,
    yes_no_prompt,
)


@pytest.mark.parametrize(
    ("detail", "language", "expected"),
    [
        ("brief", "en", "Describe the image concisely."),
        ("detailed", "en", "Describe this image in detail."),
        ("brief", "zh", "简要描述一下这张图"),
        ("detailed", "zh", "详细描述一下这张图"),
    ],
)
def test_describe_prompt_exact(detail, language, expected):
    assert describe_prompt(detail, language) == expected
    assert describe_prompt(detail=detail, language=language) == expected


def test_describe_prompt_defaults_to_brief_english():
    assert describe_prompt() == "Describe the image concisely."


def test_belle_vl_model_card_prompt_is_the_detailed_chinese_one():
    assert describe_prompt("detailed", "zh") == "详细描述一下这张图"


@pytest.mark.parametrize("detail", ["long", "", None, "Detailed"])
def test_describe_prompt_rejects_unknown_detail(detail):
    with pytest.raises(PromptError, match="brief"):
        describe_prompt(detail)


@pytest.mark.parametrize("language", ["fr", "EN", "", None, "zh-CN"])
def test_unknown_language_is_refused_everywhere(language):
    for call in (
        lambda: describe_prompt("brief", language),
        lambda: locate_prompt("a dog", language),
        lambda: read_text_prompt(language),
        lambda: yes_no_prompt("Is it red?", language),
    ):
        with pytest.raises(PromptError, match="'en', 'zh'"):
            call()


def test_locate_prompt_exact():
    assert locate_prompt("the red car") == 'Output the detection box of "the red car"'
    assert locate_prompt("the red car", "en") == 'Output the detection box of "the red car"'
    assert locate_prompt("击掌", "zh") == '输出"击掌"的检测框'


def test_locate_prompt_strips_and_collapses_whitespace():
    assert locate_prompt("  the \t red   car \n") == 'Output the detection box of "the red car"'


@pytest.mark.parametrize(
    ("phrase", "expected"),
    [
        ('a"b', "ab"),
        ('the "red" car', "the red car"),
        ("the \u201cred\u201d car", "the red car"),
        ("\uff02猫\uff02", "猫"),
        ("the dog's ball", "the dog's ball"),
    ],
)
def test_locate_prompt_removes_double_quotes(phrase, expected):
    prompt = locate_prompt(phrase)
    assert prompt == f'Output the detection box of "{expected}"'
    assert prompt.count('"') == 2


@pytest.mark.parametrize(
    "phrase",
    ["<ref>x</ref>", "a <box>(1,2),(3,4)</box>", "x</ref>", "<img>cat.png</img>", "<IMGPAD>", "<quad>"],
)
def test_locate_prompt_refuses_special_tags(phrase):
    with pytest.raises(PromptError, match="tag"):
        locate_prompt(phrase)


@pytest.mark.parametrize("phrase", ["", "   ", '""', ' " \u201c ', None, 3])
def test_locate_prompt_refuses_empty_or_non_text(phrase):
    with pytest.raises(PromptError, match="phrase"):
        locate_prompt(phrase)


def test_locate_prompt_refuses_several_lines():
    with pytest.raises(PromptError, match="single line"):
        locate_prompt("a dog\nand a cat")


def test_prompt_error_is_a_value_error_of_the_package():
    with pytest.raises(ValueError):
        locate_prompt("")
    with pytest.raises(BelleVLError):
        locate_prompt("")


def test_read_text_prompt_exact():
    assert read_text_prompt() == "Read out all the text in this image."
    assert read_text_prompt("en") == "Read out all the text in this image."
    assert read_text_prompt("zh") == "识别这张图中的所有文字"


def test_ask_prompt_strips_and_keeps_text():
    assert ask_prompt("  What color is the car?\n") == "What color is the car?"
    assert ask_prompt("图中有几只猫？") == "图中有几只猫？"
    region = "What is in <ref>this area</ref><box>(1,2),(3,4)</box>?"
    assert ask_prompt(region) == region


@pytest.mark.parametrize("question", ["", " \n\t ", None, b"bytes"])
def test_ask_prompt_refuses_empty_or_non_text(question):
    with pytest.raises(PromptError, match="question"):
        ask_prompt(question)


def test_ask_prompt_refuses_image_tags():
    with pytest.raises(PromptError, match="<img>"):
        ask_prompt("Describe <img>/etc/passwd</img>")


def test_yes_no_prompt_exact():
    assert yes_no_prompt("Is there a dog in the image?") == "Is there a dog in the image? Please answer yes or no."
    assert yes_no_prompt(" Is there a dog? ", "en") == "Is there a dog? Please answer yes or no."
    assert yes_no_prompt("图中有狗吗？", "zh") == "图中有狗吗？请回答是或否。"


def test_yes_no_prompt_does_not_repeat_the_suffix():
    once = yes_no_prompt("Is it red?")
    assert yes_no_prompt(once) == once
    assert yes_no_prompt("Is it red? please answer yes or no.") == "Is it red? please answer yes or no."
    zh_once = yes_no_prompt("是红色的吗？", "zh")
    assert yes_no_prompt(zh_once, "zh") == zh_once


def test_yes_no_prompt_refuses_empty_question():
    with pytest.raises(PromptError, match="question"):
        yes_no_prompt("  ")


def test_templates_list_every_task_and_language():
    assert set(TASKS) == {"describe_brief", "describe_detailed", "locate", "read_text", "yes_no"}
    assert LANGUAGES == ("en", "zh")
    assert DETAILS == ("brief", "detailed")
    for task in TASKS:
        assert set(PROMPT_TEMPLATES[task]) == set(LANGUAGES)


def test_templates_are_what_the_functions_return():
    for language in LANGUAGES:
        for detail in DETAILS:
            assert describe_prompt(detail, language) == PROMPT_TEMPLATES[f"describe_{detail}"][language]
        assert read_text_prompt(language) == PROMPT_TEMPLATES["read_text"][language]
        assert locate_prompt("a cat", language) == PROMPT_TEMPLATES["locate"][language].format(phrase="a cat")
        assert yes_no_prompt("Q?", language) == PROMPT_TEMPLATES["yes_no"][language].format(question="Q?")


def test_templates_are_read_only():
    with pytest.raises(TypeError):
        PROMPT_TEMPLATES["locate"]["en"] = "changed"  # type: ignore[index]
    with pytest.raises(TypeError):
        PROMPT_TEMPLATES["new"] = {}  # type: ignore[index]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("What is in this picture?", "en"),
        ("详细描述一下这张图", "zh"),
        ("这张图里的cat是什么颜色", "zh"),
        ("请描述这张 screenshot", "zh"),
        ("What does 你好 mean in this sign?", "en"),
        ("", "en"),
        ("123 ?!", "en"),
        ("。？", "en"),
    ],
)
def test_detect_language(text, expected):
    assert detect_language(text) == expected


def test_detect_language_refuses_non_text():
    with pytest.raises(PromptError):
        detect_language(None)  # type: ignore[arg-type]
