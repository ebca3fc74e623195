"""YOLOX's SimOTA assignment and losses and YOLOV's refined-class loss (megavod/models/yolox_losses.py):
hand-computed cases; equality with the authors' own ``get_losses`` on the case that
``tests/data/reference/make_yolox_loss_vectors.py`` wrote (``yolox_losses.npz``) and with their whole YOLOV
head's training forward (``yolox_losses_yolov_head.npz``); YOLOV's training data (frames of one video with
their ground truth) and the training forward on megavod samples (what trains, what is frozen).

Error budget of the reference comparison (u = 2**-24, tests/error_budget.py): every loss is a sum of n
non-negative terms, each from its operands in at most ~16 roundings (sigmoid/log1p/exp, the IoU's
corners and areas; torchvision's IoU areas from corners, theirs from w x h, differ in the last bits),
summed in some order: |error| <= u (n + 16) (sum of the terms + sum of the operands' magnitudes), twice
for two float32 implementations, divided by the number of foregrounds as the loss is. Gradients: each
element is a chain of ~32 roundings of values bounded by the largest gradient times the largest decode
scale (the stride, up to 32, and the box size it multiplies): 2 x 32 u x 32 x max|grad|. The discrete
decisions (dynamic k's floor, the k-th cheapest cost, the 0.6 IoU threshold) are at least 1e-3 away
from their thresholds in the stored case (the script checks it), far beyond these errors, so the
assignment itself must be equal.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.ops import box_convert

from megavod.data.sampling import VideoFramesSampler
from megavod.models.yolox import anchor_grid, decode_boxes
from megavod.models.yolox_losses import (
    anchor_centers,
    assign_batch,
    center_candidates,
    dynamic_k_matching,
    gt_cxcywh,
    iou_loss,
    l1_target,
    refined_class_targets,
    simota_assign,
    yolov_losses,
    yolox_losses,
)
from tests.error_budget import U
from tests.reference_data import REFERENCE

NUM_CLASSES = 3


def grid_64() -> tuple[torch.Tensor, torch.Tensor]:
    """(grids [84, 2], strides [84]) of a 64 x 64 input: levels 8 x 8, 4 x 4, 2 x 2."""
    return anchor_grid([(8, 8), (4, 4), (2, 2)], (8, 16, 32), torch.float32, torch.device("cpu"))


def test_anchor_centers_and_l1_target():
    grids, strides = grid_64()
    # Level by level, row-major: anchor 9 is row 1, column 1 of stride 8; 70 is row 1, column 2 of stride 16.
    cx, cy = anchor_centers(grids, strides)
    assert (cx[9].item(), cy[9].item(), cx[70].item(), cy[70].item(), cx[83].item()) == (12.0, 12.0, 40.0, 24.0, 48.0)
    raw = torch.zeros(84, 4)
    raw[83] = torch.tensor([0.5, -0.25, math.log(2.0), 0.0])
    boxes = decode_boxes(raw, grids, strides)
    assert torch.allclose(boxes[83], torch.tensor([48.0, 24.0, 64.0, 32.0]))
    # l1_target inverts the decode.
    assert torch.allclose(l1_target(boxes[83:], grids[83:], strides[83:]), raw[83:], atol=1e-6)


def test_center_candidates_by_hand():
    """One box (16, 16, 48, 48): stride-8 centres 20..44 are inside it and inside its 2.5-stride centre
    region (12, 52) exclusive: 4 x 4; stride 16: centres 24, 40 inside the box (2 x 2), all 16 in the
    region (radius 40); stride 32: centres 16 and 48 lie on the box's edges (not strictly inside), all 4
    in the region. Candidates 16 + 16 + 4 = 36, inside both 16 + 4 + 0."""
    grids, strides = grid_64()
    gt = gt_cxcywh(torch.tensor([[16.0, 16.0, 48.0, 48.0]]))
    candidates, both = center_candidates(gt, grids, strides, 2.5)
    assert int(candidates[:64].sum()) == 16 and int(candidates[64:80].sum()) == 16 and int(candidates[80:].sum()) == 4
    stride8 = candidates[:64].reshape(8, 8)
    assert stride8[2:6, 2:6].all() and int(stride8.sum()) == 16
    assert both.shape == (1, 36)
    index = candidates.nonzero()[:, 0]
    assert int(both[0, index < 64].sum()) == 16 and int(both[0, (index >= 64) & (index < 80)].sum()) == 4
    assert int(both[0, index >= 80].sum()) == 0
    # YOLOV's radius 4.5 reaches every stride-8 centre within 36 px: 4..60 of (32 - 36, 32 + 36) -> all 64.
    candidates, _ = center_candidates(gt, grids, strides, 4.5)
    assert int(candidates.sum()) == 84


def hand_case():
    """The box (16, 16, 48, 48) of class 1; every anchor predicts a tiny far box (IoU 0) except:
    anchors 27 (stride 8, row 3, col 3) and 36 (row 4, col 4) predict the box exactly (IoU 1); anchor 80
    (stride 32, a candidate outside the box) predicts it exactly too; anchor 18 (row 2, col 2) predicts
    its upper half (IoU 0.5). All logits 0."""
    grids, strides = grid_64()
    outputs = torch.zeros(1, 84, 5 + NUM_CLASSES)
    outputs[0, :, :4] = torch.tensor([2.0, 2.0, 1.0, 1.0])
    for a in (27, 36, 80):
        outputs[0, a, :4] = torch.tensor([32.0, 32.0, 32.0, 32.0])
    outputs[0, 18, :4] = torch.tensor([32.0, 24.0, 32.0, 16.0])
    return grids, strides, outputs, [torch.tensor([[16.0, 16.0, 48.0, 48.0]])], [torch.tensor([1])]


def test_simota_by_hand():
    """k = floor(1 + 1 + 1 + 0.5) = 3 (the out-of-centre anchor 80 counts in k); the 100000 penalty keeps
    80 out, so the three cheapest are 27, 36 (IoU cost 3 x -log(1 + 1e-8) ~ 0) and 18 (3 ln 2)."""
    grids, strides, outputs, boxes, labels = hand_case()
    out = outputs[0]
    a = simota_assign(gt_cxcywh(boxes[0]), labels[0], out[:, :4], out[:, 4], out[:, 5:], grids, strides, 2.5)
    assert a.fg_mask.nonzero()[:, 0].tolist() == [18, 27, 36]
    assert a.matched_gt.tolist() == [0, 0, 0]
    assert a.matched_iou.tolist() == [0.5, 1.0, 1.0]


def test_yolox_losses_by_hand():
    """num_fg 3; IoU loss 5 x (0.75 + 0 + 0) / 3; every logit 0 gives BCE ln 2 whatever the target: class
    3 fg x 3 classes x ln 2 / 3, objectness 84 x ln 2 / 3; the L1 loss is off (zero) without raw outputs."""
    grids, strides, outputs, boxes, labels = hand_case()
    losses = yolox_losses(outputs, grids, strides, boxes, labels)
    assert losses.num_fg == 3 and losses.num_gt == 1
    assert losses.iou.item() == pytest.approx(5 * 0.75 / 3, rel=1e-6)
    assert losses.cls.item() == pytest.approx(3 * math.log(2), rel=1e-6)
    assert losses.obj.item() == pytest.approx(84 * math.log(2) / 3, rel=1e-6)
    assert losses.l1.item() == 0.0 and losses.refined is None
    terms = losses.terms()
    assert set(terms) == {"loss_iou", "loss_obj", "loss_cls", "loss_l1"}
    assert losses.total.item() == pytest.approx(sum(v.item() for v in terms.values()))


def test_no_ground_truth_is_all_background():
    grids, strides, outputs, _, _ = hand_case()
    losses = yolox_losses(outputs, grids, strides, [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)])
    assert losses.num_fg == 0 and losses.iou.item() == 0.0 and losses.cls.item() == 0.0
    assert losses.obj.item() == pytest.approx(84 * math.log(2), rel=1e-6)  # divided by max(num_fg, 1)


def test_dynamic_k_conflicts_go_to_the_cheapest_box_of_all():
    """Boxes 0 and 1 take k = int(2.1) = 2 anchors each, both anchors 0 and 1; box 2 takes k = 1, its
    cheapest, anchor 2. Anchor 0 goes to the box of least cost over *all* boxes, box 2 (0.5), which had
    not chosen it (the authors' ``cost[:, shared].min(0)``); anchor 1 to box 1 (1.5 < 2 < 9)."""
    cost = torch.tensor([[1.0, 2.0, 5.0, 7.0], [3.0, 1.5, 4.0, 7.0], [0.5, 9.0, 0.1, 7.0]])
    ious = torch.tensor([[0.9, 0.9, 0.3, 0.0], [0.6, 0.9, 0.6, 0.0], [0.5, 0.0, 0.6, 0.0]])
    assert dynamic_k_matching(cost, ious).tolist() == [2, 1, 2, -1]


def test_iou_loss_by_hand():
    pred = torch.tensor([[10.0, 10.0, 4.0, 4.0], [10.0, 10.0, 4.0, 4.0], [0.0, 0.0, 2.0, 2.0]])
    target = torch.tensor([[10.0, 10.0, 4.0, 4.0], [12.0, 10.0, 4.0, 4.0], [10.0, 10.0, 2.0, 2.0]])
    # identical: 0; half overlap: IoU 8 / 24 = 1/3 -> 1 - 1/9; disjoint: 1.
    assert iou_loss(pred, target).tolist() == pytest.approx([0.0, 1 - 1 / 9, 1.0])


def test_refined_targets_by_hand():
    """Proposals: anchor 27 (a foreground of IoU 1: its base target), anchor 5 (not foreground, IoU 0.64
    with the box: one-hot x 0.64), anchor 6 (IoU 0.36 < 0.6: left out)."""
    grids, strides, outputs, boxes, labels = hand_case()
    out = outputs[0]
    gt = gt_cxcywh(boxes[0])
    a = simota_assign(gt, labels[0], out[:, :4], out[:, 4], out[:, 5:], grids, strides, 4.5)
    proposals = torch.tensor([27, 5, 6])
    props = torch.tensor([[16.0, 16.0, 48.0, 48.0], [16.0, 16.0, 48.0, 36.48], [16.0, 16.0, 48.0, 27.52]])
    targets, keep = refined_class_targets(a, gt, labels[0], proposals, props, NUM_CLASSES)
    assert keep.tolist() == [True, True, False]
    assert targets[0].tolist() == [0.0, 1.0, 0.0]
    assert targets[1].tolist() == pytest.approx([0.0, 0.64, 0.0], abs=1e-6)
    assert targets[2].tolist() == [0.0, 0.0, 0.0]


# -- equality with the authors' get_losses --------------------------------------------------------------


@pytest.fixture(scope="module")
def ref():
    with np.load(REFERENCE / "yolox_losses.npz") as data:
        return {k: torch.from_numpy(data[k]) for k in data.files}


def reference_inputs(ref, requires_grad: bool = True):
    grids, strides = anchor_grid([tuple(s) for s in ref["feature_sizes"].tolist()], tuple(ref["strides"].tolist()),
                                 torch.float32, torch.device("cpu"))
    raw = ref["raw"].clone().requires_grad_(requires_grad)
    outputs = torch.cat([decode_boxes(raw[..., :4], grids, strides), raw[..., 4:]], dim=-1)
    counts = ref["gt_count"].tolist()
    boxes = [ref["gt_boxes"][b, :n] for b, n in enumerate(counts)]
    labels = [ref["gt_labels"][b, :n] for b, n in enumerate(counts)]
    return grids, strides, raw, outputs, boxes, labels


def loss_budget(n_terms: int, terms_sum: float, operands_sum: float, num_fg: int) -> float:
    """Two float32 implementations of a sum of n non-negative terms, each ~16 roundings from its operands."""
    return 2 * U * (n_terms + 16) * (terms_sum + operands_sum) / num_fg


def grad_budget(grad: torch.Tensor) -> float:
    return 2 * 32 * U * 32 * float(grad.abs().max())


def check_assignment(ref, prefix, grids, strides, outputs, boxes, labels, radius):
    assignments, _ = assign_batch(outputs.detach(), grids, strides, boxes, labels, radius)
    assert torch.equal(torch.stack([a.fg_mask for a in assignments]), ref[f"{prefix}_fg_mask"])
    assert torch.equal(torch.cat([a.matched_gt for a in assignments]), ref[f"{prefix}_matched_gt"])
    iou = torch.cat([a.matched_iou for a in assignments])
    # IoU in [0, 1] from ~8 roundings on each side.
    assert torch.allclose(iou, ref[f"{prefix}_matched_iou"], rtol=0, atol=2 * 8 * U)
    return assignments


def check_losses(ref, prefix, losses, outputs, num_anchors):
    num_fg, fg = losses.num_fg, int(ref[f"{prefix}_fg_mask"].sum())
    assert num_fg == fg
    logits = outputs.detach()
    size = float(outputs.detach()[..., :4].abs().sum())  # the IoU's operands
    expected = {
        "loss_iou": (num_fg, size),
        "loss_obj": (logits.shape[0] * num_anchors, float(logits[..., 4].abs().sum()) + logits.shape[0] * num_anchors),
        "loss_cls": (num_fg * NUM_CLASSES, float(logits[..., 5:].abs().sum())),
        "loss_l1": (num_fg * 4, float(ref["raw"][..., :4].abs().sum()) + size),
    }
    if losses.refined is not None:
        expected["loss_refined"] = (ref["yolov_refined_logits"].numel(), float(ref["yolov_refined_logits"].abs().sum()))
    got = losses.terms()
    assert set(got) == set(expected)
    for name, (n, operands) in expected.items():
        want = float(ref[f"{prefix}_{name}"])
        budget = loss_budget(n, want * num_fg, operands, num_fg)
        assert abs(got[name].item() - want) <= budget, (name, got[name].item(), want, budget)
    total = float(ref[f"{prefix}_loss_total"])
    budget = sum(loss_budget(n, float(ref[f"{prefix}_{k}"]) * num_fg, o, num_fg) for k, (n, o) in expected.items())
    assert abs(losses.total.item() - total) <= budget


def test_yolox_losses_equal_the_authors(ref):
    grids, strides, raw, outputs, boxes, labels = reference_inputs(ref)
    check_assignment(ref, "yolox", grids, strides, outputs, boxes, labels, 2.5)
    losses = yolox_losses(outputs, grids, strides, boxes, labels, raw[..., :4])
    check_losses(ref, "yolox", losses, outputs, raw.shape[1])
    losses.total.backward()
    want = ref["yolox_grad_raw"]
    assert (raw.grad - want).abs().max().item() <= grad_budget(want)
    # Without raw outputs the L1 loss is off: the total drops by exactly that term.
    off = yolox_losses(outputs.detach(), grids, strides, boxes, labels)
    assert off.l1.item() == 0.0
    assert off.total.item() == pytest.approx(float(ref["yolox_loss_total"]) - float(ref["yolox_loss_l1"]), rel=1e-5)


def test_yolov_losses_equal_the_authors(ref):
    grids, strides, raw, outputs, boxes, labels = reference_inputs(ref)
    assignments = check_assignment(ref, "yolov", grids, strides, outputs, boxes, labels, 4.5)
    proposals = list(ref["yolov_proposals"])
    refined = ref["yolov_refined_logits"].clone().requires_grad_(True)
    # The case exercises every branch of the refined targets: foreground proposals, others of IoU >= 0.6,
    # the rest left out.
    kinds = {"fg": 0, "near": 0, "out": 0}
    for b, (a, idx) in enumerate(zip(assignments, proposals)):
        is_fg = a.fg_mask[idx]
        if a.num_fg == 0:
            kinds["out"] += len(idx)
            continue
        _, keep = refined_class_targets(a, gt_cxcywh(boxes[b]), labels[b], idx,
                                        box_convert(outputs[b, idx, :4].detach(), "cxcywh", "xyxy"), NUM_CLASSES)
        kinds["fg"] += int(is_fg.sum())
        kinds["near"] += int((keep & ~is_fg).sum())
        kinds["out"] += int((~keep).sum())
    assert min(kinds.values()) > 0, kinds
    losses = yolov_losses(outputs, grids, strides, boxes, labels, list(refined), proposals, raw[..., :4])
    check_losses(ref, "yolov", losses, outputs, raw.shape[1])
    losses.total.backward()
    for name, grad in (("raw", raw.grad), ("refined", refined.grad)):
        want = ref[f"yolov_grad_{name}"]
        assert (grad - want).abs().max().item() <= grad_budget(want), name


# -- the whole YOLOV head in training, against the authors' yolovp_msa.py::YOLOXHead.forward ---------------

HEAD_WIDTH = 0.0625  # make_yolox_loss_vectors.py: 16 channels, 4 heads


@pytest.fixture(scope="module")
def head_ref():
    with np.load(REFERENCE / "yolox_losses_yolov_head.npz") as data:
        return {k: torch.from_numpy(data[k]) for k in data.files}


def authors_yolov_head(head_ref) -> torch.nn.Module:
    """megavod's YOLOX head with the video branch, YOLOV's aggregation and ``linear_pred``, holding the
    authors' head's weights (their keys, loaded strictly)."""
    from megavod.models.yolov_head import YOLOVAggregation
    from megavod.models.yolox import YOLOXHead

    head = YOLOXHead(NUM_CLASSES, HEAD_WIDTH, video_branch=True)
    width = head.width
    head.trans = YOLOVAggregation(width, heads=4, scale=25.0, sim_thresh=0.75, affinity="2022")
    head.linear_pred = torch.nn.Linear(4 * width, NUM_CLASSES + 1)
    head.load_state_dict({k[len("state."):]: v for k, v in head_ref.items() if k.startswith("state.")}, strict=True)
    for m in head.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.eps == 1e-3  # their init_yolo, as the script set
    return head.train()


def test_yolov_head_training_equals_the_authors(head_ref):
    """yolov_head_losses (the YOLOX head, the selection without gradient, the aggregation with the proposals'
    scores carrying gradient, linear_pred, the losses) against their head's training forward: the same
    proposals, foregrounds and losses, and the gradients of every part YOLOV trains.

    Budget: the head's convolutions (reductions 16, 16 x 9 twice, the predictions' 16) and the
    aggregation (qkv 16, the heads' 4, the 30 rows' attention, linear1 32, linear2 64, linear_pred 64)
    ahead of the losses; unit-scale activations (BatchNorm in training mode), errors relative to the
    largest value, both sides: chain_budget with a margin of 4 for the losses' own sums and the
    gradients' backward chains (the same reductions again)."""
    from megavod.models.yolox_losses import yolov_head_losses
    from tests.error_budget import chain_budget

    head = authors_yolov_head(head_ref)
    features = [head_ref[f"xin{k}"] for k in range(3)]
    counts = head_ref["gt_count"].tolist()
    targets = [{"boxes": head_ref["gt_boxes"][b, :n], "labels": head_ref["gt_labels"][b, :n] + 1}
               for b, n in enumerate(counts)]
    seen = {}
    from megavod.models import yolox_losses as module

    select = module.select_proposals

    def recording(*args, **kwargs):
        out = select(*args, **kwargs)
        seen.setdefault("proposals", []).append(out)
        return out

    module.select_proposals = recording
    try:
        losses = yolov_head_losses(head, features, targets, pre_top=40, pre_nms_thresh=0.75, num_proposals=10,
                                   use_l1=True)
    finally:
        module.select_proposals = select
    assert torch.equal(torch.stack(seen["proposals"]), head_ref["proposals"])
    assert losses.num_fg == int(head_ref["fg_mask"].sum())
    assert losses.refined.item() > 0  # the case selects foreground proposals
    lengths = (16, 144, 144, 16, 16, 4, 30, 32, 64, 64)
    for name, value in losses.terms().items():
        want = float(head_ref[name])
        budget = chain_budget(lengths, magnitude=max(1.0, abs(want)), sides=2, margin=4)
        assert abs(value.item() - want) <= budget, (name, value.item(), want, budget)
    losses.total.backward()
    params = dict(head.named_parameters())
    for key, want in head_ref.items():
        if not key.startswith("grad."):
            continue
        got = params[key[len("grad."):]].grad
        budget = chain_budget(lengths * 2, magnitude=float(want.abs().max()), sides=2, margin=4)
        assert (got - want).abs().max().item() <= budget, (key, (got - want).abs().max().item(), budget)


# -- YOLOV's training data: frames of one video, each with its ground truth ----------------------------------


@pytest.fixture(scope="module")
def vid_root(tmp_path_factory):
    from megavod.data.convert_dataset import vid_layout_to_coco
    from megavod.data.synthetic import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("vid")
    generate_synthetic_dataset(root, num_train_videos=2, num_val_videos=0, frames=(20, 24), size=64,
                               num_det_images=2)
    assert vid_layout_to_coco(root, "VID_train_15frames", root / "train.json").skipped_boxes == 0
    return root


def test_video_frames_sampler():
    sampler = VideoFramesSampler(15)
    assert sampler.counts() == {"frames": 15} and VideoFramesSampler.with_targets
    for seed in range(20):
        frames = sampler.sample(7, 40, np.random.default_rng(seed))["frames"]
        assert len(frames) == 15 == len(set(frames)) and 7 not in frames and all(0 <= f < 40 for f in frames)
    # A video shorter than the batch repeats frames (the authors skip it); one frame long: the key itself.
    short = sampler.sample(2, 5, np.random.default_rng(0))["frames"]
    assert len(short) == 15 and set(short) <= {0, 1, 3, 4}
    assert sampler.sample(0, 1, np.random.default_rng(0))["frames"] == [0] * 15


@pytest.mark.parametrize("source", ["folder", "coco"])
def test_references_bring_their_ground_truth(vid_root, source):
    from megavod.data.sampling import MEGASampler, VideoFramesSampler
    from megavod.data.transforms import LetterboxTransform, letterbox_ratio
    from megavod.data.vid_dataset import VIDTrainDataset
    from megavod.data.vid_xml import read_annotation
    from megavod.train.distributed import SampleKey

    root = vid_root if source == "folder" else vid_root / "train.json"
    ds = VIDTrainDataset(root, ("DET_train_30classes", "VID_train_15frames") if source == "folder" else (),
                         LetterboxTransform(64, flip_prob=0.5), VideoFramesSampler(5),
                         image_root=vid_root / "Data" / "VID" if source == "coco" else None)
    flips = set()
    for i, rec in enumerate(ds.records):
        s = ds[SampleKey(i, 11 + i)]
        flips.add(s.flipped)
        assert len(s.refs["frames"]) == len(s.ref_targets["frames"]) == 5
        if not rec.is_video:  # a still image: copies of the image, and of its ground truth
            assert all(t is s.target for t in s.ref_targets["frames"])
            continue
        r = letterbox_ratio(rec.height, rec.width, 64)
        for f, target in zip(s.ref_frames["frames"], s.ref_targets["frames"]):
            ann = read_annotation(vid_root / "Annotations" / "VID" / rec.video / f"{f:06d}.xml", rec.video, f)
            boxes = ann.boxes.float().clone()
            if s.flipped:
                boxes[:, [0, 2]] = rec.width - boxes[:, [2, 0]]
            keep = (ann.boxes[:, 2] > ann.boxes[:, 0]) & (ann.boxes[:, 3] > ann.boxes[:, 1])
            assert torch.equal(target["boxes"], boxes[keep] * r) and torch.equal(target["labels"], ann.labels[keep])
        moved = s.to("cpu")
        assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(moved.ref_targets["frames"],
                                                                         s.ref_targets["frames"]))
    assert flips == {True, False}
    # A sampler without with_targets: no reference ground truth, as before.
    plain = VIDTrainDataset(root, ("VID_train_15frames",) if source == "folder" else (), LetterboxTransform(64),
                            MEGASampler(T_l=5, T_m=5), image_root=vid_root / "Data" / "VID" if source == "coco" else None)
    assert plain[0].ref_targets == {}


