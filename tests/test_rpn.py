"""Legacy anchors, +1 box coder / IoU / NMS, proposal selection in key/ref modes, RPN loss
(docs/conventions.md#anchors, docs/conventions.md#legacy-plus-one-boxes, docs/conventions.md#rpn)."""

from __future__ import annotations

import math

import pytest
import torch

from megavod.models.box_coder import BBOX_XFORM_CLIP, BoxCoder, batched_nms, box_iou, clip_boxes, nms
from megavod.models.rpn import RPN, AnchorGenerator, legacy_cell_anchors

SPEC_CELL_ANCHORS = [
    (-38, -16, 53, 31), (-84, -40, 99, 55), (-176, -88, 191, 103), (-360, -184, 375, 199),
    (-24, -24, 39, 39), (-56, -56, 71, 71), (-120, -120, 135, 135), (-248, -248, 263, 263),
    (-14, -36, 29, 51), (-36, -80, 51, 95), (-80, -168, 95, 183), (-168, -344, 183, 359),
]


def test_cell_anchors_are_the_legacy_detectron_values_ratio_major():
    cell = legacy_cell_anchors(16, (64, 128, 256, 512), (0.5, 1.0, 2.0))
    assert cell.tolist() == [list(map(float, a)) for a in SPEC_CELL_ANCHORS]
    gen = AnchorGenerator()
    assert torch.equal(gen.cell_anchors[0], cell)
    assert list(gen.state_dict()) == ["cell_anchors.0"]


def test_anchor_grid_order_and_count():
    gen = AnchorGenerator()
    anchors = gen((3, 5))
    assert anchors.shape == (3 * 5 * 12, 4)
    cell = gen.cell_anchors[0]
    # location-major (row y, then column x), the 12 cell anchors inner
    y, x, a = 2, 3, 7
    expected = cell[a] + torch.tensor([16.0 * x, 16.0 * y, 16.0 * x, 16.0 * y])
    assert torch.equal(anchors[(y * 5 + x) * 12 + a], expected)
    vis = gen.visibility(anchors, (48, 80))
    assert not vis[0]  # (-38, -16, 53, 31) straddles the top-left corner
    inside = (anchors[:, 0] >= 0) & (anchors[:, 1] >= 0) & (anchors[:, 2] < 80) & (anchors[:, 3] < 48)
    assert torch.equal(vis, inside)


def test_box_coder_hand_computed_and_round_trip():
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    anchor = torch.tensor([[0.0, 0.0, 9.0, 19.0]])  # w 10, h 20, centre (5, 10)
    gt = torch.tensor([[5.0, 0.0, 24.0, 19.0]])  # w 20, h 20, centre (15, 10)
    d = coder.encode(gt, anchor)
    torch.testing.assert_close(d, torch.tensor([[1.0, 0.0, math.log(2.0), 0.0]]))
    torch.testing.assert_close(coder.decode(d, anchor), gt)
    weighted = BoxCoder((10.0, 10.0, 5.0, 5.0))
    torch.testing.assert_close(weighted.encode(gt, anchor), torch.tensor([[10.0, 0.0, 5 * math.log(2.0), 0.0]]))
    # zero deltas give the box back (x2 = cx + w/2 - 1)
    boxes = torch.tensor([[3.0, 4.0, 50.0, 20.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(coder.decode(torch.zeros(2, 8), boxes), boxes.repeat(1, 2))
    # random round trip
    g = torch.Generator().manual_seed(0)
    a = torch.rand(50, 2, generator=g) * 100
    a = torch.cat([a, a + 1 + torch.rand(50, 2, generator=g) * 100], 1)
    b = torch.rand(50, 2, generator=g) * 100
    b = torch.cat([b, b + 1 + torch.rand(50, 2, generator=g) * 100], 1)
    torch.testing.assert_close(weighted.decode(weighted.encode(b, a), a), b, rtol=1e-4, atol=1e-3)


def test_box_coder_clamps_dw_from_above_only():
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    box = torch.tensor([[0.0, 0.0, 15.0, 15.0]])  # w = h = 16
    out = coder.decode(torch.tensor([[0.0, 0.0, 100.0, -3.0]]), box)
    w = out[0, 2] - out[0, 0] + 1
    h = out[0, 3] - out[0, 1] + 1
    assert BBOX_XFORM_CLIP == pytest.approx(math.log(1000 / 16))
    torch.testing.assert_close(w, torch.tensor(1000.0))
    torch.testing.assert_close(h, torch.tensor(16 * math.exp(-3.0)))


def test_iou_and_nms_use_plus_one_and_suppress_only_above_threshold():
    a = torch.tensor([[0.0, 0.0, 9.0, 9.0]])  # area 100 with +1
    b = torch.tensor([[0.0, 0.0, 9.0, 19.0]])  # area 200, intersection 100
    assert box_iou(a, b).item() == pytest.approx(0.5)
    boxes = torch.cat([b, a])
    scores = torch.tensor([0.9, 0.8])
    assert nms(boxes, scores, 0.5).tolist() == [0, 1]  # IoU == thr is kept (CUDA: suppress when >)
    assert nms(boxes, scores, 0.49).tolist() == [0]
    # +1 matters: without it IoU would be 81 / 171 = 0.47 and the box would survive at 0.48
    assert nms(torch.tensor([[0.0, 0.0, 9.0, 19.0], [0.0, 0.0, 9.0, 10.0]]), scores, 0.48).tolist() == [0]
    # per-class NMS: grouped by ascending class, by score inside a class
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60]])
    keep = batched_nms(boxes, torch.tensor([0.5, 0.9, 0.8, 0.7]), torch.tensor([2, 1, 2, 2]), 0.5)
    assert keep.tolist() == [1, 2, 3]
    clipped = clip_boxes(torch.tensor([[-5.0, 3.0, 120.0, 90.0]]), (50, 100))
    assert clipped.tolist() == [[0.0, 3.0, 99.0, 49.0]]


