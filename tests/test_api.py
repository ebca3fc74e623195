"""The public Python API: what ``import megavod`` offers, the frame types it reads, its errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import megavod
from megavod.api import FrameResult, RandomWeightsWarning, resolve_device
from megavod.apps.cli import main as cli_main

SMALL = {"input.min_size_test": 48, "input.max_size_test": 64}


SHIPPED = Path(megavod.__file__).parent / "weights" / "synthetic_mega.safetensors"
NO_WEIGHTS = "megavod detect: warning: no --weights given: the model is randomly initialised"


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    with pytest.warns(RandomWeightsWarning, match="no weights given: the model is randomly initialised"):
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
    with pytest.warns(RandomWeightsWarning):
        same = megavod.load("synthetic_single", device="cpu", input__min_size_test=48)
    assert same.cfg.input.min_size_test == 48
    with pytest.raises(megavod.ConfigError, match="mega.T_g"):
        megavod.load("synthetic_mega", device="cpu", **{"mega.T_g": -1})


def test_load_warns_only_without_weights(tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)  # weights given: no warning
        megavod.load(weights=SHIPPED, device="cpu")
    # The CLI goes through the same load() and says it once, in its own words, as a line on stderr
    # (before the missing input fails): not also as a Python warning.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = cli_main(["detect", str(tmp_path / "missing.mp4"), "--config", "synthetic_single",
                         "--device", "cpu", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.splitlines()
    assert code == 1 and [ln for ln in err if "warning" in ln] == [NO_WEIGHTS]
    assert not [w for w in caught if issubclass(w.category, RandomWeightsWarning)]


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


def test_one_frame_is_a_one_frame_video(detector, clip):
    frame = clip[1]
    want = _flat(detector.stream([frame], mode="offline"))
    assert len(want) == 1 and want[0][0] == 0 and len(want[0][1]) > 0
    as_tensor = torch.from_numpy(frame)
    for one in (frame, as_tensor, as_tensor.permute(2, 0, 1), as_tensor.permute(2, 0, 1) / 255.0, Image.fromarray(frame)):
        result = detector.detect_image(one)
        assert isinstance(result, FrameResult)
        _same(want, _flat([result]))
        _same(want, _flat(detector.stream(one)))
        _same(want, _flat(detector.stream(one, mode="online")))
    # Single frame detects each frame of a video on its own: frame 1 of the clip is the image alone.
    (_, *in_video), (_, *alone) = _flat(detector.stream(clip))[1], want[0]
    assert all(torch.equal(u, v) for u, v in zip(in_video, alone))


def test_one_frame_through_mega():
    # A relation method: the one frame is its own local window and global pool (offline and online).
    mega = megavod.load(weights=SHIPPED, device="cpu")
    frame = np.random.default_rng(5).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    want = _flat(mega.stream([frame], mode="offline"))
    assert len(want) == 1
    _same(want, _flat([mega.detect_image(Image.fromarray(frame))]))
    _same(want, _flat(mega.stream(frame, mode="offline")))
    (online,) = mega.stream(frame, mode="online")
    assert online.frame == 0 and online.boxes.shape[1] == 4


def test_bad_input_is_one_clear_error(detector, clip, tmp_path):
    with pytest.raises(megavod.MegavodError, match="detect_image takes one frame .*got list; for a video use stream"):
        detector.detect_image(clip)
    with pytest.raises(megavod.MegavodError, match=r"detect_image takes one frame .*got ndarray of shape \(3, 48, 64, 3\)"):
        detector.detect_image(np.stack(clip))
    with pytest.raises(megavod.MegavodError, match="got str"):
        detector.detect_image("photo.jpg")
    with pytest.raises(megavod.MegavodError, match="cannot read frames from a int"):
        list(detector.stream(42))
    with pytest.raises(megavod.MegavodError, match=r"RGB image \[H, W, 3\]"):
        detector.detect_image(np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(megavod.MegavodError, match=r"RGB image \[H, W, 3\]"):
        list(detector.stream([np.zeros((4, 4), np.uint8)]))
    with pytest.raises(megavod.MegavodError, match="uint8"):
        list(detector.stream([np.zeros((4, 4, 3), np.float32)]))
    with pytest.raises(megavod.MegavodError, match="mode must be"):
        list(detector.stream(clip, mode="later"))
    with pytest.raises(megavod.MegavodError, match="missing.mp4"):
        list(detector.stream(str(tmp_path / "missing.mp4")))
