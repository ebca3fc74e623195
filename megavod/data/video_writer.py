"""Writing videos and drawing detections on frames.

``write_video`` (and :class:`VideoWriter`, one frame at a time) encodes RGB frames to H.264 (libx264 when this PyAV build has it, MPEG-4 Part 2 otherwise)
in yuv420p, the pixel format every player decodes. The file appears atomically: frames go to a hidden temp
file in the target's folder, renamed over the target only once the encoder has flushed, so an interrupted
run leaves no half-written video behind. MP4/MOV output puts its index first ("faststart"), so it can be
played while downloading and a copy cut short still decodes up to the cut.

``draw_detections`` draws boxes and ``"name: 0.87"`` labels with PIL. A box's colour comes from a fixed
palette indexed by its track id (or label when there are no track ids), so an object keeps its colour
across frames. Boxes use the legacy inclusive convention (x2, y2 are the last pixels of the box).
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from megavod.errors import MegavodError

__all__ = ["PALETTE", "VideoWriter", "write_video", "draw_detections", "write_annotated_video"]

# 20 colours that stay apart from each other on screen (Tableau 10 then its light variants).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
)

_FASTSTART_FORMATS = (".mp4", ".m4v", ".mov")


def _encoder() -> str:
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def _as_rgb(frame: Any, index: int) -> np.ndarray:
    arr = np.asarray(frame)
    if arr.dtype != np.uint8:
        raise ValueError(f"frame {index}: expected dtype uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"frame {index}: expected an RGB array [H, W, 3], got shape {arr.shape}")
    return np.ascontiguousarray(arr[:, :, :3])


class VideoWriter:
    """Encode RGB ``uint8`` frames ``[H, W, 3]`` to ``path`` one :meth:`write` at a time (the frames of
    several live streams can be written side by side); :meth:`close` finishes the file and puts it in
    place, :meth:`abort` (or an exception inside ``with``) leaves nothing at ``path``.

    All frames must have the first frame's size; odd sizes are padded by one row/column (repeating the
    edge) because yuv420p needs even dimensions. The container follows the suffix (``.mp4`` when none).
    """

    def __init__(self, path: str | Path, fps: float = 25.0) -> None:
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.path = Path(path)
        self.fps = fps
        self.count = 0
        self._suffix = self.path.suffix or ".mp4"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise MegavodError(f"{self.path}: cannot create its folder ({_reason(err)})") from None
        # Same folder as the target, so the final rename cannot cross file systems; the real suffix
        # last, because FFmpeg picks the muxer from it.
        self._tmp = self.path.with_name(
            f".{self.path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial{self._suffix}")
        self._container: Any = None
        self._stream: Any = None
        self._size: tuple[int, int] = (0, 0)
        self._pad = (0, 0)

    def _open(self, height: int, width: int) -> None:
        self._size, self._pad = (height, width), (height % 2, width % 2)
        rate = Fraction(self.fps).limit_denominator(1001)
        options = {"movflags": "+faststart"} if self._suffix.lower() in _FASTSTART_FORMATS else {}
        try:
            self._container = av.open(str(self._tmp), "w", options=options)
        except (av.FFmpegError, ValueError) as err:  # ValueError: no muxer for this suffix
            raise MegavodError(f"{self.path}: cannot write video ({_reason(err)})") from None
        codec = _encoder()
        stream = self._container.add_stream(codec, rate=rate)
        stream.width, stream.height = width + self._pad[1], height + self._pad[0]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = 1 / rate
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "medium"}
        else:
            stream.bit_rate = max(1_000_000, int(stream.width * stream.height * float(rate) * 0.3))
        self._stream = stream

    def write(self, frame: np.ndarray) -> None:
        """Append one frame."""
        try:
            arr = _as_rgb(frame, self.count)
            if self._container is None:
                self._open(*arr.shape[:2])
            height, width = self._size
            if arr.shape[:2] != (height, width):
                raise ValueError(f"frame {self.count} is {arr.shape[1]}x{arr.shape[0]} but frame 0 is {width}x{height}")
            if any(self._pad):
                arr = np.pad(arr, ((0, self._pad[0]), (0, self._pad[1]), (0, 0)), mode="edge")
            video_frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            video_frame.pts = self.count
            for packet in self._stream.encode(video_frame):
                self._container.mux(packet)
        except av.FFmpegError as err:
            self.abort()
            raise MegavodError(f"{self.path}: cannot write video ({_reason(err)})") from None
        except BaseException:
            self.abort()
            raise
        self.count += 1

    def close(self) -> int:
        """Flush the encoder, write the trailer and rename the file into place; returns the frame count.
        A video needs at least one frame (``ValueError`` otherwise, nothing written)."""
        if self._container is None:
            self.abort()
            raise ValueError("write_video: frames is empty; a video needs at least one frame")
        try:
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()  # writes the trailer (and moves the index to the front): can fail too
            self._container = None
            os.replace(self._tmp, self.path)
        except (av.FFmpegError, OSError) as err:
            self.abort()
            raise MegavodError(f"{self.path}: cannot write video ({_reason(err)})") from None
        except BaseException:
            self.abort()
            raise
        return self.count

    def abort(self) -> None:
        """Stop writing and remove the partial file (nothing is left at ``path``)."""
        if self._container is not None:
            _close_quietly(self._container)
            self._container = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: float = 25.0) -> int:
    """Encode RGB ``uint8`` frames ``[H, W, 3]`` to ``path`` and return how many were written
    (:class:`VideoWriter`). An empty ``frames`` raises ``ValueError``; nothing is left at ``path`` when
    writing fails."""
    writer = VideoWriter(path, fps)
    try:
        for frame in frames:
            writer.write(frame)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def _reason(err: BaseException) -> str:
    return " ".join(str(getattr(err, "strerror", None) or err).split())


def _close_quietly(container: Any) -> None:
    try:
        container.close()
    except av.FFmpegError:
        pass  # already failing; the first error is the one to report


def _numpy(values: Any, dtype: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, possibly on the GPU
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # old Pillow or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _colour(key: int) -> tuple[int, int, int]:
    return PALETTE[int(key) % len(PALETTE)]


def draw_detections(
    frame: np.ndarray,
    boxes: Any,
    labels: Any,
    scores: Any,
    class_names: Sequence[str],
    track_ids: Any = None,
    score_thresh: float = 0.0,
) -> np.ndarray:
    """A copy of ``frame`` with each detection scoring ``>= score_thresh`` drawn as a box and a
    ``"name: 0.87"`` label.

    ``boxes`` ``[N, 4]`` are ``(x1, y1, x2, y2)`` pixels; inputs may be numpy arrays, lists or tensors.
    The colour is ``PALETTE[track_id % 20]`` (``PALETTE[label % 20]`` without track ids or for a track id
    below 0), so a track keeps its colour from frame to frame. Higher scores are drawn last, on top.
    """
    image = Image.fromarray(_as_rgb(frame, 0))
    boxes = _numpy(boxes, np.float64).reshape(-1, 4)
    labels = _numpy(labels, np.int64).reshape(-1)
    scores = _numpy(scores, np.float64).reshape(-1)
    tracks = None if track_ids is None else _numpy(track_ids, np.int64).reshape(-1)
    if not len(boxes) == len(labels) == len(scores) or (tracks is not None and len(tracks) != len(boxes)):
        raise ValueError(
            f"draw_detections: {len(boxes)} boxes, {len(labels)} labels, {len(scores)} scores"
            + ("" if tracks is None else f", {len(tracks)} track_ids")
        )
    width, height = image.size
    thickness = max(1, round(min(width, height) / 300))
    font = _font(max(10, round(min(width, height) / 40)))
    draw = ImageDraw.Draw(image)
    for i in np.argsort(scores, kind="stable"):
        if not scores[i] >= score_thresh or not np.isfinite(boxes[i]).all():
            continue
        x1, y1, x2, y2 = boxes[i]
        x1, x2 = np.clip([x1, x2], 0, width - 1)
        y1, y2 = np.clip([y1, y2], 0, height - 1)
        if x2 < x1 or y2 < y1:
            continue
        label = int(labels[i])
        key = label if tracks is None or tracks[i] < 0 else int(tracks[i])
        colour = _colour(key)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=thickness)
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        text = f"{name}: {scores[i]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        text_w, text_h = right - left + 4, bottom - top + 4
        # Above the box when it fits, otherwise just inside its top edge.
        tx, ty = x1, (y1 - text_h if y1 - text_h >= 0 else y1)
        tx = min(tx, max(width - text_w, 0))
        draw.rectangle((tx, ty, tx + text_w - 1, ty + text_h - 1), fill=colour)
        luma = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        ink = (0, 0, 0) if luma > 150 else (255, 255, 255)
        draw.text((tx + 2 - left, ty + 2 - top), text, fill=ink, font=font)
    return np.asarray(image)


def _fields(det: Any) -> tuple[Any, Any, Any, Any]:
    """(boxes, labels, scores, track_ids) from a Detections-like object, a mapping or a tuple."""
    if det is None:
        return np.zeros((0, 4)), np.zeros(0), np.zeros(0), None
    if isinstance(det, Mapping):
        return det["boxes"], det["labels"], det["scores"], det.get("track_ids")
    if hasattr(det, "boxes"):
        return det.boxes, det.labels, det.scores, getattr(det, "track_ids", None)
    if isinstance(det, (tuple, list)) and len(det) in (3, 4):
        boxes, scores, labels = det[:3]  # the order of Detections(boxes, scores, labels)
        return boxes, labels, scores, det[3] if len(det) == 4 else None
    raise TypeError(f"cannot read detections from {type(det).__name__}")


def write_annotated_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    detections_per_frame: Iterable[Any],
    class_names: Sequence[str],
    fps: float = 25.0,
    score_thresh: float = 0.5,
) -> int:
    """Draw each frame's detections and write the video; returns the number of frames.

    ``detections_per_frame`` yields, per frame, a :class:`~megavod.structures.Detections` (an optional
    ``track_ids`` attribute gives track-stable colours), a mapping with ``boxes/labels/scores[/track_ids]``,
    a ``(boxes, scores, labels[, track_ids])`` tuple, or ``None``. It must be as long as ``frames``.
    """

    def annotated() -> Iterable[np.ndarray]:
        for frame, det in zip(frames, detections_per_frame, strict=True):
            boxes, labels, scores, tracks = _fields(det)
            yield draw_detections(frame, boxes, labels, scores, class_names, tracks, score_thresh)

    return write_video(path, annotated(), fps=fps)
