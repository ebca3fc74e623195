"""Single-level RPN on C4 (docs/conventions.md#rpn): legacy anchors, head, proposal selection in key/ref modes, loss.

State-dict names equal the authors': ``rpn.anchor_generator.cell_anchors.0`` [A,4] (buffer),
``rpn.head.conv``, ``rpn.head.cls_logits``, ``rpn.head.bbox_pred`` (torchvision >= 0.13 would call
the conv ``rpn.head.conv.0.0``).

Proposal modes (``RPN.proposals(features, image_sizes, mode)``):

* ``"key"``: the key frame; pre/post-NMS top-N 6000/300 (train or test values by ``self.training``);
  in training the ground-truth boxes are appended with objectness 1.
* ``"ref"``: every reference/local/global/memory frame of MEGA and RDN (the authors'
  ``RPNWithRefModule``); 6000/75, no ground truth, computed under ``no_grad``.

Proposals of an image are sorted by descending objectness (NMS keeps the top-k order), which MEGA and
RDN rely on when they take "the first 15". Fewer than ``post_nms_top_n`` come back when NMS leaves
fewer boxes (tiny images).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, Matcher

from megavod.models.box_coder import BoxCoder, box_iou, clip_boxes, nms, top_k

ProposalMode = Literal["key", "ref"]


@dataclass
class Proposals:
    """RPN output of one image: ``boxes`` [N,4] (resized-image pixels) and ``objectness`` [N] (sigmoid)."""

    boxes: Tensor
    objectness: Tensor

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


def target_boxes_labels(target: Any) -> tuple[Tensor, Tensor]:
    """``(boxes [M,4] float, labels [M] int64)`` of a target: a mapping with ``"boxes"``/``"labels"``
    or any object with ``.boxes``/``.labels`` (``FrameAnnotation``)."""
    if isinstance(target, dict):
        boxes, labels = target["boxes"], target["labels"]
    else:
        boxes, labels = target.boxes, target.labels
    return boxes.reshape(-1, 4).float(), labels.reshape(-1).long()


# ----------------------------------------------------------------------------------------------
# Anchors


def legacy_cell_anchors(stride: int, sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """Detectron's ``generate_anchors``: [len(ratios) * len(sizes), 4], ratio-major, centred at
    ((stride - 1) / 2, (stride - 1) / 2), widths rounded half to even (numpy), ratio = h / w."""
    anchor = np.array([0, 0, stride - 1, stride - 1], dtype=np.float64)

    def whctrs(a: np.ndarray) -> tuple[float, float, float, float]:
        w, h = a[2] - a[0] + 1, a[3] - a[1] + 1
        return w, h, a[0] + 0.5 * (w - 1), a[1] + 0.5 * (h - 1)

    def mkanchors(ws: np.ndarray, hs: np.ndarray, cx: float, cy: float) -> np.ndarray:
        ws, hs = ws[:, None], hs[:, None]
        return np.hstack((cx - 0.5 * (ws - 1), cy - 0.5 * (hs - 1), cx + 0.5 * (ws - 1), cy + 0.5 * (hs - 1)))

    w, h, cx, cy = whctrs(anchor)
    ratios = np.asarray(aspect_ratios, dtype=np.float64)
    ws = np.round(np.sqrt(w * h / ratios))
    hs = np.round(ws * ratios)
    ratio_anchors = mkanchors(ws, hs, cx, cy)
    scales = np.asarray(sizes, dtype=np.float64) / stride
    out = []
    for a in ratio_anchors:
        w, h, cx, cy = whctrs(a)
        out.append(mkanchors(w * scales, h * scales, cx, cy))
    return torch.from_numpy(np.vstack(out)).float()


class _BufferList(nn.Module):
    """Buffers named 0, 1, ... (the authors' ``BufferList``, for the key ``cell_anchors.0``)."""

    def __init__(self, buffers: Sequence[Tensor]):
        super().__init__()
        for i, b in enumerate(buffers):
            self.register_buffer(str(i), b)

    def __getitem__(self, i: int) -> Tensor:
        return getattr(self, str(i))


class AnchorGenerator(nn.Module):
    """Anchors of one stride-16 level: location-major, the A cell anchors inner (matches the head's
    [B, A, H, W] -> [B, H*W*A] flattening)."""

    def __init__(self, sizes: Sequence[float] = (64, 128, 256, 512), aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
                 stride: int = 16, straddle_thresh: float = 0.0):
        super().__init__()
        self.stride = stride
        self.straddle_thresh = straddle_thresh
        self.cell_anchors = _BufferList([legacy_cell_anchors(stride, sizes, aspect_ratios)])

    @property
    def num_anchors(self) -> int:
        return int(self.cell_anchors[0].shape[0])

    def forward(self, feature_size: tuple[int, int]) -> Tensor:
        """[H*W*A, 4] anchors for a feature map of ``(H, W)`` (traced sizes too: the grid is ``arange(W) *
        stride``, so the map size stays a graph value in an ONNX trace; exact in float32, the same values as
        ``arange(0, W * stride, stride)``, below 2**24)."""
        h, w = feature_size
        cell = self.cell_anchors[0]
        stride = float(self.stride)
        shifts_x = torch.arange(w, dtype=torch.float32, device=cell.device) * stride
        shifts_y = torch.arange(h, dtype=torch.float32, device=cell.device) * stride
        sy, sx = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
        shifts = torch.stack((sx, sy, sx, sy), dim=-1).reshape(-1, 1, 4)
        return (shifts + cell.view(1, -1, 4)).reshape(-1, 4)

    def visibility(self, anchors: Tensor, image_size: tuple[int, int]) -> Tensor:
        """Anchors inside the image (``STRADDLE_THRESH = 0``); the others are ignored by the loss."""
        h, w = image_size
        t = self.straddle_thresh
        if t < 0:
            return torch.ones(anchors.shape[0], dtype=torch.bool, device=anchors.device)
        return (anchors[:, 0] >= -t) & (anchors[:, 1] >= -t) & (anchors[:, 2] < w + t) & (anchors[:, 3] < h + t)


class RPNHead(nn.Module):
    """``SingleConvRPNHead``: 3x3 conv (+bias) -> ReLU -> ``cls_logits`` (A) and ``bbox_pred`` (4A)."""

    def __init__(self, in_channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, 4 * num_anchors, 1)
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        t = F.relu(self.conv(x))
        return self.cls_logits(t), self.bbox_pred(t)


def _flatten(objectness: Tensor, deltas: Tensor) -> tuple[Tensor, Tensor]:
    """[B,A,H,W], [B,4A,H,W] -> [B, H*W*A], [B, H*W*A, 4] (the authors' ``permute_and_flatten``)."""
    b, a, h, w = objectness.shape
    obj = objectness.permute(0, 2, 3, 1).reshape(b, -1)
    d = deltas.view(b, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, 4)
    return obj, d


class RPN(nn.Module):
    """Region proposal network on C4 (docs/conventions.md#rpn). See the module docstring for the modes."""

    def __init__(
        self,
        in_channels: int,
        anchor_sizes: Sequence[float] = (64, 128, 256, 512),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        anchor_stride: int = 16,
        pre_nms_top_n_train: int = 6000,
        post_nms_top_n_train: int = 300,
        pre_nms_top_n_test: int = 6000,
        post_nms_top_n_test: int = 300,
        ref_pre_nms_top_n: int = 6000,
        ref_post_nms_top_n: int = 75,
        nms_thresh: float = 0.7,
        min_size: float = 0.0,
        fg_iou_thresh: float = 0.7,
        bg_iou_thresh: float = 0.3,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
    ):
        super().__init__()
        self.anchor_generator = AnchorGenerator(anchor_sizes, aspect_ratios, anchor_stride)
        self.head = RPNHead(in_channels, self.anchor_generator.num_anchors)
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.top_n = {
            ("key", True): (pre_nms_top_n_train, post_nms_top_n_train),
            ("key", False): (pre_nms_top_n_test, post_nms_top_n_test),
            ("ref", True): (ref_pre_nms_top_n, ref_post_nms_top_n),
            ("ref", False): (ref_pre_nms_top_n, ref_post_nms_top_n),
        }
        self.nms_thresh = nms_thresh
        self.min_size = min_size
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
        self.sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)

    # -- pieces MEGA/RDN reuse ---------------------------------------------------------------

    def anchors(self, features: Tensor) -> Tensor:
        """[H*W*A, 4] anchors for C4 ``features`` [B,C,H,W] (the same for every image of the batch)."""
        return self.anchor_generator(tuple(features.shape[-2:]))

    def select_image(self, objectness: Tensor, deltas: Tensor, anchors: Tensor,
                     image_size: tuple[int, int] | Tensor, pre_nms_top_n: int,
                     post_nms_top_n: int | Tensor) -> tuple[Tensor, Tensor]:
        """One image's proposals (boxes [P, 4], objectness [P]), by descending objectness, from its flattened
        head outputs (``objectness`` logits [H*W*A], ``deltas`` [H*W*A, 4], location-major as ``anchors``):
        sigmoid, the top ``pre_nms_top_n`` (:func:`top_k`: equal objectness in index order, in PyTorch and
        ONNX Runtime alike, docs/conventions.md#ties), decode, clip to [0,W-1]x[0,H-1], drop w or h <
        min_size, NMS, the first ``post_nms_top_n`` (docs/conventions.md#rpn).

        Traceable: ``image_size`` may be an int64 tensor [2] and ``post_nms_top_n`` a 0-d tensor (graph
        values), and ``min(pre_nms_top_n, anchors)`` is computed in the graph (:func:`top_k`)."""
        scores, idx = top_k(objectness.sigmoid(), pre_nms_top_n)
        boxes = clip_boxes(self.box_coder.decode(deltas[idx], anchors[idx]), image_size)
        if self.min_size > 0:
            ws, hs = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
            keep = (ws >= self.min_size) & (hs >= self.min_size)
            boxes, scores = boxes[keep], scores[keep]
        keep = nms(boxes, scores, self.nms_thresh)[:post_nms_top_n]
        return boxes[keep], scores[keep]

    def test_proposals(self, c4: Tensor, image_size: tuple[int, int] | Tensor,
                       post_nms_top_n: int | Tensor | None = None) -> Proposals:
        """Test-time key-mode proposals of one image from its C4 map [1, C, h, w] (:meth:`select_image`
        with the test top-n; ``post_nms_top_n`` overrides the post-NMS count, e.g. the ONNX graphs'
        ``post_nms_top_n`` input). What the exported graphs run; eagerly equal to
        ``proposals(c4, [image_size], "key")[0]`` in eval mode."""
        pre_n, post_n = self.top_n[("key", False)]
        objectness, deltas = _flatten(*self.head(c4))
        boxes, scores = self.select_image(objectness[0].float(), deltas[0].float(), self.anchors(c4), image_size,
                                          pre_n, post_n if post_nms_top_n is None else post_nms_top_n)
        return Proposals(boxes, scores)

    @torch.no_grad()
    def select(
        self,
        objectness: Tensor,
        deltas: Tensor,
        anchors: Tensor,
        image_sizes: Sequence[tuple[int, int]],
        mode: ProposalMode = "key",
        targets: Sequence[Any] | None = None,
    ) -> list[Proposals]:
        """Per image :meth:`select_image` (sigmoid, top pre-NMS, decode, clip, min_size, NMS, post-NMS) with
        the mode's counts; in training ``"key"`` mode append GT (objectness 1)."""
        if mode not in ("key", "ref"):
            raise ValueError(f"mode must be 'key' or 'ref', got {mode!r}")
        pre_n, post_n = self.top_n[(mode, self.training)]
        obj, d = _flatten(objectness.detach().float(), deltas.detach().float())
        out = []
        for i, image_size in enumerate(image_sizes):
            boxes, s = self.select_image(obj[i], d[i], anchors, image_size, pre_n, post_n)
            if mode == "key" and self.training and targets is not None:
                gt, _ = target_boxes_labels(targets[i])
                gt = gt.to(boxes)
                boxes = torch.cat([boxes, gt])
                s = torch.cat([s, torch.ones(gt.shape[0], dtype=s.dtype, device=s.device)])
            out.append(Proposals(boxes, s))
        return out

    def assign_targets(self, anchors: Tensor, image_size: tuple[int, int], target: Any) -> tuple[Tensor, Tensor]:
        """Anchor labels (1 fg: IoU >= 0.7 or a GT's best anchor, ties included; 0 bg: IoU < 0.3;
        -1 ignored: in between or straddling the border) and box regression targets [A_total, 4]."""
        gt, _ = target_boxes_labels(target)
        gt = gt.to(anchors)
        if gt.shape[0] == 0:
            labels = torch.zeros(anchors.shape[0], device=anchors.device)
            regression = torch.zeros_like(anchors)
        else:
            matched = self.matcher(box_iou(gt, anchors))
            labels = (matched >= 0).float()
            labels[matched == Matcher.BETWEEN_THRESHOLDS] = -1
            regression = self.box_coder.encode(gt[matched.clamp(min=0)], anchors)
        labels[~self.anchor_generator.visibility(anchors, image_size)] = -1
        return labels, regression

    def loss(
        self,
        objectness: Tensor,
        deltas: Tensor,
        anchors: Tensor,
        image_sizes: Sequence[tuple[int, int]],
        targets: Sequence[Any],
    ) -> dict[str, Tensor]:
        """``loss_objectness`` (BCE over the 256 sampled anchors per image) and ``loss_rpn_box_reg``
        (smooth-L1, beta 1/9, over positives, divided by the number sampled)."""
        labels, regression_targets = [], []
        for image_size, target in zip(image_sizes, targets):
            lab, reg = self.assign_targets(anchors, image_size, target)
            labels.append(lab)
            regression_targets.append(reg)
        pos_masks, neg_masks = self.sampler(labels)
        pos = torch.nonzero(torch.cat(pos_masks)).squeeze(1)
        sampled = torch.nonzero(torch.cat(pos_masks) | torch.cat(neg_masks)).squeeze(1)
        obj, d = _flatten(objectness.float(), deltas.float())
        obj, d = obj.reshape(-1), d.reshape(-1, 4)
        labels_t, reg_t = torch.cat(labels), torch.cat(regression_targets)
        num = max(sampled.numel(), 1)
        box_loss = F.smooth_l1_loss(d[pos], reg_t[pos], beta=1.0 / 9, reduction="sum") / num
        if sampled.numel():
            obj_loss = F.binary_cross_entropy_with_logits(obj[sampled], labels_t[sampled])
        else:  # every anchor straddles the border: nothing to learn, but keep the graph connected
            obj_loss = obj.sum() * 0
        return {"loss_objectness": obj_loss, "loss_rpn_box_reg": box_loss}

    # -- entry points -----------------------------------------------------------------------

    def proposals(
        self,
        features: Tensor,
        image_sizes: Sequence[tuple[int, int]],
        mode: ProposalMode = "key",
        targets: Sequence[Any] | None = None,
    ) -> list[Proposals]:
        """Proposals for C4 ``features`` [B,C,H,W]; ``"ref"`` mode runs entirely under ``no_grad``."""
        if mode == "ref":
            with torch.no_grad():
                objectness, deltas = self.head(features)
        else:
            objectness, deltas = self.head(features)
        return self.select(objectness, deltas, self.anchors(features), image_sizes, mode, targets)

    def forward(
        self,
        features: Tensor,
        image_sizes: Sequence[tuple[int, int]],
        targets: Sequence[Any] | None = None,
    ) -> tuple[list[Proposals], dict[str, Tensor]]:
        """Key-mode proposals and, in training with ``targets``, the RPN losses."""
        objectness, deltas = self.head(features)
        anchors = self.anchors(features)
        props = self.select(objectness, deltas, anchors, image_sizes, "key", targets)
        losses: dict[str, Tensor] = {}
        if self.training and targets is not None:
            losses = self.loss(objectness, deltas, anchors, image_sizes, targets)
        return props, losses


def build_rpn(cfg: Any, in_channels: int) -> RPN:
    """RPN from a ``megavod.config.RPNConfig``."""
    return RPN(
        in_channels,
        anchor_sizes=cfg.anchor_sizes,
        aspect_ratios=cfg.aspect_ratios,
        anchor_stride=cfg.anchor_stride,
        pre_nms_top_n_train=cfg.pre_nms_top_n_train,
        post_nms_top_n_train=cfg.post_nms_top_n_train,
        pre_nms_top_n_test=cfg.pre_nms_top_n_test,
        post_nms_top_n_test=cfg.post_nms_top_n_test,
        ref_pre_nms_top_n=cfg.ref_pre_nms_top_n,
        ref_post_nms_top_n=cfg.ref_post_nms_top_n,
        nms_thresh=cfg.nms_thresh,
        fg_iou_thresh=cfg.fg_iou_thresh,
        bg_iou_thresh=cfg.bg_iou_thresh,
        batch_size_per_image=cfg.batch_size_per_image,
        positive_fraction=cfg.positive_fraction,
    )