# -- the training forward on megavod samples -------------------------------------------------------------------


def test_pad_letterboxed_pads_with_114():
    from megavod.models.yolox_losses import pad_letterboxed

    a, b = torch.zeros(3, 64, 32), torch.ones(3, 32, 64)
    batch = pad_letterboxed([a, b])
    assert batch.shape == (2, 3, 64, 64)
    assert (batch[0, :, :, 32:] == 114).all() and (batch[0, :, :, :32] == 0).all()
    assert (batch[1, :, 32:] == 114).all() and (batch[1, :, :32] == 1).all()
    assert torch.equal(pad_letterboxed([a, a]), torch.stack([a, a]))


def test_loss_targets_drop_boxes_of_one_pixel_and_shift_labels():
    from megavod.models.yolox_losses import loss_targets

    boxes, labels = loss_targets({"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 6.0, 20.0],
                                                         [1.0, 1.0, 3.5, 2.5]]), "labels": torch.tensor([3, 4, 30])})
    assert boxes.tolist() == [[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 3.5, 2.5]] and labels.tolist() == [2, 29]


def tiny_config(method: str):
    from megavod.config import load_config

    preset = {"yolox": "yolox_s_vid", "yolov": "yolov_s"}[method]
    return load_config(preset, [f"{method}.width=0.0625", "input.letterbox=64"])


