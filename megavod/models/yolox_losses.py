"""YOLOX's SimOTA assignment and losses, and YOLOV's refined-class loss, as the authors' code computes them.

The reference is the 2022 YOLOV code (commit 28ff8b0) the released YOLOX-VID and YOLOV weights were
trained with: ``yolox/models/yolo_head.py::YOLOXHead`` (``get_losses``, ``get_assignments``,
``get_in_boxes_info``, ``dynamic_k_matching``, ``get_l1_target``), ``yolox/models/losses.py::IOUloss``
and, for YOLOV, ``yolox/models/yolovp_msa.py::YOLOXHead.get_losses`` (with ``refined_cls`` and ``idx``).

What a training step hands in, per batch of B images of one size with A anchors:

* ``outputs`` [B, A, 5 + C]: the head's training output as ``get_output_and_grid`` leaves it: box
  centre and size in input pixels (``(t_xy + grid) * stride``, ``exp(t_wh) * stride``), then the
  objectness logit and the C class logits. Anchors in the authors' order (levels 8, 16, 32, row-major).
* ``grids`` [A, 2] each anchor's grid cell (x, y) and ``strides`` [A] its level's stride (the authors'
  ``x_shifts``, ``y_shifts``, ``expanded_strides``; :class:`megavod.models.yolox.HeadOutputs` holds them).
* per image, the ground truth: boxes ``x1y1x2y2`` in input pixels and labels ``0..C-1``.
* ``raw_regression`` [B, A, 4] (the undecoded ``t``), only when the L1 loss is on (the authors switch
  it on for the last ``no_aug_epochs`` epochs: ``use_l1``).

The assignment (SimOTA, per image, without gradient): candidates are the anchors whose centre lies
strictly inside a ground-truth box or within ``center_radius`` strides of its centre (2.5 in YOLOX,
4.5 in YOLOV's head); cost = BCE(sqrt(sigmoid(cls) x sigmoid(obj)), one-hot) + 3 x (-log(IoU + 1e-8))
+ 100000 x [not inside the box and the centre region]; each ground truth takes its ``k`` cheapest
candidates, ``k = max(1, floor(sum of its 10 largest IoUs))``; an anchor taken twice goes to the ground
truth of least cost. Losses, summed over the batch and divided by its number of foreground anchors
(at least 1): IoU loss ``1 - IoU^2`` on the foregrounds (weight 5 in YOLOX, 3 in YOLOV), objectness BCE
on every anchor, class BCE on the foregrounds against one-hot x the matched IoU, and the L1 loss on
the undecoded regression when on. YOLOV adds 2 x the refined-class BCE over its selected proposals
(:func:`refined_class_targets`).

Departures, none of which changes a value: the authors' fallback that repeats an out-of-memory
assignment on the CPU is not needed; the losses are computed in float32 whatever the autocast (the
authors' assignment is float32 too); an image whose ground truths have no candidate anchor at all
(their code raises there; with a box inside the image it cannot happen) gets no foreground; IoUs come
from ``torchvision.ops.box_iou`` (the authors' formula on corners: the areas differ in the last bit).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, box_iou

from megavod.models.yolov_head import select_proposals
from megavod.models.yolox import cxcywh_to_xyxy

YOLOX_CENTER_RADIUS = 2.5  # yolo_head.py::get_in_boxes_info
YOLOV_CENTER_RADIUS = 4.5  # yolovp_msa.py::get_in_boxes_info
YOLOX_REG_WEIGHT = 5.0  # yolo_head.py::get_losses
YOLOV_REG_WEIGHT = 3.0  # yolovp_msa.py::get_losses
YOLOV_REFINED_WEIGHT = 2.0  # yolovp_msa.py::get_losses: loss = ... + 2 * loss_ref
REFINED_IOU_THRESH = 0.6  # yolovp_msa.py::get_losses: a non-foreground proposal counts from this IoU
IOU_COST_WEIGHT = 3.0
OUT_OF_CENTER_COST = 100000.0
DYNAMIC_K_CANDIDATES = 10


def gt_cxcywh(boxes_xyxy: Tensor) -> Tensor:
    """Ground truth ``x1y1x2y2`` -> centre and size, computed in float64 and rounded once to float32,
    as the authors' data pipeline does (numpy ``xyxy2cxcywh`` on float64, labels stored as float32)."""
    return box_convert(boxes_xyxy.double(), "xyxy", "cxcywh").float()


