"""Single-frame detector (docs/conventions.md#single-frame-detector): presets build, train/eval forward, and a
tiny model overfits."""

from __future__ import annotations

import math

import pytest
import torch

from megavod.config import Config, load_config
from megavod.models.backbone import calibrate_frozen_bn
from megavod.models.box_coder import box_iou
from megavod.models.contract import KeyFrameInputs
from megavod.models.single_frame import SingleFrameDetector, build_single_frame_detector
from megavod.structures import Detections, FrameAnnotation


def _tiny_config() -> Config:
    cfg = Config()
    b = cfg.model.backbone
    b.arch, b.small_stem_channels, b.small_blocks = "small", 8, (1, 1, 1, 1)
    # 64x64 frames: anchors of 64+ pixels all straddle the border and would be ignored by the RPN loss
    cfg.model.rpn.anchor_sizes = (16, 32, 48)
    h = cfg.model.roi_head
    h.reduce_channel, h.reduced_channels, h.representation_size = True, 32, 64
    return cfg


def _synthetic_frames() -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Two 64x64 frames (normalised pixel scale) with coloured rectangles of classes 1, 2, 3."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 64, generator=g) * 10
    boxes = [torch.tensor([[8.0, 10, 40, 50]]), torch.tensor([[20.0, 16, 55, 47], [2, 2, 20, 22]])]
    labels = [torch.tensor([1]), torch.tensor([2, 3])]
    colours = {1: (0.0, 0.0, 200.0), 2: (200.0, 0.0, 0.0), 3: (0.0, 200.0, 0.0)}
    for i in range(2):
        for (x1, y1, x2, y2), c in zip(boxes[i].int().tolist(), labels[i].tolist()):
            images[i, :, y1 : y2 + 1, x1 : x2 + 1] += torch.tensor(colours[c])[:, None, None] - 100
    return images, [{"boxes": b, "labels": l} for b, l in zip(boxes, labels)]


def test_synthetic_preset_trains_and_detects():
    cfg = load_config("synthetic_single")
    model = build_single_frame_detector(cfg)
    assert isinstance(model, SingleFrameDetector)
    images = torch.randn(2, 3, 96, 128) * 50
    calibrate_frozen_bn(model, images)
    box = torch.tensor([[10.0, 12.0, 70.0, 80.0]])
    ann = FrameAnnotation("v", 0, 128, 96, box, torch.tensor([4]), torch.tensor([0]))
    no_gt = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    model.train()
    losses = model(images, [ann, no_gt])  # a FrameAnnotation and an image without ground truth
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    # classifier starts near uniform over the 31 classes
    assert losses["loss_classifier"].item() == pytest.approx(math.log(31), rel=0.05)
    sum(losses.values()).backward()
    assert model.backbone.body.layer2[0].conv1.weight.grad is not None
    assert model.box_head.feature_extractor.head.layer4[0].conv2.weight.grad is not None
    model.eval()
    with torch.no_grad():
        dets = model(images)
    assert len(dets) == 2 and all(isinstance(d, Detections) for d in dets)
    for d in dets:
        assert len(d) <= cfg.model.roi_head.detections_per_img
        assert d.scores.min() > cfg.model.roi_head.score_thresh
        assert d.labels.min() >= 1 and d.labels.max() <= 30
        assert d.boxes[:, 0::2].max() <= 127 and d.boxes[:, 1::2].max() <= 95 and d.boxes.min() >= 0
    # the streaming engine's entry point: one frame, boxes back in the original frame's pixels
    with torch.no_grad():
        one = model.detect_key(KeyFrameInputs(model.frame_features(images[1], 0, (192, 256)))).detections
    torch.testing.assert_close(one.boxes, dets[1].boxes * 2, rtol=1e-4, atol=1e-3)  # batch of 1 vs 2
    torch.testing.assert_close(one.scores, dets[1].scores, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="targets"):
        model.train()(images)


def test_frozen_stages_follow_freeze_at():
    model = build_single_frame_detector(_tiny_config())  # freeze_at = 2 by default
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("backbone.body.stem.", "backbone.body.layer1.")) for n in frozen)
    assert not any(n.startswith("backbone.body.layer2.") for n in frozen)


def test_tiny_model_overfits_two_frames():
    torch.manual_seed(0)
    model = build_single_frame_detector(_tiny_config())
    images, targets = _synthetic_frames()
    calibrate_frozen_bn(model, images)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02, momentum=0.9, weight_decay=1e-4)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small run ~3x faster without intra-op threading
    try:
        for step in range(300):
            loss = sum(model(images, targets).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step == 240:  # settle the box regression with a 10x lower lr
                for group in opt.param_groups:
                    group["lr"] = 0.002
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():
        dets = model(images)
    for det, target in zip(dets, targets):
        for box, label in zip(target["boxes"], target["labels"]):
            same = det.labels == label
            assert same.any()
            best = det.scores[same].argmax()
            assert det.scores[same][best] > 0.95
            assert box_iou(det.boxes[same][best : best + 1], box[None]).item() > 0.8
        # no confident false positive
        confident = det.scores > 0.5
        assert int(confident.sum()) == len(target["labels"])
        assert sorted(det.labels[confident].tolist()) == sorted(target["labels"].tolist())


def test_bf16_autocast_keeps_boxes_and_losses_float32():
    model = build_single_frame_detector(_tiny_config())
    images, targets = _synthetic_frames()
    calibrate_frozen_bn(model, images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model.train()(images, targets)
        assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
        sum(losses.values()).backward()
        with torch.no_grad():
            props = model.rpn.proposals(model.backbone(images), [(64, 64)] * 2, mode="ref")
            dets = model.eval()(images)
    assert props[0].boxes.dtype == torch.float32
    assert all(d.boxes.dtype == torch.float32 and d.scores.dtype == torch.float32 for d in dets)