def video_samples(vid_root, frames: int, count: int):
    from megavod.data.sampling import VideoFramesSampler
    from megavod.data.transforms import LetterboxTransform
    from megavod.data.vid_dataset import VIDTrainDataset
    from megavod.train.distributed import SampleKey

    ds = VIDTrainDataset(vid_root, ("VID_train_15frames",), LetterboxTransform(64, flip_prob=0.5),
                         VideoFramesSampler(frames))
    return [ds[SampleKey(i, 3 + i)] for i in range(count)]


def test_yolov_training_losses_train_what_the_authors_train(vid_root):
    """The authors' YOLOV get_model freezes the backbone, stems, cls_convs, reg_convs and reg_preds: no
    gradient reaches them, every other part gets one (cls_convs2 and linear_pred through the refined loss
    alone); the frozen parts' BatchNorm still updates its running statistics (their fix_bn is commented
    out). Two samples give the mean of each alone."""
    from megavod.models.yolov import build_yolov_detector
    from megavod.models.yolox_losses import (YOLOV_FROZEN_HEAD, freeze_yolov_base, video_batch, yolov_sample_losses,
                                             yolov_training_losses)

    torch.manual_seed(0)
    detector = build_yolov_detector(tiny_config("yolov"))
    freeze_yolov_base(detector)
    detector.train()
    samples = video_samples(vid_root, 5, 2)
    bn = detector.backbone.backbone.stem.conv.bn
    before = bn.running_mean.clone()
    losses = yolov_training_losses(detector, samples[:1])
    assert set(losses) == {"loss_iou", "loss_obj", "loss_cls", "loss_l1", "loss_refined"}
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_refined"].item() > 0
    assert not torch.equal(bn.running_mean, before)
    sum(losses.values()).backward()
    for name, p in detector.named_parameters():
        frozen = name.startswith("backbone.") or name.split(".")[1] in YOLOV_FROZEN_HEAD
        assert (p.grad is None) == frozen, name
        if not frozen:
            assert p.grad.abs().sum() > 0, name
    with torch.no_grad():
        pair = yolov_training_losses(detector, samples)
        alone = [yolov_sample_losses(detector, *video_batch(s)).terms() for s in samples]
    for name, value in pair.items():
        assert value.item() == pytest.approx((alone[0][name].item() + alone[1][name].item()) / 2, rel=1e-5, abs=1e-6)


