"""Parsing, writing and drawing of the model's grounding boxes."""

from __future__ import annotations

import pytest
from PIL import Image

from belle_vl_tools import grounding
from belle_vl_tools.errors import ImageError, PromptError
from belle_vl_tools.grounding import (
    GRID_SIZE,
    Box,
    draw_boxes,
    format_box,
    parse_boxes,
    strip_grounding,
    to_grid,
)


def corners(box: Box) -> tuple[float, float, float, float]:
    return (box.x1, box.y1, box.x2, box.y2)


# --- parse_boxes ---------------------------------------------------------------------------------------------------
def test_single_ref_and_box_in_pixels():
    boxes = parse_boxes("<ref>the red circle</ref><box>(100,200),(300,400)</box>", 640, 480)
    assert boxes == [Box("the red circle", 64.0, 96.0, 192.0, 192.0, (100, 200, 300, 400))]
    box = boxes[0]
    assert box.width == 128.0
    assert box.height == 96.0
    assert box.area == 128.0 * 96.0
    assert box.center == (128.0, 144.0)
    assert box.as_dict() == {
        "label": "the red circle",
        "x1": 64.0,
        "y1": 96.0,
        "x2": 192.0,
        "y2": 192.0,
        "grid": [100, 200, 300, 400],
    }


def test_without_size_coordinates_stay_in_grid_units():
    (box,) = parse_boxes("<ref>cat</ref><box>(100,200),(300,400)</box>")
    assert corners(box) == (100.0, 200.0, 300.0, 400.0)
    assert all(isinstance(value, float) for value in corners(box))
    assert box.grid == (100, 200, 300, 400)


def test_two_refs_in_a_sentence():
    text = "图中<ref>狗</ref><box>(10,20),(30,40)</box>和<ref>人</ref><box>(500,500),(1000,1000)</box>在玩。"
    boxes = parse_boxes(text, 1000, 1000)
    assert [b.label for b in boxes] == ["狗", "人"]
    assert [b.grid for b in boxes] == [(10, 20, 30, 40), (500, 500, 1000, 1000)]
    assert corners(boxes[1]) == (500.0, 500.0, 1000.0, 1000.0)


def test_one_ref_with_two_boxes():
    text = "<ref>cats</ref><box>(0,0),(100,100)</box><box>(200,200),(300,300)</box>"
    boxes = parse_boxes(text, 200, 100)
    assert [b.label for b in boxes] == ["cats", "cats"]
    assert [corners(b) for b in boxes] == [(0.0, 0.0, 20.0, 10.0), (40.0, 20.0, 60.0, 30.0)]


def test_box_without_ref_gets_default_label():
    assert parse_boxes("<box>(1,2),(3,4)</box>")[0].label == ""
    boxes = parse_boxes("<box>(1,2),(3,4)</box> then <ref>dog</ref><box>(5,6),(7,8)</box>", default_label="thing")
    assert [b.label for b in boxes] == ["thing", "dog"]


def test_empty_ref_falls_back_to_default_label():
    (box,) = parse_boxes("<ref>  </ref><box>(1,2),(3,4)</box>", default_label="object")
    assert box.label == "object"


def test_label_whitespace_is_tidied():
    (box,) = parse_boxes("<ref>  the \n big  dog </ref><box>(1,2),(3,4)</box>")
    assert box.label == "the big dog"


def test_spaces_inside_parentheses():
    (box,) = parse_boxes("<ref>a</ref><box>( 100 , 200 ) , ( 300 ,400 )</box>", 1000, 1000)
    assert box.grid == (100, 200, 300, 400)


def test_swapped_corners_are_ordered():
    (box,) = parse_boxes("<ref>a</ref><box>(300,400),(100,200)</box>", 640, 480)
    assert box.grid == (100, 200, 300, 400)
    assert corners(box) == (64.0, 96.0, 192.0, 192.0)
    (mixed,) = parse_boxes("<box>(300,200),(100,400)</box>")
    assert mixed.grid == (100, 200, 300, 400)


def test_values_are_clamped_to_the_grid():
    (box,) = parse_boxes("<ref>a</ref><box>(-5,200),(1200,1001)</box>", 100, 50)
    assert box.grid == (0, 200, GRID_SIZE, GRID_SIZE)
    assert corners(box) == (0.0, 10.0, 100.0, 50.0)


