"""The prediction file: detections of whole videos, in original-frame pixels, as JSON.

Layout (UTF-8)::

    {"format": "megavod.predictions", "version": 1, "classes": [31 names],
     "videos": [{"video": "val/ILSVRC2015_val_00000000", "width": W, "height": H,
                 "frames": [{"frame": 0, "file": "000000.JPEG",
                             "boxes": [[x1, y1, x2, y2], ...], "scores": [...], "labels": [...]}]}]}

Boxes follow megavod's legacy +1 convention (width = x2 - x1 + 1). Float32 values are written with
enough digits to read back bit for bit. ``read_predictions`` checks everything an evaluation relies
on and names the offending entry in a one-line :class:`MegavodError`.

``export_coco_results`` writes the same detections as a COCO results list for external tools.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from megavod.atomic import atomic_path, atomic_write_text
from megavod.data.classes import VID_CLASSES
from megavod.errors import MegavodError, first_line
from megavod.structures import Detections

FORMAT_NAME = "megavod.predictions"
FORMAT_VERSION = 1


@dataclass
class FramePrediction:
    """Detections of one frame; ``file`` is the image file name inside the video (optional)."""

    frame: int
    file: str | None
    detections: Detections


@dataclass
class VideoPredictions:
    """All predicted frames of one video; ``width``/``height`` are the original frame size."""

    video: str
    width: int
    height: int
    frames: list[FramePrediction]

    def save_json(self, path: str | os.PathLike, *, decimals: int | None = None) -> None:
        """Write the prediction file (README "Prediction file") holding this video, atomically."""
        write_predictions(path, [self], decimals=decimals)

    def save_csv(self, path: str | os.PathLike) -> None:
        """One row per detection: video, frame, file, x1, y1, x2, y2, score, label, class (atomic)."""
        write_csv(path, self)

    def to_coco(self, path: str | os.PathLike, image_ids: dict[tuple[str, int], int] | None = None) -> int:
        """Write a COCO results list (:func:`export_coco_results`); returns the detections written."""
        return export_coco_results(path, [self], image_ids)


def write_csv(path: str | os.PathLike, video: VideoPredictions, classes: Sequence[str] = VID_CLASSES) -> None:
    """One row per detection: video, frame, file, x1, y1, x2, y2, score, label, class (atomic)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "frame", "file", "x1", "y1", "x2", "y2", "score", "label", "class"])
        for fp in video.frames:
            d = fp.detections
            for box, score, label in zip(d.boxes.tolist(), d.scores.tolist(), d.labels.tolist()):
                writer.writerow([video.video, fp.frame, fp.file or "", *(f"{v:.2f}" for v in box),
                                 f"{score:.6f}", label, classes[label]])


def _frame_dict(fp: FramePrediction, decimals: int | None) -> dict[str, Any]:
    det = fp.detections
    # float32 -> float64 is exact and Python's repr round-trips it, so reading gives the same bits.
    boxes = det.boxes.detach().cpu().to(torch.float32).to(torch.float64).numpy()
    if decimals is not None:
        boxes = np.round(boxes, decimals)
    return {
        "frame": int(fp.frame),
        "file": fp.file,
        "boxes": boxes.tolist(),
        "scores": det.scores.detach().cpu().to(torch.float32).to(torch.float64).tolist(),
        "labels": det.labels.detach().cpu().to(torch.int64).tolist(),
    }


def write_predictions(
    path: str | os.PathLike,
    videos: Sequence[VideoPredictions],
    *,
    classes: Sequence[str] = VID_CLASSES,
    decimals: int | None = None,
) -> None:
    """Write ``videos`` to ``path`` atomically (temp file + rename).

    ``decimals`` rounds box coordinates to that many decimals to shrink big files (scores are never
    rounded, so ranking is kept); the default keeps every float32 bit.
    """
    doc = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "classes": list(classes),
        "videos": [
            {
                "video": v.video,
                "width": int(v.width),
                "height": int(v.height),
                "frames": [_frame_dict(f, decimals) for f in v.frames],
            }
            for v in videos
        ],
    }
    atomic_write_text(path, json.dumps(doc, separators=(",", ":"), allow_nan=False))


