"""The web chat (`belle-vl ui`): driven in a real headless Chromium, called through gradio_client, and its handlers.

One app over the shipped demo model is launched for the module on a loopback port; the browser tests open a fresh
page (a new browser session) each. The demo model answers simple questions about colored shapes, so a right answer
read from the page shows the uploaded picture reached the model.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image, ImageChops
from selenium.webdriver.common.keys import Keys
from typer.testing import CliRunner

from belle_vl_tools import cli, ui
from belle_vl_tools.backend import ChatResult, StreamChunk, VisionTasks
from belle_vl_tools.errors import BackendError, ContextLengthError
from belle_vl_tools.images import ImagePolicy

PICTURES = Path(__file__).resolve().parent.parent / "examples" / "pictures"
RED = PICTURES / "red_circle.png"
BLUE = PICTURES / "blue_square.png"
SHAPES = PICTURES / "shapes_and_word.png"
WAIT = 90  # seconds a model answer may take in the page on a busy 2-core machine


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _browser_paths() -> tuple[str, str] | None:
    binary = os.environ.get("BELLE_VL_CHROMIUM") or next(
        (found for name in ("chromium", "chromium-browser", "google-chrome") if (found := shutil.which(name))), None
    )
    driver = os.environ.get("BELLE_VL_CHROMEDRIVER") or shutil.which("chromedriver")
    return (binary, driver) if binary and driver else None


NO_BROWSER = (
    "no Chromium and chromedriver here: scripts/test.sh installs Debian's chromium and chromium-driver when it runs "
    "as root; elsewhere install them (or set BELLE_VL_CHROMIUM and BELLE_VL_CHROMEDRIVER)"
)


# --- the app, once per module -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_backend():
    from belle_vl_tools import BelleVL

    return BelleVL.from_pretrained(dtype="float32")


@pytest.fixture(scope="module")
def url(demo_backend) -> Iterator[str]:
    port = _free_port()
    app = ui.launch(
        demo_backend, host="127.0.0.1", port=port, block=False, quiet=True, concurrency_limit=2, temperature=0.0
    )
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


@pytest.fixture(scope="module")
def client(url: str) -> Client:
    return Client(url, verbose=False)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    paths = _browser_paths()
    if paths is None:
        pytest.skip(NO_BROWSER)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    options.add_argument("--window-size=1400,1100")
    driver = webdriver.Chrome(options=options, service=Service(paths[1]))
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The chat page in the browser, with the few moves a user makes."""

    def __init__(self, driver: Any, url: str) -> None:
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.by, self.stale = driver, By, StaleElementReferenceException
        # The page re-renders as answers stream in: an element found a moment ago may be gone when it is read.
        self.wait = lambda timeout=WAIT: WebDriverWait(
            driver, timeout, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,)
        )
        driver.get(url)
        self.wait(30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#chat-input textarea"))

    def find(self, css: str) -> list[Any]:
        return self.driver.find_elements(self.by.CSS_SELECTOR, css)

    def texts(self, css: str) -> list[str]:
        """The text of every element ``css`` selects, read again if the page re-rendered them meanwhile."""
        for _ in range(10):
            try:
                return [element.text for element in self.find(css)]
            except self.stale:
                continue
        raise AssertionError(f"{css} kept changing while it was read")

    def text(self, css: str) -> str:
        return "\n".join(self.texts(css))

    def attach(self, *paths: Path) -> None:
        before = len(self.find("#chat-input .thumbnail-item"))
        field = self.find("#chat-input input[type=file]")[0]
        # As a file dialog does, a new choice replaces the last one: ChromeDriver would add to the files the input
        # still holds from the last upload (Gradio leaves them there), which would upload those again.
        self.driver.execute_script("arguments[0].value = '';", field)
        field.send_keys("\n".join(str(path) for path in paths))
        self.wait(30).until(lambda d: len(self.find("#chat-input .thumbnail-item")) >= before + len(paths))

    def send(self, text: str) -> None:
        from selenium.webdriver.common.keys import Keys

        self.find("#chat-input textarea")[0].send_keys(text + Keys.ENTER)

    def answers(self) -> list[str]:
        return self.texts("#belle-vl-chat [data-testid='bot']")

    def busy(self) -> bool:
        """Whether the chat still waits for the model (its progress tracker is shown)."""
        trackers = self.find("#belle-vl-chat [data-testid='status-tracker']")
        return any("hide" not in (tracker.get_attribute("class") or "").split() for tracker in trackers)

    def next_answer(self, count_before: int) -> str:
        """The text of the next assistant message once it is complete (not busy, and the same on two looks)."""
        seen: list[str] = []

        def done(_driver: Any) -> str | bool:
            answers = self.answers()
            if len(answers) <= count_before or answers[-1].strip() in ("", "…") or self.busy():
                return False
            seen.append(answers[-1])
            return answers[-1] if len(seen) > 1 and seen[-2] == seen[-1] else False

        return self.wait().until(done)

    def click(self, element_id: str) -> None:
        self.find(f"#{element_id}")[0].click()

    def error_badges(self) -> list[str]:
        """Gradio's pop-ups and the red "Error" badges it puts on every output of a handler that raised."""
        shown = [e for e in self.find("[data-testid='toast-body'], [data-testid='status-tracker'] .error")]
        return [e.text for e in shown if e.is_displayed()]

    def notice(self, count_before: int) -> str:
        """The next message of the conversation, once it is there (a notice comes at once, without the model)."""
        return self.wait(30).until(lambda d: len(self.answers()) > count_before and self.answers()[-1] or False)


@pytest.fixture
def page(browser: Any, url: str) -> Page:
    return Page(browser, url)


# --- in the browser -----------------------------------------------------------------------------------------------
def test_the_page_names_the_model_and_its_device(page: Page):
    shown = page.text("#belle-vl-model")
    assert "belle-vl-demo" in shown and "cpu" in shown


def test_an_uploaded_picture_is_answered_and_stays_in_the_conversation(page: Page):
    page.attach(RED)
    page.send("What color is the circle?")
    answer = page.next_answer(0)
    assert "red" in answer.lower()
    # the user's turn shows the picture itself
    assert page.find("#belle-vl-chat [data-testid='user'] img")
    # a later turn without a new picture: the picture from the first turn is still the model's to see
    page.click("describe-brief")
    description = page.next_answer(1).lower()
    assert "circle" in description and "red" in description

    page.click("new-chat")
    page.wait(30).until(lambda d: not page.answers())
    page.attach(BLUE)
    page.send("What color is the square?")
    answer = page.next_answer(0).lower()
    assert "blue" in answer and "red" not in answer
    assert len(page.find("#belle-vl-chat [data-testid='user'] img")) == 1  # only the picture attached this time


def test_a_question_in_chinese(page: Page):
    page.attach(RED)
    page.send("图中的圆形是什么颜色的？")
    assert "红" in page.next_answer(0)


def test_locate_shows_the_picture_with_the_boxes_drawn(page: Page):
    page.attach(RED)
    page.find("#locate-phrase textarea, #locate-phrase input")[0].send_keys("the red circle")
    page.click("locate")
    listing = page.next_answer(0)
    assert "the red circle" in listing and "Found 1 box" in listing
    sources = lambda d: [img.get_attribute("src") for img in page.find("#located-image img")]  # noqa: E731
    source = page.wait().until(lambda d: next((src for src in sources(d) if src), False))
    with urllib.request.urlopen(source, timeout=30) as response:
        drawn = Image.open(io.BytesIO(response.read())).convert("RGB")
    original = Image.open(RED).convert("RGB")
    assert drawn.size == original.size
    assert ImageChops.difference(drawn, original).getbbox() is not None  # the boxes are drawn on it
    assert "the red circle" in page.text("#located-boxes")
    assert page.find("#belle-vl-chat [data-testid='bot'] img")  # the drawn picture is in the chat too


def _corrupt(folder: Path) -> Path:
    path = folder / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not the rest of a picture" * 8)
    return path


def _bomb(folder: Path) -> Path:
    """8000 x 8000 pixels (64 million, over the upload limit of 40 million) in a few kilobytes."""
    path = folder / "bomb.png"
    Image.new("1", (8000, 8000)).save(path, optimize=True)
    assert path.stat().st_size < 200_000
    return path


BAD_UPLOADS = [(_corrupt, "could not be read as a picture: the file is damaged"), (_bomb, "8000 x 8000 pixels")]


@pytest.mark.parametrize(("make", "expected"), BAD_UPLOADS, ids=["corrupt", "bomb"])
def test_a_bad_upload_is_one_message_and_a_good_question_then_works(page: Page, tmp_path: Path, make, expected):
    bad = make(tmp_path)
    page.attach(bad)
    page.send("What color is the circle?")
    message = page.notice(0)
    assert bad.name in message and re.search(expected, message)
    assert "Try another file" in message or "use a smaller picture" in message  # and what to do
    # in the page's words: none of the server's paths, the loader's settings or library names
    for internal in ("/tmp", "Traceback", "ImagePolicy", "Pillow", "PIL", "max_pixels", "gradio"):
        assert internal not in message, internal
    assert not page.error_badges()  # the rest of the page is as it was
    count_before = len(page.answers())
    # the question stayed in the box and the bad picture left it: attach a good one and send again
    assert page.find("#chat-input textarea")[0].get_attribute("value") == "What color is the circle?"
    assert not page.find("#chat-input .thumbnail-item")
    page.attach(RED)
    page.find("#chat-input textarea")[0].send_keys(Keys.ENTER)
    assert "red" in page.next_answer(count_before).lower()
    assert not page.error_badges()


def test_describe_and_a_question_with_no_picture_are_refused_politely(page: Page):
    page.click("describe-brief")
    message = page.notice(0)
    assert "no picture to describe yet" in message and "paper clip" in message
    assert not page.error_badges()
    page.send("What color is the circle?")  # the demo model only knows pictures: it asks for one, invents nothing
    message = page.notice(1)
    assert "no picture in this conversation yet" in message and "circle" not in message.split("⚠️")[-1]
    assert not page.error_badges()
    # the question stays in the box: attach the picture and send it again
    assert page.find("#chat-input textarea")[0].get_attribute("value") == "What color is the circle?"
    page.attach(RED)
    page.find("#chat-input textarea")[0].send_keys(Keys.ENTER)
    assert "red" in page.next_answer(2).lower()


def test_a_narrow_window_keeps_the_page_usable(browser: Any, url: str):
    browser.set_window_size(420, 900)
    try:
        page = Page(browser, url)
        # the settings panel starts closed, so nothing covers the conversation or the buttons
        page.wait(10).until(lambda d: not page.find(".sidebar.open"))
        page.attach(RED)
        page.click("describe-brief")  # a covered button would not take the click
        description = page.next_answer(0).lower()
        assert "red" in description and "circle" in description
    finally:
        browser.set_window_size(1400, 1100)


# --- through gradio_client ----------------------------------------------------------------------------------------
def test_ask_endpoint(client: Client):
    assert "red" in client.predict(handle_file(str(RED)), "What color is the circle?", api_name="/ask").lower()
    assert "blue" in client.predict(handle_file(str(BLUE)), "What color is the square?", api_name="/ask").lower()


def test_describe_and_read_text_endpoints(client: Client):
    brief = client.predict(handle_file(str(RED)), api_name="/describe").lower()
    assert "red" in brief and "circle" in brief
    detailed = client.predict(handle_file(str(RED)), "detailed", "en", api_name="/describe").lower()
    assert "red" in detailed and "circle" in detailed
    word = client.predict(handle_file(str(SHAPES)), "en", api_name="/read_text")
    assert word.strip()


def test_locate_endpoint(client: Client):
    boxes, drawn_path = client.predict(handle_file(str(RED)), "the red circle", api_name="/locate")
    assert len(boxes) == 1 and boxes[0]["label"] == "the red circle"
    box = boxes[0]
    assert 0 <= box["x1"] < box["x2"] <= 112 and 0 <= box["y1"] < box["y2"] <= 112
    drawn = Image.open(drawn_path).convert("RGB")
    original = Image.open(RED).convert("RGB")
    assert drawn.size == original.size and ImageChops.difference(drawn, original).getbbox() is not None


def test_several_clients_at_once_each_get_their_own_answer(url: str):
    answers: dict[str, str] = {}

    def ask(name: str, picture: Path, question: str) -> None:
        answers[name] = Client(url, verbose=False).predict(handle_file(str(picture)), question, api_name="/ask")

    threads = [
        threading.Thread(target=ask, args=("red", RED, "What color is the circle?")),
        threading.Thread(target=ask, args=("blue", BLUE, "What color is the square?")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT)
    assert "red" in answers["red"].lower() and "blue" in answers["blue"].lower()


def test_errors_reach_the_client_and_the_app_keeps_serving(client: Client, tmp_path: Path):
    with pytest.raises(AppError, match="could not be read as a picture"):
        client.predict(handle_file(str(_corrupt(tmp_path))), "What color?", api_name="/ask")
    with pytest.raises(AppError, match="maximum"):
        client.predict(handle_file(str(RED)), "What color is the circle?", 0.0, 100_000, api_name="/ask")
    with pytest.raises(AppError, match="phrase"):
        client.predict(handle_file(str(RED)), "   ", api_name="/locate")
    with pytest.raises(AppError, match="picture is missing"):
        client.predict(None, "What color is the circle?", api_name="/ask")
    assert "red" in client.predict(handle_file(str(RED)), "What color is the circle?", api_name="/ask").lower()


# --- the handlers, with a scripted backend ------------------------------------------------------------------------
class RecordingBackend(VisionTasks):
    """Answers from a script and keeps every conversation it was sent; ``fail`` makes the next stream fail."""

    model_name = "scripted"

    def __init__(self, answers: list[str]) -> None:
        self.answers = list(answers)
        self.sent: list[list[dict[str, Any]]] = []
        self.fail: BaseException | None = None

    def chat(self, messages, **generation) -> ChatResult:
        self.sent.append(list(messages))
        return ChatResult(self.answers.pop(0))

    def stream(self, messages, **generation) -> Iterator[StreamChunk]:
        self.sent.append(list(messages))
        if self.fail is not None:
            yield StreamChunk("Half an ans")
            raise self.fail
        answer = self.answers.pop(0)
        yield StreamChunk(answer[: len(answer) // 2])
        yield StreamChunk(answer[len(answer) // 2 :], finish_reason="stop")


def _last(steps: list[tuple[Any, ...]]) -> dict[str, Any]:
    """The final values of the page's outputs: (box, chatbot, history, shown, located picture, located boxes)."""
    final: dict[str, Any] = {}
    names = ("box", "chatbot", "history", "shown", "located", "boxes")
    for step in steps:
        for name, value in zip(names, step, strict=True):
            if not (isinstance(value, dict) and value.get("__type__") == "update" and len(value) == 1):
                final[name] = value
    return final


def test_pictures_stay_pictures_in_later_turns():
    backend = RecordingBackend(["The circle is red.", "It is round."])
    chat = ui.WebChat(backend, ImagePolicy.trusted())
    first = _last(list(chat.submit({"text": "What color?", "files": [str(RED)]}, [], [], 0.0, 64)))
    assert first["chatbot"][-1]["content"] == "The circle is red."
    second = _last(list(chat.submit({"text": "What shape?", "files": []}, first["history"], first["shown"], 0.0, 64)))
    sent = backend.sent[-1]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    picture = sent[0]["content"][0]
    assert picture["type"] == "image" and isinstance(picture["image"], Image.Image)
    assert picture["image"].size == (112, 112)
    assert sent[2]["content"] == [{"type": "text", "text": "What shape?"}]
    assert second["history"][-1] == {"role": "assistant", "content": "It is round."}


@pytest.mark.parametrize(
    "failure",
    [
        BackendError("The server at http://gpu-box:8000 did not answer."),
        ContextLengthError("The prompt has 9000 tokens: more than this runtime's max_context_tokens (8192)."),
    ],
)
def test_a_model_failure_is_a_message_in_the_chat_and_the_turn_is_not_kept(failure):
    backend = RecordingBackend([])
    backend.fail = failure
    chat = ui.WebChat(backend, ImagePolicy.trusted())
    final = _last(list(chat.submit({"text": "What color?", "files": [str(RED)]}, [], [], 0.0, 64)))
    assert str(failure) in final["chatbot"][-1]["content"]
    assert final["history"] == []
    backend.fail = RuntimeError("CUDA error: device-side assert triggered")
    final = _last(list(chat.submit({"text": "What color?", "files": [str(RED)]}, [], [], 0.0, 64)))
    shown = final["chatbot"][-1]["content"]
    assert "The model could not answer this" in shown and "CUDA" not in shown and "RuntimeError" not in shown


def _notice_of(steps: list[tuple[Any, ...]]) -> str:
    final = _last(steps)
    assert final["history"] == []  # nothing reached the model's conversation
    return final["chatbot"][-1]["content"]


def test_buttons_need_a_picture_and_problems_are_messages_in_the_chat():
    backend = RecordingBackend([])
    chat = ui.WebChat(backend, ImagePolicy.trusted())
    assert "no picture to describe" in _notice_of(
        list(chat.task("brief", {"text": "", "files": []}, "auto", [], [], 0.0, 64))
    )
    assert "no picture to look in" in _notice_of(
        list(chat.locate({"text": "", "files": []}, "the red circle", "auto", [], [], 0.0, 64))
    )
    assert "one picture" in _notice_of(
        list(chat.locate({"text": "", "files": [str(RED), str(BLUE)]}, "the circle", "auto", [], [], 0.0, 64))
    )
    assert "temperature" in _notice_of(
        list(chat.submit({"text": "What color?", "files": [str(RED)]}, [], [], -1.0, 64))
    )
    assert "Type a question" in _notice_of(list(chat.submit({"text": " ", "files": [str(RED)]}, [], [], 0.0, 64)))
    assert not backend.sent


def test_a_question_without_a_picture():
    """Answered as a text question by a model that chats, and said so; refused politely by the demo model."""
    backend = RecordingBackend(["Hello! How can I help?"])
    chat = ui.WebChat(backend, ImagePolicy.trusted())
    final = _last(list(chat.submit({"text": "Hi", "files": []}, [], [], 0.0, 64)))
    assert final["chatbot"][-1]["content"] == f"Hello! How can I help?\n\n{ui.TEXT_ONLY_NOTE}"
    assert final["history"][-1] == {"role": "assistant", "content": "Hello! How can I help?"}
    backend.model_name = "belle-vl-demo"
    demo = ui.WebChat(backend, ImagePolicy.trusted())
    assert "only answers questions about pictures" in _notice_of(
        list(demo.submit({"text": "What color is the circle?", "files": []}, [], [], 0.0, 64))
    )
    assert len(backend.sent) == 1


def test_the_page_starts_at_the_models_default_temperature(demo_backend):
    """As on the command line: the demo model's generation_config.json samples (temperature 1, top-p 0.3)."""
    config = demo_backend.generation_config
    assert config.do_sample and ui.default_temperature(demo_backend) == (config.temperature or 1.0) == 1.0
    assert ui.default_temperature(RecordingBackend([])) == 0.0  # a backend that names no default: greedy
    app = ui.build_app(demo_backend)
    slider = next(block for block in app.blocks.values() if getattr(block, "label", None) == "Temperature")
    assert slider.value == 1.0 and "top-p 0.3" in slider.info


def test_uploads_are_read_only_from_gradios_upload_folder(tmp_path: Path):
    import gradio as gr

    chat = ui.WebChat(RecordingBackend(["red"]))  # the default policy: Gradio's upload folder only
    outside = tmp_path / "red.png"
    shutil.copy(RED, outside)
    shown = _notice_of(list(chat.submit({"text": "What color?", "files": [str(outside)]}, [], [], 0.0, 64)))
    assert shown.startswith("⚠️ red.png could not be opened here") and str(tmp_path) not in shown
    with pytest.raises(gr.Error, match="red.png could not be opened here"):  # through the scripts' endpoints
        chat.api_ask(str(outside), "What color?", 0.0, 64)


# --- the command ----------------------------------------------------------------------------------------------------
@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    calls: dict[str, Any] = {}
    monkeypatch.setattr(ui, "launch", lambda backend, **kwargs: calls.update(backend=backend, **kwargs))
    monkeypatch.setattr(cli, "_load_backend", lambda settings: f"local model {settings.model}")
    return calls


def test_the_command_passes_its_flags(launched: dict[str, Any]):
    result = CliRunner().invoke(
        cli.app,
        ["ui", "--host", "0.0.0.0", "--port", "7999", "--auth", "alice:s3:cret", "--max-new-tokens", "64"]
        + ["--max-pixels", "1000000", "--model", "some/checkpoint"],
    )
    assert result.exit_code == 0, result.output
    assert launched["backend"] == "local model some/checkpoint"
    assert launched["host"] == "0.0.0.0" and launched["port"] == 7999 and launched["share"] is False
    assert launched["auth"] == ("alice", "s3:cret") and launched["max_new_tokens"] == 64
    assert launched["image_policy"].max_pixels == 1_000_000 and launched["concurrency_limit"] == 1
    assert launched["image_policy"].max_bytes == ui.DEFAULT_MAX_BYTES and launched["temperature"] is None
    assert "warning" not in result.output


def test_the_command_defaults_to_loopback_and_warns_without_a_login(launched: dict[str, Any]):
    result = CliRunner().invoke(cli.app, ["ui"])
    assert result.exit_code == 0, result.output
    assert launched["host"] == "127.0.0.1" and launched["port"] == ui.DEFAULT_PORT and launched["auth"] is None
    assert "warning" not in result.output
    result = CliRunner().invoke(cli.app, ["ui", "--share"])
    assert launched["share"] is True and "no login" in result.output


def test_the_command_takes_the_options_given_before_it(launched: dict[str, Any]):
    result = CliRunner().invoke(cli.app, ["--temperature", "0.7", "--max-image-bytes", "1000", "ui"])
    assert result.exit_code == 0, result.output
    assert launched["temperature"] == 0.7 and launched["image_policy"].max_bytes == 1000


@pytest.mark.parametrize("option", [["--top-p", "0.5"], ["--seed", "1"], ["--json"], ["--allow-urls"]])
def test_the_command_refuses_options_that_do_not_apply_to_it(launched: dict[str, Any], option: list[str]):
    result = CliRunner().invoke(cli.app, [*option, "ui"])
    assert result.exit_code == 2 and "does not apply to the web chat" in " ".join(result.output.split())
    assert not launched


def test_the_command_with_a_remote_server(launched: dict[str, Any]):
    from belle_vl_tools.backends.remote import RemoteBelleVL

    result = CliRunner().invoke(cli.app, ["ui", "--remote", "http://127.0.0.1:9/v1", "--remote-api-key", "k"])
    assert result.exit_code == 0, result.output
    assert isinstance(launched["backend"], RemoteBelleVL)
    assert launched["backend"].base_url.startswith("http://127.0.0.1:9")
    assert launched["concurrency_limit"] == 8


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--auth", "alice"], "USER:PASSWORD"),
        (["--auth", ":pw"], "USER:PASSWORD"),
        (["--remote", "http://127.0.0.1:9/v1", "--device", "cuda"], "--device applies to a local model"),
        (["--remote-api-key", "k"], "needs --remote"),
    ],
)
def test_the_command_refuses_bad_flags(launched: dict[str, Any], arguments: list[str], message: str):
    result = CliRunner().invoke(cli.app, ["ui", *arguments])
    assert result.exit_code == 2
    assert message in " ".join(result.output.replace("│", " ").split())
    assert not launched


def test_a_backend_without_the_vision_tasks_is_refused_when_the_page_is_built():
    class ChatOnly:
        model_name = "chat-only"

        def chat(self, messages, **generation):
            return ChatResult("hi")

    with pytest.raises(TypeError, match="describe, ask, read_text and locate.*got ChatOnly"):
        ui.WebChat(ChatOnly(), ImagePolicy.trusted())
