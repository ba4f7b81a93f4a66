"""The one total deadline shared by the image fetcher and the remote client."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from belle_vl_tools import deadline as deadline_module
from belle_vl_tools.deadline import Deadline, DeadlineExceeded

PACKAGE = Path(deadline_module.__file__).parent


@pytest.fixture()
def clock(monkeypatch) -> list[float]:
    """A monotonic clock the test moves by hand."""
    now = [1000.0]
    monkeypatch.setattr(deadline_module, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    return now


def test_each_step_gets_its_own_timeout_cut_to_the_time_left(clock):
    deadline = Deadline(10.0, 4.0)
    assert deadline.timeout() == 4.0 and deadline.timeout(2.5) == 2.5
    clock[0] += 7.0
    assert deadline.timeout() == pytest.approx(3.0) and deadline.timeout(2.5) == 2.5
    assert deadline.remaining() == pytest.approx(3.0) and not deadline.expired()
    assert deadline.expired(slack=3.5) and not deadline.expired(slack=2.5)
    clock[0] += 3.0
    assert deadline.expired() and deadline.remaining() == 0.0
    with pytest.raises(DeadlineExceeded, match="deadline has passed"):
        deadline.timeout()


def test_without_a_step_timeout_a_step_may_use_all_the_time_left(clock):
    deadline = Deadline(5.0)
    assert deadline.timeout() == 5.0
    clock[0] += 4.0
    assert deadline.timeout() == pytest.approx(1.0) and deadline.timeout(30.0) == pytest.approx(1.0)
    clock[0] += 2.0
    assert deadline.remaining() == 0.0
    with pytest.raises(DeadlineExceeded):
        deadline.timeout(30.0)


def test_the_error_class_is_the_callers(clock):
    class NotRetried(Exception):
        pass

    deadline = Deadline(1.0, error=NotRetried)
    clock[0] += 1.0
    with pytest.raises(NotRetried) as caught:
        deadline.timeout()
    assert not isinstance(caught.value, TimeoutError)
    assert issubclass(DeadlineExceeded, TimeoutError)  # the default is a timeout, as socket code expects


def test_the_fetcher_and_the_remote_client_keep_no_clock_of_their_own():
    """Both bound their sockets by this module's deadline; neither reads the monotonic clock itself."""
    for relative in ("images/fetch.py", "backends/remote.py"):
        source = (PACKAGE / relative).read_text(encoding="utf-8")
        assert "from ..deadline import Deadline" in source, relative
        assert "time.monotonic" not in source and "import time\n" not in source, relative