def test_decimals_are_rounded():
    (box,) = parse_boxes("<box>(10.4,10.5),(20.6,30)</box>")
    assert box.grid == (10, 11, 21, 30)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "no boxes here",
        "<ref>",
        "</ref></box><box>",
        "<box>(1,2)</box>",
        "<box>(a,b),(c,d)</box>",
        "<box>(1,2),(3,4),(5,6)</box>",
        "<box>((1,2),(3,4))</box>",
        "<ref>x</ref><box>1,2,3,4</box>",
        "<<box>>(1,2),(3,4)<</box>>",
        "<box>(1e999,2),(3,4)</box>",
        "<box>(" + "9" * 400 + ",2),(3,4)</box>",
        "<quad>(1,2),(3,4),(5,6),(7,8)</quad>",
        "<ref>a</ref><quad>(1,2),(3,4),(5,6),(7,8)</quad>",
        "<box>(1,2),(3,",
    ],
)
def test_garbage_gives_no_boxes_and_no_exception(text):
    assert parse_boxes(text, 640, 480) == []


def test_malformed_fragments_are_skipped_and_good_ones_kept():
    text = (
        "<ref>bad</ref><box>(1,2)</box>"
        "<ref>good</ref><box>(10,20),(30,40)</box>"
        "<box>(oops)</box><quad>(1,1),(2,2),(3,3),(4,4)</quad>"
        "<ref>also good</ref><box>(50,60),(70,80)</box>"
    )
    boxes = parse_boxes(text)
    assert [(b.label, b.grid) for b in boxes] == [("good", (10, 20, 30, 40)), ("also good", (50, 60, 70, 80))]


def test_half_open_tags_give_partial_results():
    # Cut off after the coordinates: the closing tag is missing but the box is complete.
    (box,) = parse_boxes("<ref>dog</ref><box>(10,20),(30,40)", 1000, 1000)
    assert (box.label, box.grid) == ("dog", (10, 20, 30, 40))
    # An unclosed reference still names the box that follows it.
    (box,) = parse_boxes("<ref>cat<box>(1,2),(3,4)</box>")
    assert box.label == "cat"
    # A cut-off second box is dropped, the first one kept.
    boxes = parse_boxes("<ref>a</ref><box>(1,2),(3,4)</box><ref>b</ref><box>(5,6),(7")
    assert [(b.label, b.grid) for b in boxes] == [("a", (1, 2, 3, 4))]


def test_non_string_model_output_gives_no_boxes():
    assert parse_boxes(None) == []  # type: ignore[arg-type]


def test_size_arguments_are_checked():
    with pytest.raises(ImageError, match="both width and height"):
        parse_boxes("<box>(1,2),(3,4)</box>", 640)
    with pytest.raises(ImageError, match="positive"):
        parse_boxes("<box>(1,2),(3,4)</box>", 0, 480)


# --- format_box / to_grid --------------------------------------------------------------------------------------------
def test_format_box_exact():
    assert (
        format_box("the red circle", (100, 200, 300, 400)) == "<ref>the red circle</ref><box>(100,200),(300,400)</box>"
    )
    assert format_box("", [1, 2, 3, 4]) == "<box>(1,2),(3,4)</box>"
    assert format_box("a", (300, 400, 100, 200)) == "<ref>a</ref><box>(100,200),(300,400)</box>"


def test_format_parse_round_trip():
    cases = [("狗", (0, 0, 1000, 1000)), ("a small cup", (12, 345, 678, 999))]
    text = "".join(format_box(label, grid) for label, grid in cases)
    boxes = parse_boxes(text)
    assert [(b.label, b.grid) for b in boxes] == cases
    # format_box accepts a parsed Box and gives the same text back.
    assert "".join(format_box(b.label, b) for b in boxes) == text


def test_to_grid_inverts_the_pixel_conversion():
    for grid in [(100, 200, 300, 400), (0, 0, 1000, 1000), (1, 667, 333, 999)]:
        (box,) = parse_boxes(format_box("x", grid), 641, 479)
        assert to_grid(box, 641, 479) == grid
        assert to_grid(corners(box), 641, 479) == grid
    for width, height in [(641, 479), (7, 3), (4000, 3000)]:
        for value in range(GRID_SIZE + 1):
            (box,) = parse_boxes(f"<box>({value},{value}),({value},{value})</box>", width, height)
            assert to_grid(box, width, height) == (value,) * 4


def test_to_grid_rounds_clamps_and_orders():
    assert to_grid((64, 96, 192, 192), 640, 480) == (100, 200, 300, 400)
    assert to_grid((0.05, 0, 0.049, 1), 1000, 1000) == (0, 0, 0, 1)
    assert to_grid((-10, 500, 700, 20), 640, 480) == (0, 42, 1000, 1000)


