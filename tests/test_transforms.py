"""Input pipeline (docs/conventions.md#input-pipeline): resize rule, PIL bilinear, BGR x 255 - mean, +1 flip,
shared draws."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from megavod.config import InputConfig
from megavod.data.transforms import (
    FrameTransform,
    TransformDraw,
    build_transform,
    hflip_boxes,
    image_to_tensor,
    resize_boxes,
    resized_size,
    tensor_to_image,
)


@pytest.mark.parametrize(
    "size,expected",
    [
        ((1280, 720), (999, 562)),  # s = round(562.5) = 562 (half to even), long side int(562 * 16/9)
        ((720, 1280), (562, 999)),
        ((500, 375), (800, 600)),
        ((1000, 600), (1000, 600)),  # already the target size
        ((1920, 1080), (999, 562)),
        ((640, 480), (800, 600)),
        ((300, 200), (900, 600)),
    ],
)
def test_resize_rule(size, expected):
    assert resized_size(*size, 600, 1000) == expected


def test_resize_rule_rounds_half_to_even():
    # long/short * 600 > 1000 with 1000 * short / long = 562.5 -> 562, and 1000 * 3 / 8 = 375 exactly
    assert resized_size(1600, 900, 600, 1000)[1] == 562
    assert resized_size(800, 300, 600, 1000) == (1000, 375)
    # 1000 * 217 / 400 = 542.5 rounds to 542 (even); a round-half-up rule would give 543
    assert resized_size(400, 217, 600, 1000)[1] == 542


def test_pixel_convention_bgr255_minus_mean():
    img = Image.new("RGB", (4, 3), (10, 20, 30))
    t = image_to_tensor(img)
    assert t.shape == (3, 3, 4) and t.dtype == torch.float32
    torch.testing.assert_close(t[:, 0, 0], torch.tensor([30 - 102.9801, 20 - 115.9465, 10 - 122.7717]))
    assert np.array_equal(np.asarray(tensor_to_image(t)), np.asarray(img))


def test_flip_and_resize_boxes():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    assert hflip_boxes(boxes, 100).tolist() == [[69.0, 20.0, 89.0, 40.0]]  # x1' = W - x2 - 1
    assert torch.equal(hflip_boxes(hflip_boxes(boxes, 100), 100), boxes)
    assert resize_boxes(boxes, (100, 50), (200, 25)).tolist() == [[20.0, 10.0, 60.0, 20.0]]


def test_frame_transform_resizes_flips_and_shares_the_draw():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(40, 80, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    tf = FrameTransform(min_size=60, max_size=200, flip_prob=0.5)
    boxes = torch.tensor([[4.0, 6.0, 20.0, 30.0]])
    plain, b0 = tf(img, boxes)
    assert plain.shape == (3, 60, 120)
    torch.testing.assert_close(plain, image_to_tensor(img.resize((120, 60), Image.BILINEAR)))
    assert b0.tolist() == [[6.0, 9.0, 30.0, 45.0]]
    flipped, b1 = tf(img, boxes, TransformDraw(60, True))
    assert torch.equal(flipped, plain.flip(-1))
    assert b1.tolist() == [[120 - 30 - 1, 9.0, 120 - 6 - 1, 45.0]]
    # one draw per sample: the key frame and its references flip together
    draws = [tf.draw(random.Random(s)) for s in range(20)]
    assert {d.flip for d in draws} == {True, False}
    assert all(d.min_size == 60 for d in draws)
    d = tf.draw(random.Random(3))
    key, _ = tf(img, boxes, d)
    ref, none = tf(img, None, d)
    assert torch.equal(key, ref) and none is None


def test_build_transform_from_config():
    cfg = InputConfig()
    train, test = build_transform(cfg, train=True), build_transform(cfg, train=False)
    assert train.flip_prob == 0.5 and test.flip_prob == 0.0
    assert test.output_size(1280, 720) == (999, 562)
    assert not any(test.draw(random.Random(s)).flip for s in range(10))
