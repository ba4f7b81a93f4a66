"""Results render richly in Jupyter: answers beside their picture, located boxes drawn."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
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


# --- examples/notebook.ipynb as Jupyter runs it ---------------------------------------------------------------------
NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "notebook.ipynb"


def test_the_notebook_executes_as_nbconvert_runs_it():
    """``jupyter nbconvert --to notebook --execute examples/notebook.ipynb``: nbconvert's ExecutePreprocessor is
    nbclient's NotebookClient, run in a real kernel whose working folder is the notebook's own (examples/), wherever
    the command was typed. Every cell runs without an error (and without tqdm's "IProgress not found"), on the demo
    model."""
    nbformat = pytest.importorskip("nbformat", reason="the test extra installs nbformat, nbclient and ipykernel")
    nbclient = pytest.importorskip("nbclient", reason="the test extra installs nbformat, nbclient and ipykernel")
    pytest.importorskip("ipykernel", reason="the test extra installs nbformat, nbclient and ipykernel")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    stderr = "".join(output.text for output in outputs if output.get("name") == "stderr")
    assert "IProgress" not in stderr and "Traceback" not in stderr, stderr
    printed = "".join(output.text for output in outputs if output.get("name") == "stdout")
    assert "red" in printed.split("image_1 -> ", 1)[1].splitlines()[0].lower()  # the demo model saw the circle
    shown = [output for output in outputs if output.output_type == "execute_result"]
    assert "image/png" in shown[0].data  # cell 1 shows the picture
    assert "red" in shown[1].data["text/html"].lower()  # "What color is the circle?" answered beside its picture
    assert any("image/png" in output.data and "the red square" in output.data.get("text/html", "") for output in shown)
