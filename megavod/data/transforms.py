"""Input pipeline of the authors' code (docs/conventions.md#input-pipeline): resize, horizontal flip,
BGR x 255 minus the mean.

Order: PIL RGB -> resize (PIL bilinear) -> optional flip -> ToTensor ([0, 1]) -> channels to BGR,
x 255 -> subtract ``pixel_mean`` (B, G, R), divide by ``pixel_std``. The ops are the authors' own
(``to_tensor`` then ``* 255``, not a direct uint8 cast) so pixels match theirs bit for bit.

Randomness is an explicit draw (:meth:`FrameTransform.draw`), made once per training sample and
applied to the key frame and all of its reference frames: the authors' flip transform keeps its draw
for the reference frames processed after the key frame, so a sample's frames flip together
(docs/conventions.md#input-pipeline). The train short side is drawn with the flip, once per sample (the
authors draw it per frame; with the reference setting ``min_size_train = (600,)`` the two are the same).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

import cv2
import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor


def resized_size(width: int, height: int, min_size: int = 600, max_size: int | None = 1000) -> tuple[int, int]:
    """``(new_width, new_height)``: short side ``min_size`` unless the long side would exceed
    ``max_size``, then short side ``round(max_size * short / long)`` (half to even); the long side is
    truncated. 1280x720 -> 999x562."""
    size = min_size
    if max_size is not None:
        short, long = float(min(width, height)), float(max(width, height))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return width, height
    if width < height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resize_image(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """PIL bilinear resize to ``(width, height)``."""
    if image.size == tuple(size):
        return image
    return image.resize(tuple(size), Image.BILINEAR)


def resize_boxes(boxes: Tensor, old_size: tuple[int, int], new_size: tuple[int, int]) -> Tensor:
    """Scale boxes from ``old_size`` to ``new_size`` (both (W, H)) as ``BoxList.resize``: plain ratios, no +1."""
    sx = new_size[0] / old_size[0]
    sy = new_size[1] / old_size[1]
    return boxes * torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype, device=boxes.device)


def hflip_boxes(boxes: Tensor, width: int) -> Tensor:
    """Horizontal flip with the +1 convention: x1' = W - x2 - 1, x2' = W - x1 - 1."""
    out = boxes.clone()
    out[:, 0] = width - boxes[:, 2] - 1
    out[:, 2] = width - boxes[:, 0] - 1
    return out


def image_to_tensor(
    image: Image.Image,
    pixel_mean: Sequence[float] = (102.9801, 115.9465, 122.7717),
    pixel_std: Sequence[float] = (1.0, 1.0, 1.0),
    to_bgr255: bool = True,
) -> Tensor:
    """PIL RGB image -> [3,H,W] float32 in the model's convention (BGR x 255 minus the mean by default)."""
    t = TF.to_tensor(image.convert("RGB"))
    if to_bgr255:
        t = t[[2, 1, 0]] * 255
    return TF.normalize(t, list(pixel_mean), list(pixel_std))


def tensor_to_image(
    tensor: Tensor,
    pixel_mean: Sequence[float] = (102.9801, 115.9465, 122.7717),
    pixel_std: Sequence[float] = (1.0, 1.0, 1.0),
    to_bgr255: bool = True,
) -> Image.Image:
    """Inverse of :func:`image_to_tensor` (for visualisation), rounded to uint8 RGB."""
    t = tensor * torch.tensor(pixel_std)[:, None, None] + torch.tensor(pixel_mean)[:, None, None]
    if to_bgr255:
        t = t[[2, 1, 0]]
    else:
        t = t * 255
    return Image.fromarray(t.round().clamp(0, 255).byte().permute(1, 2, 0).numpy())


@dataclass(frozen=True)
class TransformDraw:
    """The random choices of one sample: short side and flip."""

    min_size: int
    flip: bool


