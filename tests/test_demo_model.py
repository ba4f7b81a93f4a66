"""The shipped demo model answers simple questions about pictures it never saw, through every front door.

Its pictures here are drawn with seeds that training never used (training draws from seed 0; see
scripts/train_demo_model.py), so right answers show that the picture reached the model and was understood.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from belle_vl_tools import BelleVL
from belle_vl_tools.cli import app
from belle_vl_tools.demo import DEMO_MODEL_NAME, default_model_path
from belle_vl_tools.demo_data import COLORS, MME_SUBTASKS, Scene, Shape, generate_mme_set, render

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "pictures"


def _single(color: str, kind: str, cell: tuple[int, int]) -> Scene:
    step = 112 / 3
    side = round(step * 0.7)
    x0, y0 = round(cell[1] * step + 3), round(cell[0] * step + 5)
    return Scene(112, (Shape(kind, color, cell, (x0, y0, x0 + side, y0 + side)),))


@pytest.fixture(scope="session")
def demo() -> BelleVL:
    return BelleVL.from_pretrained(dtype="float32")


def test_the_demo_model_is_the_default(demo):
    assert default_model_path().is_dir()
    assert demo.model_name == DEMO_MODEL_NAME
    assert demo.model.config.visual is not None
    # the published layout: weights and vocabulary are files of the folder, read by the same code as any checkpoint
    names = {p.name for p in default_model_path().iterdir()}
    assert {"config.json", "generation_config.json", "qwen.tiktoken", "model.safetensors"} <= names
    assert sum(p.stat().st_size for p in default_model_path().iterdir()) < 20e6


@pytest.mark.parametrize("color", sorted(COLORS))
def test_it_names_the_color_of_a_circle_it_never_saw(demo, color, tmp_path):
    path = tmp_path / f"{color}.png"
    render(_single(color, "circle", (2, 0))).save(path)
    answer = demo.ask(path, "What color is the circle?", do_sample=False).text
    assert color in answer.lower()
    others = [c for c in COLORS if c != color]
    assert not any(c in answer.lower() for c in others)


def test_the_red_circle_through_the_runtime(demo):
    answer = demo.ask(EXAMPLES / "red_circle.png", "What color is the circle?", do_sample=False).text
    assert "red" in answer.lower()
    assert (
        demo.ask(EXAMPLES / "blue_square.png", "What color is the square?", do_sample=False).text.lower().count("blue")
    )


def test_the_red_circle_in_bfloat16():
    """Half precision, as on a GPU: the same right answer."""
    half = BelleVL.from_pretrained(dtype="bfloat16")
    assert half.model.dtype == torch.bfloat16
    assert "red" in half.ask(EXAMPLES / "red_circle.png", "What color is the circle?", do_sample=False).text.lower()


def test_the_red_circle_through_the_cli():
    result = CliRunner().invoke(app, ["ask", str(EXAMPLES / "red_circle.png"), "What color is the circle?", "--json"])
    assert result.exit_code == 0, result.output
    assert "red" in json.loads(result.output)["text"].lower()


#: MME pictures for the CI check: a seed that neither training (seed 0) nor the trainer's held-out scoring (7919) uses.
MME_CHECK_SEED = 2027


def test_mme_sample_scores_at_least_170_on_every_subtask(tmp_path):
    """A fixed held-out sample of 40 pictures per subtask, run and scored through the CLI as a user runs it."""
    generate_mme_set(tmp_path / "mme", seed=MME_CHECK_SEED, images_per_subtask=40)
    result = CliRunner().invoke(
        app,
        ["eval", "mme", "--data", str(tmp_path / "mme"), "--out", str(tmp_path / "results"), "--json"],
    )
    assert result.exit_code == 0, result.output
    subtasks = json.loads(result.stdout)["subtasks"]
    scores = {name.lower(): subtasks[name]["score"] for name in subtasks}
    assert set(scores) == {name.lower() for name in MME_SUBTASKS}, scores
    assert all(score >= 170 for score in scores.values()), scores


def test_the_readme_command_in_a_fresh_process():
    """The README's main command, run as a new user runs it: the installed console script, the default model."""
    script = Path(sys.executable).with_name("belle-vl")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "belle_vl_tools.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [*command, "ask", str(EXAMPLES / "red_circle.png"), "What color is the circle?"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "red" in out.stdout.lower()


def test_the_notebook_runs_top_to_bottom(monkeypatch, capsys):
    """Every code cell of examples/notebook.ipynb, in order, in one namespace, from the repository's root."""
    root = EXAMPLES.parent.parent
    monkeypatch.chdir(root)
    notebook = json.loads((root / "examples" / "notebook.ipynb").read_text(encoding="utf-8"))
    namespace: dict = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "notebook.ipynb", "exec"), namespace)  # noqa: S102
    printed = capsys.readouterr().out
    assert "image_1 -> " in printed and "red" in printed.split("image_1 -> ", 1)[1].splitlines()[0].lower()
    found = namespace["found"]
    assert found.phrase == "the red square" and found.image.size == (112, 112)
    assert found._repr_png_()[:4] == b"\x89PNG"


