"""Frames for the YOLOX / YOLOV tests: a bright square moving over dark noise (structured, so that the
proposals' features differ between frames and the aggregation's thresholds cut)."""

from __future__ import annotations

import numpy as np


def moving_square(n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` RGB frames of 48 x 80 pixels, the square 2 px further right in each."""
    rng = np.random.default_rng(seed)
    frames = []
    for t in range(n):
        frame = rng.integers(0, 60, (48, 80, 3), dtype=np.uint8)
        frame[10:30, 5 + 2 * t:25 + 2 * t] = (230, 200, 40)
        frames.append(frame)
    return frames
