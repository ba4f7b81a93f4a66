"""`belle-vl chat` and Ctrl-C in a real terminal: the command runs in a pseudo-terminal (pexpect), is typed at, and
interrupted with the terminal's interrupt character, as a person at a shell does.

The tiny random checkpoint answers noise until --max-new-tokens, so an answer is long enough to interrupt midway.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect", reason="the test extra installs pexpect")

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120  # seconds for the model to load or answer on a busy 2-core machine


def _spawn(*args: str) -> pexpect.spawn:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200", "TERM": "dumb"}
    child = pexpect.spawn(
        sys.executable, ["-m", "belle_vl_tools.cli", *args], cwd=str(ROOT), env=env, encoding="utf-8", timeout=TIMEOUT
    )
    child.setwinsize(50, 200)
    return child


def _rest(child: pexpect.spawn) -> str:
    child.expect(pexpect.EOF)
    child.close()
    return child.before


def test_chat_commands_confirm_and_ctrl_c_stops_only_the_answer(tiny_dir: Path, pictures: dict[str, Path]):
    child = _spawn("--model", str(tiny_dir), "chat", "--max-new-tokens", "4000", "--temperature", "1")
    child.expect_exact("/image PATH: attach a picture")  # the help, when the chat is a terminal
    child.expect_exact("> ")

    child.sendline(f"/image {pictures['red']}")
    child.expect(r"Attached \S*red\S* \(\d+x\d+\): it goes with your next message\.")
    child.expect_exact("> ")

    child.sendline("/imag foo")  # a mistyped command is refused with the list, and never reaches the model
    child.expect_exact("error: unknown command /imag. The commands are: /image PATH, /reset, /help, /exit.")
    child.expect_exact("> ")

    child.sendline("Tell me a very long story about this picture.")
    child.expect(r"\S{20}")  # the answer is streaming (noise from the random checkpoint)
    child.sendintr()  # Ctrl-C, as the terminal sends it
    child.expect_exact("(Answer stopped; that message is not kept in the conversation (1 attached picture kept).)")
    child.expect_exact("> ")

    child.sendline("/reset")  # the stopped turn was not kept: nothing to forget but the picture
    child.expect_exact("Conversation cleared (0 exchanges forgotten).")
    child.expect_exact("> ")

    child.sendline("Hi")  # no picture now: a text question, and the chat says so
    child.expect_exact("(No picture attached: asked as a text question. /image PATH attaches one.)")
    child.sendintr()
    child.expect_exact("(Answer stopped")
    child.expect_exact("> ")

    child.sendintr()  # Ctrl-C at the prompt quits, as every command does
    rest = _rest(child)
    assert rest.strip().splitlines()[-1].strip() == "interrupted"
    assert "Traceback" not in rest and "Exception ignored" not in rest
    assert child.exitstatus == 130


def test_ctrl_c_during_an_answer_is_one_line_and_exit_130(tiny_dir: Path, pictures: dict[str, Path]):
    child = _spawn("--model", str(tiny_dir), "describe", str(pictures["red"]), "--max-new-tokens", "4000")
    child.expect(r"\S{20}")
    child.sendintr()
    rest = _rest(child)
    assert rest.strip().splitlines()[-1].strip() == "interrupted" and rest.count("interrupted") == 1
    assert "Traceback" not in rest and "Exception ignored" not in rest
    assert child.exitstatus == 130


# A command whose Ctrl-C arrives while a finalizer runs: Python drops that KeyboardInterrupt ("Exception ignored
# in ...") and the command goes on. The CLI still ends it as interrupted.
DROPPED = textwrap.dedent(
    """
    import gc, os, signal, sys
    from belle_vl_tools import cli

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # the signal handler runs inside this finalizer

    @cli.app.command("work")
    def work():
        Finalized()
        gc.collect()
        print("the work went on")

    sys.argv = ["belle-vl", "work"]
    cli.main()
    """
)


def test_an_interrupt_python_drops_still_ends_the_command_with_130():
    out = subprocess.run([sys.executable, "-c", DROPPED], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 130, (out.stdout, out.stderr)
    assert out.stderr.strip().splitlines() == ["interrupted"]  # no "Exception ignored in ..." either


def test_a_second_ctrl_c_while_the_first_is_handled_ends_at_once(tiny_dir: Path, pictures: dict[str, Path]):
    """Two quick interrupts (the second while the answer's thread is being stopped): one line, exit 130."""
    child = _spawn("--model", str(tiny_dir), "describe", str(pictures["red"]), "--max-new-tokens", "4000")
    child.expect(r"\S{20}")
    os.kill(child.pid, signal.SIGINT)
    os.kill(child.pid, signal.SIGINT)
    rest = _rest(child)
    assert rest.count("interrupted") == 1 and "Traceback" not in rest and "Exception ignored" not in rest
    assert child.exitstatus == 130