def _rpn(**kw) -> RPN:
    torch.manual_seed(0)
    return RPN(8, **kw)


def test_proposal_counts_per_mode_sorted_and_clipped():
    rpn = _rpn()
    features = torch.randn(2, 8, 24, 24)  # 6912 anchors, more than pre_nms_top_n = 6000
    sizes = [(384, 384), (380, 370)]
    targets = [{"boxes": torch.tensor([[10.0, 10, 100, 120]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[0.0, 0, 50, 50], [60, 60, 200, 300]]), "labels": torch.tensor([2, 3])}]
    rpn.train()
    props, losses = rpn(features, sizes, targets)
    assert [len(p) for p in props] == [301, 302]  # 300 + GT appended with objectness 1
    assert torch.equal(props[1].boxes[-2:], targets[1]["boxes"]) and props[1].objectness[-2:].tolist() == [1.0, 1.0]
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg"}
    ref = rpn.proposals(features, sizes, mode="ref", targets=targets)
    assert [len(p) for p in ref] == [75, 75]  # no GT in ref mode, even in training
    assert not ref[0].boxes.requires_grad
    rpn.eval()
    props, losses = rpn(features, sizes)
    assert [len(p) for p in props] == [300, 300] and losses == {}
    assert [len(p) for p in rpn.proposals(features, sizes, mode="ref")] == [75, 75]
    for p, (h, w) in zip(props, sizes):
        assert torch.all(p.objectness[:-1] >= p.objectness[1:])  # descending: MEGA takes "the first 15"
        assert p.boxes[:, 0::2].min() >= 0 and p.boxes[:, 0::2].max() <= w - 1
        assert p.boxes[:, 1::2].min() >= 0 and p.boxes[:, 1::2].max() <= h - 1
        assert box_iou(p.boxes, p.boxes).fill_diagonal_(0).max() <= 0.7
    with pytest.raises(ValueError, match="mode"):
        rpn.proposals(features, sizes, mode="memory")


def test_head_layout_matches_anchor_order():
    """The top-scoring logit at (anchor a, row y, column x) must come back as that anchor's box."""
    rpn = _rpn(post_nms_top_n_test=5).eval()
    with torch.no_grad():
        for layer in (rpn.head.conv, rpn.head.cls_logits, rpn.head.bbox_pred):
            layer.weight.zero_()
            layer.bias.zero_()
        rpn.head.cls_logits.bias[7] = 5.0
    features = torch.zeros(1, 8, 6, 7)
    objectness, deltas = rpn.head(features)
    bump = torch.zeros_like(objectness)
    bump[0, 7, 4, 2] = 1.0  # anchor 7 (ratio 1, size 512 -> (-248..263)), y 4, x 2
    sel = rpn.select(objectness + bump, deltas, rpn.anchors(features), [(96, 112)], "key")[0]
    anchor = rpn.anchor_generator.cell_anchors[0][7] + torch.tensor([32.0, 64.0, 32.0, 64.0])
    assert torch.equal(sel.boxes[0], clip_boxes(anchor[None], (96, 112))[0])
    assert sel.objectness[0].item() == pytest.approx(torch.sigmoid(torch.tensor(6.0)).item())


def test_anchor_labels_thresholds_low_quality_and_border():
    rpn = _rpn()
    anchors = torch.tensor([
        [0.0, 0.0, 63.0, 63.0],  # IoU 1 with the GT
        [8.0, 0.0, 71.0, 63.0],  # IoU 56*64/(2*4096-56*64) = 0.78 -> fg
        [24.0, 0.0, 87.0, 63.0],  # IoU 40/88 = 0.45 -> ignored
        [48.0, 0.0, 111.0, 63.0],  # IoU 16/112 = 0.14 -> bg
        [-10.0, 0.0, 53.0, 63.0],  # would be fg but straddles the border -> ignored
        [200.0, 200.0, 210.0, 210.0],  # IoU 36/185 = 0.19 with the small GT, its best: low-quality fg
    ])
    gt = torch.tensor([[0.0, 0.0, 63.0, 63.0], [205.0, 205.0, 214.0, 214.0]])
    target = {"boxes": gt, "labels": torch.tensor([1, 1])}
    labels, reg = rpn.assign_targets(anchors, (256, 256), target)
    assert labels.tolist() == [1.0, 1.0, -1.0, 0.0, -1.0, 1.0]
    torch.testing.assert_close(reg[0], torch.zeros(4))
    torch.testing.assert_close(reg[5], BoxCoder((1.0, 1.0, 1.0, 1.0)).encode(target["boxes"][1:], anchors[5:])[0])
    labels, _ = rpn.assign_targets(anchors, (256, 256), {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)})
    assert labels.tolist() == [0.0, 0.0, 0.0, 0.0, -1.0, 0.0]  # no GT: every visible anchor is background


