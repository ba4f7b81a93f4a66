"""MME: read the benchmark, run a backend over it, write response files and score them as the official tool does.

The official scoring (MME's ``eval_tool/calculation.py``), reproduced by :func:`score_lines`:

* one response file per subtask, ``<subtask>.txt``, with lines ``image_name<TAB>question<TAB>ground_truth<TAB>
  response``; each picture has two questions, on consecutive lines;
* ground truth and response are lower-cased; a response that is exactly "yes" or "no" is taken as it is, any
  other response counts by its first four characters only: "yes" among them reads as yes, else "no" among them
  reads as no, else the answer is "other" (always wrong);
* a subtask scores 100 x accuracy (share of questions right) + 100 x accuracy+ (share of pictures with both
  questions right), at most 200;
* perception is the sum over existence, count, position, color, posters, celebrity, scene, landmark, artwork and
  OCR (at most 2000), cognition the sum over commonsense_reasoning, numerical_calculation, text_translation and
  code_reasoning (at most 800).

Data layouts read by :func:`read_mme` (``DIR`` may also be a folder holding one such benchmark folder, such as
``MME_Benchmark_release_version``), per subtask:

* ``DIR/<subtask>/<subtask>.txt`` with lines ``image_name<TAB>question<TAB>ground_truth`` (a fourth column is
  ignored) and the pictures beside it or in ``DIR/<subtask>/images/`` (what
  :func:`belle_vl_tools.demo_data.generate_mme_set` writes);
* ``DIR/<subtask>.txt`` in that form (as the official tool's answer templates) with the pictures in
  ``DIR/<subtask>/`` or ``DIR/<subtask>/images/``;
* the official release: ``DIR/<subtask>/`` holding the pictures and, for each, a ``<picture stem>.txt`` with two
  lines ``question<TAB>ground_truth``; or ``DIR/<subtask>/images/`` with the pictures and
  ``DIR/<subtask>/questions_answer_YES_NO/`` with the question files.

Response files written by :func:`run_mme` are in the official form, so the official tool can score them too.
This module imports neither torch nor transformers.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..captions import IMAGE_SUFFIXES, ProgressBar, _LazyBackend, run_batch
from ..errors import BelleVLError
from ..images import ImagePolicy, load_image

__all__ = [
    "COGNITION",
    "DISPLAY_NAMES",
    "PERCEPTION",
    "SUBTASKS",
    "MMEFormatError",
    "MMEQuestion",
    "MMEScores",
    "SubtaskScore",
    "find_mme_root",
    "format_table",
    "parse_answer",
    "read_mme",
    "read_responses",
    "run_mme",
    "score_lines",
    "score_results",
    "write_responses",
]

#: Perception subtasks, in the order of MME's tool (each scores at most 200).
PERCEPTION: tuple[str, ...] = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
#: Cognition subtasks, in the order of MME's tool.
COGNITION: tuple[str, ...] = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SUBTASKS: tuple[str, ...] = PERCEPTION + COGNITION

#: Names in the score table (as in the Belle-VL model card).
DISPLAY_NAMES: dict[str, str] = {
    "existence": "Existence",
    "count": "Count",
    "position": "Position",
    "color": "Color",
    "posters": "Posters",
    "celebrity": "Celebrity",
    "scene": "Scene",
    "landmark": "Landmark",
    "artwork": "Artwork",
    "OCR": "OCR",
    "commonsense_reasoning": "Commonsense Reasoning",
    "numerical_calculation": "Numerical Calculation",
    "text_translation": "Text Translation",
    "code_reasoning": "Code Reasoning",
}

Answer = Literal["yes", "no", "other"]

DEFAULT_MAX_NEW_TOKENS = 32


class MMEFormatError(BelleVLError, ValueError):
    """MME data or a response file is not in the expected form (the message names the file and line)."""


# ---------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------


def parse_answer(response: str) -> Answer:
    """A response as the official tool reads it: "yes", "no" or "other" (see the module's docstring)."""
    text = response.lower()
    if text in ("yes", "no"):
        return text  # type: ignore[return-value]
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


@dataclass(frozen=True)
class SubtaskScore:
    """The score of one subtask: ``score = accuracy + accuracy_plus`` (percentages, at most 200)."""

    subtask: str
    questions: int
    images: int
    correct: int
    images_both_correct: int
    other: int  # responses read as neither yes nor no

    @property
    def accuracy(self) -> float:
        return 100.0 * self.correct / self.questions if self.questions else 0.0

    @property
    def accuracy_plus(self) -> float:
        return 100.0 * self.images_both_correct / self.images if self.images else 0.0

    @property
    def score(self) -> float:
        return self.accuracy + self.accuracy_plus

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy": self.accuracy, "accuracy_plus": self.accuracy_plus, "score": self.score}


def _split_line(line: str, where: str, columns: int) -> list[str]:
    parts = line.split("\t", columns - 1)
    if len(parts) < columns:
        names = "image_name, question, ground_truth" + (", response" if columns == 4 else "")
        raise MMEFormatError(f"{where}: expected {columns} tab-separated columns ({names}), found {len(parts)}.")
    return parts


def _ground_truth(value: str, where: str) -> Literal["yes", "no"]:
    truth = value.strip().lower()
    if truth not in ("yes", "no"):
        raise MMEFormatError(f"{where}: the ground truth must be Yes or No, found {value!r}.")
    return truth  # type: ignore[return-value]


def _lines(text: str) -> list[tuple[int, str]]:
    """Non-blank lines with their 1-based numbers; only the line ending is removed."""
    return [(n, line.rstrip("\r\n")) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def score_lines(subtask: str, lines: Iterable[str], source: str = "<lines>") -> SubtaskScore:
    """Score the lines of a response file (``image_name, question, ground_truth, response``, tab-separated, two
    consecutive lines per picture) as the official tool does."""
    rows = [(n, line) for n, line in enumerate((line.rstrip("\r\n") for line in lines), start=1) if line.strip()]
    if len(rows) % 2:
        raise MMEFormatError(f"{source}: {len(rows)} lines; every picture needs two questions on consecutive lines.")
    correct = both = other = 0
    for i in range(0, len(rows), 2):
        right = 0
        names = []
        for n, line in rows[i : i + 2]:
            where = f"{source}:{n}"
            name, _question, truth, response = _split_line(line, where, 4)
            names.append(name)
            answer = parse_answer(response)
            if answer == "other":
                other += 1
            if answer == _ground_truth(truth, where):
                right += 1
        if names[0] != names[1]:
            raise MMEFormatError(
                f"{source}:{rows[i][0]}: consecutive lines name different pictures ({names[0]!r}, {names[1]!r}); "
                "the two questions of a picture must be on consecutive lines."
            )
        correct += right
        both += right == 2
    return SubtaskScore(subtask, len(rows), len(rows) // 2, correct, both, other)


@dataclass(frozen=True)
class MMEScores:
    """Scores of the subtasks that were scored, with the perception and cognition totals."""

    subtasks: dict[str, SubtaskScore] = field(default_factory=dict)

    @property
    def perception(self) -> float:
        return sum((self.subtasks[t].score for t in PERCEPTION if t in self.subtasks), 0.0)

    @property
    def cognition(self) -> float:
        return sum((self.subtasks[t].score for t in COGNITION if t in self.subtasks), 0.0)

    @property
    def missing(self) -> list[str]:
        return [t for t in SUBTASKS if t not in self.subtasks]

    def scored(self, category: Literal["perception", "cognition"]) -> bool:
        """Whether any subtask of the category (``"perception"`` or ``"cognition"``) was scored."""
        names = PERCEPTION if category == "perception" else COGNITION
        return any(t in self.subtasks for t in names)

    def as_dict(self) -> dict[str, Any]:
        """The scores as plain data; a category with no scored subtask has the total None (not 0)."""
        return {
            "perception": self.perception if self.scored("perception") else None,
            "cognition": self.cognition if self.scored("cognition") else None,
            "subtasks": {t: s.as_dict() for t, s in self.subtasks.items()},
            "missing": self.missing,
        }

    def table(self) -> str:
        return format_table(self)


def _number(value: float) -> str:
    return f"{value:.2f}"


def format_table(scores: MMEScores) -> str:
    """The Markdown table of the Belle-VL model card: Category | Score, the Perception and Cognition totals in
    bold and each subtask under its total. Only categories with a scored subtask are shown; their subtasks without
    a score show "-" (the totals add up the others)."""
    lines = ["| Category | Score |", "|---|---|"]
    for title, names, total in (
        ("Perception", PERCEPTION, scores.perception),
        ("Cognition", COGNITION, scores.cognition),
    ):
        if not scores.scored("perception" if names is PERCEPTION else "cognition"):
            continue
        lines.append(f"| **{title}** | **{_number(total)}** |")
        for name in names:
            score = scores.subtasks.get(name)
            lines.append(f"| --{DISPLAY_NAMES[name]} | {_number(score.score) if score else '-'} |")
    missing = scores.missing
    if missing and len(missing) < len(SUBTASKS):
        lines.append("")
        lines.append(
            f"Scored {len(SUBTASKS) - len(missing)} of {len(SUBTASKS)} subtasks; not scored: {', '.join(missing)}."
        )
    return "\n".join(lines)


def _subtask_name(name: str) -> str | None:
    lowered = {t.lower(): t for t in SUBTASKS}
    return lowered.get(name.lower())


def score_results(results_dir: str | os.PathLike[str], subtasks: Sequence[str] | None = None) -> MMEScores:
    """Score the response files ``<subtask>.txt`` in ``results_dir`` (no model needed)."""
    root = Path(results_dir)
    if not root.is_dir():
        raise MMEFormatError(f"{str(root)!r} is not a folder: name the folder holding the <subtask>.txt files.")
    files: dict[str, Path] = {}
    for path in sorted(root.glob("*.txt")):
        name = _subtask_name(path.stem)
        if name is not None and (subtasks is None or name in subtasks):
            files[name] = path
    if not files:
        raise MMEFormatError(
            f"No response file in {str(root)!r}: expected files named after MME subtasks, e.g. existence.txt, OCR.txt."
        )
    scored = {}
    for name in SUBTASKS:
        if name in files:
            path = files[name]
            scored[name] = score_lines(name, path.read_text(encoding="utf-8").splitlines(), str(path))
    return MMEScores(scored)


# ---------------------------------------------------------------------------------------------------------------
# Reading the benchmark
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MMEQuestion:
    """One question: its subtask, picture (file name and path), text and ground truth ("Yes" / "No")."""

    subtask: str
    image_name: str
    image_path: Path
    question: str
    ground_truth: str


def _subtask_entries(root: Path) -> dict[str, Path]:
    """Known subtask names among the folders and .txt files directly in ``root``."""
    found: dict[str, Path] = {}
    if not root.is_dir():
        return found
    for child in sorted(root.iterdir()):
        stem = child.name if child.is_dir() else (child.stem if child.suffix == ".txt" else "")
        name = _subtask_name(stem) if stem else None
        if name is not None and (child.is_dir() or name not in found):
            found[name] = child
    return found


def find_mme_root(data_dir: str | os.PathLike[str]) -> Path:
    """The folder holding the subtask folders: ``data_dir`` itself, or the only folder (up to two levels down)
    that holds them."""
    root = Path(data_dir)
    if not root.is_dir():
        raise MMEFormatError(f"{str(root)!r} is not a folder: name the MME data folder (one folder per subtask).")
    level = [root]
    for _ in range(3):
        with_tasks = [d for d in level if _subtask_entries(d)]
        if len(with_tasks) == 1:
            return with_tasks[0]
        if len(with_tasks) > 1:
            names = ", ".join(str(d) for d in with_tasks)
            raise MMEFormatError(f"{str(root)!r} holds several MME folders ({names}); name one of them.")
        level = [c for d in level for c in sorted(d.iterdir()) if c.is_dir() and not c.name.startswith(".")]
    raise MMEFormatError(
        f"No MME subtask in {str(root)!r}: expected folders named after subtasks ({', '.join(SUBTASKS)})."
    )


def _image_dirs(folder: Path) -> list[Path]:
    return [d for d in (folder, folder / "images") if d.is_dir()]


def _find_image(name: str, dirs: Sequence[Path], where: str) -> Path:
    for d in dirs:
        if (d / name).is_file():
            return d / name
    raise MMEFormatError(f"{where}: the picture {name!r} is not in {' or '.join(str(d) for d in dirs) or '-'}.")


def _read_table(subtask: str, path: Path, image_dirs: Sequence[Path]) -> list[MMEQuestion]:
    questions = []
    for n, line in _lines(path.read_text(encoding="utf-8-sig")):
        where = f"{path}:{n}"
        name, question, truth = _split_line(line, where, 3)[:3]
        truth = truth.split("\t")[0]
        _ground_truth(truth, where)
        questions.append(MMEQuestion(subtask, name, _find_image(name, image_dirs, where), question, truth.strip()))
    _check_pairs(questions, str(path))
    return questions


def _check_pairs(questions: Sequence[MMEQuestion], source: str) -> None:
    if len(questions) % 2:
        raise MMEFormatError(f"{source}: {len(questions)} questions; every picture needs two, on consecutive lines.")
    for a, b in zip(questions[::2], questions[1::2], strict=True):
        if a.image_name != b.image_name:
            raise MMEFormatError(
                f"{source}: the questions about {a.image_name!r} and {b.image_name!r} are interleaved; "
                "the two questions of a picture must be on consecutive lines."
            )


def _read_per_image(subtask: str, image_dir: Path, question_dir: Path) -> list[MMEQuestion]:
    questions = []
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    for image in images:
        qfile = question_dir / f"{image.stem}.txt"
        if not qfile.is_file():
            continue
        rows = _lines(qfile.read_text(encoding="utf-8-sig"))
        if len(rows) != 2:
            raise MMEFormatError(f"{qfile}: expected two lines 'question<TAB>answer', found {len(rows)}.")
        for n, line in rows:
            where = f"{qfile}:{n}"
            parts = line.split("\t")
            if len(parts) < 2:
                raise MMEFormatError(f"{where}: expected 'question<TAB>answer'.")
            question, truth = parts[0], parts[1]
            _ground_truth(truth, where)
            questions.append(MMEQuestion(subtask, image.name, image, question, truth.strip()))
    return questions


def _read_subtask(subtask: str, entry: Path, root: Path) -> list[MMEQuestion]:
    folder = entry if entry.is_dir() else root / entry.stem
    if entry.is_dir():
        for candidate in (entry / f"{entry.name}.txt", entry / f"{subtask}.txt"):
            if candidate.is_file():
                return _read_table(subtask, candidate, _image_dirs(entry))
        flat = root / f"{entry.name}.txt"
        if flat.is_file():
            return _read_table(subtask, flat, _image_dirs(entry))
        if (entry / "images").is_dir() and (entry / "questions_answer_YES_NO").is_dir():
            return _read_per_image(subtask, entry / "images", entry / "questions_answer_YES_NO")
        return _read_per_image(subtask, entry, entry)
    return _read_table(subtask, entry, _image_dirs(folder))


def read_mme(
    data_dir: str | os.PathLike[str], *, subtasks: Sequence[str] | None = None, limit: int | None = None
) -> dict[str, list[MMEQuestion]]:
    """The questions of every subtask found in ``data_dir`` (see the module's docstring for the layouts), in
    MME's subtask order; ``limit`` keeps the first ``limit`` pictures (two questions each) of each subtask."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise MMEFormatError(f"limit must be a positive number of pictures per subtask; got {limit!r}.")
    root = find_mme_root(data_dir)
    entries = _subtask_entries(root)
    wanted = None
    if subtasks is not None:
        wanted = set()
        for name in subtasks:
            known = _subtask_name(name)
            if known is None:
                raise MMEFormatError(f"Unknown MME subtask {name!r}; the subtasks are {', '.join(SUBTASKS)}.")
            wanted.add(known)
    result: dict[str, list[MMEQuestion]] = {}
    for name in SUBTASKS:
        if name not in entries or (wanted is not None and name not in wanted):
            continue
        questions = _read_subtask(name, entries[name], root)
        if limit is not None:
            questions = questions[: 2 * limit]
        if questions:
            result[name] = questions
    if not result:
        raise MMEFormatError(f"No MME questions found in {str(root)!r}.")
    return result


# ---------------------------------------------------------------------------------------------------------------
# Response files
# ---------------------------------------------------------------------------------------------------------------


def _clean(text: str) -> str:
    """A response on one line and without tabs, as the official file format needs."""
    return " ".join(text.replace("\t", " ").splitlines())


def write_responses(
    out_dir: str | os.PathLike[str], subtask: str, questions: Sequence[MMEQuestion], responses: Sequence[str]
) -> Path:
    """Write ``<out_dir>/<subtask>.txt`` in the official four-column form (atomically); returns its path."""
    if len(questions) != len(responses):
        raise ValueError(f"{len(questions)} questions but {len(responses)} responses.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"{q.image_name}\t{_clean(q.question)}\t{q.ground_truth}\t{_clean(r)}\n"
        for q, r in zip(questions, responses, strict=True)
    ]
    target = out / f"{subtask}.txt"
    tmp = out / f".{subtask}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
    try:
        with open(tmp, "x", encoding="utf-8", newline="\n") as f:
            f.writelines(lines)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def read_responses(path: str | os.PathLike[str]) -> list[tuple[str, str, str, str]]:
    """The rows ``(image_name, question, ground_truth, response)`` of a response file."""
    p = Path(path)
    return [tuple(_split_line(line, f"{p}:{n}", 4)) for n, line in _lines(p.read_text(encoding="utf-8"))]  # type: ignore[misc]


def _already_answered(path: Path, questions: Sequence[MMEQuestion]) -> bool:
    if not path.is_file():
        return False
    try:
        rows = read_responses(path)
    except MMEFormatError:
        return False
    return [(r[0], r[1]) for r in rows] == [(q.image_name, _clean(q.question)) for q in questions]


# ---------------------------------------------------------------------------------------------------------------
# Running a backend
# ---------------------------------------------------------------------------------------------------------------


def run_mme(
    backend: Any,
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    subtasks: Sequence[str] | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    resume: bool = True,
    progress: bool = True,
    image_policy: ImagePolicy | None = None,
    **generation: Any,
) -> MMEScores:
    """Answer the MME questions of ``data_dir`` with ``backend`` (greedy, ``batch_size`` questions per batch),
    write ``<out_dir>/<subtask>.txt`` per subtask in the official form, and return the scores.

    ``backend`` is a backend (``chat``, optionally ``generate_batch``) or a callable that returns one, called only
    if some subtask needs answering: with ``resume`` a subtask whose response file already answers exactly its
    questions is scored as it is. Each question is sent as written (it ends with "Please answer yes or no.")
    after its picture. ``generation`` defaults to ``temperature=0, max_new_tokens=32``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
    data = read_mme(data_dir, subtasks=subtasks, limit=limit)
    lazy = _LazyBackend(backend)
    generation.setdefault("temperature", 0)
    if generation.get("max_new_tokens") is None:
        generation["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
    policy = image_policy or ImagePolicy.trusted()
    out = Path(out_dir)
    todo = {t: qs for t, qs in data.items() if not (resume and _already_answered(out / f"{t}.txt", qs))}
    total = sum(len(qs) for qs in todo.values())
    with ProgressBar(total, "MME", enabled=progress and total > 0) as bar:
        for subtask, questions in todo.items():
            responses: list[str] = []
            for start in range(0, len(questions), batch_size):
                chunk = questions[start : start + batch_size]
                pictures: dict[Path, Any] = {}
                for q in chunk:
                    if q.image_path not in pictures:
                        pictures[q.image_path] = load_image(q.image_path, policy)
                conversations = [
                    [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image", "image": pictures[q.image_path]},
                                {"type": "text", "text": q.question},
                            ],
                        }
                    ]
                    for q in chunk
                ]
                responses.extend(run_batch(lazy.get(), conversations, dict(generation)))
                bar.advance(len(chunk))
            write_responses(out, subtask, questions, responses)
    return score_results(out, subtasks=list(data))
