"""Box head of the C4 detector (docs/conventions.md#box-head-and-predictor): res5 on the whole map, RoIAlign,
fc6/fc7, predictor, Fast R-CNN sampling and loss, test-time postprocess.

Pieces MEGA/RDN/FGFA/DFF reuse:

* ``ResNetC5MLPFeatureExtractor.res5(c4) -> map`` (res5, then the optional 1x1 reduce conv + ReLU),
  ``.pool(map, boxes) -> [N, C*7*7]``, ``.fc6`` / ``.fc7`` (``.mlp(x)`` applies both with ReLU);
* :class:`FPNPredictor` (``cls_score`` 31, ``bbox_pred`` 124, class-specific);
* :class:`FastRCNNLossComputation`: ``subsample(proposals, targets)`` then ``loss(logits, deltas, sampled)``;
* :class:`BoxPostProcessor`: softmax, per-class decode/clip, score > 0.001, NMS 0.5, top 300.

State-dict names equal the authors': ``roi_heads.box.feature_extractor.{head.layer4, conv, fc6, fc7}``
and ``roi_heads.box.predictor.{cls_score, bbox_pred}`` (torchvision: ``roi_heads.box_predictor``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.onnx.operators import shape_as_tensor
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, Matcher
from torchvision.ops import roi_align

from megavod.errors import ConfigError
from megavod.models.backbone import ResNetHead, build_res5_head
from megavod.models.box_coder import BoxCoder, box_iou, clip_boxes, per_class_nms
from megavod.models.rpn import Proposals, target_boxes_labels
from megavod.structures import Detections


def make_fc(in_features: int, out_features: int) -> nn.Linear:
    """The authors' ``make_fc``: Linear with kaiming_uniform(a=1) and bias 0."""
    fc = nn.Linear(in_features, out_features)
    nn.init.kaiming_uniform_(fc.weight, a=1)
    nn.init.zeros_(fc.bias)
    return fc


def _as_boxes(proposals: Sequence[Tensor | Proposals]) -> list[Tensor]:
    return [p.boxes if isinstance(p, Proposals) else p for p in proposals]


class ResNetC5RoIPooler(nn.Module):
    """res5 on the whole C4 map -> [1x1 reduce conv + ReLU] -> RoIAlign 7x7, flattened.

    RoIAlign is legacy (``aligned=False``), ``sampling_ratio=0`` (adaptive), scale 1/16, applied to the
    res5 output of the whole image, not res5 applied to pooled C4 (docs/conventions.md#box-head-and-predictor).
    Every C4 box head (plain, MEGA, RDN) starts with this; they differ in what follows the pooled features.
    """

    def __init__(
        self,
        res5: ResNetHead,
        reduce_channels: int | None = None,
        resolution: int = 7,
        scale: float = 1.0 / 16,
        sampling_ratio: int = 0,
    ):
        super().__init__()
        self.head = res5
        channels = res5.out_channels
        if reduce_channels is not None:
            self.conv = nn.Conv2d(channels, reduce_channels, 1)
            nn.init.kaiming_uniform_(self.conv.weight, a=1)
            nn.init.zeros_(self.conv.bias)
            channels = reduce_channels
        else:
            self.conv = None
        self.resolution = resolution
        self.scale = scale
        self.sampling_ratio = sampling_ratio
        self.map_channels = channels
        self.pooled_features = channels * resolution * resolution

    def res5(self, c4: Tensor) -> Tensor:
        """The map RoIs are pooled from: res5 on C4 [B,1024,h,w], then the reduce conv + ReLU if any."""
        x = self.head(c4)
        if self.conv is not None:
            x = F.relu(self.conv(x))
        return x

    def pool(self, feature_map: Tensor, boxes: Sequence[Tensor | Proposals]) -> Tensor:
        """RoIAlign of ``boxes`` (one [N_i,4] tensor per image of the map's batch) -> [sum N_i, C*r*r].

        The box coordinates stay float32 (float64 with a float64 map): a lower-precision map (bf16 under
        CUDA autocast, where ``reduce_channels``' conv gives a bf16 map) is cast up for RoIAlign, never the
        boxes down (a bf16 x near 1000 is off by up to 2 px). torchvision's autocast rule for ``roi_align``
        does the same (both inputs to float32, the output back to the map's dtype) but only for what it is
        given, so boxes cast to bf16 beforehand stay rounded. The output has the map's dtype; in float32
        nothing changes."""
        dtype = torch.promote_types(feature_map.dtype, torch.float32)
        rois = [b.to(dtype) for b in _as_boxes(boxes)]
        pooled = roi_align(feature_map.to(dtype), rois, self.resolution, self.scale, self.sampling_ratio,
                           aligned=False)
        return pooled.to(feature_map.dtype).flatten(1)


