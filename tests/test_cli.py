"""The belle-vl command: plumbing, output shapes, exit codes and one-line errors, picture sources, generation flags,
laziness (no torch for --help or cached work). Answers come from the tiny checkpoint (loaded once) or a scripted
backend; answer quality is not tested here."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from belle_vl_tools import cli
from belle_vl_tools.demo_data import generate_mme_set
from belle_vl_tools.testing import ScriptedBackend

FAST = ["--max-new-tokens", "4"]
ROOT = Path(__file__).resolve().parents[1]

# Runs belle-vl in a fresh interpreter where importing torch or transformers fails, as on a machine without them.
BLOCKED = textwrap.dedent(
    """
    import sys

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers"):
                raise ImportError(f"blocked for this test: {name}")
            return None

    sys.meta_path.insert(0, Blocker())
    from belle_vl_tools.cli import main

    sys.argv = ["belle-vl", *sys.argv[1:]]
    main()
    """
)


def _blocked(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCKED, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd or ROOT,
    )


@pytest.fixture()
def loads(monkeypatch, runtime):
    """The CLI's model loads answered by the session's tiny runtime (loaded once); records the settings."""
    seen = []

    def load(settings):
        seen.append(settings)
        return runtime

    monkeypatch.setattr(cli, "_load_backend", load)
    return seen


@pytest.fixture()
def run(tiny_dir, loads):
    runner = CliRunner()

    def invoke(*args: str, model: bool = True, input: str | bytes | None = None):
        extra = ["--model", str(tiny_dir), *FAST] if model else []
        return runner.invoke(cli.app, [*map(str, args), *extra], input=input, prog_name="belle-vl")

    return invoke


@pytest.fixture()
def scripted(monkeypatch):
    """The CLI's model loads answered by a scripted backend (no model); records calls and settings."""
    backend = ScriptedBackend("a red circle")
    backend.settings = []

    def load(settings):
        backend.settings.append(settings)
        return backend

    monkeypatch.setattr(cli, "_load_backend", load)
    return backend


@pytest.fixture()
def no_model(monkeypatch):
    """Fail if the model is loaded."""

    def refuse(settings):
        raise AssertionError("the model must not be loaded here")

    monkeypatch.setattr(cli, "_load_backend", refuse)


