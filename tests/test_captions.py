"""The caption cache: keyed by pixels, model and prompt; resumes after a crash; never stores or computes twice."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from belle_vl_tools.backend import ChatResult
from belle_vl_tools.captions import (
    CaptionCache,
    CaptionCacheError,
    CaptionRecord,
    caption_images,
    checkpoint_key,
    clean_partial_files,
    find_images,
    partial_path,
)
from belle_vl_tools.errors import BelleVLError, ImageError
from belle_vl_tools.images import image_digest, load_image
from belle_vl_tools.prompts import describe_prompt

COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]


def _folder(tmp_path: Path, colors=COLORS) -> list[Path]:
    folder = tmp_path / "pictures"
    folder.mkdir(exist_ok=True)
    paths = []
    for i, color in enumerate(colors):
        path = folder / f"{i:02d}_{color}.png"
        Image.new("RGB", (40 + i, 30), color).save(path)
        paths.append(path)
    return paths


def _digest(path: Path) -> str:
    return image_digest(load_image(path))


class Recorder:
    """A backend with chat only: answers "caption <digest prefix>" and records what it was asked."""

    model_name = "recorder"

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.generation: list[dict] = []

    def chat(self, messages, **generation):
        image = messages[0]["content"][0]["image"]
        digest = image_digest(image)
        self.seen.append(digest)
        self.generation.append(generation)
        return ChatResult(f"caption {digest[:8]}")


class BatchRecorder(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def generate_batch(self, conversations, **generation):
        self.batches.append(len(conversations))
        return [self.chat(c, **generation) for c in conversations]


def _never():
    raise AssertionError("the backend must not be created when everything is cached")


def test_second_run_is_answered_from_the_cache_without_creating_the_backend(tmp_path):
    paths = _folder(tmp_path)
    db = tmp_path / "cache.sqlite"
    backend = Recorder()
    first = list(caption_images(paths, lambda: backend, cache=db, model_name="m", progress=False))
    assert [r.path for r in first] == [str(p) for p in paths]
    assert not any(r.cached for r in first)
    assert sorted(backend.seen) == sorted(_digest(p) for p in paths)
    assert all(g["temperature"] == 0 for g in backend.generation)  # greedy by default
    assert first[0].width == 40 and first[0].height == 30 and first[0].caption == f"caption {first[0].digest[:8]}"

    again = list(caption_images(paths, _never, cache=db, model_name="m", progress=False))
    assert [(r.path, r.caption, r.digest, r.width, r.height) for r in again] == [
        (r.path, r.caption, r.digest, r.width, r.height) for r in first
    ]
    assert all(r.cached for r in again)
    assert isinstance(again[0], CaptionRecord) and again[0].as_dict()["cached"] is True


def test_key_is_pixels_model_and_prompt(tmp_path):
    paths = _folder(tmp_path, ["red", "blue"])
    copy = tmp_path / "elsewhere" / "same_red.png"
    copy.parent.mkdir()
    Image.open(paths[0]).save(copy)  # same pixels, other file
    db = tmp_path / "cache.sqlite"
    list(caption_images(paths, Recorder(), cache=db, model_name="m", progress=False))
    [hit] = caption_images([copy], _never, cache=db, model_name="m", progress=False)
    assert hit.cached and hit.path == str(copy)

    other_model = Recorder()
    list(caption_images(paths, other_model, cache=db, model_name="m2", progress=False))
    other_prompt = Recorder()
    list(caption_images(paths, other_prompt, cache=db, model_name="m", detail="detailed", progress=False))
    assert len(other_model.seen) == len(other_prompt.seen) == 2
    with CaptionCache(db) as cache:
        assert len(cache) == 6
        assert cache.get(_digest(paths[0]), "m", describe_prompt("detailed", "en")) is not None
        assert cache.get(_digest(paths[0]), "m", "Another prompt") is None


def test_checkpoint_key_follows_the_folder_files_and_keeps_hub_ids(tmp_path):
    folder = tmp_path / "belle-vl-small"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 64}')
    (folder / "model.safetensors").write_bytes(b"weights")
    key = checkpoint_key(folder)
    assert key.startswith("belle-vl-small@") and len(key.split("@")[1]) == 16
    assert checkpoint_key(str(folder)) == key
    (folder / "notes").mkdir()  # sub-folders do not count
    assert checkpoint_key(folder) == key

    stat = (folder / "config.json").stat()
    (folder / "config.json").write_text('{"hidden_size": 32}')  # same size and time: the contents still count
    os.utime(folder / "config.json", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed = checkpoint_key(folder)
    assert changed != key
    (folder / "model.safetensors").write_bytes(b"weights, retrained")
    assert checkpoint_key(folder) not in (key, changed)
    assert checkpoint_key("BELLE-2/BELLE-VL") == "BELLE-2/BELLE-VL"


def test_batches_use_generate_batch_and_keep_input_order_and_duplicates_are_captioned_once(tmp_path):
    paths = _folder(tmp_path)
    db = tmp_path / "cache.sqlite"
    list(caption_images(paths[:2], Recorder(), cache=db, model_name="m", progress=False))  # two already cached
    backend = BatchRecorder()
    order = [paths[3], paths[0], paths[4], paths[3], paths[1], paths[5], paths[2]]
    records = list(caption_images(order, backend, cache=db, model_name="m", batch_size=2, progress=False))
    assert [r.path for r in records] == [str(p) for p in order]
    assert [r.cached for r in records] == [False, True, False, False, True, False, False]
    assert records[0].caption == records[3].caption
    assert sorted(backend.seen) == sorted(_digest(p) for p in (paths[2], paths[3], paths[4], paths[5]))
    assert backend.batches and max(backend.batches) <= 2
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT digest, COUNT(*) FROM captions GROUP BY digest, model, prompt").fetchall()
    assert len(rows) == 6 and all(n == 1 for _, n in rows)


def test_unreadable_pictures_raise_or_are_skipped(tmp_path):
    paths = _folder(tmp_path, ["red", "blue"])
    bad = paths[0].parent / "broken.png"
    bad.write_bytes(b"not a picture")
    with pytest.raises(ImageError):
        list(caption_images([paths[0], bad], Recorder(), cache=None, progress=False))
    records = list(caption_images([paths[0], bad, paths[1]], Recorder(), cache=None, progress=False, on_error="skip"))
    assert [r.path for r in records] == [str(paths[0]), str(paths[1])]


def test_factory_needs_a_model_name_and_progress_callback_sees_every_record(tmp_path):
    paths = _folder(tmp_path, ["red", "blue"])
    with pytest.raises(ValueError, match="model_name"):
        caption_images(paths, lambda: Recorder(), cache=None)
    seen = []
    list(caption_images(paths, Recorder(), cache=None, progress=seen.append))
    assert [r.path for r in seen] == [str(p) for p in paths]


def test_find_images_sorted_recursive_without_hidden(tmp_path):
    paths = _folder(tmp_path, ["red", "blue"])
    sub = paths[0].parent / "sub"
    sub.mkdir()
    Image.new("RGB", (8, 8)).save(sub / "a.JPG")
    (paths[0].parent / ".hidden.png").write_bytes(b"x")
    (paths[0].parent / "notes.txt").write_text("x")
    found = find_images(paths[0].parent)
    assert [p.name for p in found] == [paths[0].name, paths[1].name, "a.JPG"]
    assert [p.name for p in find_images(paths[0].parent, recursive=False)] == [paths[0].name, paths[1].name]
    with pytest.raises(ImageError):
        find_images(tmp_path / "missing")


def test_cache_is_thread_safe_and_writes_each_key_once(tmp_path):
    cache = CaptionCache(tmp_path / "c.sqlite")
    rows = [(f"d{i}", "m", "p", f"caption {i}", 1, 1) for i in range(50)]
    added = []

    def work(k):
        added.append(cache.put_many(rows[k::2] + rows[: 10 + k]))

    threads = [threading.Thread(target=work, args=(k % 2,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(added) == 50 and len(cache) == 50
    assert cache.put("d1", "m", "p", "a different caption", 1, 1) is False
    assert cache.get("d1", "m", "p").caption == "caption 1"
    clone = pickle.loads(pickle.dumps(cache))
    assert len(clone) == 50 and clone.get("d7", "m", "p").caption == "caption 7"
    cache.close()
    clone.close()


SLOW_RUN = textwrap.dedent(
    """
    import sys, time
    from belle_vl_tools.backend import ChatResult
    from belle_vl_tools.captions import caption_images
    from belle_vl_tools.images import image_digest

    db, log, *paths = sys.argv[1:]

    class Slow:
        model_name = "slow"

        def chat(self, messages, **generation):
            digest = image_digest(messages[0]["content"][0]["image"])
            with open(log, "a") as f:
                f.write(digest + "\\n")
            time.sleep(0.4)
            return ChatResult("caption " + digest[:8])

    for record in caption_images(paths, Slow(), cache=db, batch_size=1, progress=False):
        print(record.digest, flush=True)
    print("finished", flush=True)
    """
)


def test_a_run_killed_midway_resumes_without_losing_or_redoing_anything(tmp_path):
    paths = _folder(tmp_path)
    db, log = tmp_path / "cache.sqlite", tmp_path / "computed.log"
    script = tmp_path / "slow_run.py"
    script.write_text(SLOW_RUN)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(db), str(log), *map(str, paths)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    done = []
    deadline = time.monotonic() + 120
    while len(done) < 3 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        done.append(line.strip())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert len(done) == 3, "the slow run did not get going"
    assert proc.returncode == -signal.SIGKILL

    with CaptionCache(db) as cache:
        saved = {row.digest: row.caption for row in cache}
    assert set(done) <= set(saved) and len(saved) < len(paths)  # finished batches survive the kill

    backend = Recorder()
    records = list(caption_images(paths, backend, cache=db, model_name="slow", progress=False))
    everything = {_digest(p) for p in paths}
    assert set(backend.seen) == everything - set(saved)  # only the rest is computed
    assert len(backend.seen) == len(set(backend.seen))
    assert [r.digest for r in records if r.cached] == [d for d in (r.digest for r in records) if d in saved]
    assert all(r.caption == saved[r.digest] for r in records if r.cached)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM captions").fetchone()[0] == len(paths)
        assert conn.execute("SELECT COUNT(DISTINCT digest) FROM captions").fetchone()[0] == len(paths)


def test_with_the_tiny_runtime(runtime, pictures, tmp_path):
    paths = [pictures["red"], pictures["blue"], pictures["green"]]
    db = tmp_path / "cache.sqlite"
    first = list(caption_images(paths, runtime, cache=db, batch_size=2, max_new_tokens=4, progress=False))
    assert len(first) == 3 and not any(r.cached for r in first)
    assert all(isinstance(r.caption, str) for r in first)
    again = list(caption_images(paths, _never, cache=db, model_name=runtime.model_name, progress=False))
    assert [r.caption for r in again] == [r.caption for r in first] and all(r.cached for r in again)


def test_two_runs_at_once_split_the_pictures_and_caption_none_twice(tmp_path):
    paths = _folder(tmp_path)
    db, log = tmp_path / "cache.sqlite", tmp_path / "computed.log"
    script = tmp_path / "slow_run.py"
    script.write_text(SLOW_RUN)
    command = [sys.executable, str(script), str(db), str(log), *map(str, paths)]
    root = Path(__file__).resolve().parents[1]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=root) for _ in range(2)]
    outputs = [run.communicate(timeout=120)[0].split() for run in runs]
    assert all(run.returncode == 0 for run in runs)
    everything = {_digest(p) for p in paths}
    for output in outputs:  # each run yields every picture, in order, and finishes
        assert output[-1] == "finished" and output[:-1] == [_digest(p) for p in paths]
    computed = log.read_text().split()
    assert sorted(computed) == sorted(everything)  # every picture captioned exactly once, by one run or the other
    with CaptionCache(db) as cache:
        assert len(cache) == len(paths) and cache.leases() == []  # finished runs hold no leases


def test_a_lease_of_a_stopped_run_is_taken_over(tmp_path):
    paths = _folder(tmp_path, COLORS[:2])
    db = tmp_path / "cache.sqlite"
    first, second = (_digest(p) for p in paths)
    prompt = describe_prompt("brief", "en")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with CaptionCache(db) as cache:
        # A killed run on this machine (its process is gone), and a run elsewhere whose lease has expired.
        dead_owner = f"{socket.gethostname()}:{int(gone.stdout)}:killed"
        assert cache.claim(first, "m", prompt, dead_owner, lease_seconds=600) is True
        assert cache.claim(second, "m", prompt, "elsewhere:1:stopped", lease_seconds=0.2) is True
        # A live lease is respected.
        assert cache.claim(second, "m", prompt, "another-run", lease_seconds=600) is False
    time.sleep(0.3)
    backend = Recorder()
    records = list(caption_images(paths, backend, cache=db, model_name="m", progress=False))
    assert sorted(backend.seen) == sorted([first, second]) and all(not r.cached for r in records)
    with CaptionCache(db) as cache:
        assert cache.leases() == []


def test_a_run_waits_for_the_caption_another_live_run_is_making(tmp_path):
    paths = _folder(tmp_path, COLORS[:2])
    db = tmp_path / "cache.sqlite"
    first, second = (_digest(p) for p in paths)
    prompt = describe_prompt("brief", "en")
    with CaptionCache(db) as cache:
        assert cache.claim(first, "m", prompt, "elsewhere:1:busy", lease_seconds=600) is True

    def finish_elsewhere():
        time.sleep(0.5)
        with CaptionCache(db) as other:
            other.put(first, "m", prompt, "made by the other run", 40, 30)

    helper = threading.Thread(target=finish_elsewhere)
    helper.start()
    backend = Recorder()
    records = list(caption_images(paths, backend, cache=db, model_name="m", progress=False, poll_seconds=0.05))
    helper.join()
    assert backend.seen == [second]  # the leased picture was not captioned again
    assert records[0].caption == "made by the other run" and records[0].cached
    assert [r.digest for r in records] == [first, second]


def test_a_damaged_cache_file_is_a_typed_error_saying_what_to_do(tmp_path):
    bad = tmp_path / "cache.sqlite"
    bad.write_bytes(b"definitely not SQLite " * 100)
    with pytest.raises(CaptionCacheError, match=r"damaged .* delete it") as info:
        CaptionCache(bad)
    assert "\n" not in str(info.value) and isinstance(info.value, BelleVLError)
    paths = _folder(tmp_path, COLORS[:1])
    with pytest.raises(CaptionCacheError):
        list(caption_images(paths, _never, cache=bad, model_name="m", progress=False))


def test_a_cache_that_cannot_be_created_is_a_typed_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(CaptionCacheError, match="cannot be opened or created"):
        CaptionCache(blocker / "cache.sqlite")
    with pytest.raises(CaptionCacheError, match="folder, not a file|cannot be opened"):
        CaptionCache(tmp_path)  # a folder is not a cache file


def test_partial_files_of_stopped_runs_are_cleaned(tmp_path):
    out = tmp_path / "captions.jsonl"
    mine = partial_path(out)
    assert mine.parent == tmp_path and mine.name.startswith(f".captions.jsonl.{os.getpid()}.")
    mine.write_text("in progress")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".captions.jsonl.{int(gone.stdout)}.deadbeef.partial"
    dead.write_text("half")
    old = tmp_path / f".captions.jsonl.{os.getpid()}.0ld0ld00.partial"
    old.write_text("old")
    os.utime(old, (time.time() - 8 * 24 * 3600,) * 2)
    unrelated = tmp_path / "captions.jsonl.partial"
    unrelated.write_text("not ours")
    removed = clean_partial_files(out)
    assert sorted(removed) == sorted([dead, old])
    assert mine.exists() and unrelated.exists() and not dead.exists() and not old.exists()
    assert clean_partial_files(tmp_path / "nowhere" / "x.jsonl") == []