# --------------------------------------------------------------------------------------------------
# Reading with validation
# --------------------------------------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _numeric(value: Any, where: str, key: str, ndim: int) -> np.ndarray:
    """``value`` as a numeric array of ``ndim`` dims, or a MegavodError naming ``where``/``key``."""
    if not isinstance(value, list):
        raise MegavodError(f"{where}: '{key}' must be a list, got {type(value).__name__}")
    shape_msg = (
        f"{where}: 'boxes' must be a list of [x1, y1, x2, y2] rows (N x 4)"
        if ndim == 2
        else f"{where}: '{key}' must be a flat list of numbers"
    )
    try:
        arr = np.asarray(value)
    except ValueError:  # ragged rows
        raise MegavodError(shape_msg) from None
    if arr.size == 0:
        return np.zeros((0, 4) if ndim == 2 else 0)
    if arr.dtype.kind not in "iuf":
        raise MegavodError(f"{where}: '{key}' must hold only numbers")
    if arr.ndim != ndim or (ndim == 2 and arr.shape[1] != 4):
        raise MegavodError(shape_msg)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise MegavodError(f"{where}: '{key}' holds a non-finite value")
    return arr


def _read_frame(entry: Any, where: str, num_classes: int) -> FramePrediction:
    if not isinstance(entry, dict):
        raise MegavodError(f"{where}: must be an object, got {type(entry).__name__}")
    for key in ("frame", "boxes", "scores", "labels"):
        if key not in entry:
            raise MegavodError(f"{where}: missing key '{key}'")
    frame = entry["frame"]
    if not _is_int(frame) or frame < 0:
        raise MegavodError(f"{where}: 'frame' must be an integer >= 0, got {frame!r}")
    where = f"{where} (frame {frame})"
    file = entry.get("file")
    if file is not None and not isinstance(file, str):
        raise MegavodError(f"{where}: 'file' must be a string or null")
    boxes = _numeric(entry["boxes"], where, "boxes", 2)
    scores = _numeric(entry["scores"], where, "scores", 1)
    labels = _numeric(entry["labels"], where, "labels", 1)
    n = len(boxes)
    if len(scores) != n or len(labels) != n:
        raise MegavodError(
            f"{where}: lengths differ: {n} boxes, {len(scores)} scores, {len(labels)} labels"
        )
    if n and labels.dtype.kind not in "iu":
        raise MegavodError(f"{where}: 'labels' must be integers")
    bad = np.flatnonzero((labels < 1) | (labels >= num_classes))
    if bad.size:
        raise MegavodError(
            f"{where}: label {int(labels[bad[0]])} (detection {int(bad[0])}) is outside 1..{num_classes - 1}"
        )
    # Negative size in megavod's +1 convention: x2 - x1 + 1 < 0 (a one-pixel box has x2 == x1).
    neg = np.flatnonzero((boxes[:, 2] - boxes[:, 0] + 1 < 0) | (boxes[:, 3] - boxes[:, 1] + 1 < 0))
    if neg.size:
        raise MegavodError(
            f"{where}: box {int(neg[0])} {boxes[neg[0]].tolist()} has negative size (x2 < x1 - 1 or y2 < y1 - 1)"
        )
    det = Detections(
        torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.as_tensor(scores, dtype=torch.float32).reshape(-1),
        torch.as_tensor(labels, dtype=torch.int64).reshape(-1),
    )
    return FramePrediction(frame=int(frame), file=file, detections=det)


def _read_video(entry: Any, where: str, num_classes: int) -> VideoPredictions:
    if not isinstance(entry, dict):
        raise MegavodError(f"{where}: must be an object, got {type(entry).__name__}")
    for key in ("video", "width", "height", "frames"):
        if key not in entry:
            raise MegavodError(f"{where}: missing key '{key}'")
    video = entry["video"]
    if not isinstance(video, str) or not video:
        raise MegavodError(f"{where}: 'video' must be a non-empty string")
    where = f"{where} ({video!r})"
    for key in ("width", "height"):
        if not _is_int(entry[key]) or entry[key] <= 0:
            raise MegavodError(f"{where}: '{key}' must be a positive integer, got {entry[key]!r}")
    if not isinstance(entry["frames"], list):
        raise MegavodError(f"{where}: 'frames' must be a list")
    frames = [
        _read_frame(f, f"{where} frames[{j}]", num_classes) for j, f in enumerate(entry["frames"])
    ]
    seen: set[int] = set()
    for j, f in enumerate(frames):
        if f.frame in seen:
            raise MegavodError(f"{where} frames[{j}]: frame {f.frame} appears twice")
        seen.add(f.frame)
    return VideoPredictions(video, entry["width"], entry["height"], frames)


