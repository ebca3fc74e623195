"""Box head: RoIAlign on res5, fc6/fc7, predictor, Fast R-CNN sampling/loss, postprocess
(docs/conventions.md#box-head-and-predictor)."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import roi_align

from megavod.models.backbone import ResNetHead, resnet_spec
from megavod.models.box_coder import BoxCoder, box_iou
from megavod.models.roi_heads import (
    BoxPostProcessor,
    FastRCNNLossComputation,
    FPNPredictor,
    ResNetC5MLPFeatureExtractor,
)

SPEC = resnet_spec("small", small_stem_channels=8, small_blocks=(1, 1, 1, 1))


def _extractor(**kw) -> ResNetC5MLPFeatureExtractor:
    torch.manual_seed(0)
    return ResNetC5MLPFeatureExtractor(ResNetHead(SPEC), representation_size=32, **kw)


def test_pool_is_legacy_roialign_on_the_res5_map():
    ext = _extractor()
    # a ramp f(y, x) = x: each 7x7 bin of a legacy (aligned=False) RoIAlign with one adaptive sample per
    # bin reads x at the bin centre, (j + 0.5) * roi_w / 7 with roi_w = 111 / 16 and no half-pixel shift
    ramp = torch.arange(10.0).repeat(1, 1, 10, 1)
    pooled = ext.pool(ramp, [torch.tensor([[0.0, 0.0, 111.0, 111.0]])]).view(7, 7)
    expected = (torch.arange(7.0) + 0.5) * (111 / 16) / 7
    torch.testing.assert_close(pooled[3], expected)
    torch.testing.assert_close(pooled[:, 2], torch.full((7,), expected[2].item()))
    # RoIs of image i read image i's map; output is [N, C*7*7]
    maps = torch.randn(2, 4, 12, 12)
    boxes = [torch.tensor([[0.0, 0, 50, 60]]), torch.tensor([[10.0, 20, 100, 90], [0, 0, 180, 180]])]
    out = ext.pool(maps, boxes)
    assert out.shape == (3, 4 * 49)
    ref = roi_align(maps[1:], [boxes[1]], 7, 1 / 16, 0, aligned=False).flatten(1)
    torch.testing.assert_close(out[1:], ref)


def test_res5_runs_on_the_whole_map_and_feature_sizes():
    ext = _extractor()
    c4 = torch.randn(1, SPEC.c4_channels, 5, 6)
    m = ext.res5(c4)
    assert m.shape == (1, SPEC.res5_channels, 5, 6)
    assert ext.fc6.in_features == SPEC.res5_channels * 49
    feats = ext(c4, [torch.tensor([[0.0, 0, 40, 40], [10, 10, 90, 70]])])
    assert feats.shape == (2, 32) and feats.min() >= 0  # ReLU after fc7
    reduced = _extractor(reduce_channels=16)
    assert reduced.res5(c4).shape == (1, 16, 5, 6) and reduced.res5(c4).min() >= 0
    assert reduced.fc6.in_features == 16 * 49
    pred = FPNPredictor(32, 31)
    logits, deltas = pred(feats)
    assert logits.shape == (2, 31) and deltas.shape == (2, 124)


def test_pool_keeps_box_coordinates_float32_under_bf16_autocast():
    # CUDA training runs under bf16 autocast; the reduce conv then gives a bf16 map. A bf16 box coordinate
    # is rounded (200.7 -> 201.0; near 1000 by up to 2 px): the boxes must reach RoIAlign in float32.
    ext = _extractor(reduce_channels=16, scale=1.0)
    # columns alternate 0 / 1, so a shift of 0.3 px moves every sample by 0.3; one sample per bin (box < 7 px)
    zigzag = (torch.arange(256) % 2).float().repeat(1, 2, 16, 1)
    box = torch.tensor([[200.7, 2.0, 206.7, 9.0]])
    rounded = box.bfloat16().float()
    assert rounded[0, 0] == 201.0 and rounded[0, 2] == 207.0
    exact = roi_align(zigzag, [box], 7, 1.0, 0, aligned=False).flatten(1)
    off = roi_align(zigzag, [rounded], 7, 1.0, 0, aligned=False).flatten(1)
    assert (exact - off).abs().max() > 0.25  # the two are far apart, in bf16 terms
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = ext.pool(zigzag.bfloat16(), [box])
    assert pooled.dtype == torch.bfloat16  # the map's dtype, as torchvision's autocast rule returns it
    torch.testing.assert_close(pooled.float(), exact, rtol=2**-8, atol=2**-8)  # bf16 output rounding only

    # The real path: res5 + reduce conv under autocast give a bf16 map; pooling it equals float32 RoIAlign of
    # that map with the float32 boxes, to the output's bf16 rounding.
    ext = _extractor(reduce_channels=16)
    c4 = torch.randn(1, SPEC.c4_channels, 40, 70)
    boxes = torch.tensor([[1000.7, 300.3, 1090.2, 610.9], [17.3, 5.6, 620.1, 402.7]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feature_map = ext.res5(c4)
        pooled = ext.pool(feature_map, [boxes])
    assert feature_map.dtype == torch.bfloat16
    expected = roi_align(feature_map.float(), [boxes], 7, 1 / 16, 0, aligned=False).flatten(1)
    torch.testing.assert_close(pooled.float(), expected, rtol=2**-8, atol=1e-5)
    # float32 (and float64) maps: exactly torchvision's RoIAlign, boxes in the map's precision
    fp32 = ext.res5(c4)
    assert torch.equal(ext.pool(fp32, [boxes]), roi_align(fp32, [boxes], 7, 1 / 16, 0, aligned=False).flatten(1))
    fp64 = fp32.double()
    assert torch.equal(ext.pool(fp64, [boxes]),
                       roi_align(fp64, [boxes.double()], 7, 1 / 16, 0, aligned=False).flatten(1))


def test_subsample_128_at_most_25_percent_foreground_in_proposal_order():
    torch.manual_seed(0)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    loss = FastRCNNLossComputation(coder)
    gt = torch.tensor([[100.0, 100.0, 199.0, 199.0]])
    jitter = torch.randint(-8, 9, (100, 4)).float()
    fg = gt + jitter  # IoU well above 0.5
    bg = torch.rand(300, 2) * 300 + 300
    bg = torch.cat([bg, bg + 40], 1)
    proposals = torch.cat([bg[:150], fg, bg[150:], gt])
    sampled = loss.subsample([proposals], [{"boxes": gt, "labels": torch.tensor([7])}])
    assert sampled.boxes[0].shape == (128, 4)
    assert int((sampled.labels == 7).sum()) == 32 and int((sampled.labels == 0).sum()) == 96
    assert set(sampled.labels.tolist()) == {0, 7}
    # sampled rows keep the proposals' order
    idx = [int((proposals == b).all(1).nonzero()[0]) for b in sampled.boxes[0]]
    assert idx == sorted(idx)
    ious = box_iou(sampled.boxes[0], gt)[:, 0]
    assert torch.all((ious >= 0.5) == (sampled.labels == 7))
    fg_rows = sampled.labels == 7
    expected = coder.encode(gt.expand(32, 4), sampled.boxes[0][fg_rows])
    torch.testing.assert_close(sampled.regression_targets[fg_rows], expected)
    # an image without GT: everything sampled is background
    empty = loss.subsample([bg], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}])
    assert empty.labels.tolist() == [0] * 128


def test_fast_rcnn_loss_uses_the_gt_class_columns_only():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    loss = FastRCNNLossComputation(coder, batch_size_per_image=4, positive_fraction=0.5)
    gt = torch.tensor([[10.0, 10.0, 49.0, 49.0]])
    proposals = torch.tensor(
        [[10.0, 10.0, 49.0, 49.0], [12.0, 10.0, 51.0, 49.0], [200.0, 200, 240, 240], [300.0, 300, 340, 340]]
    )
    sampled = loss.subsample([proposals], [{"boxes": gt, "labels": torch.tensor([3])}])
    assert sampled.labels.tolist() == [3, 3, 0, 0]
    logits = torch.zeros(4, 31, requires_grad=True)
    deltas = torch.full((4, 124), 7.0)  # garbage everywhere except class 3's columns
    deltas[:, 12:16] = 0.0
    deltas.requires_grad_(True)
    out = loss.loss(logits, deltas, sampled)
    assert out["loss_classifier"].item() == pytest.approx(math.log(31))
    reg = sampled.regression_targets[:2]
    assert torch.equal(reg[0], torch.zeros(4))  # proposal equal to GT
    dx = 10 * (-2.0 / 40)  # centre 2 px to the right of the GT, width 40
    assert reg[1].tolist() == pytest.approx([dx, 0.0, 0.0, 0.0])
    expected = torch.nn.functional.smooth_l1_loss(torch.zeros(2, 4), reg, beta=1.0, reduction="sum") / 4
    assert out["loss_box_reg"].item() == pytest.approx(expected.item())
    sum(out.values()).backward()
    assert deltas.grad[:, :12].abs().sum() == 0 and deltas.grad[:, 16:].abs().sum() == 0


def _logits_for(probs: torch.Tensor) -> torch.Tensor:
    return probs.log()


def test_postprocess_threshold_nms_and_class_specific_boxes():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    post = BoxPostProcessor(coder, score_thresh=0.001, nms_thresh=0.5, detections_per_img=300)
    proposals = torch.tensor([[10.0, 10.0, 49.0, 49.0], [12.0, 10.0, 51.0, 49.0], [100.0, 100, 139, 139]])
    probs = torch.full((3, 31), 1e-6)
    probs[0, 5], probs[1, 5] = 0.9, 0.8  # overlapping (IoU 0.9) same class: NMS keeps the first
    probs[1, 6] = 0.15  # same box, another class: kept
    probs[2, 9] = 0.0011  # just above the 0.001 threshold
    probs[2, 10] = 0.0009  # just below
    probs[:, 0] = 0
    probs[:, 0] = 1 - probs.sum(1)  # background takes the rest
    deltas = torch.zeros(3, 124)
    deltas[2, 4 * 9] = 10.0  # class 9 of proposal 2 moves right by one width (dx = 10 / wx = 1)
    deltas[2, 4 * 10] = -10.0
    det = post(_logits_for(probs), deltas, [proposals], [(120, 160)])[0]
    pairs = sorted(zip(det.labels.tolist(), det.scores.tolist()))
    assert [p[0] for p in pairs] == [5, 6, 9]
    assert det.labels.tolist() == [5, 6, 9]  # class-major order as the authors concatenate
    assert det.scores[0].item() == pytest.approx(probs[0, 5].item(), rel=1e-5)
    # class 9's box used class 9's deltas, then was clipped to the 160-wide image
    assert det.boxes[2].tolist() == pytest.approx([140.0, 100.0, 159.0, 119.0])


def test_postprocess_keeps_top_300_over_classes():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    post = BoxPostProcessor(coder, detections_per_img=300)
    # 400 disjoint boxes, one class each cycling over 1..30: nothing is suppressed
    xy = torch.stack(torch.meshgrid(torch.arange(20.0), torch.arange(20.0), indexing="ij"), -1).reshape(-1, 2) * 20
    proposals = torch.cat([xy, xy + 9], 1)
    probs = torch.full((400, 31), 1e-4)
    scores = torch.linspace(0.2, 0.9, 400)
    probs[torch.arange(400), 1 + torch.arange(400) % 30] = scores
    probs[:, 0] = 0
    probs[:, 0] = 1 - probs.sum(1)
    det = post(probs.log(), torch.zeros(400, 124), [proposals], [(400, 400)])[0]
    assert len(det) == 300
    assert det.scores.min().item() == pytest.approx(scores[100].item(), rel=1e-5)
    # ties at the kth value are all kept, as the authors' kthvalue threshold does
    probs[:, 1:] = 1e-4
    probs[:, 4] = 0.5  # identical rows give bit-identical scores (disjoint boxes: no suppression)
    probs[:, 0] = 0
    probs[:, 0] = 1 - probs.sum(1)
    det = post(probs.log(), torch.zeros(400, 124), [proposals], [(400, 400)])[0]
    assert len(det) == 400


def _postprocess_by_the_rule(post, logits, regression, proposals, size):
    """The box postprocess written out: per class ascending, entries above the threshold in (-score, row)
    order, greedy +1 NMS at IoU > t, then every detection at or above the D-th largest score."""
    probs = torch.softmax(logits.float(), -1)
    boxes = post.box_coder.decode(regression, proposals)
    h, w = size
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h - 1)
    out = []
    for c in range(1, probs.shape[1]):
        rows = sorted((r for r in range(len(probs)) if probs[r, c] > post.score_thresh),
                      key=lambda r: (-float(probs[r, c]), r))
        kept = []
        for r in rows:
            box = boxes[r, 4 * c : 4 * c + 4]
            if all(box_iou(box[None], boxes[k, 4 * c : 4 * c + 4][None]).item() <= post.nms_thresh for k in kept):
                kept.append(r)
        out += [(c, r) for r in kept]
    scores = [float(probs[r, c]) for c, r in out]
    if 0 < post.detections_per_img < len(out):
        cut = sorted(scores, reverse=True)[post.detections_per_img - 1]
        out = [e for e, s in zip(out, scores) if s >= cut]
    labels = torch.tensor([c for c, _ in out], dtype=torch.int64)
    rows = torch.tensor([r for _, r in out], dtype=torch.int64)
    det_boxes = torch.stack([boxes[r, 4 * c : 4 * c + 4] for c, r in out]) if out else torch.zeros(0, 4)
    det_scores = torch.stack([probs[r, c] for c, r in out]) if out else torch.zeros(0)
    return det_boxes, det_scores, labels, rows


@pytest.mark.parametrize("limit", [300, 25, 1, 0])
def test_image_detections_equal_the_rule_with_ties_and_tensor_settings(limit):
    """One function serves PyTorch and the ONNX graphs: it equals the rule written out (ties: the lower
    proposal row first, docs/conventions.md#ties), bit for bit, with its values as numbers or 0-d tensors."""
    g = torch.Generator().manual_seed(4)
    post = BoxPostProcessor(BoxCoder((10.0, 10.0, 5.0, 5.0)), score_thresh=0.05, nms_thresh=0.5,
                            detections_per_img=limit)
    n, classes = 80, 5
    logits = torch.randn(4, classes, generator=g)[torch.randint(0, 4, (n,), generator=g)]  # tied rows
    regression = torch.randint(-1, 2, (n, 4 * classes), generator=g).float() / 10
    xy = torch.randint(0, 60, (n, 2), generator=g).float()
    proposals = torch.cat([xy, xy + torch.randint(8, 30, (n, 2), generator=g).float()], 1)
    size = (80, 100)
    expected = _postprocess_by_the_rule(post, logits, regression, proposals, size)
    assert len(expected[2]) >= (limit if 0 < limit < 300 else 100)  # a cut, or none of 100+
    (det,), (rows,) = post(logits, regression, [proposals], [size], return_indices=True)
    as_numbers = post.image_detections(logits, regression, proposals, size)
    as_tensors = post.image_detections(logits, regression, proposals, torch.tensor(size), torch.tensor(0.05),
                                       torch.tensor(0.5), torch.tensor(limit))
    for got in ((det.boxes, det.scores, det.labels, rows), as_numbers, as_tensors):
        for a, b in zip(got, expected, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
