"""Config overrides on ONNX Runtime (README "Export and deploy", ``megavod.export.runtime.export_config``):
on an export folder, an override of a value the graphs take as an input (the proposal count, the box
postprocess's score and NMS thresholds, detections per image) or one the graphs do not use (the stream
schedule) gives PyTorch's detections with the same override; one of a value the graphs hold as a constant
is refused in one line naming the key, through the API and the CLI; a weight file, exported with its
overrides, honours them all. One export of the shipped weights serves every test (it is the slow part)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime", reason="the ONNX tests need the onnx extra: pip install -e '.[onnx]'")
pytest.importorskip("onnx", reason="the ONNX tests need the onnx extra: pip install -e '.[onnx]'")

import megavod  # noqa: E402
from megavod.apps.cli import main as cli_main  # noqa: E402
from megavod.data.predictions import read_predictions  # noqa: E402
from megavod.data.synthetic_render import make_scene, render_frame  # noqa: E402
from megavod.errors import MegavodError  # noqa: E402
from megavod.export.graphs import SETTINGS  # noqa: E402

WEIGHTS = Path(megavod.__file__).parent / "weights" / "synthetic_mega.safetensors"
BOX_TOL, SCORE_TOL = 1e-2, 1e-4
# Small images and stream budgets keep a run to seconds (themselves honoured overrides). The RPN's NMS
# threshold is a constant of the graphs (shipped: 0.7): the weight file on ONNX Runtime is exported with
# 0.6, so its export folder, which the folder tests use, holds 0.6.
BASE = ["input.min_size_test=96", "input.max_size_test=160", "mega.T_l=3", "mega.T_g=2", "mega.T_m=2",
        "model.rpn.nms_thresh=0.6"]
FRAMES = 4


def as_kwargs(texts: list[str]) -> dict[str, str]:
    return dict(t.split("=", 1) for t in texts)


@pytest.fixture(scope="module")
def frames():
    scene = make_scene(np.random.default_rng([1, 17]), FRAMES, 160, 96, motion="medium")
    return [render_frame(scene, t) for t in range(FRAMES)]


def detections(detector, frames) -> list:
    return [(r.frame, r.detections) for r in detector.detect(frames).frames]


@pytest.fixture(scope="module")
def weight_file_detector():
    """The weight file on ONNX Runtime with BASE (exported on the fly, kept while the detector lives)."""
    return megavod.load(weights=WEIGHTS, backend="onnxruntime", device="cpu", **as_kwargs(BASE))


@pytest.fixture(scope="module")
def export(weight_file_detector) -> Path:
    return Path(weight_file_detector.model.export_folder.name) / "export"


_torch_runs: dict[tuple[str, ...], list] = {}


def torch_detections(frames, overrides: list[str]) -> list:
    """PyTorch's detections with BASE + ``overrides`` (each set once per module)."""
    key = tuple(overrides)
    if key not in _torch_runs:
        _torch_runs[key] = detections(megavod.load(weights=WEIGHTS, device="cpu", **as_kwargs(BASE + overrides)), frames)
    return _torch_runs[key]


def folder_detections(export, frames, overrides: list[str]) -> list:
    return detections(megavod.load(weights=export, backend="onnxruntime", device="cpu", **as_kwargs(overrides)), frames)


def assert_same(expected, got) -> None:
    """Same frames and counts; every detection matched one-to-one by label, box (1e-2 px), score (1e-4)."""
    assert [k for k, _ in expected] == [k for k, _ in got]
    for (k, a), (_, b) in zip(expected, got):
        assert len(a) == len(b), f"frame {k}: {len(a)} vs {len(b)} detections"
        free = np.ones(len(b), dtype=bool)
        for i in range(len(a)):
            ok = (free & (b.labels == a.labels[i]).numpy()
                  & ((b.boxes - a.boxes[i]).abs().max(dim=1).values <= BOX_TOL).numpy()
                  & ((b.scores - a.scores[i]).abs() <= SCORE_TOL).numpy())
            assert ok.any(), f"frame {k}: detection {i} has no equal"
            free[int(np.flatnonzero(ok)[0])] = False


def differ(a, b) -> bool:
    return any(len(x) != len(y) or not bool((x.boxes - y.boxes).abs().max() <= BOX_TOL) for (_, x), (_, y) in zip(a, b))