def read_predictions(
    path: str | os.PathLike, *, classes: Sequence[str] = VID_CLASSES
) -> list[VideoPredictions]:
    """Read a prediction file; any malformed entry raises a one-line MegavodError naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MegavodError(f"{path}: prediction file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MegavodError(f"{path}: cannot read prediction file: {e}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise MegavodError(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except (ValueError, RecursionError) as e:  # a number of over 4300 digits, nesting too deep
        raise MegavodError(f"{path}: not valid JSON: {first_line(e)}") from None
    try:
        return _read_document(path, doc, classes)
    except (MegavodError, MemoryError):  # MemoryError: the machine's, not the file's
        raise
    except Exception as e:  # noqa: BLE001 - content none of the checks foresaw is still the file's fault
        raise MegavodError(f"{path}: malformed prediction file ({type(e).__name__}: {first_line(e)})") from None



def _read_document(path: Path, doc: Any, classes: Sequence[str]) -> list[VideoPredictions]:
    """The body of :func:`read_predictions`: validate the parsed JSON ``doc``."""
    if not isinstance(doc, dict):
        raise MegavodError(f"{path}: top level must be an object")
    for key in ("format", "version", "classes", "videos"):
        if key not in doc:
            raise MegavodError(f"{path}: missing key '{key}'")
    if doc["format"] != FORMAT_NAME:
        raise MegavodError(f"{path}: 'format' is {doc['format']!r}, expected {FORMAT_NAME!r}")
    if doc["version"] != FORMAT_VERSION:
        raise MegavodError(f"{path}: unsupported version {doc['version']!r} (this megavod reads {FORMAT_VERSION})")
    got = doc["classes"]
    if not isinstance(got, list) or len(got) != len(classes):
        n = len(got) if isinstance(got, list) else type(got).__name__
        raise MegavodError(f"{path}: 'classes' must be a list of {len(classes)} names, got {n}")
    if got != list(classes):
        i = next(k for k, (a, b) in enumerate(zip(got, classes)) if a != b)
        raise MegavodError(f"{path}: classes[{i}] is {got[i]!r}, expected {classes[i]!r}")
    if not isinstance(doc["videos"], list):
        raise MegavodError(f"{path}: 'videos' must be a list")
    videos = [
        _read_video(v, f"{path}: videos[{i}]", len(classes)) for i, v in enumerate(doc["videos"])
    ]
    seen: dict[str, int] = {}
    for i, v in enumerate(videos):
        if v.video in seen:
            raise MegavodError(f"{path}: videos[{i}]: video {v.video!r} also appears as videos[{seen[v.video]}]")
        seen[v.video] = i
    return videos


# --------------------------------------------------------------------------------------------------
# COCO results export
# --------------------------------------------------------------------------------------------------


def export_coco_results(
    path: str | os.PathLike,
    videos: Sequence[VideoPredictions],
    image_ids: dict[tuple[str, int], int] | None = None,
) -> int:
    """Write the detections as a COCO results list; returns the number of detections written.

    Each detection becomes ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` with
    ``category_id`` the VID label (1..30) and **w = x2 - x1 + 1, h = y2 - y1 + 1** (megavod's box
    convention). With that choice the interval [x, x + w) covers the same pixels as the legacy box,
    so pycocotools' IoU on exported boxes equals the legacy +1 IoU when the ground truth is exported
    the same way.

    ``image_ids`` maps ``(video, frame)`` to the COCO image id (e.g. from the ground-truth JSON); a
    frame missing from it is an error. Without it, ids are 1, 2, ... in the order of ``videos`` and
    their frames.
    """
    results: list[dict[str, Any]] = []
    next_id = 1
    for v in videos:
        for f in v.frames:
            if image_ids is None:
                image_id = next_id
                next_id += 1
            else:
                try:
                    image_id = int(image_ids[(v.video, f.frame)])
                except KeyError:
                    raise MegavodError(
                        f"no COCO image id for video {v.video!r} frame {f.frame}"
                    ) from None
            det = f.detections
            b = det.boxes.detach().cpu().to(torch.float64).numpy()
            xywh = np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0] + 1, b[:, 3] - b[:, 1] + 1], axis=1)
            scores = det.scores.detach().cpu().to(torch.float64).tolist()
            labels = det.labels.detach().cpu().tolist()
            for box, score, label in zip(xywh.tolist(), scores, labels):
                results.append(
                    {"image_id": image_id, "category_id": int(label), "bbox": box, "score": score}
                )
    atomic_write_text(path, json.dumps(results, separators=(",", ":"), allow_nan=False))
    return len(results)