def invoke(*args, input=None):
    return CliRunner().invoke(cli.app, [*map(str, args)], input=input, prog_name="belle-vl")


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _one_error_line(result, *needles: str) -> str:
    """The single ``error: ...`` line of a failed run (exit 1, nothing on stdout, no traceback)."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert result.stdout == "" and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "ImagePolicy" not in lines[0] and "base64" not in lines[0]  # hints name the CLI's flags
    return lines[0]


# --- starting ------------------------------------------------------------------------------------------------------
def test_help_lists_the_commands(run):
    result = run("--help", model=False)
    assert result.exit_code == 0
    for command in ("ask", "describe", "locate", "read-text", "chat", "caption", "eval"):
        assert command in result.stdout
    assert run("eval", "mme", "--help", model=False).exit_code == 0


def test_help_and_model_free_commands_need_neither_torch_nor_transformers(tmp_path):
    result = _blocked("--help")
    assert result.returncode == 0, result.stderr
    assert "ask" in result.stdout and "caption" in result.stdout
    for command in ("ask", "caption", "locate"):
        helped = _blocked(command, "--help")
        assert helped.returncode == 0 and "--temperature" in helped.stdout, helped.stderr
    version = _blocked("--version")
    assert version.returncode == 0 and version.stdout.startswith("belle-vl ")
    # Scoring response files needs no model either.
    rows = "\n".join(f"e{i}.jpg\tIs it? Please answer yes or no.\t{a}\t{a}" for i in range(2) for a in ("Yes", "No"))
    (tmp_path / "existence.txt").write_text(rows + "\n")
    scored = _blocked("eval", "mme", "--results", tmp_path)
    assert scored.returncode == 0 and "| --Existence | 200.00 |" in scored.stdout, scored.stderr
    # And a model command that needs the model says so in one line.
    Image.new("RGB", (8, 8), "red").save(tmp_path / "x.png")
    refused = _blocked("ask", tmp_path / "x.png", "What color?")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1 and "torch" in refused.stderr


def test_a_fully_cached_caption_run_loads_no_model_and_needs_no_torch(scripted, pictures, tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    for name in ("red", "blue"):
        shutil.copy(pictures[name], folder / f"{name}.png")
    out = tmp_path / "captions.jsonl"
    first = _json(invoke("caption", folder, "--out", out, "--json"))
    assert (first["new"], first["cached"]) == (2, 0) and len(scripted.calls) == 2
    out.unlink()
    result = _blocked("caption", folder, "--out", out, "--json")  # the same default model key as above
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["captions"], summary["cached"], summary["new"]) == (2, 2, 0)
    assert [json.loads(line)["caption"] for line in out.read_text().splitlines()] == ["a red circle"] * 2


# --- answers -------------------------------------------------------------------------------------------------------
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


def test_json_names_the_demo_model_as_the_api_does(pictures):
    # The real loader, the shipped demo model: the name is the one the API and the server give.
    data = _json(invoke("ask", pictures["red"], "What color is the circle?", "--json", "--max-new-tokens", "3"))
    assert data["model"] == "belle-vl-demo"


def test_generation_flags_reach_every_generating_command(scripted, pictures, tmp_path):
    flags = ["--temperature", "0.7", "--top-p", "0.5", "--seed", "3", "--max-new-tokens", "9"]
    expected = {"temperature": 0.7, "top_p": 0.5, "seed": 3, "max_new_tokens": 9}
    folder = tmp_path / "pictures"
    folder.mkdir()
    shutil.copy(pictures["red"], folder / "a.png")
    for args in (
        ("ask", pictures["red"], "What?"),
        ("describe", pictures["red"]),
        ("read-text", pictures["red"]),
        ("locate", pictures["red"], "the circle"),
        ("caption", folder, "--out", tmp_path / "c.jsonl"),
    ):
        before = len(scripted.calls)
        result = invoke(*args, *flags)
        assert result.exit_code == 0, (args, result.output)
        assert len(scripted.calls) == before + 1
        assert {k: scripted.calls[-1][1].get(k) for k in expected} == expected, args
    result = invoke("chat", *flags, input="Hello\n")
    assert result.exit_code == 0 and scripted.calls[-1][1]["seed"] == 3
    # Given before the command name, they hold too; --temperature 0 is a value, not "unset".
    result = invoke("--temperature", "0", "ask", pictures["red"], "What?")
    assert result.exit_code == 0 and scripted.calls[-1][1]["temperature"] == 0


def test_temperature_zero_is_greedy_and_a_seed_repeats_a_sample(run, pictures):
    def answer(*flags):
        result = run("ask", pictures["red"], "What is this?", "--json", "--max-new-tokens", "8", *flags)
        return _json(result)["text"]

    assert answer("--temperature", "0") == answer("--temperature", "0", "--seed", "5")
    sampled = answer("--temperature", "5", "--top-p", "1", "--seed", "1")
    assert sampled == answer("--temperature", "5", "--top-p", "1", "--seed", "1")
    others = {answer("--temperature", "5", "--top-p", "1", "--seed", str(seed)) for seed in range(2, 6)}
    assert others - {sampled}  # the seed, and so the flags, reach the sampler


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


# --- picture sources -------------------------------------------------------------------------------------------------
def test_a_picture_from_stdin_or_a_data_url_reaches_the_model(scripted, pictures):
    data = pictures["blue"].read_bytes()
    result = invoke("ask", "-", "What is this?", input=data)
    assert result.exit_code == 0, result.output
    (picture,) = scripted.pictures()
    assert picture.size == (96, 80) and picture.getpixel((30, 30)) == (0, 0, 255)
    url = "data:image/png;base64," + base64.b64encode(pictures["red"].read_bytes()).decode()
    result = invoke("describe", url)
    assert result.exit_code == 0, result.output
    assert scripted.pictures()[0].getpixel((48, 40)) == (255, 0, 0)
    _one_error_line(invoke("ask", "-", "What?", input=b""), "No picture on stdin")
    _one_error_line(invoke("chat", "--image", "-", input="Hi\n"), "--image -")


def test_a_url_needs_allow_urls_and_goes_through_the_guarded_fetcher(scripted, pictures, monkeypatch):
    from belle_vl_tools.images import fetch

    url = "http://example.com/pictures/x.png"
    line = _one_error_line(invoke("ask", url, "What?"), url, "--allow-urls")  # not mangled into http:/
    assert "http:/example" not in line and not scripted.calls
    # Loopback and private addresses stay refused even with --allow-urls (checked before any connection).
    line = _one_error_line(invoke("ask", "http://127.0.0.1:9/x.png", "What?", "--allow-urls"), "127.0.0.1")
    assert "download it and pass the file" in line
    _one_error_line(invoke("ask", "ftp://example.com/x.png", "What?", "--allow-urls"), "ftp://", "--allow-urls")

    fetched = []

    def fake_fetch(address, policy):  # the policy's fetcher: no network in tests
        fetched.append((address, policy.allow_urls))
        return pictures["green"].read_bytes()

    monkeypatch.setattr(fetch, "fetch_url", fake_fetch)  # the default fetcher, where the URL loader looks it up
    result = invoke("ask", url, "What?", "--allow-urls")
    assert result.exit_code == 0, result.output
    assert fetched == [(url, True)] and scripted.pictures()[0].getpixel((48, 40)) == (0, 128, 0)


def test_picture_errors_name_cli_flags(scripted, pictures, tmp_path):
    _one_error_line(invoke("ask", pictures["red"], "What?", "--max-pixels", "100"), "--max-pixels")
    _one_error_line(invoke("ask", pictures["red"], "What?", "--max-image-bytes", "10"), "--max-image-bytes")
    line = _one_error_line(invoke("ask", tmp_path / "missing.png", "What?"), "missing.png")
    assert "'-'" in line and "--allow-urls" in line
    assert not scripted.calls


# --- errors ----------------------------------------------------------------------------------------------------------
def test_bad_input_is_one_error_line_and_exit_1(run, pictures, tmp_path, no_model):
    _one_error_line(run("ask", tmp_path / "missing.png", "What is this?"), "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    _one_error_line(run("describe", bad), "bad.png")
    assert run("ask", pictures["red"], "   ").stderr.startswith("error: question")  # an empty question
    _one_error_line(run("caption", tmp_path / "no-such-folder", "--out", tmp_path / "c.jsonl"), "no-such-folder")


def test_model_and_device_errors_are_one_line(pictures, tmp_path, tiny_dir):
    import torch

    ask = ("ask", pictures["red"], "Hi?")
    _one_error_line(invoke(*ask, "--model", "/no/such/folder"), "--model /no/such/folder", "not a Hub id")
    (tmp_path / "weights.bin").write_bytes(b"x")
    _one_error_line(invoke(*ask, "--model", tmp_path / "weights.bin"), "is a file")
    (tmp_path / "empty").mkdir()
    _one_error_line(invoke(*ask, "--model", tmp_path / "empty"), "config.json")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    _one_error_line(invoke(*ask, "--model", broken), "config.json")
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    _one_error_line(invoke(*ask, "--model", no_weights))  # whatever the loader raises: one line
    if torch.cuda.is_available():  # a device this machine lacks
        missing = f"cuda:{torch.cuda.device_count()}"
        _one_error_line(invoke(*ask, "--device", missing), f"--device {missing}", "Available here: cpu")
    else:
        _one_error_line(invoke(*ask, "--device", "cuda"), "--device cuda", "Available here: cpu")
    _one_error_line(invoke(*ask, "--device", "toaster"), "--device toaster")


def test_loading_is_quiet_unless_verbose(pictures, tiny_dir):
    result = invoke("ask", pictures["red"], "Hi?", "--model", tiny_dir, *FAST)
    assert result.exit_code == 0 and result.stderr == "", result.stderr
    verbose = invoke("ask", pictures["red"], "Hi?", "--model", tiny_dir, *FAST, "--verbose")
    assert verbose.exit_code == 0 and "Loading weights" in verbose.stderr


def test_usage_errors_exit_2(run, pictures, tmp_path):
    assert run("ask", pictures["red"], model=False).exit_code == 2  # no question
    assert run("frobnicate", model=False).exit_code == 2
    assert run("describe", pictures["red"], "--detail", "epic", model=False).exit_code == 2
    assert run("locate", pictures["red"], "x", "--out", tmp_path / "boxes.unknown").exit_code == 2
    assert run("eval", "mme", model=False).exit_code == 2  # neither --data nor --results
    assert run("ask", pictures["red"], "Hi?", "--temperature", "-1").exit_code == 2


# --- chat ------------------------------------------------------------------------------------------------------------
def test_chat_keeps_the_history_and_stops_at_exit(run, pictures):
    result = run("chat", "--image", pictures["red"], "--json", input="Hello\n\nAnd then?\n/exit\nnot read\n")
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.exit_code == 0 and len(answers) == 2
    first, second = (a["usage"] for a in answers)
    assert first["images"] == second["images"] == 1  # the picture stays in the conversation
    assert second["prompt_tokens"] > first["prompt_tokens"] + first["completion_tokens"]  # the first turn is in it
    result = run("chat", input="Hi\n")  # ends at the end of the input
    assert result.exit_code == 0 and len(result.stdout.splitlines()) >= 1
    result = run("chat", input="/image -\n/exit\n")
    assert result.exit_code == 0 and result.stderr.startswith("error: /image -")
    result = run("chat", input="/image nowhere.png\n/exit\n")
    assert result.exit_code == 0 and result.stderr.startswith("error: ") and "ImagePolicy" not in result.stderr


def test_chat_commands_say_what_they_did_and_unknown_ones_are_refused(run, pictures, loads):
    result = run("chat", input=f"/image {pictures['red']}\n/imag foo\n/help\n/reset\n/exit\n")
    assert result.exit_code == 0 and not loads  # no message was sent: the model was never loaded
    lines = result.stderr.splitlines()
    assert lines[0].startswith("Attached ") and "red" in lines[0] and "your next message" in lines[0]
    assert lines[1] == "error: unknown command /imag. The commands are: /image PATH, /reset, /help, /exit."
    assert "/reset: forget the conversation" in lines[2]
    assert lines[3] == "Conversation cleared (0 exchanges forgotten)."
    result = run("chat", input="//etc is a folder\n")  # a message that starts with / is sent after a second /
    assert result.exit_code == 0 and loads and "unknown command" not in result.stderr


def test_chat_on_the_demo_model_asks_for_a_picture_instead_of_inventing_one(monkeypatch):
    def no_load(settings):
        raise AssertionError("the model is not needed to refuse")

    monkeypatch.setattr(cli, "_load_backend", no_load)
    result = CliRunner().invoke(cli.app, ["chat"], input="What color is the circle?\n/exit\n")
    assert result.exit_code == 0 and result.stdout == ""
    assert result.stderr.startswith("error: no picture is attached, and the demo model only answers questions about")
    assert "/image PATH" in result.stderr


# --- caption -------------------------------------------------------------------------------------------------------
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


def _caption_folder(tmp_path: Path, pictures) -> Path:
    folder = tmp_path / "pictures"
    folder.mkdir()
    shutil.copy(pictures["red"], folder / "a.png")
    return folder


def test_a_damaged_cache_is_one_line_that_says_what_to_do(scripted, pictures, tmp_path):
    folder = _caption_folder(tmp_path, pictures)
    cache = tmp_path / "captions.cache.sqlite"
    cache.write_bytes(b"this is not a SQLite database, but it is long enough to look like a header" * 20)
    result = invoke("caption", folder, "--out", tmp_path / "captions.jsonl")
    _one_error_line(result, str(cache), "delete it", "--cache PATH")
    assert not scripted.calls and cache.exists()  # nothing captioned, nothing deleted behind the user's back


def test_a_cache_that_cannot_be_created_is_one_line(scripted, pictures, tmp_path):
    folder = _caption_folder(tmp_path, pictures)
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where the cache's folder should be")
    result = invoke("caption", folder, "--out", tmp_path / "c.jsonl", "--cache", blocker / "cache.sqlite")
    _one_error_line(result, "cache.sqlite", "--cache PATH")
    assert not scripted.calls


def test_a_read_only_cache_is_one_line(pictures, tmp_path):
    """A cache file and folder the user may not write. Root writes anyway, so as root the command runs without the
    capabilities that let root ignore file permissions (util-linux's setpriv)."""
    from belle_vl_tools.captions import CaptionCache

    folder = _caption_folder(tmp_path, pictures)
    store = tmp_path / "store"
    with CaptionCache(store / "cache.sqlite"):
        pass
    for leftover in store.glob("cache.sqlite-*"):
        leftover.unlink()
    (store / "cache.sqlite").chmod(0o444)
    store.chmod(0o555)
    command = [sys.executable, "-c", BLOCKED, "caption", str(folder), "--out", str(tmp_path / "c.jsonl")]
    command += ["--cache", str(store / "cache.sqlite")]
    if os.geteuid() == 0:
        drop = "-dac_override,-dac_read_search,-fowner"
        setpriv = shutil.which("setpriv")
        probe = [setpriv, "--bounding-set", drop, "--inh-caps", drop, "sh", "-c", f"touch {store}/probe"]
        if setpriv is None or subprocess.run(probe, capture_output=True).returncode == 0:
            pytest.skip("cannot run as root without the capability to write read-only files here")
        command = [setpriv, "--bounding-set", drop, "--inh-caps", drop, *command]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    finally:
        store.chmod(0o755)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "cannot be written" in lines[0], result.stderr
    assert "--cache PATH" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "c.jsonl").exists()


