"""Motion IoU of ground-truth boxes from the annotations' track ids (docs/departures.md#motion-iou-from-track-ids).

FGFA's motion-specific evaluation sorts every ground-truth box into a speed bucket by its *motion
IoU*: the mean IoU of the object with itself in nearby frames (slow objects barely move, so their
boxes overlap a lot). The authors ship the values for ImageNet VID val as a ``.mat`` file; megavod
computes them from the XML track ids instead, so that any dataset in the VID layout can be bucketed.

For a box of track ``t`` in frame ``f`` the motion IoU is the mean IoU (legacy +1 convention) between
it and the boxes of track ``t`` in frames ``f - radius ... f + radius`` (``f`` excluded), over the frames
where the track is present. A box with no such neighbour (a one-frame track, or no track id) gets
:data:`NO_NEIGHBOUR` (-1): it falls in no bucket.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from megavod.structures import FrameAnnotation

#: Inclusive motion-IoU ranges of the authors' evaluation (docs/conventions.md#evaluation-protocol). "all" is
#: special-cased by the evaluator: it ignores no ground truth whatever the motion IoU
#: (docs/departures.md#motion-iou-from-track-ids).
MOTION_RANGES: dict[str, tuple[float, float]] = {
    "all": (0.0, 1.0),
    "fast": (0.0, 0.7),
    "medium": (0.7, 0.9),
    "slow": (0.9, 1.0),
}
#: The motion IoU of a box without any neighbour of its track within the radius.
NO_NEIGHBOUR = -1.0


def _pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of row i of ``a`` with row i of ``b`` ([N,4] each), widths x2 - x1 + 1, float64."""
    iw = np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]) + 1.0
    ih = np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]) + 1.0
    inter = np.clip(iw, 0.0, None) * np.clip(ih, 0.0, None)
    area_a = (a[:, 2] - a[:, 0] + 1.0) * (a[:, 3] - a[:, 1] + 1.0)
    area_b = (b[:, 2] - b[:, 0] + 1.0) * (b[:, 3] - b[:, 1] + 1.0)
    union = area_a + area_b - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
    # Two zero-area boxes: no meaningful overlap rather than NaN poisoning the mean.
    return np.nan_to_num(iou, nan=0.0)


def motion_ious_for_video(frames: Sequence[FrameAnnotation], radius: int = 10) -> list[Tensor]:
    """Per-box motion IoU for every frame of one video (docs/departures.md#motion-iou-from-track-ids).

    Args:
        frames: the annotated frames of a single video, any order; ``FrameAnnotation.frame`` gives
            the frame number that the ``radius`` window is measured in, and ``track_ids`` link boxes
            across frames (-1 = no track).
        radius: half-width of the window in frames (10 as FGFA).

    Returns:
        One float64 tensor per input frame (same order), one value per box in box order: the mean
        IoU with the same track's boxes in the other frames of the window, or -1 where there is none.
        If a track id occurs twice in one frame, the neighbour lookup uses the first of them.
    """
    if radius < 1:
        raise ValueError(f"radius must be >= 1, got {radius}")
    videos = {f.video for f in frames}
    if len(videos) > 1:
        raise ValueError(f"frames must come from one video, got {len(videos)}: {sorted(videos)[:3]}")
    counts = [len(f) for f in frames]
    total = int(sum(counts))
    if total == 0:
        return [torch.zeros(0, dtype=torch.float64) for _ in frames]

    boxes = torch.cat([f.boxes.reshape(-1, 4) for f in frames]).to(torch.float64).numpy()
    tracks = torch.cat([f.track_ids.reshape(-1) for f in frames]).to(torch.int64).numpy()
    frame_no = np.repeat(np.array([f.frame for f in frames], dtype=np.int64), counts)

    # One integer key per (track, frame) so that "track t at frame f + d" is a single sorted lookup:
    # each offset d costs one vectorised searchsorted over all boxes of the video.
    base = int(frame_no.min()) - radius
    span = int(frame_no.max()) - base + radius + 1
    valid = tracks >= 0
    key = tracks * span + (frame_no - base)
    valid_idx = np.flatnonzero(valid)
    order = valid_idx[np.argsort(key[valid_idx], kind="stable")]
    sorted_key = key[order]

    sums = np.zeros(total)
    hits = np.zeros(total, dtype=np.int64)
    for d in range(-radius, radius + 1):
        if d == 0 or not len(valid_idx):
            continue
        query = key[valid_idx] + d
        pos = np.searchsorted(sorted_key, query)
        pos_c = np.minimum(pos, len(sorted_key) - 1)
        found = (pos < len(sorted_key)) & (sorted_key[pos_c] == query)
        me = valid_idx[found]
        other = order[pos_c[found]]
        sums[me] += _pairwise_iou(boxes[me], boxes[other])
        hits[me] += 1

    values = np.full(total, NO_NEIGHBOUR)
    has = hits > 0
    values[has] = sums[has] / hits[has]
    return [torch.from_numpy(v.copy()) for v in np.split(values, np.cumsum(counts)[:-1])]


def bucket_shares(motion_ious: Sequence[Tensor | np.ndarray | Sequence[float]]) -> dict[str, float]:
    """Share of motion-IoU entries inside each bucket, counted as the authors' code counts them.

    This is the ``empty_weight`` of each bucket (docs/conventions.md#evaluation-protocol,
    docs/departures.md#motion-iou-from-track-ids): the entries are all per-box values of all frames, where a
    frame without ground truth contributes one entry 0 (the authors' reading of an empty ``.mat`` cell) and -1
    entries count in the denominator only. Ranges are inclusive, so a value of exactly 0.7 or 0.9 counts in
    two buckets. Also returns ``"no_neighbour"``: the share of -1 entries, and ``"entries"``: the denominator.
    """
    parts = [np.asarray(m, dtype=np.float64).reshape(-1) for m in motion_ious]
    parts = [p if p.size else np.zeros(1) for p in parts]
    values = np.concatenate(parts) if parts else np.zeros(0)
    n = values.size
    shares: dict[str, float] = {}
    for name, (low, high) in MOTION_RANGES.items():
        if name == "all":
            continue
        inside = int(np.count_nonzero((values >= low) & (values <= high)))
        shares[name] = inside / n if n else 0.0
    shares["no_neighbour"] = int(np.count_nonzero(values < 0)) / n if n else 0.0
    shares["entries"] = float(n)
    return shares
