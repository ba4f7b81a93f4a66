"""MME: the official answer parsing and scoring on hand-computed examples, the data layouts, running a backend."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from belle_vl_tools.backend import ChatResult
from belle_vl_tools.demo_data import generate_mme_set
from belle_vl_tools.eval import mme
from belle_vl_tools.eval.mme import MMEFormatError, parse_answer, read_mme, run_mme, score_lines, score_results

Q = "Is there a cat in the image? Please answer yes or no."


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("yes", "yes"),
        ("No", "no"),  # lower-cased, then exact
        ("YES", "yes"),
        ("Yes, it is", "yes"),  # first four characters "yes," hold "yes"
        ("yes.", "yes"),
        ("Not really", "no"),  # "not " holds "no"
        ("nope", "no"),
        ("I know", "other"),  # "i kn": no "no" within the first four characters
        ("know", "no"),  # ... but "know" itself holds "no"
        ("I think yes", "other"),  # "yes" comes too late
        ("The answer is no", "other"),
        ("  yes", "other"),  # "  ye"
        ("", "other"),
    ],
)
def test_parse_answer_follows_the_official_rules(response, expected):
    assert parse_answer(response) == expected


def _row(image, truth, response):
    return f"{image}\t{Q}\t{truth}\t{response}"


def test_hand_computed_subtask_scores(tmp_path):
    existence = [
        _row("a.jpg", "Yes", "Yes"),  # right
        _row("a.jpg", "No", "no"),  # right: picture a has both right
        _row("b.jpg", "Yes", "Yes, it is"),  # right
        _row("b.jpg", "No", "I think yes"),  # other: wrong
        _row("c.jpg", "No", "Not really"),  # right
        _row("c.jpg", "Yes", "no"),  # wrong
    ]
    # 4 of 6 questions right, 1 of 3 pictures with both right: 66.67 + 33.33 = 100
    score = score_lines("existence", existence)
    assert (score.questions, score.images, score.correct, score.images_both_correct, score.other) == (6, 3, 4, 1, 1)
    assert score.accuracy == pytest.approx(400 / 6)
    assert score.accuracy_plus == pytest.approx(100 / 3)
    assert score.score == pytest.approx(100.0)

    commonsense = [
        _row("x.png", "Yes", "yes"),  # right
        _row("x.png", "No", "nope"),  # right: both right
        _row("y.png", "Yes", "YES."),  # right
        _row("y.png", "No", "I don't know"),  # "i do": other, wrong
    ]
    # 3 of 4 right (75) + 1 of 2 pictures (50) = 125
    results = tmp_path / "results"
    results.mkdir()
    (results / "existence.txt").write_text("\n".join(existence) + "\n", encoding="utf-8")
    (results / "commonsense_reasoning.txt").write_text("\r\n".join(commonsense), encoding="utf-8")  # no last \n
    (results / "notes.txt").write_text("not a subtask")
    scores = score_results(results)
    assert set(scores.subtasks) == {"existence", "commonsense_reasoning"}
    assert scores.subtasks["commonsense_reasoning"].score == pytest.approx(125.0)
    assert scores.perception == pytest.approx(100.0) and scores.cognition == pytest.approx(125.0)

    table = scores.table()
    lines = table.splitlines()
    assert lines[0] == "| Category | Score |"
    assert "| **Perception** | **100.00** |" in lines and "| --Existence | 100.00 |" in lines
    assert "| **Cognition** | **125.00** |" in lines and "| --Commonsense Reasoning | 125.00 |" in lines
    assert "| --Count | - |" in lines
    assert lines.index("| **Perception** | **100.00** |") < lines.index("| --Existence | 100.00 |")
    assert lines.index("| --OCR | - |") < lines.index("| **Cognition** | **125.00** |")
    data = scores.as_dict()
    assert data["subtasks"]["existence"]["correct"] == 4 and "count" in data["missing"]


def test_all_right_gives_the_maxima(tmp_path):
    for name in mme.SUBTASKS:
        rows = [_row(f"{name}_{i}.jpg", t, t.lower()) for i in range(3) for t in ("Yes", "No")]
        (tmp_path / f"{name}.txt").write_text("\n".join(rows) + "\n")
    scores = score_results(tmp_path)
    assert scores.perception == pytest.approx(2000.0) and scores.cognition == pytest.approx(800.0)
    assert not scores.missing and "Scored" not in scores.table()


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([_row("a.jpg", "Yes", "yes")], "two questions"),
        ([_row("a.jpg", "Yes", "yes"), _row("b.jpg", "No", "no")], "different pictures"),
        ([_row("a.jpg", "Maybe", "yes"), _row("a.jpg", "No", "no")], "Yes or No"),
        ([f"a.jpg\t{Q}\tYes", _row("a.jpg", "No", "no")], "4 tab-separated columns"),
    ],
)
def test_malformed_response_files_are_refused_with_the_line(rows, message):
    with pytest.raises(MMEFormatError, match=message) as info:
        score_lines("count", rows, "count.txt")
    assert "count.txt" in str(info.value)


def _picture(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), "gray").save(path)


def _official_pair(folder: Path, stem: str) -> None:
    (folder / f"{stem}.txt").write_text("Is it gray? Please answer yes or no.\tYes\nIs it red?\tNo\n")


def test_layouts_of_the_official_release(tmp_path):
    root = tmp_path / "download" / "MME_Benchmark_release_version"  # found one and two levels down
    # images and question files side by side
    for stem in ("0001", "0002"):
        _picture(root / "count" / f"{stem}.png")
        _official_pair(root / "count", stem)
    # images/ and questions_answer_YES_NO/
    for stem in ("tt01_shot_1", "tt02_shot_2"):
        _picture(root / "celebrity" / "images" / f"{stem}.jpg")
        (root / "celebrity" / "questions_answer_YES_NO").mkdir(parents=True, exist_ok=True)
        _official_pair(root / "celebrity" / "questions_answer_YES_NO", stem)
    # a picture without questions is ignored
    _picture(root / "count" / "extra.png")
    # a flat <subtask>.txt (answer-template form) with the pictures in the subtask folder
    _picture(root / "code_reasoning" / "0020.png")
    (root / "code_reasoning.txt").write_text(f"0020.png\t{Q}\tNo\n0020.png\t{Q}\tYes\n")
    (root / "unrelated").mkdir()

    for start in (tmp_path, tmp_path / "download", root):
        data = read_mme(start)
        assert list(data) == ["count", "celebrity", "code_reasoning"]
    count = data["count"]
    assert [(q.image_name, q.ground_truth) for q in count] == [
        ("0001.png", "Yes"),
        ("0001.png", "No"),
        ("0002.png", "Yes"),
        ("0002.png", "No"),
    ]
    assert count[0].image_path == root / "count" / "0001.png"
    assert data["celebrity"][0].image_path == root / "celebrity" / "images" / "tt01_shot_1.jpg"
    assert len(read_mme(root, limit=1)["count"]) == 2
    assert list(read_mme(root, subtasks=["Celebrity"])) == ["celebrity"]


def test_generated_set_layout_and_errors(tmp_path):
    generate_mme_set(tmp_path / "set", images_per_subtask=2, size=64)
    data = read_mme(tmp_path / "set")
    assert list(data) == ["existence", "count", "position", "color", "OCR"]
    assert all(len(qs) == 4 for qs in data.values())
    assert all(q.image_path.is_file() and q.question.endswith("Please answer yes or no.") for q in data["OCR"])
    with pytest.raises(MMEFormatError, match="not a folder"):
        read_mme(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MMEFormatError, match="No MME subtask"):
        read_mme(tmp_path / "empty")
    (tmp_path / "set" / "count" / "count.txt").write_text(f"gone.png\t{Q}\tYes\ngone.png\t{Q}\tNo\n")
    with pytest.raises(MMEFormatError, match="gone.png"):
        read_mme(tmp_path / "set")


class Oracle:
    """Answers each question with its ground truth, looked up from the question text and the picture."""

    model_name = "oracle"

    def __init__(self, data) -> None:
        from belle_vl_tools.images import image_digest, load_image

        self.truth = {
            (image_digest(load_image(q.image_path)), q.question): q.ground_truth for qs in data.values() for q in qs
        }
        self.batches: list[int] = []
        self.generation: list[dict] = []

    def chat(self, messages, **generation):
        from belle_vl_tools.images import image_digest

        image, text = messages[0]["content"][0]["image"], messages[0]["content"][1]["text"]
        self.generation.append(generation)
        answer = self.truth[(image_digest(image), text)]
        return ChatResult(f"{answer}, surely.\tReally\nyes" if answer == "Yes" else "No")

    def generate_batch(self, conversations, **generation):
        self.batches.append(len(conversations))
        return [self.chat(c, **generation) for c in conversations]


def test_run_mme_writes_official_files_scores_them_and_resumes(tmp_path):
    generate_mme_set(tmp_path / "set", images_per_subtask=2, size=64)
    data = read_mme(tmp_path / "set")
    oracle = Oracle(data)
    scores = run_mme(oracle, tmp_path / "set", tmp_path / "out", batch_size=3, progress=False)
    assert scores.perception == pytest.approx(5 * 200.0) and scores.cognition == 0
    assert max(oracle.batches) <= 3 and len(oracle.generation) == 20  # a lone last question goes through chat
    assert all(g == {"temperature": 0, "max_new_tokens": 32} for g in oracle.generation)
    lines = (tmp_path / "out" / "count.txt").read_text().splitlines()
    assert len(lines) == 4 and all(len(line.split("\t")) == 4 for line in lines)
    assert [line.split("\t")[:3] for line in lines] == [
        [q.image_name, q.question, q.ground_truth] for q in data["count"]
    ]
    assert score_results(tmp_path / "out").as_dict() == scores.as_dict()

    def never():
        raise AssertionError("everything is answered already")

    again = run_mme(never, tmp_path / "set", tmp_path / "out", progress=False)
    assert again.as_dict() == scores.as_dict()
    # a changed limit means other questions: that subtask runs again (only the factory is lazy)
    limited = run_mme(lambda: oracle, tmp_path / "set", tmp_path / "out", limit=1, subtasks=["count"], progress=False)
    assert list(limited.subtasks) == ["count"] and limited.subtasks["count"].questions == 2


def test_only_the_scored_categories_are_printed(tmp_path):
    rows = [_row(f"e_{i}.jpg", t, t.lower()) for i in range(2) for t in ("Yes", "No")]
    (tmp_path / "existence.txt").write_text("\n".join(rows) + "\n")
    scores = score_results(tmp_path)
    table = scores.table()
    assert "| **Perception** | **200.00** |" in table and "| --Existence | 200.00 |" in table
    assert "Cognition" not in table and "Commonsense" not in table  # no "Cognition 0.00" for what was not run
    data = scores.as_dict()
    assert data["perception"] == pytest.approx(200.0) and data["cognition"] is None
