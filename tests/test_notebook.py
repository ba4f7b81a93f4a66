"""Results render richly in Jupyter: answers beside their picture, located boxes drawn."""

from __future__ import annotations

import base64
import io

from PIL import Image

from belle_vl_tools.backend import ChatResult, LocateResult
from belle_vl_tools.grounding import Box


def _png_of(html_text: str) -> Image.Image:
    data = html_text.split("data:image/png;base64,", 1)[1].split("'", 1)[0]
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_answer_renders_with_its_picture(runtime, pictures):
    result = runtime.ask(pictures["red"], "What color is the circle?", do_sample=False, max_new_tokens=4)
    assert result.image == pictures["red"]
    shown = result._repr_html_()
    assert _png_of(shown).size == Image.open(pictures["red"]).size
    # the answer is escaped text beside the picture
    assert ChatResult("<b>x</b>")._repr_html_() == "<div style='white-space:pre-wrap'>&lt;b&gt;x&lt;/b&gt;</div>"


def test_answers_never_fetch_urls_for_display():
    result = ChatResult("red", image="http://example.invalid/a.png")
    assert "<img" not in result._repr_html_()


def test_located_boxes_are_drawn(pictures):
    picture = Image.new("RGB", (100, 80), "white")
    box = Box("the circle", 10, 10, 50, 40, (100, 125, 500, 500))
    result = LocateResult(
        "the circle", [box], "<ref>the circle</ref><box>(100,125),(500,500)</box>", (100, 80), picture
    )
    png = Image.open(io.BytesIO(result._repr_png_()))
    assert png.size == (100, 80)
    assert png.getpixel((10, 25)) != (255, 255, 255)  # the outline is drawn on the left edge of the box
    assert picture.getpixel((10, 25)) == (255, 255, 255)  # the caller's picture is untouched
    assert "the circle (10, 10, 50, 40)" in result._repr_html_()
    empty = LocateResult("a dog", [], "no", (100, 80), picture)
    assert "nothing found" in empty._repr_html_()


def test_locate_through_the_runtime_carries_the_picture(runtime, pictures):
    result = runtime.locate(pictures["red"], "the circle", do_sample=False, max_new_tokens=8)
    assert result.image.size == Image.open(pictures["red"]).size
    assert result._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"