class ResNetC5MLPFeatureExtractor(ResNetC5RoIPooler):
    """``ResNetConv52MLPFeatureExtractor``: res5 -> [conv+ReLU] -> RoIAlign 7x7 -> fc6 -> ReLU -> fc7 -> ReLU."""

    def __init__(
        self,
        res5: ResNetHead,
        reduce_channels: int | None = None,
        resolution: int = 7,
        scale: float = 1.0 / 16,
        sampling_ratio: int = 0,
        representation_size: int = 1024,
    ):
        super().__init__(res5, reduce_channels, resolution, scale, sampling_ratio)
        self.fc6 = make_fc(self.pooled_features, representation_size)
        self.fc7 = make_fc(representation_size, representation_size)
        self.out_channels = representation_size

    def mlp(self, x: Tensor) -> Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(x))))

    def forward(self, c4: Tensor, boxes: Sequence[Tensor | Proposals]) -> Tensor:
        return self.mlp(self.pool(self.res5(c4), boxes))


class AggregatingFeatureExtractor(ResNetC5RoIPooler):
    """res5 -> [conv] -> RoIAlign -> ``aggregator`` (MEGA, RDN), whose ``embed`` is the authors' fc6 + ReLU
    giving each RoI's raw feature; the aggregation itself is called by the detector with other frames' rows."""

    def __init__(self, res5: ResNetHead, aggregator: nn.Module, reduce_channels: int | None = None,
                 resolution: int = 7, scale: float = 1.0 / 16, sampling_ratio: int = 0):
        super().__init__(res5, reduce_channels, resolution, scale, sampling_ratio)
        self.aggregator = aggregator

    def raw_features(self, c4: Tensor, boxes: Sequence[Tensor | Proposals]) -> Tensor:
        """Raw per-RoI features ReLU(fc6(RoIAlign(res5(C4)))) of the boxes of each image of ``c4``."""
        return self.aggregator.embed(self.pool(self.res5(c4), boxes))


class FPNPredictor(nn.Module):
    """``cls_score`` Linear(in, K) std 0.01 and class-specific ``bbox_pred`` Linear(in, 4K) std 0.001."""

    def __init__(self, in_features: int = 1024, num_classes: int = 31):
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


@dataclass
class SampledRoIs:
    """RoIs sampled for the Fast R-CNN loss: per-image boxes (original proposal order) and, for all
    of them concatenated, ``labels`` [N] (0 = background) and ``regression_targets`` [N,4]."""

    boxes: list[Tensor]
    labels: Tensor
    regression_targets: Tensor


class FastRCNNLossComputation:
    """Matching (IoU >= 0.5 fg, < 0.5 bg, no low-quality matches), 128 RoIs per image at most 25% fg,
    cross-entropy + smooth-L1 (beta 1) on the class-specific deltas / number sampled
    (docs/conventions.md#box-head-and-predictor)."""

    def __init__(
        self,
        box_coder: BoxCoder,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.5,
        batch_size_per_image: int = 128,
        positive_fraction: float = 0.25,
    ):
        self.box_coder = box_coder
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        self.sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)

    def _match(self, boxes: Tensor, gt: Tensor, gt_labels: Tensor) -> tuple[Tensor, Tensor]:
        if gt.shape[0] == 0:
            return torch.zeros(boxes.shape[0], dtype=torch.int64, device=boxes.device), torch.zeros_like(boxes)
        matched = self.matcher(box_iou(gt, boxes))
        labels = gt_labels[matched.clamp(min=0)].clone()
        labels[matched == Matcher.BELOW_LOW_THRESHOLD] = 0
        labels[matched == Matcher.BETWEEN_THRESHOLDS] = -1
        return labels, self.box_coder.encode(gt[matched.clamp(min=0)], boxes)

    @torch.no_grad()
    def subsample(self, proposals: Sequence[Tensor | Proposals], targets: Sequence[Any]) -> SampledRoIs:
        boxes_list = _as_boxes(proposals)
        labels, regs = [], []
        for boxes, target in zip(boxes_list, targets):
            gt, gt_labels = target_boxes_labels(target)
            lab, reg = self._match(boxes, gt.to(boxes), gt_labels.to(boxes.device))
            labels.append(lab)
            regs.append(reg)
        pos_masks, neg_masks = self.sampler(labels)
        out_boxes, out_labels, out_regs = [], [], []
        for boxes, lab, reg, pos, neg in zip(boxes_list, labels, regs, pos_masks, neg_masks):
            # nonzero of the mask keeps the proposals' order, as the authors' subsample does
            inds = torch.nonzero(pos | neg).squeeze(1)
            out_boxes.append(boxes[inds])
            out_labels.append(lab[inds])
            out_regs.append(reg[inds])
        return SampledRoIs(out_boxes, torch.cat(out_labels), torch.cat(out_regs))

    def loss(self, class_logits: Tensor, box_regression: Tensor, sampled: SampledRoIs) -> dict[str, Tensor]:
        labels = sampled.labels.to(class_logits.device)
        if labels.numel() == 0:
            zero = class_logits.sum() * 0 + box_regression.sum() * 0
            return {"loss_classifier": zero, "loss_box_reg": zero}
        class_logits, box_regression = class_logits.float(), box_regression.float()
        loss_classifier = F.cross_entropy(class_logits, labels)
        pos = torch.nonzero(labels > 0).squeeze(1)
        cols = 4 * labels[pos, None] + torch.arange(4, device=labels.device)
        box_loss = F.smooth_l1_loss(
            box_regression[pos[:, None], cols], sampled.regression_targets[pos].to(box_regression.device),
            beta=1.0, reduction="sum",
        )
        return {"loss_classifier": loss_classifier, "loss_box_reg": box_loss / labels.numel()}