def test_partial_files_of_killed_runs_are_cleaned_and_live_ones_kept(scripted, pictures, tmp_path):
    folder = _caption_folder(tmp_path, pictures)
    out = tmp_path / "captions.jsonl"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        dead = tmp_path / f".captions.jsonl.{int(gone.stdout)}.0123abcd.partial"
        live = tmp_path / f".captions.jsonl.{sleeper.pid}.4567abcd.partial"
        other = tmp_path / ".other.jsonl.1.89abcdef.partial"
        for path in (dead, live, other):
            path.write_text('{"path": "half a line')
        result = invoke("caption", folder, "--out", out)
        assert result.exit_code == 0, result.output
        assert not dead.exists() and live.exists() and other.exists()
        assert sorted(p.name for p in tmp_path.glob(".captions.jsonl.*.partial")) == [live.name]
    finally:
        sleeper.kill()
        sleeper.wait()


# --- eval ----------------------------------------------------------------------------------------------------------
def test_eval_mme_runs_end_to_end_and_scores_results_without_the_model(run, tmp_path, monkeypatch):
    generate_mme_set(tmp_path / "mme", images_per_subtask=2, size=64)
    out = tmp_path / "responses"
    result = run("eval", "mme", "--data", tmp_path / "mme", "--out", out, "--batch-size", "3")
    assert result.exit_code == 0, result.output
    table = result.stdout
    assert table.startswith("| Category | Score |")
    for row in ("| **Perception** |", "| --Existence |", "| --OCR |", "| --Celebrity | - |"):
        assert row in table
    assert "Cognition" not in table.split("\n\n")[0]  # no "Cognition 0.00" for subtasks that were not run
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
    assert 0 <= data["perception"] <= 1000 and data["cognition"] is None
    limited = run("eval", "mme", "--results", out, "--subtask", "count", model=False)
    assert limited.exit_code == 0 and "| --Existence | - |" in limited.stdout
    missing = run("eval", "mme", "--results", tmp_path / "nowhere", model=False)
    assert missing.exit_code == 1 and missing.stderr.startswith("error: ")


def test_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "belle_vl_tools.cli", "--version"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.startswith("belle-vl ")


def test_a_question_past_the_checkpoints_window_is_one_error_line(run, pictures, runtime):
    question = " ".join(["red"] * 14000)  # the tiny checkpoint's window is 6144 tokens, as the published ones
    result = run("ask", pictures["red"], question)
    line = _one_error_line(result, "6144", "--max-new-tokens")
    assert "max_context_tokens" not in line


def test_the_python_api_refuses_a_prompt_past_the_window_before_generating(runtime, monkeypatch):
    from belle_vl_tools.errors import ContextLengthError

    def never(*args, **kwargs):
        raise AssertionError("nothing may be generated")

    monkeypatch.setattr(runtime.model, "generate", never)
    monkeypatch.setattr(runtime.model, "forward", never)
    with pytest.raises(ContextLengthError, match="context of 6144 tokens") as caught:
        runtime.chat([{"role": "user", "content": " ".join(["red"] * 14000)}], max_new_tokens=4)
    assert caught.value.limit == 6144 and caught.value.prompt_tokens >= 14000 and caught.value.max_new_tokens == 4
