"""The task prompts behind the describe / ask / locate / read-text tools, in English and Chinese.

This module is the one place where these prompts are written down, so inference and training data use exactly
the same wording. The forms follow what Qwen-VL-Chat and Belle-VL were trained on:

* Detailed description in Chinese is Belle-VL's own example, ``详细描述一下这张图``; the brief Chinese form keeps
  its shape. The English forms use the wording of LLaVA-style instruction data (Belle-VL was instruction-tuned
  on LLaVA data).
* Grounding in Chinese is Qwen-VL-Chat's request ``输出"<phrase>"的检测框``; the model answers with
  ``<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>`` (see :mod:`belle_vl_tools.grounding`). The English request,
  ``Output the detection box of "<phrase>"``, is a word-for-word rendering of the Chinese one: same order, the
  phrase again delimited by double quotes. It is this project's choice, not a string quoted from a model card.
* Yes/no questions carry the MME suffix `` Please answer yes or no.``; the Chinese form ends with
  ``请回答是或否。`` (written directly after the question, as Chinese puts no space between sentences).

:data:`PROMPT_TEMPLATES` lists every template, keyed by task and language, for scripts that need to enumerate
them; the functions below are the checked way to fill them in. Only the standard library is used.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Literal, get_args

from belle_vl_tools.errors import PromptError

__all__ = [
    "CJK_SHARE_THRESHOLD",
    "DETAILS",
    "LANGUAGES",
    "PROMPT_TEMPLATES",
    "TASKS",
    "YES_NO_SUFFIXES",
    "Detail",
    "Language",
    "ask_prompt",
    "describe_prompt",
    "detect_language",
    "locate_prompt",
    "read_text_prompt",
    "yes_no_prompt",
]

Language = Literal["en", "zh"]
Detail = Literal["brief", "detailed"]

#: The languages every task prompt exists in.
LANGUAGES: tuple[Language, ...] = get_args(Language)
#: The levels of detail :func:`describe_prompt` accepts.
DETAILS: tuple[Detail, ...] = get_args(Detail)

#: The suffix :func:`yes_no_prompt` appends, per language (the English one is MME's, leading space included).
YES_NO_SUFFIXES: Mapping[str, str] = MappingProxyType(
    {
        "en": " Please answer yes or no.",
        "zh": "请回答是或否。",
    }
)


def _frozen(table: dict[str, dict[str, str]]) -> Mapping[str, Mapping[str, str]]:
    return MappingProxyType({task: MappingProxyType(dict(by_language)) for task, by_language in table.items()})


#: Every task prompt, as ``PROMPT_TEMPLATES[task][language]``. Templates with a placeholder are filled with
#: :meth:`str.format`: ``{phrase}`` for "locate", ``{question}`` for "yes_no"; the others are used as they are.
#: The "ask" tool sends the user's question unchanged, so it has no template here.
PROMPT_TEMPLATES: Mapping[str, Mapping[str, str]] = _frozen(
    {
        "describe_brief": {
            "en": "Describe the image concisely.",
            "zh": "简要描述一下这张图",
        },
        "describe_detailed": {
            "en": "Describe this image in detail.",
            "zh": "详细描述一下这张图",
        },
        "locate": {
            "en": 'Output the detection box of "{phrase}"',
            "zh": '输出"{phrase}"的检测框',
        },
        "read_text": {
            "en": "Read out all the text in this image.",
            "zh": "识别这张图中的所有文字",
        },
        "yes_no": {
            "en": "{question}" + YES_NO_SUFFIXES["en"],
            "zh": "{question}" + YES_NO_SUFFIXES["zh"],
        },
    }
)

#: The task names, in the order of :data:`PROMPT_TEMPLATES`.
TASKS: tuple[str, ...] = tuple(PROMPT_TEMPLATES)

# Tags the tokenizer turns into special tokens wherever they occur in a message. Image tags inside text would
# be read as an image reference; grounding tags inside a quoted phrase would end the phrase early.
_IMAGE_TAG_RE = re.compile(r"</?img>|<imgpad>", re.IGNORECASE)
_SPECIAL_TAG_RE = re.compile(r"</?(?:ref|box|quad|img)>|<imgpad>", re.IGNORECASE)
# Double quotes that would close the quoted phrase of a grounding request (ASCII, curly, full-width).
_DOUBLE_QUOTES_RE = re.compile('["\u201c\u201d\uff02]')
_SPACES_RE = re.compile(r"\s+")


def _check_language(language: object) -> Language:
    if language not in LANGUAGES:
        raise PromptError(f"language must be one of {', '.join(map(repr, LANGUAGES))}; got {language!r}.")
    return language


def _check_text(value: object, name: str, example: str) -> str:
    if not isinstance(value, str):
        raise PromptError(f"{name} must be a string, e.g. {example!r}; got {type(value).__name__}.")
    text = value.strip()
    if not text:
        raise PromptError(f"{name} must not be empty; pass the words to use, e.g. {example!r}.")
    return text


def _reject_image_tags(text: str, name: str) -> None:
    match = _IMAGE_TAG_RE.search(text)
    if match:
        raise PromptError(
            f"{name} must not contain the image tag {match.group(0)!r}; pass images as images, not as tags in the text."
        )


def describe_prompt(detail: Detail = "brief", language: Language = "en") -> str:
    """The prompt asking for a description of the image: ``detail`` is "brief" or "detailed"."""
    if detail not in DETAILS:
        raise PromptError(f"detail must be one of {', '.join(map(repr, DETAILS))}; got {detail!r}.")
    language = _check_language(language)
    return PROMPT_TEMPLATES[f"describe_{detail}"][language]


def ask_prompt(question: str) -> str:
    """The user's question about the image, stripped of surrounding whitespace.

    The question is sent as written, in whatever language it is in; grounding tags are allowed (they let a
    question point at a region), image tags are refused.
    """
    text = _check_text(question, "question", "What color is the car?")
    _reject_image_tags(text, "question")
    return text


def locate_prompt(phrase: str, language: Language = "en") -> str:
    """The grounding request for ``phrase``: the model answers with ``<ref>…</ref><box>…</box>``.

    The phrase is put between double quotes in the prompt, so it is cleaned to keep it from breaking out:
    surrounding whitespace is stripped, runs of spaces or tabs become one space, and double quotes (ASCII,
    curly and full-width) are removed (``the "red" car`` becomes ``the red car``). A phrase that is empty
    (after that), spans several lines, or holds a special tag such as ``<ref>``, ``<box>`` or ``<img>`` is
    refused with :class:`PromptError`.
    """
    language = _check_language(language)
    text = _check_text(phrase, "phrase", "the red car")
    if "\n" in text or "\r" in text:
        raise PromptError("phrase must be a single line; pass a short noun phrase, e.g. 'the red car'.")
    match = _SPECIAL_TAG_RE.search(text)
    if match:
        raise PromptError(
            f"phrase must not contain the tag {match.group(0)!r}; pass the plain words of the object to find, "
            "e.g. 'the red car'."
        )
    text = _SPACES_RE.sub(" ", _DOUBLE_QUOTES_RE.sub("", text)).strip()
    if not text:
        raise PromptError(
            "phrase has no words left once quotes are removed; pass the object to find, e.g. 'the red car'."
        )
    return PROMPT_TEMPLATES["locate"][language].format(phrase=text)


def read_text_prompt(language: Language = "en") -> str:
    """The prompt asking the model to read out the text in the image."""
    return PROMPT_TEMPLATES["read_text"][_check_language(language)]


def yes_no_prompt(question: str, language: Language = "en") -> str:
    """``question`` with the yes/no suffix of ``language`` appended (MME's form in English).

    A question that already ends with that suffix is returned without adding it a second time.
    """
    language = _check_language(language)
    text = _check_text(question, "question", "Is there a dog in the image?")
    _reject_image_tags(text, "question")
    suffix = YES_NO_SUFFIXES[language]
    if text.casefold().endswith(suffix.strip().casefold()):
        return text
    return PROMPT_TEMPLATES["yes_no"][language].format(question=text)


def _is_han(char: str) -> bool:
    code = ord(char)
    return (
        0x4E00 <= code <= 0x9FFF  # CJK Unified Ideographs
        or 0x3400 <= code <= 0x4DBF  # Extension A
        or 0xF900 <= code <= 0xFAFF  # Compatibility Ideographs
        or 0x20000 <= code <= 0x3134F  # Extensions B-G
    )


#: :func:`detect_language` answers "zh" when at least this share of the letters are Chinese characters.
#: A Chinese character carries about as much as a whole English word, hence a share well below one half.
CJK_SHARE_THRESHOLD = 0.25


def detect_language(text: str) -> Language:
    """Guess whether ``text`` is Chinese ("zh") or English ("en") from the share of Chinese characters.

    Only letters count (digits, punctuation and spaces are ignored); text with no letters is "en".
    """
    if not isinstance(text, str):
        raise PromptError(f"text must be a string; got {type(text).__name__}.")
    letters = [char for char in text if char.isalpha()]
    if not letters:
        return "en"
    han = sum(1 for char in letters if _is_han(char))
    return "zh" if han / len(letters) >= CJK_SHARE_THRESHOLD else "en"