@dataclass
class Assignment:
    """One image's SimOTA result: ``fg_mask`` [A] (the foreground anchors), and per foreground anchor
    in anchor order its ground truth ``matched_gt`` [F] and the IoU of its box with it ``matched_iou`` [F]."""

    fg_mask: Tensor
    matched_gt: Tensor
    matched_iou: Tensor

    @property
    def num_fg(self) -> int:
        return int(self.matched_gt.shape[0])

    @staticmethod
    def empty(num_anchors: int, device: torch.device) -> "Assignment":
        return Assignment(torch.zeros(num_anchors, dtype=torch.bool, device=device),
                          torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, device=device))


def anchor_centers(grids: Tensor, strides: Tensor) -> tuple[Tensor, Tensor]:
    """Anchor centres (x, y) [A] in input pixels, as ``get_in_boxes_info``: ``x * stride + 0.5 * stride``."""
    return grids[:, 0] * strides + 0.5 * strides, grids[:, 1] * strides + 0.5 * strides


def center_candidates(gt: Tensor, grids: Tensor, strides: Tensor, center_radius: float) -> tuple[Tensor, Tensor]:
    """``get_in_boxes_info``: the candidate anchors [A] (centre strictly inside some ground-truth box
    ``gt`` [G, 4] (cx, cy, w, h), or within ``center_radius`` strides of some box centre), and for the
    candidates [G, K] whether the centre is inside that box *and* its centre region."""
    cx, cy = anchor_centers(grids, strides)
    cx, cy = cx[None], cy[None]
    gcx, gcy, gw, gh = (v[:, None] for v in gt.unbind(-1))
    in_box = ((cx - (gcx - 0.5 * gw)) > 0) & (((gcx + 0.5 * gw) - cx) > 0) \
        & ((cy - (gcy - 0.5 * gh)) > 0) & (((gcy + 0.5 * gh) - cy) > 0)
    reach = center_radius * strides[None]
    in_center = ((cx - (gcx - reach)) > 0) & (((gcx + reach) - cx) > 0) \
        & ((cy - (gcy - reach)) > 0) & (((gcy + reach) - cy) > 0)
    candidates = in_box.any(0) | in_center.any(0)
    return candidates, in_box[:, candidates] & in_center[:, candidates]


def dynamic_k_matching(cost: Tensor, ious: Tensor) -> Tensor:
    """``dynamic_k_matching`` on the candidates' ``cost`` and ``ious`` [G, K] -> the ground truth of
    each candidate [K] (-1: background). Ground truth g takes its ``k_g`` cheapest candidates,
    ``k_g = max(1, int(sum of its min(10, K) largest IoUs))``; a candidate taken by several goes to the
    ground truth of least cost over all of them."""
    num_gt, num_cand = cost.shape
    top_ious = torch.topk(ious, min(DYNAMIC_K_CANDIDATES, num_cand), dim=1).values
    ks = torch.clamp(top_ious.sum(1).int(), min=1)
    picks = torch.topk(cost, int(ks.max()), dim=1, largest=False).indices  # cheapest first
    taken = torch.arange(picks.shape[1], device=cost.device)[None] < ks[:, None]
    matching = torch.zeros_like(cost, dtype=torch.bool)
    matching[torch.arange(num_gt, device=cost.device)[:, None].expand_as(picks)[taken], picks[taken]] = True
    matched = torch.where(matching.any(0), matching.int().argmax(0), -1)
    shared = matching.sum(0) > 1
    if bool(shared.any()):
        matched[shared] = cost[:, shared].argmin(0)
    return matched


