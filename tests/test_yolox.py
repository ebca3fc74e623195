"""The YOLOX network (megavod/models/yolox.py): the authors' state-dict names, shapes and dtypes for
YOLOX-S/L/X and YOLOV-S/L/X (tests/data/checkpoint_keys/yolov/), the authors' initialisation, the decode
on a hand-computed case (anchor order, grids, strides, exp, corners) and the per-image post-processing
(``yolox/utils/boxes.py::postprocess``) on hand-made boxes."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from megavod.models.yolox import (
    SIZES,
    AnchorPredictions,
    Focus,
    anchor_grid,
    build_yolox,
    decode,
    decode_boxes,
    yolox_detections,
)

LISTINGS = Path(__file__).resolve().parent / "data" / "checkpoint_keys" / "yolov"
# Helper B's module: the YOLOV aggregation under the head (head.trans.*, head.linear_pred.*).
VIDEO_HEAD_KEYS = ("head.trans.", "head.linear_pred.")
HAS_YOLOV_HEAD = importlib.util.find_spec("megavod.models.yolov_head") is not None


def yolov_listing(name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key: (shape, dtype)} of ``LISTINGS / f"{name}.txt"`` (tab-separated: key, shape, dtype), in order;
    the header's key count is checked."""
    lines = (LISTINGS / f"{name}.txt").read_text().splitlines()
    n_keys = int(re.search(r"; (\d+) keys", lines[0]).group(1))
    out = {}
    for line in lines[1:]:
        key, shape, dtype = line.split("\t")
        out[key] = (tuple(int(v) for v in re.findall(r"\d+", shape)), dtype)
    assert len(out) == n_keys
    return out


def described(model: nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}


def build_listed(size: str, video: bool) -> nn.Module:
    """The model of a listing on the meta device; YOLOV with helper B's aggregation when it exists."""
    depth, width = SIZES[size]
    with torch.device("meta"):
        model = build_yolox(depth, width, video_branch=video)
        if video and HAS_YOLOV_HEAD:
            from megavod.models.yolov_head import YOLOVAggregation

            channels = int(256 * width)
            model.head.trans = YOLOVAggregation(channels)
            model.head.linear_pred = nn.Linear(4 * channels, 31)
    return model


@pytest.mark.parametrize("size", ["S", "L", "X"])
@pytest.mark.parametrize("video", [False, True], ids=["yolox", "yolov"])
def test_state_dict_equals_the_authors_listing(size, video):
    name = f"yolov_{size.lower()}" if video else f"yolox_{size.lower()}_vid"
    theirs = yolov_listing(name)
    ours = described(build_listed(size, video))
    if video and not HAS_YOLOV_HEAD:
        theirs = {k: v for k, v in theirs.items() if not k.startswith(VIDEO_HEAD_KEYS)}
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))[:5]
    assert ours == theirs
    if not video:  # same order too (the YOLOV head's trans / linear_pred are attached after the rest)
        assert list(ours) == list(theirs)


def test_initialisation_is_the_authors():
    model = build_yolox(0.33, 0.5)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 and m.momentum == 0.03 for m in bns)
    prior = -math.log((1 - 0.01) / 0.01)
    for conv in [*model.head.cls_preds, *model.head.obj_preds]:
        assert torch.equal(conv.bias, torch.full_like(conv.bias, prior))
    assert all(isinstance(m, nn.SiLU) for m in model.modules() if isinstance(m, (nn.SiLU, nn.ReLU, nn.LeakyReLU)))
    assert not any(m.bias is not None for n, m in model.named_modules()
                   if isinstance(m, nn.Conv2d) and not n.startswith(("head.cls_preds", "head.reg_preds", "head.obj_preds")))


def test_focus_order():
    """``network_blocks.py::Focus``: top-left, bottom-left, top-right, bottom-right."""
    focus = Focus(1, 4)
    focus.conv = nn.Identity()
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert focus(x).flatten().tolist() == [1.0, 3.0, 2.0, 4.0]


def test_anchor_grid_row_major_per_level():
    grids, strides = anchor_grid([(2, 3), (1, 2), (1, 1)], (8, 16, 32), torch.float32, torch.device("cpu"))
    assert grids.tolist() == [[0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [2, 1], [0, 0], [1, 0], [0, 0]]
    assert strides.tolist() == [8] * 6 + [16] * 2 + [32]


def test_decode_boxes_hand_computed():
    # cx = (tx + x) s, cy = (ty + y) s, w = exp(tw) s, h = exp(th) s
    regression = torch.tensor([[0.5, -0.25, math.log(2.0), 0.0], [0.0, 1.0, 0.0, math.log(0.5)]])
    grids = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    strides = torch.tensor([8.0, 32.0])
    out = decode_boxes(regression, grids, strides)
    expected = torch.tensor([[20.0, 6.0, 16.0, 8.0], [0.0, 128.0, 32.0, 16.0]])
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)  # exp's float32 rounding: ~1 ulp