@pytest.mark.parametrize("override", ["model.roi_head.detections_per_img=10", "model.roi_head.score_thresh=0.2",
                                      "model.roi_head.nms_thresh=0.3", "model.rpn.post_nms_top_n_test=20"])
def test_graph_input_overrides_equal_pytorch(export, frames, override):
    """Each graph input's override, on the export folder, gives PyTorch's detections with it, and they
    are not the detections without it."""
    expected = torch_detections(frames, [override])
    assert_same(expected, folder_detections(export, frames, [override]))
    default = torch_detections(frames, [])
    assert differ(expected, default)
    key, value = override.split("=")
    if key.endswith("detections_per_img"):  # the top 10 by score; ties at the 10th could keep a few more
        assert all(len(d) <= 12 for _, d in expected) and any(len(d) > 10 for _, d in default)
    if key.endswith("score_thresh"):
        assert all(bool((d.scores > float(value)).all()) for _, d in expected)


def test_weight_file_honours_every_override(weight_file_detector, frames):
    """A weight file is exported with its overrides: a key the graphs hold as a constant (the RPN's NMS
    threshold, in BASE) is honoured there."""
    assert weight_file_detector.cfg.model.rpn.nms_thresh == 0.6
    assert_same(torch_detections(frames, []), detections(weight_file_detector, frames))


def test_schedule_overrides_are_honoured(export, frames):
    """Values only the stream schedule uses (window, global pool, seed) change on an export folder."""
    schedule = ["mega.T_l=5", "mega.T_g=3", "seed=3"]
    expected = torch_detections(frames, schedule)
    assert_same(expected, folder_detections(export, frames, schedule))
    assert differ(expected, torch_detections(frames, []))


@pytest.mark.parametrize("override,exported", [("model.rpn.nms_thresh=0.7", "0.6"), ("mega.N_l=3", "2"),
                                               ("relation.num_heads=4", "8"), ("model.roi_head.num_classes=11", "31")])
def test_baked_overrides_are_refused_in_one_line(export, override, exported):
    key, value = override.split("=")
    with pytest.raises(MegavodError) as error:
        megavod.load(weights=export, backend="onnxruntime", device="cpu", **{key: value})
    message = str(error.value)
    assert "\n" not in message and f"'{key}'" in message and "export again" in message
    assert f"is {exported} " in message and f"become {value}" in message and f"{key}={value}" in message


def _frame_folder(frames, folder: Path) -> Path:
    folder.mkdir()
    for t, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{t:06d}.png")
    return folder


def test_cli_honours_graph_inputs_and_refuses_constants(export, frames, tmp_path, capsys):
    clip = _frame_folder(frames, tmp_path / "clip")
    base = ["detect", str(clip), "--weights", str(export), "--backend", "onnxruntime", "--device", "cpu"]
    assert cli_main([*base, "--out", str(tmp_path / "out"), "model.roi_head.detections_per_img=10"]) == 0
    records = read_predictions(next((tmp_path / "out").glob("*.json")))[0].frames
    assert len(records) == FRAMES and all(0 < len(r.detections) <= 12 for r in records)
    capsys.readouterr()
    assert cli_main([*base, "--out", str(tmp_path / "refused"), "mega.N_l=3"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("megavod detect: error:") and "'mega.N_l'" in err[0], err
    assert "Traceback" not in err[0] and not (tmp_path / "refused").exists()


def test_export_predating_graph_inputs(export, tmp_path):
    """An export whose graphs take no settings (written before they were inputs) refuses an override of
    one ("export again") and still loads with any other override."""
    old = tmp_path / "old"
    shutil.copytree(export, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for graph in manifest["graphs"].values():
        graph["inputs"] = [i for i in graph["inputs"] if i["name"] not in SETTINGS]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MegavodError, match=r"'model.roi_head.score_thresh'.*predates.*export again"):
        megavod.load(weights=old, backend="onnxruntime", device="cpu", **{"model.roi_head.score_thresh": "0.2"})
    detector = megavod.load(weights=old, backend="onnxruntime", device="cpu", **{"mega.T_g": "3"})
    assert detector.cfg.mega.T_g == 3
