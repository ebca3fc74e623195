"""YOLOX (0.3.0, Focus stem) as the authors' YOLOV repository builds it: CSPDarknet, PAFPN and the
decoupled head, plus YOLOV's video classification branch ``cls_convs2`` (docs/authors_code.md).

Every module is named as the authors' attribute, so ``state_dict()`` equals their ``ckpt["model"]``
key for key (``backbone.backbone.stem.conv.conv.weight``, ``head.cls_preds.0.bias``, ...) and their
files load with ``load_state_dict(strict=True)``; ``tests/test_yolox.py`` compares the names, shapes
and dtypes with the listings in ``tests/data/checkpoint_keys/yolov/``. YOLOV's aggregation
(``head.trans``, ``head.linear_pred``) is :mod:`megavod.models.yolov_head`'s.

Input: BGR 0-255 images, letterboxed (no mean/std); output (:class:`AnchorPredictions`) in the pixels
of that input, one row per anchor in the authors' order: levels of stride 8, 16, 32, each row-major.
Training parts (SimOTA, the losses) take :meth:`YOLOX.raw_outputs` (:class:`HeadOutputs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from megavod.structures import Detections

STRIDES = (8, 16, 32)
# yolox/exp/yolox_base.py::Exp.get_model (init_yolo): every BatchNorm2d gets eps 1e-3, momentum 0.03.
BN_EPS = 1e-3
BN_MOMENTUM = 0.03
PRIOR_PROB = 0.01  # head.initialize_biases(1e-2) in every get_model


# ----------------------------------------------------------------------------------------------
# Blocks (yolox/models/network_blocks.py)


class BaseConv(nn.Module):
    """Conv (no bias, 'same' padding) -> BatchNorm -> SiLU: ``network_blocks.py::BaseConv``."""

    def __init__(self, in_channels: int, out_channels: int, ksize: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, ksize, stride, padding=(ksize - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """1x1 then 3x3 conv, plus the input when ``shortcut`` (``network_blocks.py::Bottleneck``, expansion 1)."""

    def __init__(self, channels: int, shortcut: bool):
        super().__init__()
        self.conv1 = BaseConv(channels, channels, 1)
        self.conv2 = BaseConv(channels, channels, 3)
        self.use_add = shortcut

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv2(self.conv1(x))
        return y + x if self.use_add else y


class CSPLayer(nn.Module):
    """CSP bottleneck with 3 convs (``network_blocks.py::CSPLayer``, expansion 0.5): ``conv1`` feeds
    ``n`` bottlenecks ``m``, ``conv2`` the bypass, ``conv3`` fuses both."""

    def __init__(self, in_channels: int, out_channels: int, n: int, shortcut: bool = True):
        super().__init__()
        hidden = int(out_channels * 0.5)
        self.conv1 = BaseConv(in_channels, hidden, 1)
        self.conv2 = BaseConv(in_channels, hidden, 1)
        self.conv3 = BaseConv(2 * hidden, out_channels, 1)
        self.m = nn.Sequential(*[Bottleneck(hidden, shortcut) for _ in range(n)])

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(torch.cat([self.m(self.conv1(x)), self.conv2(x)], dim=1))


class SPPBottleneck(nn.Module):
    """Spatial pyramid pooling, max pools 5/9/13 (``network_blocks.py::SPPBottleneck``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_sizes: tuple[int, ...] = (5, 9, 13)):
        super().__init__()
        hidden = in_channels // 2
        self.conv1 = BaseConv(in_channels, hidden, 1)
        self.m = nn.ModuleList([nn.MaxPool2d(k, stride=1, padding=k // 2) for k in kernel_sizes])
        self.conv2 = BaseConv(hidden * (len(kernel_sizes) + 1), out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        return self.conv2(torch.cat([x] + [pool(x) for pool in self.m], dim=1))


class Focus(nn.Module):
    """Space-to-depth (top-left, bottom-left, top-right, bottom-right) then a 3x3 conv
    (``network_blocks.py::Focus``)."""

    def __init__(self, in_channels: int, out_channels: int, ksize: int = 3):
        super().__init__()
        self.conv = BaseConv(in_channels * 4, out_channels, ksize)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], dim=1)
        return self.conv(x)


# ----------------------------------------------------------------------------------------------
# Backbone and neck (yolox/models/darknet.py, yolo_pafpn.py)


def base_depth(depth: float) -> int:
    """Bottlenecks of dark2's (and dark5's) CSP layer: ``darknet.py::CSPDarknet`` ``max(round(3 d), 1)``;
    dark3 and dark4 have 3 times as many."""
    return max(round(depth * 3), 1)


class CSPDarknet(nn.Module):
    """``darknet.py::CSPDarknet``: Focus stem, then dark2..dark5 (a stride-2 conv and a CSP layer each;
    dark5 with SPP before its CSP layer, whose bottlenecks have no shortcut). Returns dark3, dark4, dark5
    (strides 8, 16, 32)."""

    def __init__(self, depth: float, width: float):
        super().__init__()
        c = int(width * 64)
        n = base_depth(depth)
        self.stem = Focus(3, c, ksize=3)
        self.dark2 = nn.Sequential(BaseConv(c, c * 2, 3, 2), CSPLayer(c * 2, c * 2, n))
        self.dark3 = nn.Sequential(BaseConv(c * 2, c * 4, 3, 2), CSPLayer(c * 4, c * 4, n * 3))
        self.dark4 = nn.Sequential(BaseConv(c * 4, c * 8, 3, 2), CSPLayer(c * 8, c * 8, n * 3))
        self.dark5 = nn.Sequential(
            BaseConv(c * 8, c * 16, 3, 2), SPPBottleneck(c * 16, c * 16), CSPLayer(c * 16, c * 16, n, shortcut=False)
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.dark2(self.stem(x))
        dark3 = self.dark3(x)
        dark4 = self.dark4(dark3)
        return dark3, dark4, self.dark5(dark4)


def _upsample(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


class YOLOPAFPN(nn.Module):
    """``yolo_pafpn.py::YOLOPAFPN``: CSPDarknet (``backbone``), top-down then bottom-up path.
    Returns the maps of strides 8, 16, 32 with 256, 512, 1024 x width channels."""

    def __init__(self, depth: float, width: float, in_channels: tuple[int, int, int] = (256, 512, 1024)):
        super().__init__()
        c3, c4, c5 = (int(c * width) for c in in_channels)
        n = round(3 * depth)
        self.backbone = CSPDarknet(depth, width)
        self.lateral_conv0 = BaseConv(c5, c4, 1)
        self.C3_p4 = CSPLayer(2 * c4, c4, n, shortcut=False)
        self.reduce_conv1 = BaseConv(c4, c3, 1)
        self.C3_p3 = CSPLayer(2 * c3, c3, n, shortcut=False)
        self.bu_conv2 = BaseConv(c3, c3, 3, 2)
        self.C3_n3 = CSPLayer(2 * c3, c4, n, shortcut=False)
        self.bu_conv1 = BaseConv(c4, c4, 3, 2)
        self.C3_n4 = CSPLayer(2 * c4, c5, n, shortcut=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x2, x1, x0 = self.backbone(x)
        fpn_out0 = self.lateral_conv0(x0)
        f_out0 = self.C3_p4(torch.cat([_upsample(fpn_out0), x1], dim=1))
        fpn_out1 = self.reduce_conv1(f_out0)
        pan_out2 = self.C3_p3(torch.cat([_upsample(fpn_out1), x2], dim=1))
        pan_out1 = self.C3_n3(torch.cat([self.bu_conv2(pan_out2), fpn_out1], dim=1))
        pan_out0 = self.C3_n4(torch.cat([self.bu_conv1(pan_out1), fpn_out0], dim=1))
        return pan_out2, pan_out1, pan_out0


# ----------------------------------------------------------------------------------------------
# Head outputs


@dataclass
class HeadOutputs:
    """The head's per-anchor outputs before decoding, what training needs
    (``yolo_head.py::YOLOXHead.forward`` in training, before ``get_output_and_grid`` decodes the boxes).

    outputs: [B, A, 5 + C] the authors' layout: (tx, ty, tw, th) raw regression, objectness logit,
        C class logits. grids: [A, 2] each anchor's cell (x, y); strides: [A] its level's stride (both
        in ``outputs``' dtype). cls_features: [B, A, W] the video branch's features (``cls_convs2``),
        None without it; reg_features: [B, A, W] the regression branch's (``reg_convs``).
    """

    outputs: Tensor
    grids: Tensor
    strides: Tensor
    cls_features: Tensor | None
    reg_features: Tensor

    @property
    def regression(self) -> Tensor:
        return self.outputs[..., :4]

    @property
    def objectness_logits(self) -> Tensor:
        return self.outputs[..., 4]

    @property
    def class_logits(self) -> Tensor:
        return self.outputs[..., 5:]

    def boxes_cxcywh(self) -> Tensor:
        """[B, A, 4] decoded (cx, cy, w, h) in input pixels: ``get_output_and_grid`` / ``decode_outputs``."""
        return decode_boxes(self.regression, self.grids, self.strides)


@dataclass
class AnchorPredictions:
    """Test-time output of the head, one row per anchor (levels 8, 16, 32; row-major per level).

    boxes: [B, A, 4] x1y1x2y2 in input pixels; objectness: [B, A] and class_scores: [B, A, C] after
    the sigmoid; cls_features: [B, A, W] from ``cls_convs2`` (None without the video branch);
    reg_features: [B, A, W] from ``reg_convs``.
    """

    boxes: Tensor
    objectness: Tensor
    class_scores: Tensor
    cls_features: Tensor | None
    reg_features: Tensor

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def __getitem__(self, index: int | slice) -> "AnchorPredictions":
        """The predictions of image(s) ``index`` (an int keeps the batch axis, of size 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        cls = None if self.cls_features is None else self.cls_features[index]
        return AnchorPredictions(self.boxes[index], self.objectness[index], self.class_scores[index], cls,
                                 self.reg_features[index])


def anchor_grid(sizes: list[tuple[int, int]], strides: tuple[int, ...], dtype: torch.dtype,
                device: torch.device) -> tuple[Tensor, Tensor]:
    """(grids [A, 2] (x, y), strides [A]) for levels of ``sizes`` (h, w), each row-major
    (``yolo_head.py::YOLOXHead.decode_outputs``)."""
    grids, level_strides = [], []
    for (h, w), stride in zip(sizes, strides):
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        grids.append(torch.stack((xs, ys), dim=2).reshape(-1, 2))
        level_strides.append(torch.full((h * w,), stride, device=device))
    return torch.cat(grids).to(dtype), torch.cat(level_strides).to(dtype)


def decode_boxes(regression: Tensor, grids: Tensor, strides: Tensor) -> Tensor:
    """(cx, cy, w, h) = ((tx, ty) + grid) * stride, exp(tw, th) * stride: ``YOLOXHead.decode_outputs``."""
    s = strides.unsqueeze(-1)
    return torch.cat([(regression[..., :2] + grids) * s, torch.exp(regression[..., 2:4]) * s], dim=-1)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """As ``yolox/utils/boxes.py::postprocess`` turns decoded boxes into corners."""
    half = boxes[..., 2:4] / 2
    return torch.cat([boxes[..., :2] - half, boxes[..., :2] + half], dim=-1)


def _flatten_levels(maps: list[Tensor]) -> Tensor:
    """[B, C, H_l, W_l] per level -> [B, sum H_l W_l, C] (the authors' flatten, concat, permute)."""
    return torch.cat([m.flatten(start_dim=2) for m in maps], dim=2).permute(0, 2, 1)


# ----------------------------------------------------------------------------------------------
# Head (yolox/models/yolo_head.py, yolox/models/yolovp_msa.py)


def _conv_pair(width: int) -> nn.Sequential:
    return nn.Sequential(BaseConv(width, width, 3), BaseConv(width, width, 3))


class YOLOXHead(nn.Module):
    """The decoupled head (``yolo_head.py::YOLOXHead``): per level a 1x1 ``stems`` conv, two 3x3 convs
    per branch (``cls_convs``, ``reg_convs``) and 1x1 predictions (``cls_preds``, ``reg_preds``,
    ``obj_preds`` on the regression branch). ``video_branch``: YOLOV's second classification branch
    ``cls_convs2`` (``yolovp_msa.py::YOLOXHead``), whose features are the ones YOLOV aggregates."""

    def __init__(self, num_classes: int, width: float, in_channels: tuple[int, int, int] = (256, 512, 1024),
                 strides: tuple[int, ...] = STRIDES, video_branch: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.strides = tuple(strides)
        self.width = int(256 * width)
        w = self.width
        # In the authors' order, so that state_dict() lists the tensors as their files do.
        self.cls_convs = nn.ModuleList([_conv_pair(w) for _ in in_channels])
        self.reg_convs = nn.ModuleList([_conv_pair(w) for _ in in_channels])
        self.cls_preds = nn.ModuleList([nn.Conv2d(w, num_classes, 1) for _ in in_channels])
        self.reg_preds = nn.ModuleList([nn.Conv2d(w, 4, 1) for _ in in_channels])
        self.obj_preds = nn.ModuleList([nn.Conv2d(w, 1, 1) for _ in in_channels])
        self.cls_convs2 = nn.ModuleList([_conv_pair(w) for _ in in_channels]) if video_branch else None
        self.stems = nn.ModuleList([BaseConv(int(c * width), w, 1) for c in in_channels])

    @property
    def video_branch(self) -> bool:
        return self.cls_convs2 is not None

    @torch.no_grad()
    def initialize_biases(self, prior_prob: float = PRIOR_PROB) -> None:
        """Class and objectness biases at -log((1 - p) / p): ``YOLOXHead.initialize_biases``."""
        value = -math.log((1 - prior_prob) / prior_prob)
        for conv in [*self.cls_preds, *self.obj_preds]:
            conv.bias.fill_(value)

    def raw_outputs(self, features: tuple[Tensor, ...] | list[Tensor]) -> HeadOutputs:
        """The per-anchor outputs of the PAFPN maps (strides 8, 16, 32), undecoded."""
        outputs, cls2, reg = [], [], []
        for k, x in enumerate(features):
            x = self.stems[k](x)
            cls_feat = self.cls_convs[k](x)
            reg_feat = self.reg_convs[k](x)
            outputs.append(torch.cat([self.reg_preds[k](reg_feat), self.obj_preds[k](reg_feat),
                                      self.cls_preds[k](cls_feat)], dim=1))
            reg.append(reg_feat)
            if self.cls_convs2 is not None:
                cls2.append(self.cls_convs2[k](x))
        sizes = [tuple(o.shape[-2:]) for o in outputs]
        flat = _flatten_levels(outputs)
        grids, strides = anchor_grid(sizes, self.strides, flat.dtype, flat.device)
        return HeadOutputs(outputs=flat, grids=grids, strides=strides,
                           cls_features=_flatten_levels(cls2) if cls2 else None, reg_features=_flatten_levels(reg))

    def forward(self, features: tuple[Tensor, ...] | list[Tensor]) -> AnchorPredictions:
        return decode(self.raw_outputs(features))


def decode(raw: HeadOutputs) -> AnchorPredictions:
    """Test-time predictions from the raw outputs: boxes decoded to corners, sigmoid scores."""
    return AnchorPredictions(
        boxes=cxcywh_to_xyxy(raw.boxes_cxcywh()), objectness=raw.objectness_logits.sigmoid(),
        class_scores=raw.class_logits.sigmoid(), cls_features=raw.cls_features, reg_features=raw.reg_features,
    )


# ----------------------------------------------------------------------------------------------
# The network


class YOLOX(nn.Module):
    """``backbone`` (:class:`YOLOPAFPN`) and ``head`` (:class:`YOLOXHead`): ``yolox/models/yolox.py``
    and ``myolox.py::YOLOX``. ``forward(images)`` -> :class:`AnchorPredictions`."""

    def __init__(self, backbone: YOLOPAFPN, head: YOLOXHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def raw_outputs(self, images: Tensor) -> HeadOutputs:
        """Undecoded per-anchor outputs of ``images`` [B, 3, H, W] (BGR 0-255, H and W multiples of 32)."""
        return self.head.raw_outputs(self.backbone(images))

    def forward(self, images: Tensor) -> AnchorPredictions:
        return self.head(self.backbone(images))


# The released sizes: (depth, width) of exps/yolov/yolox{s,l,x}_vid.py and yolov_{s,l,x}.py.
SIZES = {"S": (0.33, 0.5), "M": (0.67, 0.75), "L": (1.0, 1.0), "X": (1.33, 1.25)}


def build_yolox(depth: float, width: float, num_classes: int = 30, video_branch: bool = False,
                prior_prob: float = PRIOR_PROB) -> YOLOX:
    """YOLOX of ``depth`` / ``width`` multipliers (S 0.33/0.5, L 1/1, X 1.33/1.25) as the authors'
    ``get_model`` returns it: BatchNorm eps 1e-3 and momentum 0.03, class and objectness biases at
    ``prior_prob`` (their 0.01). ``video_branch``: YOLOV's ``cls_convs2`` too (its ``trans`` /
    ``linear_pred`` are :mod:`megavod.models.yolov_head`'s)."""
    model = YOLOX(YOLOPAFPN(depth, width), YOLOXHead(num_classes, width, video_branch=video_branch))
    model.head.initialize_biases(prior_prob)
    return model


# ----------------------------------------------------------------------------------------------
# Post-processing


def yolox_detections(boxes: Tensor, objectness: Tensor, class_scores: Tensor, conf_thresh: float,
                     nms_thresh: float) -> Detections:
    """One image's detections as ``yolox/utils/boxes.py::postprocess`` (class-aware) makes them.

    boxes [A, 4] x1y1x2y2, objectness [A], class_scores [A, C] (after the sigmoid). Each anchor's top
    class (the first on ties, as ``torch.max``); kept when objectness x that score >= ``conf_thresh``;
    torchvision's ``batched_nms`` per class at IoU ``nms_thresh`` on that product. Labels are the class
    index + 1 (megavod's 1..C, 0 is background); the score is the product. Rows by decreasing score.
    """
    class_conf, class_pred = class_scores.max(dim=1)
    scores = objectness * class_conf
    keep = torch.nonzero(scores >= conf_thresh).squeeze(1)
    boxes, scores, class_pred = boxes[keep], scores[keep], class_pred[keep]
    kept = torchvision.ops.batched_nms(boxes, scores, class_pred, nms_thresh)
    return Detections(boxes[kept], scores[kept], class_pred[kept] + 1)