# --- held-out pictures: drawn by another function than the training pictures (belle_vl_tools.demo_heldout) ---------
#: The fixed CI sample: 16 pictures (100 questions) of a stream no training or report run uses.
HELDOUT_SEED, HELDOUT_PICTURES = 4242, 16
#: Right answers the shipped demo model gives on that sample, which depends on the fonts installed (measured with
#: DejaVu and Liberation: color 13/13, shape 14/16, count 14/16, position 14/14, read-word 6/9, yes/no 14/16,
#: Chinese 16/16, 91/100 overall; on the full 50-picture figure the same model scores 93%), less a margin of one
#: for numerical differences between machines and fonts. Raise them when a retrained model does better.
HELDOUT_MINIMUM = {
    "color": 12, "shape": 13, "count": 13, "position": 13, "read-word": 5, "yes/no": 13, "Chinese": 15,
}  # fmt: skip
HELDOUT_MINIMUM_OVERALL = 0.88


@pytest.fixture(scope="module")
def heldout(demo):
    from belle_vl_tools.demo_heldout import evaluate, heldout_items

    return evaluate(demo, heldout_items(HELDOUT_PICTURES, seed=HELDOUT_SEED))


def test_held_out_pictures_are_drawn_differently_from_the_training_pictures():
    from belle_vl_tools.demo_heldout import SKILLS, heldout_items

    items = heldout_items(12, seed=HELDOUT_SEED)
    sizes = {item.image.size for item in items}
    assert len(sizes) >= 3 and any(w != h for w, h in sizes)  # several sizes and aspect ratios, not only 112 x 112
    corners = {item.image.getpixel((0, 0)) for item in items}
    assert all(min(c) >= 200 for c in corners) and any(c != (255, 255, 255) for c in corners)  # light, not white
    assert {item.skill for item in items} == set(SKILLS)
    again = heldout_items(12, seed=HELDOUT_SEED)
    assert [(i.question, i.expected) for i in again] == [(i.question, i.expected) for i in items]
    assert again[0].image.tobytes() == items[0].image.tobytes()  # the same sample on every run


def test_held_out_sample_keeps_the_demo_models_measured_figures(heldout):
    """The fixed sample, per skill: at least what the shipped model was measured to reach (see the README)."""
    assert heldout.asked.get("read-word", 0) >= 5
    below = {
        s: (heldout.right.get(s, 0), heldout.asked[s])
        for s, k in HELDOUT_MINIMUM.items()
        if heldout.right.get(s, 0) < k
    }
    assert not below, (below, heldout.table())
    assert heldout.accuracy() >= HELDOUT_MINIMUM_OVERALL, heldout.table()


@pytest.mark.xfail(
    strict=True,
    reason="issue 16's target (>= 90% overall, >= 80% per skill) is met on the full 50-picture held-out figure "
    "(93%, each skill >= 90%) and overall on this 16-picture sample (91/100), not on its read-word (6 of 9)",
)
def test_held_out_sample_meets_the_target(heldout):
    assert heldout.accuracy() >= 0.9, heldout.table()
    assert all(heldout.accuracy(skill) >= 0.8 for skill in heldout.asked), heldout.table()


def test_training_data_can_ask_in_other_words_with_the_same_answers():
    from belle_vl_tools.demo_data import PARAPHRASES, generate_samples, make_sample, paraphrase_texts

    kinds = ["color", "shape", "count", "position"]
    plain = generate_samples(40, seed=5, kinds=kinds)
    reworded = [make_sample(5, i, kinds=kinds, paraphrase=1.0, with_image=False) for i in range(40)]
    assert [s["answer"] for s in reworded] == [s["answer"] for s in plain]  # same scenes, same answers
    assert [s["scene"] for s in reworded] == [s["scene"] for s in plain]
    known = set(paraphrase_texts())
    pairs = [(p["question"], r["question"]) for p, r in zip(plain, reworded, strict=True)]
    changed = [r for p, r in pairs if p != r]
    assert len(changed) >= 30  # (nearly) every question is asked in other words
    assert all("\n" + r in known for r in changed)
    assert all(PARAPHRASES[k] for k in kinds)


def test_questions_that_name_no_shape_are_asked_only_about_pictures_of_one_shape():
    from belle_vl_tools.demo_data import COLORS, ONE_SHAPE_PARAPHRASES, SHAPES, make_sample

    generic = {t for by_language in ONE_SHAPE_PARAPHRASES.values() for ts in by_language.values() for t in ts}
    samples = [make_sample(9, i, kinds=["color", "shape"], paraphrase=1.0, with_image=False) for i in range(300)]
    asked = [s for s in samples if s["question"] in generic]
    assert len(asked) >= 20 and all(len(s["scene"].shapes) == 1 for s in asked)
    # "What color is the shape?" is a color question: its answer names the color, as the usual wording's does
    for s in asked:
        shape, zh = s["scene"].shapes[0], s["language"] == "zh"
        if s["kind"] == "color":
            assert (COLORS[shape.color][1] if zh else shape.color) in s["answer"]
        else:
            assert (SHAPES[shape.kind] if zh else shape.kind) in s["answer"]


