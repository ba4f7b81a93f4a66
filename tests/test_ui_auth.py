"""The web chat's login (`belle-vl ui --auth`), over HTTP on loopback: every route that runs, changes or describes
the app answers 401 without the login, and the login page, the page's files and a logged-in client still work."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gradio_client import Client, handle_file

from belle_vl_tools import ui
from belle_vl_tools.backend import ChatResult, StreamChunk, VisionTasks
from belle_vl_tools.images import ImagePolicy

RED = Path(__file__).resolve().parent.parent / "examples" / "pictures" / "red_circle.png"
USER, PASSWORD = "alice", "s3:cret"


class ScriptedBackend(VisionTasks):
    """Answers every question with the same words (the login, not the model, is under test here)."""

    model_name = "scripted"

    def chat(self, messages: Any, **generation: Any) -> ChatResult:
        return ChatResult("The circle is red.")

    def stream(self, messages: Any, **generation: Any) -> Iterator[StreamChunk]:
        yield StreamChunk("The circle is red.", finish_reason="stop")


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = ui.launch(
        ScriptedBackend(),
        host="127.0.0.1",
        port=port,
        auth=(USER, PASSWORD),
        image_policy=ImagePolicy.trusted(),
        block=False,
        quiet=True,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        app.close()


@pytest.fixture
def anonymous(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client


@pytest.fixture
def logged_in(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.post("/login", data={"username": USER, "password": PASSWORD}).status_code == 200
        yield client


# Routes Gradio itself leaves open under auth= (they mutate the queue's state or describe the app), and ones it
# already guards; all must refuse a request without the login.
GUARDED = [
    ("POST", "/gradio_api/reset", {"event_id": "e"}),
    ("POST", "/gradio_api/cancel", {"session_hash": "s", "fn_index": 0, "event_id": "e"}),
    ("POST", "/gradio_api/stream/e", {"data": [], "session_hash": "s"}),
    ("POST", "/gradio_api/stream/e/close", None),
    ("GET", "/gradio_api/heartbeat/s", None),
    ("GET", "/gradio_api/runs", None),
    ("GET", "/gradio_api/run-history/buckets", None),
    ("GET", "/gradio_api/openapi.json", None),
    ("GET", "/gradio_api/info", None),
    ("GET", "/config", None),
    ("POST", "/gradio_api/queue/join", {"data": [], "fn_index": 0, "session_hash": "s"}),
    ("GET", "/gradio_api/queue/data?session_hash=s", None),
    ("POST", "/gradio_api/upload", None),
    ("GET", "/monitoring/anything", None),
]


@pytest.mark.parametrize(("method", "path", "body"), GUARDED, ids=[f"{m} {p}" for m, p, _ in GUARDED])
def test_routes_that_run_change_or_describe_the_app_need_the_login(anonymous, method, path, body):
    answer = anonymous.request(method, path, json=body)
    assert answer.status_code == 401, (path, answer.status_code, answer.text[:200])
    assert answer.json()["detail"]["error"] == "Not authenticated"


def test_fastapis_schema_of_all_routes_is_not_served(anonymous, logged_in):
    assert anonymous.get("/openapi.json").status_code == 401
    assert logged_in.get("/openapi.json").status_code == 404  # switched off, not merely hidden
    assert logged_in.get("/docs").status_code == 404


def test_the_login_page_and_its_files_stay_public(anonymous):
    page = anonymous.get("/")
    assert page.status_code == 200 and '"auth_required":true' in page.text.replace(" ", "")
    for asset in {part.split('"')[0] for part in page.text.split('src="./')[1:]} or {"favicon.ico"}:
        assert anonymous.get(f"/{asset}").status_code == 200, asset
    assert anonymous.get("/theme.css").status_code == 200
    assert anonymous.get("/gradio_api/login_check").status_code == 401  # Gradio's own answer: "not logged in"
    assert anonymous.post("/login", data={"username": USER, "password": "wrong"}).status_code == 400


def test_after_the_login_the_same_routes_answer(logged_in):
    assert logged_in.post("/gradio_api/reset", json={"event_id": "e"}).json() == {"success": True}
    assert logged_in.get("/gradio_api/info").status_code == 200
    assert logged_in.get("/config").status_code == 200
    assert logged_in.get("/gradio_api/login_check").status_code == 200


def test_a_script_logs_in_with_gradio_client(url: str):
    client = Client(url, auth=(USER, PASSWORD), verbose=False)
    assert client.predict(handle_file(str(RED)), "What color is the circle?", api_name="/ask") == "The circle is red."
    with pytest.raises(Exception, match="(?i)auth|login|401"):
        Client(url, verbose=False)