def test_format_box_refuses_bad_arguments():
    with pytest.raises(PromptError, match="tag"):
        format_box("<ref>x</ref>", (1, 2, 3, 4))
    with pytest.raises(PromptError, match="single line"):
        format_box("a\nb", (1, 2, 3, 4))
    for grid in [(1, 2, 3), (1, 2, 3, 1001), (1.5, 2, 3, 4), (-1, 2, 3, 4), "1234"]:
        with pytest.raises(PromptError, match="to_grid"):
            format_box("a", grid)  # type: ignore[arg-type]


def test_to_grid_refuses_bad_arguments():
    with pytest.raises(ImageError):
        to_grid((1, 2, 3), 10, 10)  # type: ignore[arg-type]
    with pytest.raises(ImageError):
        to_grid((1, 2, 3, 4), 0, 10)
    with pytest.raises(ImageError):
        to_grid((1, 2, 3, 4), None, 10)  # type: ignore[arg-type]


# --- strip_grounding ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<ref>a cat</ref><box>(1,2),(3,4)</box>", "a cat"),
        (
            "<ref>a cat</ref><box>(1,2),(3,4)</box> sits on <ref>a mat</ref><box>(5,6),(7,8)</box>.",
            "a cat sits on a mat.",
        ),
        ("图中<ref>狗</ref><box>(10,20),(30,40)</box>在跑", "图中狗在跑"),
        ("It is here <box>(1,2),(3,4)</box>.", "It is here."),
        ("<ref>dog</ref><box>(1,2),(3,4)</box><box>(5,6),(7,8)</box>", "dog"),
        ("<ref>sign</ref><quad>(1,2),(3,4),(5,6),(7,8)</quad>", "sign"),
        ("<ref>dog</ref><box>(10,20),(30", "dog"),
        ("plain answer", "plain answer"),
        ("stray </box> tag", "stray  tag"),
    ],
)
def test_strip_grounding(text, expected):
    assert strip_grounding(text) == expected


# --- draw_boxes ----------------------------------------------------------------------------------------------------
WHITE = (255, 255, 255)


def test_draw_boxes_outlines_the_box_and_keeps_the_image():
    image = Image.new("RGB", (640, 480), WHITE)
    boxes = parse_boxes("<ref>the red circle</ref><box>(100,200),(300,400)</box>", 640, 480)
    out = draw_boxes(image, boxes, width=3)
    assert out is not image
    assert out.size == image.size
    assert out.mode == "RGB"
    assert image.getpixel((64, 150)) == WHITE  # the input is untouched
    # The four edges are painted, just inside the box corners.
    for point in [(64, 150), (191, 150), (120, 96), (120, 191), (65, 97)]:
        assert out.getpixel(point) != WHITE, point
    # The inside (outline only) and the far outside are not.
    assert out.getpixel((128, 150)) == WHITE
    assert out.getpixel((400, 400)) == WHITE
    assert out.getpixel((10, 470)) == WHITE
    # The label sits on a filled background above the box.
    above = [out.getpixel((x, y)) for x in range(64, 100) for y in range(70, 95)]
    assert any(pixel != WHITE for pixel in above)


def test_draw_boxes_label_goes_inside_when_no_room_above():
    image = Image.new("RGB", (200, 200), WHITE)
    out = draw_boxes(image, [Box("top", 20, 0, 180, 150, (100, 0, 900, 750))], font_size=14)
    assert out.getpixel((30, 8)) != WHITE
    assert out.getpixel((100, 100)) == WHITE


def test_draw_boxes_gives_labels_distinct_colors():
    image = Image.new("RGB", (300, 300), WHITE)
    boxes = [
        Box("a", 10, 100, 90, 200, (0, 0, 0, 0)),
        Box("b", 110, 100, 190, 200, (0, 0, 0, 0)),
        Box("a", 210, 100, 290, 200, (0, 0, 0, 0)),
    ]
    out = draw_boxes(image, boxes, width=2)
    left_a, left_b, left_a2 = (out.getpixel((x, 150)) for x in (10, 110, 210))
    assert left_a == left_a2
    assert left_a != left_b


def test_draw_boxes_draws_a_chinese_label():
    image = Image.new("RGB", (320, 240), WHITE)
    boxes = parse_boxes("<ref>红色的圆</ref><box>(250,250),(750,750)</box>", 320, 240)
    out = draw_boxes(image, boxes, font_size=20)
    assert out.size == (320, 240)
    assert out.getpixel((80, 100)) != WHITE


def test_draw_boxes_with_the_bitmap_fallback_font(monkeypatch):
    # Without a TrueType font, labels outside Latin-1 must still not fail.
    monkeypatch.setattr(grounding, "_load_font", lambda size: grounding.ImageFont.load_default_imagefont())
    image = Image.new("RGB", (200, 200), WHITE)
    out = draw_boxes(image, [Box("猫 cat", 20, 40, 180, 180, (0, 0, 0, 0))])
    assert out.getpixel((20, 100)) != WHITE