class FrameTransform:
    """Resize (+ flip) + normalise one frame; ``train`` enables the random short side and flip."""

    def __init__(
        self,
        min_size: int | Sequence[int] = 600,
        max_size: int | None = 1000,
        pixel_mean: Sequence[float] = (102.9801, 115.9465, 122.7717),
        pixel_std: Sequence[float] = (1.0, 1.0, 1.0),
        to_bgr255: bool = True,
        flip_prob: float = 0.0,
    ):
        self.min_sizes = (min_size,) if isinstance(min_size, int) else tuple(min_size)
        if not self.min_sizes:
            raise ValueError("min_size must name at least one size")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.max_size = max_size
        self.pixel_mean = tuple(pixel_mean)
        self.pixel_std = tuple(pixel_std)
        self.to_bgr255 = to_bgr255
        self.flip_prob = flip_prob

    def draw(self, rng: random.Random | None = None) -> TransformDraw:
        """One draw for a sample (key frame and its references)."""
        rng = rng or random
        size = rng.choice(self.min_sizes) if len(self.min_sizes) > 1 else self.min_sizes[0]
        flip = self.flip_prob > 0 and rng.random() < self.flip_prob
        return TransformDraw(size, flip)

    def output_size(self, width: int, height: int, draw: TransformDraw | None = None) -> tuple[int, int]:
        """(W, H) a ``width`` x ``height`` frame is resized to."""
        size = draw.min_size if draw is not None else self.min_sizes[0]
        return resized_size(width, height, size, self.max_size)

    def __call__(
        self, image: Image.Image, boxes: Tensor | None = None, draw: TransformDraw | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Returns the [3,H',W'] tensor and ``boxes`` [M,4] mapped into it (None stays None).
        Without ``draw``: the first short side, no flip (test time)."""
        draw = draw or TransformDraw(self.min_sizes[0], False)
        old = image.size
        new = self.output_size(*old, draw)
        image = resize_image(image, new)
        if boxes is not None:
            boxes = resize_boxes(boxes.float(), old, new)
        if draw.flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            if boxes is not None:
                boxes = hflip_boxes(boxes, new[0])
        return image_to_tensor(image, self.pixel_mean, self.pixel_std, self.to_bgr255), boxes


def letterbox_ratio(height: int, width: int, side: int) -> float:
    """The scale of the authors' letterbox: ``min(side / height, side / width)``."""
    return min(side / height, side / width)


def letterbox_array(bgr: np.ndarray, side: int, pad_value: float = 114.0) -> tuple[Tensor, float]:
    """A BGR uint8 [H, W, 3] array -> ([3, side, side] float32 BGR 0-255, ratio r), as the authors'
    ``yolox/data/data_augment.py::preproc``: cv2 bilinear resize to ``(int(W r), int(H r))``, placed
    at the top left of a ``side`` x ``side`` image filled with ``pad_value``."""
    height, width = bgr.shape[:2]
    r = letterbox_ratio(height, width, side)
    new_w, new_h = int(width * r), int(height * r)
    resized = cv2.resize(bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR).astype(np.uint8)
    padded = np.full((side, side, 3), pad_value, dtype=np.uint8)
    padded[:new_h, :new_w] = resized
    return torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1), dtype=np.float32)), r


class LetterboxTransform:
    """YOLOX's input (docs/yolov.md#input): optional horizontal flip, then the letterbox of
    :func:`letterbox_array`; boxes scale by r (flipped as the authors' ``_mirror``: x1' = W - x2, no +1).
    The interface of :class:`FrameTransform` (``draw``, ``__call__``), ``min_size`` of a draw being the
    letterbox side."""

    def __init__(self, side: int | Sequence[int] = 576, pad_value: float = 114.0, flip_prob: float = 0.0):
        self.sides = (side,) if isinstance(side, int) else tuple(side)
        if not self.sides or min(self.sides) <= 0:
            raise ValueError(f"letterbox sides must be positive, got {self.sides}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.pad_value = pad_value
        self.flip_prob = flip_prob

    def draw(self, rng: random.Random | None = None) -> TransformDraw:
        rng = rng or random
        side = rng.choice(self.sides) if len(self.sides) > 1 else self.sides[0]
        return TransformDraw(side, self.flip_prob > 0 and rng.random() < self.flip_prob)

    def __call__(
        self, image: Image.Image, boxes: Tensor | None = None, draw: TransformDraw | None = None
    ) -> tuple[Tensor, Tensor | None]:
        draw = draw or TransformDraw(self.sides[0], False)
        rgb = np.asarray(image.convert("RGB"))
        width = rgb.shape[1]
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)  # one pass; a [:, :, ::-1] copy is ~30x slower
        if draw.flip:
            bgr = cv2.flip(bgr, 1)
            if boxes is not None:
                boxes = boxes.float().clone()
                boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
        tensor, r = letterbox_array(bgr, draw.min_size, self.pad_value)
        if boxes is not None:
            boxes = boxes.float() * r
        return tensor, boxes


def build_transform(cfg: Any, train: bool) -> FrameTransform | LetterboxTransform:
    """From a ``megavod.config.InputConfig``: train sizes and flip, or the test size without flip
    (the letterbox of YOLOX / YOLOV when ``cfg.letterbox`` is set)."""
    if cfg.letterbox:
        if train:
            return LetterboxTransform(cfg.letterbox_train or cfg.letterbox, cfg.pad_value, cfg.flip_prob)
        return LetterboxTransform(cfg.letterbox, cfg.pad_value)
    common = dict(pixel_mean=cfg.pixel_mean, pixel_std=cfg.pixel_std, to_bgr255=cfg.to_bgr255)
    if train:
        return FrameTransform(cfg.min_size_train, cfg.max_size_train, flip_prob=cfg.flip_prob, **common)
    return FrameTransform(cfg.min_size_test, cfg.max_size_test, flip_prob=0.0, **common)