def test_yolox_training_losses_on_letterboxed_keys(vid_root):
    """A batch of key frames through the YOLOX network and the losses (normalised by the batch's
    foregrounds), the L1 loss only when asked; every parameter gets a gradient."""
    from megavod.models.yolov import build_yolox_detector
    from megavod.models.yolox_losses import decoded_outputs, loss_targets, pad_letterboxed, yolox_training_losses

    torch.manual_seed(0)
    detector = build_yolox_detector(tiny_config("yolox")).train()
    samples = video_samples(vid_root, 0, 3)
    losses = yolox_training_losses(detector, samples, use_l1=True)
    assert set(losses) == {"loss_iou", "loss_obj", "loss_cls", "loss_l1"} and losses["loss_l1"].item() > 0
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in detector.parameters())
    with torch.no_grad():
        off = yolox_training_losses(detector, samples)
        raw = detector.head.raw_outputs(detector.backbone(pad_letterboxed([s.image for s in samples])))
        boxes, labels = zip(*(loss_targets(s.target) for s in samples))
        direct = yolox_losses(decoded_outputs(raw), raw.grids, raw.strides, boxes, labels)
    assert off["loss_l1"].item() == 0.0
    assert {k: v.item() for k, v in off.items()} == {k: v.item() for k, v in direct.terms().items()}
