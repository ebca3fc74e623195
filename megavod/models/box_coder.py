"""The legacy "+1" box convention of the authors' code (docs/conventions.md#legacy-plus-one-boxes): coder,
IoU, clipping, NMS.

Every box is ``(x1, y1, x2, y2)`` in pixels with width ``x2 - x1 + 1``. The published numbers and the
released weights were produced with this convention, so megavod keeps it everywhere a box is encoded,
compared or suppressed. torchvision's ops use width ``x2 - x1``; the helpers below adapt them rather
than re-implement them.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import Tensor
from torchvision.ops import nms as _tv_nms

# The authors' clamp on dw/dh before exp(): log(1000 / 16). There is no lower clamp.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


class BoxCoder:
    """Encode/decode box deltas ``(dx, dy, dw, dh)`` with the +1 width convention.

    ``weights`` are ``(wx, wy, ww, wh)``: (1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for the box head.
    Decoding accepts ``[N, 4k]`` deltas (class-specific regression, class c in columns 4c..4c+3).
    """

    def __init__(self, weights: tuple[float, float, float, float], bbox_xform_clip: float = BBOX_XFORM_CLIP):
        if len(weights) != 4:
            raise ValueError(f"weights must have 4 numbers, got {weights!r}")
        self.weights = tuple(float(w) for w in weights)
        self.bbox_xform_clip = bbox_xform_clip

    def encode(self, gt_boxes: Tensor, boxes: Tensor) -> Tensor:
        """Deltas that move ``boxes`` [N,4] (anchors or proposals) onto ``gt_boxes`` [N,4] (float32)."""
        gt_boxes, boxes = gt_boxes.float(), boxes.float()
        wx, wy, ww, wh = self.weights
        widths = boxes[:, 2] - boxes[:, 0] + 1
        heights = boxes[:, 3] - boxes[:, 1] + 1
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights
        gt_widths = gt_boxes[:, 2] - gt_boxes[:, 0] + 1
        gt_heights = gt_boxes[:, 3] - gt_boxes[:, 1] + 1
        gt_ctr_x = gt_boxes[:, 0] + 0.5 * gt_widths
        gt_ctr_y = gt_boxes[:, 1] + 0.5 * gt_heights
        dx = wx * (gt_ctr_x - ctr_x) / widths
        dy = wy * (gt_ctr_y - ctr_y) / heights
        dw = ww * torch.log(gt_widths / widths)
        dh = wh * torch.log(gt_heights / heights)
        return torch.stack((dx, dy, dw, dh), dim=1)

    def decode(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """Apply ``deltas`` [N, 4k] to ``boxes`` [N, 4]; returns [N, 4k] boxes (x2 = cx + w/2 - 1).

        Always float32: under bf16 autocast a coordinate near 1000 would otherwise lose ~4 pixels.
        """
        deltas, boxes = deltas.float(), boxes.float()
        wx, wy, ww, wh = self.weights
        widths = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        heights = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        ctr_x = boxes[:, 0, None] + 0.5 * widths
        ctr_y = boxes[:, 1, None] + 0.5 * heights
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = (deltas[:, 2::4] / ww).clamp(max=self.bbox_xform_clip)
        dh = (deltas[:, 3::4] / wh).clamp(max=self.bbox_xform_clip)
        pred_ctr_x = dx * widths + ctr_x
        pred_ctr_y = dy * heights + ctr_y
        pred_w = torch.exp(dw) * widths
        pred_h = torch.exp(dh) * heights
        out = torch.empty_like(deltas)
        out[:, 0::4] = pred_ctr_x - 0.5 * pred_w
        out[:, 1::4] = pred_ctr_y - 0.5 * pred_h
        out[:, 2::4] = pred_ctr_x + 0.5 * pred_w - 1
        out[:, 3::4] = pred_ctr_y + 0.5 * pred_h - 1
        return out


def box_area(boxes: Tensor) -> Tensor:
    """Areas with the +1 convention."""
    return (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """[N, M] IoU with the +1 convention (the authors' ``boxlist_iou``)."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt + 1).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1[:, None] + area2[None, :] - inter)


def clip_boxes(boxes: Tensor, image_size: tuple[int, int] | Tensor) -> Tensor:
    """Clip [N, 4k] boxes to ``[0, W-1] x [0, H-1]``; ``image_size`` is ``(H, W)``, numbers or an int64
    tensor [2] (a traced graph value: the ONNX graphs serve any image size).

    One max/min against a [4] bound broadcast over the boxes, no in-place write into a copy: the same
    values as ``clamp(0, W-1)`` / ``clamp(0, H-1)`` per coordinate, and it traces with the size as a
    graph value."""
    if isinstance(image_size, Tensor):
        hw = image_size.to(boxes.device, boxes.dtype)
        upper = torch.stack([hw[1] - 1, hw[0] - 1, hw[1] - 1, hw[0] - 1])
    else:
        h, w = image_size
        upper = torch.tensor([w - 1, h - 1, w - 1, h - 1], dtype=boxes.dtype, device=boxes.device)
    grouped = boxes.reshape(boxes.shape[0], -1, 4)
    return torch.min(torch.max(grouped, torch.zeros_like(upper)), upper).reshape(boxes.shape[0], -1)


class _TopKLowerIndexFirst(torch.autograd.Function):
    """Indices of the ``k`` largest values along the last axis, by decreasing value, equal values in
    increasing index order (docs/conventions.md#ties). In an ONNX graph it is one ``TopK``, whose
    specification orders ties this way; ``torch.topk`` promises no order among ties, so the eager
    forward finds the k-th value with it and orders the candidates by a stable sort."""

    @staticmethod
    def forward(ctx, values: Tensor, k: int | Tensor) -> Tensor:
        k = min(int(k), values.shape[-1])
        if k == values.shape[-1]:
            # Every entry: one stable sort of all rows gives the rule directly (equal values keep their index
            # order), cheaper than the k-th value search below (the per-class order of the box postprocess).
            return torch.sort(values, dim=-1, descending=True, stable=True).indices
        if values.dim() > 1:
            rows = [_TopKLowerIndexFirst.forward(ctx, row, k) for row in values.reshape(-1, values.shape[-1])]
            return torch.stack(rows).reshape(*values.shape[:-1], k) if rows else values.new_zeros(
                *values.shape[:-1], k, dtype=torch.int64)
        if k == 0:
            return torch.zeros(0, dtype=torch.int64, device=values.device)
        # Every value above the k-th is in; of those equal to it, the lowest indices (nonzero ascends).
        kth = values.topk(k, sorted=False).values.min()
        candidates = torch.nonzero(values >= kth).squeeze(1)
        order = torch.sort(values[candidates], descending=True, stable=True).indices[:k]
        return candidates[order]

    @staticmethod
    def symbolic(g, values, k):
        if isinstance(k, int):
            k = g.op("Constant", value_t=torch.tensor([k], dtype=torch.int64))
        else:  # a traced count: int64 (ONNX type 7), shape [1]
            k = g.op("Reshape", g.op("Cast", k, to_i=7), g.op("Constant", value_t=torch.tensor([1], dtype=torch.int64)))
        # min(k, n) in the graph: the row length n is a graph value (the anchors of any image size).
        n = g.op("Slice", g.op("Shape", values), g.op("Constant", value_t=torch.tensor([-1], dtype=torch.int64)),
                 g.op("Constant", value_t=torch.tensor([sys.maxsize], dtype=torch.int64)))
        return g.op("TopK", values, g.op("Min", k, n), axis_i=-1, largest_i=1, sorted_i=1, outputs=2)[1]


def top_k(values: Tensor, k: int | Tensor) -> tuple[Tensor, Tensor]:
    """(values, indices) of the ``min(k, n)`` largest entries along the last axis, by decreasing value,
    ties in increasing index order in PyTorch and in ONNX Runtime alike (docs/conventions.md#ties).
    ``k`` may be a traced count (a graph value)."""
    indices = _TopKLowerIndexFirst.apply(values, k)
    return values.gather(-1, indices), indices


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """NMS with +1 areas that suppresses when IoU > threshold (the authors' CUDA kernel,
    docs/conventions.md#legacy-plus-one-boxes), ties in score taken in increasing index order
    (docs/conventions.md#ties).

    torchvision's kernel also suppresses on ``IoU > threshold`` but measures width as ``x2 - x1``;
    shifting x2, y2 by one pixel makes its intersections and areas exactly the +1 ones. The boxes go to
    the kernel in :func:`top_k`'s order with a strictly decreasing priority for scores: ONNX's
    ``NonMaxSuppression`` (what the kernel exports to) takes equal scores in no stated order. Returns kept
    indices sorted by decreasing score.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    order = top_k(scores, scores.shape[0])[1]
    # n, n-1, ..., 1 (float32: exact below 2**24) as the scores: any kernel takes the boxes in this order.
    priority = torch.arange(order.shape[0], 0, -1, dtype=torch.float32, device=order.device)
    return order[_tv_nms(plus_one(boxes[order]), priority, iou_threshold)]


def plus_one(boxes: Tensor) -> Tensor:
    """x2, y2 shifted by one pixel: torchvision's / ONNX's NMS then measure the +1 areas of the authors'
    boxes (docs/conventions.md#legacy-plus-one-boxes)."""
    return torch.cat([boxes[..., :2], boxes[..., 2:] + 1], dim=-1)


def _scalar_input(g, value, dtype: torch.dtype):
    """A symbolic's scalar argument as a graph value: a constant, or the graph input it already is (the box
    postprocess's thresholds are graph inputs, megavod.export.graphs.SETTINGS)."""
    if isinstance(value, torch._C.Value):
        return value
    return g.op("Constant", value_t=torch.tensor([float(value)], dtype=dtype))


class PerClassNMS(torch.autograd.Function):
    """Per-class NMS of boxes [C, N, 4] (already :func:`plus_one`) with priorities [C, N]: for each class,
    classes ascending, the entries with priority > ``score_thresh`` by decreasing priority, greedy
    suppression at IoU > ``iou_thresh``. Returns [S, 2]: (class column, row), classes ascending, each by
    priority. The priorities of a class must be distinct (:func:`per_class_nms` passes ranks), so that
    every kernel takes the boxes in one order (docs/conventions.md#ties).

    Eagerly one torchvision NMS per class; in an ONNX graph one ``NonMaxSuppression`` with the classes as
    its batch (every class has its own boxes), which returns the kept entries in the same order."""

    @staticmethod
    def forward(ctx, boxes: Tensor, priority: Tensor, score_thresh: float | Tensor,
                iou_thresh: float | Tensor) -> Tensor:
        kept = []
        iou = float(iou_thresh)
        for c in range(boxes.shape[0]):
            rows = torch.nonzero(priority[c] > score_thresh).squeeze(1)
            if rows.numel():
                rows = rows[_tv_nms(boxes[c, rows], priority[c, rows], iou)]
                kept.append(torch.stack([torch.full_like(rows, c), rows], dim=1))
        return torch.cat(kept) if kept else torch.zeros(0, 2, dtype=torch.int64, device=boxes.device)

    @staticmethod
    def symbolic(g, boxes, priority, score_thresh, iou_thresh):
        # boxes [C, N, 4] as C batches; priority [C, N] -> [C, 1, N] (one "class" per batch).
        axes = g.op("Constant", value_t=torch.tensor([1], dtype=torch.int64))
        selected = g.op(
            "NonMaxSuppression", boxes, g.op("Unsqueeze", priority, axes),
            g.op("Constant", value_t=torch.tensor([sys.maxsize], dtype=torch.int64)),
            _scalar_input(g, iou_thresh, torch.float32),
            _scalar_input(g, score_thresh, torch.float32),
        )  # [S, 3]: (batch = class, 0, box)
        return g.op("Gather", selected, g.op("Constant", value_t=torch.tensor([0, 2], dtype=torch.int64)), axis_i=1)


def per_class_nms(boxes: Tensor, scores: Tensor, score_thresh: float | Tensor,
                  iou_thresh: float | Tensor) -> Tensor:
    """Per-class :func:`nms` of boxes [C, N, 4] with scores [C, N] (class c's entries in row c): for each
    class, classes ascending, the entries scoring above ``score_thresh``, suppressed at IoU >
    ``iou_thresh`` in :func:`top_k` order (by score, ties by row, docs/conventions.md#ties). Returns
    [S, 2]: (class row, entry), classes ascending, each by score. The thresholds may be 0-d tensors
    (graph inputs); it traces into one ONNX ``NonMaxSuppression`` (:class:`PerClassNMS`).

    Each class's entries go to the kernel with their rank as priority (N for the first in top_k order,
    then N-1, ...; 0 for those at or below the score threshold), which fixes the order among equal
    scores in torchvision's kernel and in ONNX's alike."""
    num_rows = scores.shape[1]
    order = top_k(scores, num_rows)[1]
    # ranks[c, order[c, i]] = i; float32 priorities are exact below 2**24 rows.
    ranks = torch.zeros_like(order).scatter(1, order, torch.arange(num_rows, device=order.device).expand_as(order))
    priority = (num_rows - ranks).to(torch.float32) * (scores > score_thresh)
    return PerClassNMS.apply(plus_one(boxes), priority, 0.0, iou_thresh)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Per-category :func:`nms`, kept indices grouped by ascending category, each by score.

    A loop over categories rather than torchvision's coordinate-offset trick: offsets of thousands of
    pixels would cost float32 precision in the IoU, and the authors' inference loops over classes too.
    """
    keep = []
    for c in torch.unique(idxs).tolist():
        inds = torch.nonzero(idxs == c).squeeze(1)
        keep.append(inds[nms(boxes[inds], scores[inds], iou_threshold)])
    if not keep:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    return torch.cat(keep)