@torch.no_grad()
def simota_assign(gt: Tensor, gt_labels: Tensor, boxes: Tensor, obj_logits: Tensor, cls_logits: Tensor,
                  grids: Tensor, strides: Tensor, center_radius: float = YOLOX_CENTER_RADIUS) -> Assignment:
    """``get_assignments`` for one image: ground truth ``gt`` [G, 4] (cx, cy, w, h) with ``gt_labels``
    [G] (0..C-1), predicted ``boxes`` [A, 4] (cx, cy, w, h), ``obj_logits`` [A], ``cls_logits`` [A, C]."""
    candidates, in_box_and_center = center_candidates(gt, grids, strides, center_radius)
    if not bool(candidates.any()):
        return Assignment.empty(boxes.shape[0], boxes.device)
    cand_boxes = boxes[candidates].float()
    ious = box_iou(box_convert(gt, "cxcywh", "xyxy"), box_convert(cand_boxes, "cxcywh", "xyxy"))
    scores = (cls_logits[candidates].float().sigmoid() * obj_logits[candidates, None].float().sigmoid()).sqrt()
    one_hot = F.one_hot(gt_labels.long(), cls_logits.shape[-1]).float()
    num_gt, num_cand = gt.shape[0], cand_boxes.shape[0]
    cls_cost = F.binary_cross_entropy(scores[None].expand(num_gt, -1, -1), one_hot[:, None].expand(-1, num_cand, -1),
                                      reduction="none").sum(-1)
    cost = cls_cost + IOU_COST_WEIGHT * -torch.log(ious + 1e-8) + OUT_OF_CENTER_COST * (~in_box_and_center)
    matched = dynamic_k_matching(cost, ious)
    fg = matched >= 0
    fg_mask = torch.zeros_like(candidates)
    fg_mask[candidates.nonzero()[:, 0][fg]] = True
    matched_gt = matched[fg]
    return Assignment(fg_mask, matched_gt, ious[matched_gt, fg.nonzero()[:, 0]])


def iou_loss(pred: Tensor, target: Tensor) -> Tensor:
    """``losses.py::IOUloss`` (``loss_type="iou"``): ``1 - IoU^2`` of paired boxes [N, 4] (cx, cy, w, h)."""
    tl = torch.max(pred[:, :2] - pred[:, 2:] / 2, target[:, :2] - target[:, 2:] / 2)
    br = torch.min(pred[:, :2] + pred[:, 2:] / 2, target[:, :2] + target[:, 2:] / 2)
    inter = (br - tl).clamp(min=0).prod(1)
    union = pred[:, 2:].prod(1) + target[:, 2:].prod(1) - inter
    return 1 - (inter / (union + 1e-16)) ** 2


def l1_target(gt: Tensor, grids: Tensor, strides: Tensor, eps: float = 1e-8) -> Tensor:
    """``get_l1_target``: the undecoded regression that decodes to ``gt`` [F, 4] (cx, cy, w, h) at the
    anchors of cells ``grids`` [F, 2] and ``strides`` [F]."""
    stride = strides[:, None]
    return torch.cat([gt[:, :2] / stride - grids, torch.log(gt[:, 2:] / stride + eps)], dim=1)


@dataclass
class YOLOXLosses:
    """The batch's losses, each as it enters the authors' total (``iou`` already x the regression weight,
    ``refined`` x 2): ``total`` is their sum. ``refined`` is None for YOLOX. ``num_fg`` / ``num_gt``:
    foreground anchors and ground-truth boxes of the batch."""

    iou: Tensor
    obj: Tensor
    cls: Tensor
    l1: Tensor
    refined: Tensor | None
    num_fg: int
    num_gt: int

    @property
    def total(self) -> Tensor:
        return sum(self.terms().values())

    def terms(self) -> dict[str, Tensor]:
        """The loss dict of ``megavod train`` (it sums the values): ``loss_iou``, ``loss_obj``,
        ``loss_cls``, ``loss_l1`` (zero while off) and, for YOLOV, ``loss_refined``."""
        out = {"loss_iou": self.iou, "loss_obj": self.obj, "loss_cls": self.cls, "loss_l1": self.l1}
        if self.refined is not None:
            out["loss_refined"] = self.refined
        return out