def test_free_layout_training_pictures_match_their_answers():
    import random

    from belle_vl_tools.demo_data import BACKGROUND, COLORS, make_sample, random_scene, render

    scenes = [random_scene(random.Random(i), free=True) for i in range(40)]
    assert len({s.canvas for s in scenes}) >= 3 and any(s.background != BACKGROUND for s in scenes)
    sides = [(sh.box[2] - sh.box[0]) for s in scenes for sh in s.shapes]
    assert min(sides) < 0.15 * 112 and max(sides) > 0.25 * 112  # small and large shapes
    cells = {sh.cell for s in scenes for sh in s.shapes}
    assert len(cells) == 9
    for scene in scenes[:10]:
        image = render(scene)
        assert image.size == (112, 112)
        for shape in scene.shapes:
            x1, y1, x2, y2 = shape.box
            center = image.getpixel(((x1 + x2) // 2, (y1 + y2 * 3) // 4))  # inside circles, squares and triangles
            rgb = COLORS[shape.color][0]
            assert sum(abs(a - b) for a, b in zip(center, rgb, strict=True)) < 90, (shape, center)
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            assert (
                shape.cell == (min(2, int(3 * cy / 112)), min(2, int(3 * cx / 112)))
                or min(abs(v - b) for v in (cx, cy) for b in (112 / 3, 224 / 3)) < 2
            )  # the region of the center (rounding aside)
    sample = make_sample(1, 0, free=1.0, kinds=["describe_detailed"])
    assert ("background" in sample["answer"] or "背景" in sample["answer"]) and sample["image"].size == (112, 112)


# --- agent skills on held-out pictures (belle_vl_tools.demo_heldout.agent_items) ----------------------------------
AGENT_SEED, AGENT_PICTURES = 4343, 2


def test_agent_checks_accept_the_right_answers_only():
    from belle_vl_tools.demo_heldout import (
        HeldoutScene,
        HeldoutShape,
        _box_check,
        _description_check,
        _json_check,
        _refusal_check,
    )
    from belle_vl_tools.grounding import format_box, to_grid

    red = HeldoutShape("circle", "red", (30.0, 30.0), 30.0)
    blue = HeldoutShape("square", "blue", (150.0, 60.0), 40.0)
    scene = HeldoutScene(200, 120, (250, 250, 250), (red, blue), "CAT", (100.0, 10.0, 130.0, 22.0))
    right = format_box("the red circle", to_grid(red.box, 200, 120))
    assert _box_check(scene, red)(right) and not _box_check(scene, blue)(right)
    assert not _box_check(scene, red)("The red circle is at the top left.")
    assert _refusal_check("There is no green triangle in the image.") and not _refusal_check(right)
    detailed = (
        "The picture shows two shapes on a light background: a red circle at the top left and a blue square on "
        'the right. The word "CAT" is written in black at the top.'
    )
    assert _description_check(scene, True)(detailed) and _description_check(scene, False)(detailed)
    assert not _description_check(scene, True)(detailed.replace("on the right", "at the bottom"))
    assert not _description_check(scene, False)(detailed.replace('"CAT"', '"DOG"'))
    assert not _description_check(scene, False)("A red circle on a light background.")
    assert _json_check({"color": "red", "count": 2})('{"color": "red", "count": 2}')
    assert not _json_check({"color": "red", "count": 2})('{"color": "red", "count": 3}')
    assert not _json_check({"color": "red"})('{"HAT": 848216}')


@pytest.fixture(scope="module")
def agent_report(demo):
    from belle_vl_tools.demo_heldout import agent_items, evaluate_agent

    return evaluate_agent(demo, agent_items(AGENT_PICTURES, seed=AGENT_SEED))


def test_the_agent_sample_asks_every_agent_skill(agent_report):
    from belle_vl_tools.demo_heldout import AGENT_SKILLS

    assert set(agent_report.asked) == set(AGENT_SKILLS)
    table = agent_report.table()
    assert all(f"| {skill} |" in table for skill in AGENT_SKILLS)


@pytest.mark.xfail(
    strict=True,
    reason="issue 30's targets (each agent skill >= 90%, locate >= 80%) are not met by the shipped demo model: it "
    "draws a box for absent shapes, answers 'A' to a question before its picture, and never calls a tool unforced",
)
def test_the_agent_sample_meets_the_target(agent_report):
    below = {s: agent_report.accuracy(s) for s in agent_report.asked if agent_report.accuracy(s) < 0.9}
    assert set(below) <= {"locate"} and agent_report.accuracy("locate") >= 0.8, agent_report.table()
