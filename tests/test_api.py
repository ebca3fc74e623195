"""The public Python API: what ``import megavod`` offers, the frame types it reads, its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import megavod
from megavod.api import FrameResult, resolve_device

SMALL = {"input.min_size_test": 48, "input.max_size_test": 64}


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return megavod.load("synthetic_single", device="cpu", **SMALL)


@pytest.fixture(scope="module")
def clip():
    rng = np.random.default_rng(3)
    return [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(3)]


def _flat(results):
    return [(r.frame, r.boxes, r.scores, r.labels) for r in results]


def _same(a, b):
    assert [x[0] for x in a] == [y[0] for y in b]
    for x, y in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(x[1:], y[1:]))


def test_public_names():
    for name in ("load", "Detector", "FrameResult", "VideoPredictions", "evaluate", "train", "load_config",
                 "MegavodError", "register_method"):
        assert hasattr(megavod, name), name
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_overrides_reach_the_config(detector):
    assert detector.cfg.input.min_size_test == 48 and detector.cfg.name == "synthetic_single"
    same = megavod.load("synthetic_single", device="cpu", input__min_size_test=48)
    assert same.cfg.input.min_size_test == 48
    with pytest.raises(megavod.ConfigError, match="mega.T_g"):
        megavod.load("synthetic_mega", device="cpu", **{"mega.T_g": -1})


def test_numpy_torch_and_pil_frames_give_the_same_detections(detector, clip):
    want = _flat(detector.stream(clip))
    assert all(isinstance(r, FrameResult) for r in detector.stream(clip))
    _same(want, _flat(detector.stream([torch.from_numpy(f) for f in clip])))  # H, W, 3 uint8
    _same(want, _flat(detector.stream([torch.from_numpy(f).permute(2, 0, 1) / 255.0 for f in clip])))
    _same(want, _flat(detector.stream([Image.fromarray(f) for f in clip])))
    _same(want, _flat(detector.stream(iter(clip), mode="offline")))  # an iterator is read into a list
    result = next(iter(detector.stream(clip)))
    arrays = result.numpy()
    assert arrays["boxes"].shape == (len(result), 4) and len(result.class_names) == len(result)


def test_detect_returns_video_predictions(detector, clip, tmp_path):
    video = detector.detect(clip, name="clip")
    assert (video.video, video.width, video.height) == ("clip", 64, 48)
    assert [f.frame for f in video.frames] == [0, 1, 2]
    video.save_json(tmp_path / "p.json")
    video.save_csv(tmp_path / "p.csv")
    assert video.to_coco(tmp_path / "c.json") == sum(len(f.detections) for f in video.frames)
    (read,) = megavod.read_predictions(tmp_path / "p.json")
    assert torch.equal(read.frames[1].detections.boxes, video.frames[1].detections.boxes)


def test_bad_input_is_one_clear_error(detector, clip, tmp_path):
    with pytest.raises(megavod.MegavodError, match="one frame"):
        list(detector.stream(clip[0]))
    with pytest.raises(megavod.MegavodError, match=r"RGB image \[H, W, 3\]"):
        list(detector.stream([np.zeros((4, 4), np.uint8)]))
    with pytest.raises(megavod.MegavodError, match="uint8"):
        list(detector.stream([np.zeros((4, 4, 3), np.float32)]))
    with pytest.raises(megavod.MegavodError, match="mode must be"):
        list(detector.stream(clip, mode="later"))
    with pytest.raises(megavod.MegavodError, match="missing.mp4"):
        list(detector.stream(str(tmp_path / "missing.mp4")))