def _check_inputs(outputs: Tensor, grids: Tensor, strides: Tensor, gt_boxes: Sequence[Tensor],
                  gt_labels: Sequence[Tensor]) -> None:
    if outputs.ndim != 3 or outputs.shape[-1] < 6:
        raise ValueError(f"outputs must have shape [B, A, 5 + C], got {tuple(outputs.shape)}")
    if not outputs.shape[1] == grids.shape[0] == strides.shape[0]:
        raise ValueError(f"outputs have {outputs.shape[1]} anchors, grids {grids.shape[0]}, strides {strides.shape[0]}")
    if not len(gt_boxes) == len(gt_labels) == outputs.shape[0]:
        raise ValueError(f"{outputs.shape[0]} images but {len(gt_boxes)} box sets and {len(gt_labels)} label sets")


def assign_batch(outputs: Tensor, grids: Tensor, strides: Tensor, gt_boxes: Sequence[Tensor], gt_labels: Sequence[Tensor],
                 center_radius: float) -> tuple[list[Assignment], list[Tensor]]:
    """SimOTA on every image: the assignments and the ground truths as (cx, cy, w, h)."""
    assignments, gts = [], []
    for image_out, boxes, labels in zip(outputs, gt_boxes, gt_labels):
        gt = gt_cxcywh(boxes.reshape(-1, 4))
        gts.append(gt)
        if gt.shape[0] == 0:
            assignments.append(Assignment.empty(outputs.shape[1], outputs.device))
            continue
        assignments.append(simota_assign(gt, labels, image_out[:, :4].detach(), image_out[:, 4].detach(),
                                         image_out[:, 5:].detach(), grids, strides, center_radius))
    return assignments, gts