class BoxPostProcessor:
    """Test-time detections (docs/conventions.md#box-head-and-predictor): softmax, per-class decode and clip,
    for each class j >= 1 keep score > ``score_thresh`` and NMS at ``nms_thresh``, then the top
    ``detections_per_img`` over all classes by kth-value threshold (ties at the threshold may keep a few more,
    as the authors')."""

    def __init__(self, box_coder: BoxCoder, score_thresh: float = 0.001, nms_thresh: float = 0.5,
                 detections_per_img: int = 300):
        self.box_coder = box_coder
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img

    def image_detections(
        self,
        class_logits: Tensor,
        box_regression: Tensor,
        boxes: Tensor,
        image_size: tuple[int, int] | Tensor,
        score_thresh: float | Tensor | None = None,
        nms_thresh: float | Tensor | None = None,
        detections_per_img: int | Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The postprocess of one image's proposals ``boxes`` [N, 4] and their predictor outputs: (boxes
        [D, 4], scores [D], labels [D], the proposal row each detection was decoded from [D]) in the pixels
        of the resized image, classes ascending, each by score (ties by proposal row,
        docs/conventions.md#ties).

        The thresholds and the limit default to the postprocessor's own; they may be 0-d tensors, as
        ``image_size`` may be an int64 tensor [2]: the ONNX graphs trace this function with them as graph
        inputs (megavod.export.graphs.SETTINGS), so no Python branch depends on them or on a row count."""
        score_thresh = self.score_thresh if score_thresh is None else score_thresh
        nms_thresh = self.nms_thresh if nms_thresh is None else nms_thresh
        limit = self.detections_per_img if detections_per_img is None else detections_per_img
        probs = F.softmax(class_logits.float(), -1)
        num_classes = probs.shape[1]
        decoded = clip_boxes(self.box_coder.decode(box_regression, boxes), image_size)
        per_class_boxes = decoded.reshape(-1, num_classes, 4)[:, 1:].permute(1, 0, 2)  # [K-1, N, 4]
        per_class_scores = probs[:, 1:].permute(1, 0)  # [K-1, N]
        kept = per_class_nms(per_class_boxes, per_class_scores, score_thresh, nms_thresh)
        cls, rows = kept[:, 0], kept[:, 1]
        out_boxes, out_scores = per_class_boxes[cls, rows], per_class_scores[cls, rows]
        # The top ``limit`` by the authors' kthvalue threshold: every score at or above the limit-th largest
        # (ties at the cut kept, a set independent of order). With ``limit`` or fewer detections (or limit <= 0:
        # no cut) the cut is -1, below every probability. A sort, not kthvalue: it exports (TopK) and takes
        # the limit as a graph value. (-1, not -inf: the exporter's shape inference reads a one-element float
        # constant as an int64 and fails on -inf.)
        limit, count = torch.as_tensor(limit, dtype=torch.int64), shape_as_tensor(out_scores)[0]
        below = torch.full((1,), -1.0, dtype=out_scores.dtype, device=out_scores.device)
        ranked = torch.cat([out_scores.sort(descending=True)[0], below])
        at = torch.where(limit > 0, torch.minimum(limit - 1, count), count)  # count: the -1 after the scores
        keep = torch.nonzero(out_scores >= ranked.index_select(0, at.reshape(1).to(ranked.device))).squeeze(1)
        return out_boxes[keep], out_scores[keep], cls[keep] + 1, rows[keep]

    def __call__(
        self,
        class_logits: Tensor,
        box_regression: Tensor,
        proposals: Sequence[Tensor | Proposals],
        image_sizes: Sequence[tuple[int, int]],
        return_indices: bool = False,
    ) -> list[Detections] | tuple[list[Detections], list[Tensor]]:
        """Detections per image (:meth:`image_detections` of each). With ``return_indices`` also, per image,
        the index [N] of the proposal (row of that image's proposals) each detection was decoded from, e.g.
        to find a detection's relation-module input for BLR (docs/departures.md#blr-as-megavod-reads-the-paper);
        the detections are the same either way."""
        boxes_list = _as_boxes(proposals)
        counts = [len(b) for b in boxes_list]
        out, indices = [], []
        for logits, regression, boxes, image_size in zip(
            class_logits.split(counts), box_regression.split(counts), boxes_list, image_sizes
        ):
            det_boxes, scores, labels, rows = self.image_detections(logits, regression, boxes, image_size)
            out.append(Detections(det_boxes, scores, labels))
            indices.append(rows)
        return (out, indices) if return_indices else out


class RoIBoxHead(nn.Module):
    """Feature extractor + predictor + Fast R-CNN loss/postprocess (key ``roi_heads.box``)."""

    def __init__(
        self,
        feature_extractor: nn.Module,
        predictor: FPNPredictor,
        loss: FastRCNNLossComputation,
        postprocessor: BoxPostProcessor,
    ):
        super().__init__()
        self.feature_extractor = feature_extractor
        self.predictor = predictor
        self.loss_computation = loss
        self.postprocessor = postprocessor

    def forward(
        self,
        c4: Tensor,
        proposals: Sequence[Tensor | Proposals],
        image_sizes: Sequence[tuple[int, int]],
        targets: Sequence[Any] | None = None,
    ) -> list[Detections] | dict[str, Tensor]:
        """Training (``targets`` given): the two Fast R-CNN losses. Eval: detections per image."""
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            sampled = self.loss_computation.subsample(proposals, targets)
            class_logits, box_regression = self.predictor(self.feature_extractor(c4, sampled.boxes))
            return self.loss_computation.loss(class_logits, box_regression, sampled)
        class_logits, box_regression = self.predictor(self.feature_extractor(c4, proposals))
        return self.postprocessor(class_logits, box_regression, proposals, image_sizes)


def build_box_head(model_cfg: Any, make_aggregator: Callable[[int], nn.Module] | None = None) -> RoIBoxHead:
    """C4 box head from a ``megavod.config.ModelConfig`` (uses ``.backbone`` and ``.roi_head``): the plain
    fc6/fc7 head, or with ``make_aggregator(pooled_features)`` an aggregating one (MEGA, RDN)."""
    b, h = model_cfg.backbone, model_cfg.roi_head
    if b.res5_dilation == 1 and abs(h.pooler_scale - 1.0 / 32) > 1e-12:
        raise ConfigError("config key 'model.roi_head.pooler_scale': must be 1/32 when "
                          "model.backbone.res5_dilation is 1 (res5 then has stride 32)")
    box_coder = BoxCoder(tuple(h.bbox_reg_weights))
    pooler = dict(
        reduce_channels=h.reduced_channels if h.reduce_channel else None,
        resolution=h.pooler_resolution,
        scale=h.pooler_scale,
        sampling_ratio=h.sampling_ratio,
    )
    res5 = build_res5_head(b)
    if make_aggregator is None:
        extractor = ResNetC5MLPFeatureExtractor(res5, representation_size=h.representation_size, **pooler)
    else:
        pooled = (pooler["reduce_channels"] or res5.out_channels) * h.pooler_resolution**2
        extractor = AggregatingFeatureExtractor(res5, make_aggregator(pooled), **pooler)
    return RoIBoxHead(
        extractor,
        FPNPredictor(h.representation_size, h.num_classes),
        FastRCNNLossComputation(
            box_coder, h.fg_iou_thresh, h.bg_iou_thresh, h.batch_size_per_image, h.positive_fraction
        ),
        BoxPostProcessor(box_coder, h.score_thresh, h.nms_thresh, h.detections_per_img),
    )