def test_rpn_loss_values():
    rpn = _rpn(batch_size_per_image=64).train()
    with torch.no_grad():
        rpn.head.cls_logits.weight.zero_()
        rpn.head.cls_logits.bias.zero_()
        rpn.head.bbox_pred.weight.zero_()
        rpn.head.bbox_pred.bias.zero_()
    features = torch.randn(1, 8, 12, 12)
    target = {"boxes": torch.tensor([[40.0, 40.0, 140.0, 150.0]]), "labels": torch.tensor([5])}
    _, losses = rpn(features, [(192, 192)], [target])
    # logits 0 -> BCE = log 2 whatever the sample; zero deltas -> box loss = smooth-L1 of the targets
    assert losses["loss_objectness"].item() == pytest.approx(math.log(2.0), rel=1e-6)
    anchors = rpn.anchors(features)
    labels, reg = rpn.assign_targets(anchors, (192, 192), target)
    n_pos = int((labels == 1).sum())
    assert 0 < n_pos <= 32  # all positives are sampled (at most half of 64)
    expected = torch.nn.functional.smooth_l1_loss(reg[labels == 1], torch.zeros(n_pos, 4), beta=1 / 9, reduction="sum")
    assert losses["loss_rpn_box_reg"].item() == pytest.approx(expected.item() / 64, rel=1e-5)
    sum(losses.values()).backward()
    assert rpn.head.cls_logits.weight.grad is not None

    # an image whose anchors all straddle the border samples nothing: zero, differentiable losses
    _, losses = rpn(torch.randn(1, 8, 2, 2), [(32, 32)], [target])
    assert losses["loss_objectness"].item() == 0.0 and losses["loss_objectness"].requires_grad


def test_anchor_grid_is_the_arange_by_stride_grid_and_traces_with_the_map_size():
    gen = AnchorGenerator()
    for h, w in ((1, 1), (38, 63), (75, 125)):
        # the authors' form, arange(0, W * stride, stride): the same float32 values as arange(W) * stride
        sx = torch.arange(0, w * 16, 16, dtype=torch.float32)
        sy = torch.arange(0, h * 16, 16, dtype=torch.float32)
        yy, xx = torch.meshgrid(sy, sx, indexing="ij")
        shifts = torch.stack((xx, yy, xx, yy), dim=-1).reshape(-1, 1, 4)
        assert torch.equal(gen((h, w)), (shifts + gen.cell_anchors[0].view(1, -1, 4)).reshape(-1, 4))
    traced = torch.jit.trace(lambda x: gen(x.shape[-2:]), torch.zeros(1, 1, 3, 5))
    assert torch.equal(traced(torch.zeros(1, 1, 7, 4)), gen((7, 4)))  # the size is a traced value


def test_clip_boxes_takes_the_size_as_numbers_or_a_tensor():
    boxes = torch.tensor([[-5.0, -1.0, 120.0, 60.0, 3.0, 4.0, 99.5, 47.5]])
    expected = torch.tensor([[0.0, 0.0, 99.0, 47.0, 3.0, 4.0, 99.0, 47.0]])
    assert torch.equal(clip_boxes(boxes, (48, 100)), expected)
    assert torch.equal(clip_boxes(boxes, torch.tensor([48, 100])), expected)
    assert torch.equal(boxes[0, :2], torch.tensor([-5.0, -1.0]))  # the input is not written to


def test_test_proposals_are_the_key_mode_proposals_with_sizes_and_counts_as_tensors():
    rpn = _rpn().eval()
    features = torch.randn(2, 8, 24, 24)
    sizes = [(384, 384), (380, 370)]
    with torch.no_grad():
        for i, size in enumerate(sizes):
            c4 = features[i : i + 1]
            alone, key = rpn.test_proposals(c4, size), rpn.proposals(c4, [size], "key")[0]
            assert torch.equal(alone.boxes, key.boxes) and torch.equal(alone.objectness, key.objectness)
            as_tensors = rpn.test_proposals(c4, torch.tensor(size), torch.tensor(120))
            assert torch.equal(as_tensors.boxes, alone.boxes[:120])
            assert torch.equal(rpn.test_proposals(c4, size, 7).objectness, alone.objectness[:7])