def test_draw_boxes_keeps_rgba_and_converts_other_modes():
    boxes = [Box("x", 2, 2, 20, 20, (0, 0, 0, 0))]
    rgba = draw_boxes(Image.new("RGBA", (32, 32), (0, 0, 0, 0)), boxes, width=1)
    assert rgba.mode == "RGBA"
    assert rgba.getpixel((2, 10))[3] == 255
    grey = draw_boxes(Image.new("L", (32, 32), 255), boxes, width=1)
    assert grey.mode == "RGB"
    assert grey.getpixel((2, 10)) != WHITE


def test_draw_boxes_handles_boxes_outside_and_no_boxes():
    image = Image.new("RGB", (50, 50), WHITE)
    out = draw_boxes(image, [Box("far", -100, -100, 500, 500, (0, 0, 1000, 1000))])
    assert out.size == (50, 50)
    assert out.getpixel((0, 25)) != WHITE
    assert draw_boxes(image, []).tobytes() == image.tobytes()


def _outline_pixels(out, box_rect, line):
    left, top, right, bottom = box_rect
    return [out.getpixel((x, top + line // 2)) for x in range(left + 4, right - 4)] + [
        out.getpixel((left + line // 2, y)) for y in range(top + 4, bottom - 4)
    ]


@pytest.mark.parametrize("background", [(230, 25, 75), (220, 20, 20), (255, 255, 255), (0, 0, 0), (60, 180, 75)])
def test_draw_boxes_outline_stands_out_from_the_picture_under_it(background):
    # A box drawn over a shape of the palette's first color (crimson) used to vanish into it.
    image = Image.new("RGB", (200, 160), WHITE)
    image.paste(background, (20, 20, 180, 140))
    out = draw_boxes(image, [Box("the shape", 30, 30, 170, 130, (0, 0, 0, 0))], width=3)
    pixels = _outline_pixels(out, (30, 30, 170, 130), 3)
    assert pixels and all(grounding._distance(p, background) > 150 for p in pixels), (background, pixels[:3])


def test_draw_boxes_same_label_keeps_its_color_where_it_stands_out():
    image = Image.new("RGB", (300, 120), WHITE)
    boxes = [Box("a", 10, 10, 90, 100, (0, 0, 0, 0)), Box("a", 200, 10, 290, 100, (0, 0, 0, 0))]
    out = draw_boxes(image, boxes, width=2)
    assert out.getpixel((10, 50)) == out.getpixel((200, 50))


def test_draw_boxes_labels_stay_small_and_inside_a_small_picture():
    image = Image.new("RGB", (96, 80), WHITE)
    label = "a very long label that is much wider than the picture"
    out = draw_boxes(image, [Box(label, 30, 2, 95, 70, (0, 0, 0, 0))])
    assert out.size == (96, 80)
    # Above the bottom outline, the label (at the top, inside the box) is the only filled band.
    painted_rows = [y for y in range(66) if sum(out.getpixel((x, y)) != WHITE for x in range(40, 90)) > 30]
    assert painted_rows and max(painted_rows) < 80 * 0.2, painted_rows
    # It is shortened, not cut off at the picture's edge: the right edge keeps a margin of the label's fill.
    assert out.getpixel((95, 5)) != WHITE


def test_draw_boxes_refuses_bad_arguments():
    image = Image.new("RGB", (10, 10))
    with pytest.raises(ImageError, match="PIL"):
        draw_boxes("image.png", [])  # type: ignore[arg-type]
    with pytest.raises(ImageError, match="width"):
        draw_boxes(image, [], width=0)
    with pytest.raises(ImageError, match="font_size"):
        draw_boxes(image, [], font_size=0)
    with pytest.raises(ImageError, match="Box"):
        draw_boxes(image, [(1, 2, 3, 4)])  # type: ignore[list-item]


def test_box_is_frozen_and_normalises_types():
    box = Box("a", 1, 2, 3, 4, [1, 2, 3, 4])  # type: ignore[arg-type]
    assert box.grid == (1, 2, 3, 4)
    assert isinstance(box.x1, float)
    with pytest.raises(AttributeError):
        box.x1 = 5.0  # type: ignore[misc]
    with pytest.raises(ImageError):
        Box("a", 1, 2, 3, 4, (1, 2, 3))


def test_modules_import_without_torch_or_transformers():
    import subprocess
    import sys
    from pathlib import Path

    # torch and transformers are made unimportable, whether or not they are installed.
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
        "import belle_vl_tools.grounding, belle_vl_tools.prompts"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
