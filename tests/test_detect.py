"""``megavod detect`` over many inputs: bad inputs reported, resumable, atomic outputs, CSV == JSON."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megavod.apps.cli import split_overrides
from megavod.config import load_config
from megavod.methods import build_detector
from megavod.methods.convert import write_converted
from megavod.data.video import write_video

CLI = [sys.executable, "-m", "megavod", "detect"]
TINY = ["--config", "synthetic_single", "input.min_size_test=64", "input.max_size_test=96",
        "model.rpn.post_nms_top_n_test=30"]


def _clip(path: Path, frames: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    write_video(path, (rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(frames)), fps=10)


def _run(args, **kw):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, **kw)


def test_split_overrides_keeps_urls_as_inputs():
    inputs, overrides = split_overrides(["a.mp4", "mega.T_g=20", "rtsp://cam/x?y=1", "T_l=3"])
    assert inputs == ["a.mp4", "rtsp://cam/x?y=1"]
    assert overrides == ["mega.T_g=20", "T_l=3"]


def test_folder_with_a_corrupt_video_then_resume(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    _clip(videos / "a.mp4", 4, 0)
    _clip(videos / "b.mp4", 5, 1)
    (videos / "c.mp4").write_bytes(b"this is not a video" * 50)
    out = tmp_path / "out"
    proc = _run([videos, "--out", out, *TINY])
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "c.mp4" in errors[0]
    assert "1 of 3 inputs failed" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [f"{n}.{e}" for n in "ab" for e in ("csv", "json", "mp4")]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    again = _run([videos, "--out", out, *TINY])
    assert again.returncode == 1
    assert again.stderr.count("already done, skipped") == 2
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_csv_and_json_agree(tmp_path):
    _clip(tmp_path / "clip.mp4", 3, 2)
    out = tmp_path / "out"
    assert _run([tmp_path / "clip.mp4", "--out", out, *TINY]).returncode == 0
    video = json.loads((out / "clip.json").read_text())["videos"][0]
    from_json = [(f["frame"], *b, s, l) for f in video["frames"]
                 for b, s, l in zip(f["boxes"], f["scores"], f["labels"])]
    with open(out / "clip.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(from_json) > 0
    for row, (frame, x1, y1, x2, y2, score, label) in zip(rows, from_json):
        assert int(row["frame"]) == frame and int(row["label"]) == label
        assert [float(row[k]) for k in ("x1", "y1", "x2", "y2")] == pytest.approx([x1, y1, x2, y2], abs=0.01)
        assert float(row["score"]) == pytest.approx(score, abs=1e-6)
    assert (video["width"], video["height"]) == (64, 48)
    assert [f["frame"] for f in video["frames"]] == [0, 1, 2]


def test_killed_run_leaves_no_partial_file_and_resumes(tmp_path):
    _clip(tmp_path / "long.mp4", 120, 3)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(CLI + [str(tmp_path / "long.mp4"), "--out", str(out), "--mode", "online", *TINY],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not any(p.name.startswith(".") for p in out.iterdir()):  # the MP4 is being written
        assert proc.poll() is None and time.time() < deadline, "detect ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not any(p.name.startswith("long.") for p in out.iterdir())  # nothing under a final name
    done = _run([tmp_path / "long.mp4", "--out", out, *TINY])
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["long.csv", "long.json", "long.mp4"]
    assert len(json.loads((out / "long.json").read_text())["videos"][0]["frames"]) == 120


def test_bad_inputs_are_one_line(tmp_path):
    proc = _run([tmp_path / "missing.mp4", "--out", tmp_path / "o", *TINY])
    assert proc.returncode == 1
    assert "missing.mp4" in proc.stderr and "Traceback" not in proc.stderr
    proc = _run([str(tmp_path / "*.mkv"), "--out", tmp_path / "o", *TINY])
    assert proc.returncode == 1 and "no file matches" in proc.stderr
    proc = _run([tmp_path / "x.mp4", "--out", tmp_path / "o", "--config", "synthetic_single", "mega.T_m=-1"])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "mega.T_m" in proc.stderr


def test_ranks_share_the_inputs_like_torchrun(tmp_path):
    """Under torchrun (RANK / WORLD_SIZE in the environment) each rank detects every world_size-th
    input; together they cover all of them once."""
    videos = tmp_path / "videos"
    videos.mkdir()
    for i, name in enumerate("abc"):
        _clip(videos / f"{name}.mp4", 3, i)
    written = {}
    for rank in (0, 1):
        out = tmp_path / f"out{rank}"
        proc = _run([videos, "--out", out, *TINY], env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2"})
        assert proc.returncode == 0, proc.stderr
        written[rank] = sorted(p.stem for p in out.glob("*.json"))
    assert written == {0: ["a", "c"], 1: ["b"]}


def _detections(path: Path) -> list[tuple[list, list, list]]:
    (video,) = json.loads(path.read_text())["videos"]
    return [(f["boxes"], f["scores"], f["labels"]) for f in video["frames"]]


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_batch_streams_write_what_one_at_a_time_writes(tmp_path, mode):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name, frames, seed in (("a", 5, 0), ("b", 3, 1), ("c", 4, 2)):
        _clip(videos / f"{name}.mp4", frames, seed)
    one, many = tmp_path / "one", tmp_path / "many"
    # One set of random weights for both runs (a run without --weights draws its own).
    cfg = load_config("synthetic_single", [*TINY[2:], "method=fgfa", "fgfa.min_offset=-1", "fgfa.max_offset=1"])
    torch.manual_seed(0)
    weights = tmp_path / "fgfa.safetensors"
    write_converted(weights, build_detector(cfg).state_dict(), cfg)
    args = ["--weights", weights, "--mode", mode]
    assert _run([videos, "--out", one, *args]).returncode == 0
    proc = _run([videos, "--out", many, "--batch-streams", "3", *args])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in many.iterdir()) == sorted(p.name for p in one.iterdir())
    for name in "abc":
        a, b = _detections(one / f"{name}.json"), _detections(many / f"{name}.json")
        assert len(a) == len(b) and any(boxes for boxes, _, _ in a)
        for (boxes_a, scores_a, labels_a), (boxes_b, scores_b, labels_b) in zip(a, b):
            assert labels_a == labels_b  # batched convolutions round differently: boxes/scores to tolerance
            assert np.allclose(boxes_a, boxes_b, atol=1e-2) and np.allclose(scores_a, scores_b, atol=1e-4)


def test_batch_streams_a_bad_input_fails_alone(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    _clip(videos / "a.mp4", 4, 0)
    _clip(videos / "c.mp4", 3, 1)
    (videos / "b.mp4").write_bytes(b"this is not a video" * 50)
    frames = tmp_path / "frames"  # a frame folder whose third frame is corrupt: fails mid-stream
    frames.mkdir()
    rng = np.random.default_rng(3)
    for t in range(4):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(frames / f"{t:06d}.JPEG")
    (frames / "000002.JPEG").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "out"
    proc = _run([videos, frames, "--out", out, "--batch-streams", "4", *TINY])
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 2 and any("b.mp4" in e for e in errors) and any("000002.JPEG" in e for e in errors)
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [f"{n}.{e}" for n in "ac" for e in ("csv", "json", "mp4")]


def test_batch_streams_must_be_positive(tmp_path):
    proc = _run([tmp_path, "--batch-streams", "0", *TINY])
    assert proc.returncode == 2 and "--batch-streams" in proc.stderr and "Traceback" not in proc.stderr
