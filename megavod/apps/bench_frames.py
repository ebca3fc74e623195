"""The frames and models ``megavod bench`` and its scaling runs share (megavod/apps/bench.py)."""

from __future__ import annotations

import numpy as np
import torch

from megavod.config import Config, load_config
from megavod.data.synthetic_render import make_scene, render_frame
from megavod.models.backbone import calibrate_frozen_bn

SCENE_FRAMES = 100  # frames per rendered scene; longer runs cut to a new scene


def frame_shape(size: int) -> tuple[int, int]:
    """(height, width) of a bench frame: short side ``size``, aspect 5:3 (600 -> 600 x 1000)."""
    return size, round(size * 5 / 3)


def synthetic_frames(num_frames: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """``num_frames`` RGB uint8 frames [H, W, 3] of moving objects (a new scene every 100 frames)."""
    height, width = frame_shape(size)
    rng = np.random.default_rng(seed)
    frames: list[np.ndarray] = []
    while len(frames) < num_frames:
        n = min(SCENE_FRAMES, num_frames - len(frames))
        scene = make_scene(rng, max(n, 2), width, height)
        frames.extend(render_frame(scene, t) for t in range(n))
    return frames


LETTERBOX_STRIDE = 32  # YOLOX's largest stride: its letterbox sides are multiples of it


def letterbox_side(size: int) -> int:
    """The letterbox side of a YOLOX / YOLOV config on bench frames of short side ``size``: ``size`` rounded
    to the nearest multiple of 32 (halves up; at least 32). At ``--size 576``, the authors' YOLOX-S test
    size, the 576 x 960 frames are letterboxed to 576: the long side scaled to 576, the short one padded."""
    return max(LETTERBOX_STRIDE, LETTERBOX_STRIDE * int(size / LETTERBOX_STRIDE + 0.5))


def bench_config(name: str, size: int) -> Config:
    """The config ``name`` with its test input set to the bench frames' size (no resizing); a letterbox
    config (YOLOX, YOLOV) gets the letterbox side :func:`letterbox_side`."""
    height, width = frame_shape(size)
    overrides = [f"input.min_size_test={height}", f"input.max_size_test={width}"]
    if load_config(name).input.letterbox:
        overrides.append(f"input.letterbox={letterbox_side(size)}")
    return load_config(name, overrides)


@torch.no_grad()
def calibrate(model: torch.nn.Module, image: torch.Tensor) -> None:
    """Calibrate the FrozenBN of the C4 body, then of res5 on the calibrated C4 (``image`` [3, H, W]), where
    the detector has them (every built-in one does); YOLOX's BatchNorm of the backbone, then of the head
    (without it a random YOLOX's scores all fall under the 0.001 threshold: no detection to post-process)."""
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        return
    calibrate_frozen_bn(backbone, image[None])
    box_head = getattr(model, "box_head", None)
    head = getattr(getattr(box_head, "feature_extractor", None), "head", None)
    if head is None and isinstance(getattr(model, "head", None), torch.nn.Module):  # YOLOX's decoupled head
        head = model.head
    if head is not None:
        calibrate_frozen_bn(head, backbone(image[None]))
