"""The caption cache: keyed by pixels, model and prompt; resumes after a crash; never stores or computes twice."""

from __future__ import annotations

import os
import pickle
import signal
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
from belle_vl_tools.captions import CaptionCache, CaptionRecord, caption_images, checkpoint_key, find_images
from belle_vl_tools.errors import ImageError
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