def _base_losses(outputs: Tensor, grids: Tensor, strides: Tensor, assignments: Sequence[Assignment], gts: Sequence[Tensor],
                 gt_labels: Sequence[Tensor], raw_regression: Tensor | None, reg_weight: float,
                 num_fg: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The weighted IoU loss, objectness, class and L1 losses of ``get_losses``, divided by ``num_fg``."""
    num_classes = outputs.shape[-1] - 5
    fg_masks = torch.stack([a.fg_mask for a in assignments])
    reg_targets = torch.cat([gt[a.matched_gt] for gt, a in zip(gts, assignments)])
    cls_targets = torch.cat([F.one_hot(labels.long()[a.matched_gt], num_classes).float() * a.matched_iou[:, None]
                             for labels, a in zip(gt_labels, assignments)])
    loss_iou = iou_loss(outputs[..., :4][fg_masks], reg_targets).sum() / num_fg
    loss_obj = F.binary_cross_entropy_with_logits(outputs[..., 4], fg_masks.float(), reduction="sum") / num_fg
    loss_cls = F.binary_cross_entropy_with_logits(outputs[..., 5:][fg_masks], cls_targets, reduction="sum") / num_fg
    if raw_regression is None:
        loss_l1 = outputs.new_zeros(())
    else:
        l1_targets = torch.cat([l1_target(gt[a.matched_gt], grids[a.fg_mask], strides[a.fg_mask]) for gt, a in zip(gts, assignments)])
        loss_l1 = F.l1_loss(raw_regression.float()[fg_masks], l1_targets, reduction="sum") / num_fg
    return reg_weight * loss_iou, loss_obj, loss_cls, loss_l1


def yolox_losses(outputs: Tensor, grids: Tensor, strides: Tensor, gt_boxes: Sequence[Tensor], gt_labels: Sequence[Tensor],
                 raw_regression: Tensor | None = None, *, center_radius: float = YOLOX_CENTER_RADIUS,
                 reg_weight: float = YOLOX_REG_WEIGHT) -> YOLOXLosses:
    """``yolo_head.py::YOLOXHead.get_losses``: the batch's YOLOX losses (module docstring).
    ``raw_regression`` [B, A, 4] turns the L1 loss on (their ``use_l1``)."""
    _check_inputs(outputs, grids, strides, gt_boxes, gt_labels)
    outputs = outputs.float()
    assignments, gts = assign_batch(outputs, grids, strides, gt_boxes, gt_labels, center_radius)
    num_fg = sum(a.num_fg for a in assignments)
    iou, obj, cls, l1 = _base_losses(outputs, grids, strides, assignments, gts, gt_labels, raw_regression, reg_weight,
                                     max(num_fg, 1))
    return YOLOXLosses(iou, obj, cls, l1, None, num_fg, sum(int(g.shape[0]) for g in gts))


def refined_class_targets(assignment: Assignment, gt: Tensor, gt_labels: Tensor, proposals: Tensor,
                          proposal_boxes: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """The targets [P, C] of YOLOV's refined class logits of one frame's selected ``proposals`` [P]
    (anchor indices) with boxes ``proposal_boxes`` [P, 4] (x1y1x2y2), and which of them enter the loss
    [P] (``yolovp_msa.py::YOLOXHead.get_losses``, the ``ref_target`` loop):

    * a proposal that is a foreground anchor: its class target of the base loss (one-hot of its ground
      truth's class x the IoU of its box with it);
    * any other whose largest IoU with the ground truths that have a foreground anchor reaches 0.6:
      one-hot of that ground truth's class x that IoU;
    * the rest (and every proposal of a frame without ground truth) are left out of the loss.
    """
    num_props = proposals.shape[0]
    targets = proposal_boxes.new_zeros(num_props, num_classes)
    keep = torch.zeros(num_props, dtype=torch.bool, device=proposals.device)
    if assignment.num_fg == 0:
        return targets, keep
    labels = gt_labels.long()
    matched = torch.unique(assignment.matched_gt)
    ious = box_iou(proposal_boxes.float(), box_convert(gt[matched], "cxcywh", "xyxy"))
    best_iou, best = ious.max(1)
    near = best_iou >= REFINED_IOU_THRESH
    targets[near] = F.one_hot(labels[matched[best[near]]], num_classes).float() * best_iou[near, None]
    keep |= near
    # Foreground proposals take their base target instead (checked first in the authors' loop).
    fg_rank = torch.cumsum(assignment.fg_mask.long(), 0) - 1  # position among the foregrounds
    is_fg = assignment.fg_mask[proposals]
    rows = fg_rank[proposals[is_fg]]
    targets[is_fg] = F.one_hot(labels[assignment.matched_gt[rows]], num_classes).float() \
        * assignment.matched_iou[rows, None]
    keep |= is_fg
    return targets, keep


def yolov_losses(outputs: Tensor, grids: Tensor, strides: Tensor, gt_boxes: Sequence[Tensor], gt_labels: Sequence[Tensor],
                 refined_logits: Sequence[Tensor], proposals: Sequence[Tensor], raw_regression: Tensor | None = None,
                 *, center_radius: float = YOLOV_CENTER_RADIUS, reg_weight: float = YOLOV_REG_WEIGHT,
                 refined_weight: float = YOLOV_REFINED_WEIGHT) -> YOLOXLosses:
    """``yolovp_msa.py::YOLOXHead.get_losses``: the YOLOX losses of the B frames (centre radius 4.5,
    regression weight 3) plus 2 x the refined-class BCE: ``refined_logits[b]`` [P_b, C] (``linear_pred``'s
    output without its last logit) of frame b's selected ``proposals[b]`` [P_b] (anchor indices, the
    selection's order), against :func:`refined_class_targets`, summed and divided by the batch's
    number of foreground anchors. The proposals' boxes are the decoded ``outputs`` at those anchors."""
    _check_inputs(outputs, grids, strides, gt_boxes, gt_labels)
    if not len(refined_logits) == len(proposals) == outputs.shape[0]:
        raise ValueError(f"{outputs.shape[0]} frames but {len(refined_logits)} refined logit sets and "
                         f"{len(proposals)} proposal sets")
    outputs = outputs.float()
    num_classes = outputs.shape[-1] - 5
    assignments, gts = assign_batch(outputs, grids, strides, gt_boxes, gt_labels, center_radius)
    num_fg = sum(a.num_fg for a in assignments)
    iou, obj, cls, l1 = _base_losses(outputs, grids, strides, assignments, gts, gt_labels, raw_regression, reg_weight,
                                     max(num_fg, 1))
    logits, targets = [], []
    for b, (assignment, gt, labels, frame_logits, idx) in enumerate(
            zip(assignments, gts, gt_labels, refined_logits, proposals)):
        boxes = box_convert(outputs[b, idx, :4].detach(), "cxcywh", "xyxy")
        frame_targets, keep = refined_class_targets(assignment, gt, labels, idx, boxes, num_classes)
        logits.append(frame_logits.float()[keep])
        targets.append(frame_targets[keep])
    refined = F.binary_cross_entropy_with_logits(torch.cat(logits), torch.cat(targets), reduction="sum")
    return YOLOXLosses(iou, obj, cls, l1, refined_weight * refined / max(num_fg, 1), num_fg,
                       sum(int(g.shape[0]) for g in gts))


# ----------------------------------------------------------------------------------------------
# Training forward: a list of megavod TrainSamples -> the loss dict of ``megavod train``

#: The letterbox's pad value, also used to pad images of different sides into one batch.
PAD_VALUE = 114.0
#: The authors' frozen parts of YOLOV (``exps/yolov/yolov_{s,l,x}.py::Exp.get_model``): the backbone
#: (PAFPN with CSPDarknet) and these head modules; ``cls_preds``, ``obj_preds``, ``cls_convs2``,
#: ``trans`` and ``linear_pred`` train.
YOLOV_FROZEN_HEAD = ("stems", "cls_convs", "reg_convs", "reg_preds")


def pad_letterboxed(images: Sequence[Tensor], pad_value: float = PAD_VALUE) -> Tensor:
    """Letterboxed images [3, H_i, W_i] -> [N, 3, H, W], padded at the bottom/right with the letterbox's
    pad value to the largest (images of one size are simply stacked)."""
    if not images:
        raise ValueError("pad_letterboxed needs at least one image")
    sizes = {tuple(image.shape[-2:]) for image in images}
    if len(sizes) == 1:
        return torch.stack(list(images))
    h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    batch = images[0].new_full((len(images), images[0].shape[0], h, w), pad_value)
    for padded, image in zip(batch, images):
        padded[:, : image.shape[-2], : image.shape[-1]] = image
    return batch


def loss_targets(target: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """A megavod target (``boxes`` x1y1x2y2 in the letterboxed image's pixels, ``labels`` 1..C) -> the
    losses' ground truth: the boxes whose letterboxed width and height both exceed 1 pixel (the authors'
    ``data_augment.py::TrainTransform``: ``np.minimum(w, h) > 1``) and their labels 0..C-1."""
    boxes, labels = target["boxes"].reshape(-1, 4), target["labels"].reshape(-1)
    keep = torch.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) > 1
    return boxes[keep].float(), labels[keep].long() - 1


def decoded_outputs(raw: Any) -> Tensor:
    """[B, A, 5 + C] as ``get_output_and_grid`` leaves them (decoded centre/size, then the logits) from a
    :class:`megavod.models.yolox.HeadOutputs`."""
    return torch.cat([raw.boxes_cxcywh(), raw.outputs[..., 4:]], dim=-1)


def yolox_training_losses(detector: nn.Module, samples: Sequence[Any], use_l1: bool = False) -> dict[str, Tensor]:
    """YOLOX's training losses of a batch of :class:`~megavod.data.vid_dataset.TrainSample` (letterboxed
    key frames; references, if any, unused): one network pass on the batch, then :func:`yolox_losses`
    normalised by the batch's foregrounds as the authors' per-GPU batch. ``detector`` has the authors'
    ``backbone`` and ``head`` (:class:`megavod.models.yolox.YOLOXHead`); ``use_l1`` adds the L1 loss (their
    last ``no_aug_epochs``). Returns ``YOLOXLosses.terms()``."""
    images = pad_letterboxed([s.image for s in samples])
    raw = detector.head.raw_outputs(detector.backbone(images))
    boxes, labels = zip(*(loss_targets(s.target) for s in samples))
    losses = yolox_losses(decoded_outputs(raw), raw.grids, raw.strides, boxes, labels,
                          raw.regression if use_l1 else None)
    return losses.terms()


def video_batch(sample: Any, role: str = "frames") -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """The frames of one YOLOV training sample, key first, with their ground truth: the key and its
    ``role`` references (:class:`megavod.data.sampling.VideoFramesSampler`, ``ref_targets``)."""
    refs, ref_targets = sample.refs.get(role, []), sample.ref_targets.get(role, [])
    if len(ref_targets) != len(refs):
        raise ValueError(f"a YOLOV training sample needs the ground truth of its {role!r} references "
                         f"(a sampler with with_targets): {len(refs)} references, {len(ref_targets)} targets")
    return [sample.image, *refs], [sample.target, *ref_targets]


def yolov_sample_losses(detector: nn.Module, frames: Sequence[Tensor], targets: Sequence[dict[str, Tensor]],
                        use_l1: bool = False) -> YOLOXLosses:
    """YOLOV's training step on the frames of one video: the backbone on all frames, then
    :func:`yolov_head_losses` with the detector's selection (``pre_top``, ``pre_nms_thresh``, ``proposals``)."""
    features = detector.backbone(pad_letterboxed(list(frames)))
    return yolov_head_losses(detector.head, features, targets, detector.pre_top, detector.pre_nms_thresh,
                             detector.proposals, use_l1)


def yolov_head_losses(head: nn.Module, features: Sequence[Tensor], targets: Sequence[dict[str, Tensor]],
                      pre_top: int, pre_nms_thresh: float, num_proposals: int, use_l1: bool = False) -> YOLOXLosses:
    """``yolovp_msa.py::YOLOXHead.forward`` in training on the PAFPN maps of F frames of one video: the
    head's outputs; each frame's proposals selected without gradient (``postpro_woclass``:
    :func:`megavod.models.yolov_head.select_proposals` on the decoded sigmoid outputs); the aggregation over
    all frames' proposals (``head.trans``; the proposals' class confidence and objectness enter it with
    their gradient, as theirs); ``head.linear_pred`` without its last logit; then :func:`yolov_losses`."""
    raw = head.raw_outputs(features)
    outputs = decoded_outputs(raw)
    objectness, class_scores = raw.objectness_logits.sigmoid(), raw.class_logits.sigmoid()
    with torch.no_grad():
        corners = cxcywh_to_xyxy(outputs[..., :4])
        proposals = [select_proposals(corners[f], objectness[f], class_scores[f], pre_top, pre_nms_thresh,
                                      num_proposals) for f in range(outputs.shape[0])]
    rows = lambda t: torch.cat([t[f, idx] for f, idx in enumerate(proposals)])  # noqa: E731
    aggregated = head.trans(rows(raw.cls_features), rows(raw.reg_features), rows(class_scores).max(dim=1).values,
                            rows(objectness))
    logits = head.linear_pred(aggregated)[:, :-1].split([len(idx) for idx in proposals])
    boxes, labels = zip(*(loss_targets(t) for t in targets))
    return yolov_losses(outputs, raw.grids, raw.strides, boxes, labels, logits, proposals,
                        raw.regression if use_l1 else None)


def yolov_training_losses(detector: nn.Module, samples: Sequence[Any], use_l1: bool = False,
                          role: str = "frames") -> dict[str, Tensor]:
    """YOLOV's training losses of a batch of :class:`~megavod.data.vid_dataset.TrainSample`, each the
    frames of one video (:func:`video_batch`): each sample's losses as the authors' per-GPU batch
    (:func:`yolov_sample_losses`), the mean over samples (megavod's rule for several samples per process,
    docs/departures.md#batch-loss-normalisation). ``detector``: backbone, head with ``cls_convs2``,
    ``trans``, ``linear_pred``, and the selection's ``pre_top``, ``pre_nms_thresh``, ``proposals``."""
    per_sample = [yolov_sample_losses(detector, *video_batch(s, role), use_l1=use_l1).terms() for s in samples]
    if len(per_sample) == 1:
        return per_sample[0]
    return {name: sum(losses[name] for losses in per_sample) / len(per_sample) for name in per_sample[0]}


def freeze_yolov_base(detector: nn.Module) -> None:
    """Stop the gradient of the parts the authors freeze for YOLOV (:data:`YOLOV_FROZEN_HEAD` and the
    backbone). Their BatchNorm layers stay in training mode, as the authors' (``fix_bn`` is commented
    out): batch statistics, running statistics updated."""
    for module in [detector.backbone, *(getattr(detector.head, name) for name in YOLOV_FROZEN_HEAD)]:
        module.requires_grad_(False)
