"""The prediction file: exact round trip, atomic writes, one-line errors, COCO export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megavod.data.classes import VID_CLASSES
from megavod.data.predictions import (
    FramePrediction,
    VideoPredictions,
    export_coco_results,
    read_predictions,
    write_predictions,
)
from megavod.errors import MegavodError
from megavod.structures import Detections


def _videos() -> list[VideoPredictions]:
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(5, 2, generator=g) * 300
    boxes = torch.cat([xy, xy + torch.rand(5, 2, generator=g) * 100], 1)
    d = Detections(boxes, torch.rand(5, generator=g), torch.tensor([1, 5, 30, 7, 7]))
    return [
        VideoPredictions(
            "val/ILSVRC2015_val_00000000",
            500,
            375,
            [FramePrediction(0, "000000.JPEG", d), FramePrediction(1, None, Detections.empty())],
        ),
        VideoPredictions("val/ILSVRC2015_val_00000001", 1280, 720, []),
    ]


def test_round_trip_is_exact_and_atomic(tmp_path):
    path = tmp_path / "sub" / "pred.json"
    videos = _videos()
    write_predictions(path, videos)
    write_predictions(path, videos)  # overwriting goes through the same rename
    assert [p.name for p in path.parent.iterdir()] == ["pred.json"]  # no temp file left behind
    back = read_predictions(path)
    assert [(v.video, v.width, v.height, len(v.frames)) for v in back] == [
        (v.video, v.width, v.height, len(v.frames)) for v in videos
    ]
    f0, f1 = back[0].frames
    assert (f0.frame, f0.file, f1.frame, f1.file) == (0, "000000.JPEG", 1, None)
    src = videos[0].frames[0].detections
    assert torch.equal(f0.detections.boxes, src.boxes)  # bit for bit, float32
    assert torch.equal(f0.detections.scores, src.scores)
    assert torch.equal(f0.detections.labels, src.labels) and f0.detections.labels.dtype == torch.int64
    assert f1.detections.boxes.shape == (0, 4)
    doc = json.loads(path.read_text())
    assert doc["format"] == "megavod.predictions" and doc["version"] == 1
    assert doc["classes"] == list(VID_CLASSES)
    # Optional rounding of coordinates for big files.
    write_predictions(path, videos, decimals=1)
    rounded = read_predictions(path)[0].frames[0].detections.boxes
    assert torch.allclose(rounded, src.boxes, atol=0.05) and not torch.equal(rounded, src.boxes)


def _doc() -> dict:
    return {
        "format": "megavod.predictions",
        "version": 1,
        "classes": list(VID_CLASSES),
        "videos": [
            {
                "video": "val/a",
                "width": 100,
                "height": 80,
                "frames": [
                    {"frame": 0, "file": None, "boxes": [], "scores": [], "labels": []},
                    {"frame": 1, "file": "000001.JPEG", "boxes": [[1, 2, 30, 40]], "scores": [0.5], "labels": [3]},
                ],
            }
        ],
    }


def _frame(doc: dict) -> dict:
    return doc["videos"][0]["frames"][1]


WHERE = "videos[0] ('val/a') frames[1] (frame 1)"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: _frame(d).pop("scores"), f"{WHERE[:-10]}: missing key 'scores'"),
        (lambda d: _frame(d).update(boxes=[[1, 2, 30]]), f"{WHERE}: 'boxes' must be a list of [x1, y1, x2, y2] rows (N x 4)"),
        (lambda d: _frame(d).update(boxes=[[1, 2, 30, 40], [1, 2, 3]], scores=[0.5, 0.4], labels=[3, 3]), "rows (N x 4)"),
        (lambda d: _frame(d).update(boxes=[1, 2, 30, 40]), "rows (N x 4)"),
        (lambda d: _frame(d).update(scores=[0.5, 0.4]), f"{WHERE}: lengths differ: 1 boxes, 2 scores, 1 labels"),
        (lambda d: _frame(d).update(labels=[31]), f"{WHERE}: label 31 (detection 0) is outside 1..30"),
        (lambda d: _frame(d).update(labels=[0]), "label 0 (detection 0) is outside 1..30"),
        (lambda d: _frame(d).update(labels=[2.0]), "'labels' must be integers"),
        (lambda d: _frame(d).update(boxes=[[30, 2, 1, 40]]), f"{WHERE}: box 0 [30, 2, 1, 40] has negative size"),
        (lambda d: _frame(d).update(scores=["high"]), "'scores' must hold only numbers"),
        (lambda d: _frame(d).update(frame=-1), "'frame' must be an integer >= 0"),
        (lambda d: _frame(d).update(frame=0), "frames[1]: frame 0 appears twice"),
        (lambda d: d["videos"][0].pop("width"), "videos[0]: missing key 'width'"),
        (lambda d: d["videos"].append(dict(d["videos"][0])), "videos[1]: video 'val/a' also appears as videos[0]"),
        (lambda d: d.update(format="coco"), "'format' is 'coco'"),
        (lambda d: d.update(version=2), "unsupported version 2"),
        (lambda d: d["classes"].__setitem__(3, "bearish"), "classes[3] is 'bearish', expected 'bear'"),
        (lambda d: d["classes"].pop(), "'classes' must be a list of 31 names, got 30"),
    ],
)
def test_malformed_files_name_the_entry(tmp_path, edit, message):
    doc = _doc()
    edit(doc)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(MegavodError) as info:
        read_predictions(path)
    text = str(info.value)
    assert message in text and "\n" not in text and text.startswith(str(path))


def test_unreadable_files(tmp_path):
    with pytest.raises(MegavodError, match="not found"):
        read_predictions(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": ')
    with pytest.raises(MegavodError, match="not valid JSON.*line 1"):
        read_predictions(bad)
    bad.write_text(json.dumps(_doc()).replace("0.5", "NaN"))
    with pytest.raises(MegavodError, match="'scores' holds a non-finite value"):
        read_predictions(bad)
    assert len(read_predictions(_write(tmp_path, _doc()))[0].frames) == 2  # the unedited doc is fine


def _write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(doc))
    return path


def test_export_coco_results(tmp_path):
    videos = _videos()
    path = tmp_path / "coco.json"
    assert export_coco_results(path, videos) == 5
    rows = json.loads(path.read_text())
    d = videos[0].frames[0].detections
    x1, y1, x2, y2 = d.boxes[2].double().tolist()
    # w = x2 - x1 + 1: the legacy box covers pixels x1..x2 inclusive.
    assert rows[2]["bbox"] == pytest.approx([x1, y1, x2 - x1 + 1, y2 - y1 + 1], abs=1e-9)
    assert rows[2]["category_id"] == 30 and rows[2]["image_id"] == 1
    assert rows[2]["score"] == pytest.approx(float(d.scores[2]))
    ids = {("val/ILSVRC2015_val_00000000", 0): 17, ("val/ILSVRC2015_val_00000000", 1): 18}
    export_coco_results(path, videos, ids)
    assert {r["image_id"] for r in json.loads(path.read_text())} == {17}
    with pytest.raises(MegavodError, match="no COCO image id for video 'val/ILSVRC2015_val_00000000' frame 1"):
        export_coco_results(path, videos, {("val/ILSVRC2015_val_00000000", 0): 17})