def test_network_decode_hand_computed(one_thread):
    """Prediction convs with zero weights output their biases: every anchor's box, objectness and class
    scores follow from its level and cell alone, which checks the anchor order, grids, strides, the exp,
    the corners and the sigmoids of the whole network's output."""
    torch.manual_seed(0)
    model = build_yolox(0.33, 0.5, num_classes=3, video_branch=True).eval()
    t = (0.5, 0.25, math.log(2.0), 0.0)
    with torch.no_grad():
        for k in range(3):
            for conv, bias in ((model.head.reg_preds[k], t), (model.head.obj_preds[k], (k - 1.0,)),
                               (model.head.cls_preds[k], (0.0, 1.0, -1.0))):
                conv.weight.zero_()
                conv.bias.copy_(torch.tensor(bias))
        p = model(torch.rand(2, 3, 64, 96) * 255)
    assert isinstance(p, AnchorPredictions)
    sizes = [(8, 12), (4, 6), (2, 3)]
    assert p.boxes.shape == (2, 8 * 12 + 4 * 6 + 2 * 3, 4)
    expected, obj = [], []
    for level, ((h, w), s) in enumerate(zip(sizes, (8, 16, 32))):
        for y in range(h):
            for x in range(w):
                cx, cy, bw, bh = (x + 0.5) * s, (y + 0.25) * s, 2 * s, s
                expected.append([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2])
                obj.append(1 / (1 + math.exp(-(level - 1.0))))
    expected = torch.tensor(expected).expand(2, -1, -1)
    # Anchor 13 (level 8, y = 1, x = 1): cx 12, cy 10, w 16, h 8.
    assert expected[0, 13].tolist() == [4.0, 6.0, 20.0, 14.0]
    torch.testing.assert_close(p.boxes, expected, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(p.objectness, torch.tensor(obj).expand(2, -1), rtol=1e-6, atol=1e-7)
    cls = torch.tensor([0.5, 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))])
    torch.testing.assert_close(p.class_scores, cls.expand(2, 126, 3), rtol=1e-6, atol=1e-7)
    assert p.cls_features.shape == p.reg_features.shape == (2, 126, 128)


def test_raw_outputs_and_features(one_thread):
    """``raw_outputs`` (training): [B, A, 5 + C] in the authors' layout, whose decode is the inference
    output; the features are the branches' maps flattened in anchor order."""
    torch.manual_seed(0)
    model = build_yolox(0.33, 0.5, video_branch=True).eval()
    images = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        raw = model.raw_outputs(images)
        p = model(images)
        maps = model.backbone(images)
        stem = model.head.stems[1](maps[1])
        reg = model.head.reg_convs[1](stem)
        cls2 = model.head.cls_convs2[1](stem)
    a = 8 * 8 + 4 * 4 + 2 * 2
    assert raw.outputs.shape == (1, a, 35) and raw.grids.shape == (a, 2) and raw.strides.shape == (a,)
    assert raw.grids[64 + 5].tolist() == [1.0, 1.0] and raw.strides[64 + 5].item() == 16.0
    again = decode(raw)
    for name in ("boxes", "objectness", "class_scores", "cls_features", "reg_features"):
        assert torch.equal(getattr(again, name), getattr(p, name)), name
    # Level 16's anchors are rows 64..79, row-major over its 4 x 4 map.
    torch.testing.assert_close(p.reg_features[0, 64:80], reg[0].flatten(1).T, rtol=0, atol=0)
    torch.testing.assert_close(p.cls_features[0, 64:80], cls2[0].flatten(1).T, rtol=0, atol=0)
    torch.testing.assert_close(raw.objectness_logits[0, 64:80], model.head.obj_preds[1](reg)[0].flatten(),
                               rtol=0, atol=0)
    assert build_yolox(0.33, 0.5).eval()(images).cls_features is None


def test_predictions_index_keeps_the_batch_axis():
    p = AnchorPredictions(torch.rand(3, 5, 4), torch.rand(3, 5), torch.rand(3, 5, 2), None, torch.rand(3, 5, 8))
    one = p[1]
    assert len(one) == 1 and torch.equal(one.boxes[0], p.boxes[1]) and one.cls_features is None
    assert torch.equal(p[-1].objectness[0], p.objectness[2])


def test_yolox_detections_hand_made():
    boxes = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],   # class 1, score 0.9 * 0.8 = 0.72
        [1.0, 0.0, 11.0, 10.0],   # class 1, IoU 9/11 = 0.82 with row 0: suppressed at 0.5
        [1.0, 0.0, 11.0, 10.0],   # class 0, same box: another class, kept
        [50.0, 50.0, 60.0, 60.0],  # obj x class = 0.5 * 0.2 = 0.1: exactly the threshold, kept (>=)
        [80.0, 80.0, 90.0, 90.0],  # 0.5 * 0.19 = 0.095 < 0.1: dropped
        [20.0, 20.0, 30.0, 30.0],  # tie between classes 0 and 2: the first, class 0
    ])
    objectness = torch.tensor([0.9, 0.8, 0.7, 0.5, 0.5, 0.4])
    class_scores = torch.tensor([
        [0.1, 0.8, 0.0],
        [0.2, 0.7, 0.0],
        [0.6, 0.5, 0.0],
        [0.2, 0.0, 0.1],
        [0.0, 0.19, 0.0],
        [0.5, 0.0, 0.5],
    ])
    det = yolox_detections(boxes, objectness, class_scores, conf_thresh=0.1, nms_thresh=0.5)
    products = objectness * class_scores.max(dim=1).values
    assert products[3] >= 0.1  # the threshold case is kept as the authors' >= keeps it
    order = [0, 2, 5, 3]  # by decreasing score: 0.72, 0.42, 0.2, 0.1
    assert det.boxes.tolist() == boxes[order].tolist()
    assert det.labels.tolist() == [2, 1, 1, 1]  # class index + 1
    torch.testing.assert_close(det.scores, products[order], rtol=0, atol=0)
    # A looser NMS keeps row 1 too; nothing passes a threshold above every score.
    assert len(yolox_detections(boxes, objectness, class_scores, 0.1, 0.9)) == 5
    assert len(yolox_detections(boxes, objectness, class_scores, 0.73, 0.5)) == 0
