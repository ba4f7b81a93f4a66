"""The belle-vl command on the tiny checkpoint: plumbing, output shapes, exit codes, laziness (not answer quality)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from belle_vl_tools import cli
from belle_vl_tools.demo_data import generate_mme_set

FAST = ["--max-new-tokens", "4"]


@pytest.fixture()
def run(tiny_dir):
    runner = CliRunner()

    def invoke(*args: str, model: bool = True, input: str | None = None):
        extra = ["--model", str(tiny_dir), *FAST] if model else []
        return runner.invoke(cli.app, [*map(str, args), *extra], input=input, prog_name="belle-vl")

    return invoke


@pytest.fixture()
def no_model(monkeypatch):
    """Fail if the model is loaded."""

    def refuse(settings):
        raise AssertionError("the model must not be loaded here")

    monkeypatch.setattr(cli, "_load_backend", refuse)


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_help_lists_the_commands(run):
    result = run("--help", model=False)
    assert result.exit_code == 0
    for command in ("ask", "describe", "locate", "read-text", "chat", "caption", "eval"):
        assert command in result.stdout
    assert run("eval", "mme", "--help", model=False).exit_code == 0


def test_ask_prints_the_answer(run, pictures):
    result = run("ask", pictures["red"], "What color is the circle?")
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("\n") and result.stderr == ""


def test_json_output_shapes(run, pictures, tiny_dir):
    for args in (
        ("ask", pictures["red"], "What is this?"),
        ("describe", pictures["blue"], "--detail", "detailed", "--language", "zh"),
        ("read-text", pictures["green"]),
    ):
        data = _json(run(*args, "--json"))
        assert set(data) == {"text", "finish_reason", "usage", "model"}
        assert data["model"] == tiny_dir.name and data["usage"]["images"] == 1
        assert data["finish_reason"] in ("stop", "length") and data["usage"]["completion_tokens"] <= 4
    # options before the command name work too
    result = CliRunner().invoke(
        cli.app, ["--model", str(tiny_dir), "--json", "--max-new-tokens", "2", "ask", str(pictures["red"]), "Hi?"]
    )
    assert _json(result)["usage"]["completion_tokens"] <= 2


def test_locate_writes_the_picture_with_boxes(run, pictures, tmp_path):
    out = tmp_path / "drawn" / "boxes.png"
    data = _json(run("locate", pictures["red"], "the red circle", "--out", out, "--json"))
    assert set(data) == {"phrase", "text", "image_size", "boxes", "out"}
    assert data["phrase"] == "the red circle" and data["image_size"] == [96, 80] and data["out"] == str(out)
    assert isinstance(data["boxes"], list)
    with Image.open(out) as drawn:
        assert drawn.size == (96, 80)
    plain = run("locate", pictures["red"], "the red circle")
    assert plain.exit_code == 0 and plain.stdout.strip()


def test_bad_input_is_one_error_line_and_exit_1(run, pictures, tmp_path, no_model):
    result = run("ask", tmp_path / "missing.png", "What is this?")
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing.png" in lines[0]
    assert "Traceback" not in result.output
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    result = run("describe", bad)
    assert result.exit_code == 1 and result.stderr.startswith("error: ")
    result = run("ask", pictures["red"], "   ")  # an empty question
    assert result.exit_code == 1 and result.stderr.startswith("error: question")
    result = run("caption", tmp_path / "no-such-folder", "--out", tmp_path / "c.jsonl")
    assert result.exit_code == 1 and result.stderr.startswith("error: ")


def test_a_missing_checkpoint_is_an_error_not_a_traceback(pictures, tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli.app, ["ask", str(pictures["red"]), "Hi?", "--model", str(tmp_path / "empty")])
    assert result.exit_code == 1 and result.stderr.startswith("error: ") and "config.json" in result.stderr


def test_usage_errors_exit_2(run, pictures, tmp_path):
    assert run("ask", pictures["red"], model=False).exit_code == 2  # no question
    assert run("frobnicate", model=False).exit_code == 2
    assert run("describe", pictures["red"], "--detail", "epic", model=False).exit_code == 2
    assert run("locate", pictures["red"], "x", "--out", tmp_path / "boxes.unknown").exit_code == 2
    assert run("eval", "mme", model=False).exit_code == 2  # neither --data nor --results


def test_chat_keeps_the_history_and_stops_at_exit(run, pictures):
    result = run("chat", "--image", pictures["red"], "--json", input="Hello\n\nAnd then?\n/exit\nnot read\n")
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.exit_code == 0 and len(answers) == 2
    first, second = (a["usage"] for a in answers)
    assert first["images"] == second["images"] == 1  # the picture stays in the conversation
    assert second["prompt_tokens"] > first["prompt_tokens"] + first["completion_tokens"]  # the first turn is in it
    result = run("chat", input="Hi\n")  # ends at the end of the input
    assert result.exit_code == 0 and len(result.stdout.splitlines()) >= 1
    result = run("chat", input="/image nowhere.png\n/exit\n")
    assert result.exit_code == 0 and result.stderr.startswith("error: ")


def test_caption_resumes_through_the_cache(run, pictures, tmp_path, monkeypatch):
    folder = tmp_path / "pictures"
    folder.mkdir()
    shutil.copy(pictures["red"], folder / "a.png")
    shutil.copy(pictures["blue"], folder / "b.png")
    out = tmp_path / "out" / "captions.jsonl"
    first = _json(run("caption", folder, "--out", out, "--json", "--batch-size", "2"))
    assert first["captions"] == 2 and first["new"] == 2 and first["cached"] == 0
    assert Path(first["cache"]) == tmp_path / "out" / "captions.cache.sqlite"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["path"]).name for r in rows] == ["a.png", "b.png"]
    assert set(rows[0]) == {"path", "caption", "width", "height", "digest"} and rows[0]["width"] == 96

    shutil.copy(pictures["green"], folder / "c.png")
    second = _json(run("caption", folder, "--out", out, "--json"))
    assert (second["captions"], second["cached"], second["new"]) == (3, 2, 1)
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert again[:2] == rows

    def refuse(settings):
        raise AssertionError("a fully cached run must not load the model")

    monkeypatch.setattr(cli, "_load_backend", refuse)
    third = _json(run("caption", folder, "--out", out, "--json"))
    assert (third["captions"], third["cached"], third["new"]) == (3, 3, 0)
    plain = run("caption", folder, "--out", out)
    assert plain.exit_code == 0 and "3 from the cache" in plain.stderr
    assert not list((tmp_path / "out").glob("*.partial"))


def test_eval_mme_runs_end_to_end_and_scores_results_without_the_model(run, tmp_path, monkeypatch):
    generate_mme_set(tmp_path / "mme", images_per_subtask=2, size=64)
    out = tmp_path / "responses"
    result = run("eval", "mme", "--data", tmp_path / "mme", "--out", out, "--batch-size", "3")
    assert result.exit_code == 0, result.output
    table = result.stdout
    assert table.startswith("| Category | Score |")
    for row in ("| **Perception** |", "| --Existence |", "| --OCR |", "| **Cognition** |", "| --Posters | - |"):
        assert row in table
    files = sorted(p.name for p in out.glob("*.txt"))
    assert files == ["OCR.txt", "color.txt", "count.txt", "existence.txt", "position.txt"]
    for path in out.glob("*.txt"):
        lines = path.read_text().splitlines()
        assert len(lines) == 4 and all(len(line.split("\t")) == 4 for line in lines)

    def refuse(settings):
        raise AssertionError("scoring must not load the model")

    monkeypatch.setattr(cli, "_load_backend", refuse)
    scored = run("eval", "mme", "--results", out, model=False)
    assert scored.exit_code == 0 and scored.stdout == table
    data = _json(run("eval", "mme", "--results", out, "--json", model=False))
    assert set(data["subtasks"]) == {"existence", "count", "position", "color", "OCR"}
    assert 0 <= data["perception"] <= 1000 and data["cognition"] == 0
    limited = run("eval", "mme", "--results", out, "--subtask", "count", model=False)
    assert limited.exit_code == 0 and "| --Existence | - |" in limited.stdout
    missing = run("eval", "mme", "--results", tmp_path / "nowhere", model=False)
    assert missing.exit_code == 1 and missing.stderr.startswith("error: ")


def test_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "belle_vl_tools.cli", "--version"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.startswith("belle-vl ")
