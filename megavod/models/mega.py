"""The MEGA detector (spec §3.5, §4, §5.2): the single-frame detector's backbone and RPN, and a box head
whose features are aggregated by :class:`~megavod.models.mega_head.MEGAAggregator`.

The detector holds no stream state. At test time the streaming engine (:mod:`megavod.inference.engine`)
calls :meth:`MEGADetector.frame_features` once per frame and :meth:`MEGADetector.detect_key` once per
key frame with the local window, the global pool and the memory it owns. Training
(:meth:`MEGADetector.forward` on a :class:`~megavod.data.vid_dataset.TrainSample`) follows spec §5.2.

Work the authors' code repeats and megavod does once (same numbers):

* a frame's reference proposals (75) are the first 75 of its own test-time proposals (300): one RPN
  pass, the same NMS order (so ``rpn.ref_pre_nms_top_n`` must equal ``rpn.pre_nms_top_n_test``);
* a frame's raw RoI features (res5, RoIAlign, ``l_fcs[0]`` + ReLU) are computed once, for its 300
  proposals, and serve it as key, local, global and memory frame;
* the value projection runs before the attention-weighted sum (:mod:`megavod.models.relation`).

State-dict names equal the authors' (spec §9) except inside the aggregator, whose names map one to one
(:meth:`MEGAAggregator.authors_key_mapping`): ``roi_heads.box.feature_extractor.aggregator.fcs.0`` is
their ``roi_heads.box.feature_extractor.l_fcs.0``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from megavod.config import Config
from megavod.errors import ConfigError
from megavod.inference.memory import LongRangeMemory
from megavod.models.backbone import C4Backbone, build_backbone, build_res5_head, load_pretrained_resnet
from megavod.models.box_coder import BoxCoder
from megavod.models.mega_head import MEGAAggregator, RoiRows
from megavod.models.roi_heads import BoxPostProcessor, FastRCNNLossComputation, FPNPredictor, ResNetC5RoIPooler
from megavod.models.rpn import RPN, build_rpn
from megavod.structures import Detections, FrameFeatures


class MEGAFeatureExtractor(ResNetC5RoIPooler):
    """res5 -> [conv] -> RoIAlign -> the aggregator (whose ``fcs[0]`` is the authors' ``l_fcs[0]``)."""

    def __init__(self, pooler_args: dict[str, Any], aggregator: MEGAAggregator) -> None:
        super().__init__(**pooler_args)
        self.aggregator = aggregator

    def raw_features(self, c4: Tensor, boxes: Sequence[Tensor]) -> Tensor:
        """Raw per-RoI features ReLU(l_fcs[0](RoIAlign(res5(C4)))) for boxes of each image of ``c4``."""
        return self.aggregator.embed(self.pool(self.res5(c4), list(boxes)))


class MEGABoxHead(nn.Module):
    """``roi_heads.box``: feature extractor, predictor, and the Fast R-CNN loss / postprocess."""

    def __init__(self, feature_extractor: MEGAFeatureExtractor, predictor: FPNPredictor,
                 loss: FastRCNNLossComputation, postprocessor: BoxPostProcessor) -> None:
        super().__init__()
        self.feature_extractor = feature_extractor
        self.predictor = predictor
        self.loss_computation = loss
        self.postprocessor = postprocessor


class MEGADetector(nn.Module):
    """MEGA (also the base model: the engine just runs it without memory).

    Args:
        backbone, rpn: as the single-frame detector.
        box_head: :class:`MEGABoxHead`.
        ref_proposals: proposals per local/global/memory frame (code 75, ``REF_POST_NMS_TOP_N``).
        temporal_embedding: tag rows with their frame index (spec §13.7).
    """

    def __init__(self, backbone: C4Backbone, rpn: RPN, box_head: MEGABoxHead, ref_proposals: int = 75,
                 temporal_embedding: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = nn.ModuleDict({"box": box_head})
        self.ref_proposals = ref_proposals
        self.temporal_embedding = temporal_embedding

    @property
    def box_head(self) -> MEGABoxHead:
        return self.roi_heads["box"]

    @property
    def aggregator(self) -> MEGAAggregator:
        return self.box_head.feature_extractor.aggregator

    # -- inference: the streaming engine's entry points -----------------------------------------------

    @torch.no_grad()
    def frame_features(self, image: Tensor, index: int, original_size: tuple[int, int]) -> FrameFeatures:
        """The per-frame pass, once per frame: C4, the 300 test proposals, their raw RoI features."""
        size = (int(image.shape[-2]), int(image.shape[-1]))
        c4 = self.backbone(image[None])
        boxes = self.rpn.proposals(c4, [size], "key")[0].boxes
        feats = self.box_head.feature_extractor.raw_features(c4, [boxes])
        return FrameFeatures(index, boxes, feats, size, original_size)

    def _rows(self, frame: FrameFeatures, n: int | None) -> RoiRows:
        rows = slice(0, n)
        return RoiRows.of_frame(frame.feats[rows], frame.boxes[rows], frame.index if self.temporal_embedding else None)

    @torch.no_grad()
    def detect_key(
        self,
        key: FrameFeatures,
        local_window: Sequence[FrameFeatures],
        global_pool: Sequence[FrameFeatures],
        memory: LongRangeMemory | None,
    ) -> tuple[Detections, list[RoiRows]]:
        """Detections of the key frame (original-frame pixels) and the memory push of the oldest window
        frame (level 0: its rows after the global stage; level i: its distilled rows after stage i-1)."""
        n = self.ref_proposals
        pool = [self._rows(g, n) for g in global_pool]
        out = self.aggregator(
            key=self._rows(key, None),
            local_frames=[self._rows(f, n) for f in local_window],
            global_pool=RoiRows.cat(pool) if pool else RoiRows(key.feats[:0], key.boxes[:0]),
            memory=memory.read_all() if memory is not None else None,
        )
        class_logits, box_regression = self.box_head.predictor(out.features)
        detections = self.box_head.postprocessor(class_logits, box_regression, [key.boxes], [key.image_size])[0]
        (h, w), (oh, ow) = key.image_size, key.original_size
        return detections.scale(ow / w, oh / h), out.memory_push

    # -- training (spec §5.2) -------------------------------------------------------------------------

    def forward(self, batch: Sequence[Any]) -> dict[str, Tensor]:
        """Training losses for one sample (one key frame per process, spec §0): a
        :class:`~megavod.data.vid_dataset.TrainSample` whose ``refs`` hold ``local``, ``memory`` and
        ``global`` images of the key's size and flip."""
        if not self.training:
            raise ValueError("MEGADetector.forward computes training losses; use the streaming engine to detect")
        if len(batch) != 1:
            raise ValueError(f"MEGA trains one key frame per process (spec §0), got {len(batch)}")
        sample = batch[0]
        size = sample.image_size
        extractor = self.box_head.feature_extractor
        n = self.ref_proposals

        def ref_rows(images: Sequence[Tensor], grad: bool) -> list[RoiRows]:
            if not images:
                return []
            with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
                c4 = self.backbone(torch.stack(list(images)))
                props = [p.boxes for p in self.rpn.proposals(c4, [size] * len(images), "ref")]
                feats = extractor.raw_features(c4, props).split([len(p) for p in props])
            return [RoiRows(f, b) for f, b in zip(feats, props)]

        # Memory frames: their own stack of stages under no_grad (stop-gradient, current weights).
        global_rows = ref_rows(sample.refs.get("global", []), grad=True)
        global_pool = RoiRows.cat(global_rows) if global_rows else RoiRows(
            sample.image.new_zeros(0, extractor.aggregator.feat_dim), sample.image.new_zeros(0, 4))
        memory = None
        if sample.refs.get("memory"):
            memory = self.aggregator.memory_from_frames(ref_rows(sample.refs["memory"], grad=False), global_pool)

        # Key and local frames in one backbone batch; the key is also a local frame (its first 75).
        local_images = sample.refs.get("local", [])
        c4 = self.backbone(torch.stack([sample.image, *local_images]))
        target = sample.target
        key_props, rpn_losses = self.rpn(c4[:1], [size], [target])
        key_boxes = key_props[0].boxes
        n_key_ref = len(key_boxes) - len(target["boxes"])  # the RPN's own proposals, before the GT
        local_props = [key_boxes[: min(n, n_key_ref)]]
        if local_images:
            local_props += [p.boxes for p in self.rpn.proposals(c4[1:], [size] * len(local_images), "ref")]
        sampled = self.box_head.loss_computation.subsample([key_boxes], [target])
        # One RoIAlign per image: the key image holds its sampled RoIs and its own 75 reference rows.
        key_rois = torch.cat([sampled.boxes[0], local_props[0]])
        raw = extractor.raw_features(c4, [key_rois, *local_props[1:]])
        raw = raw.split([len(sampled.boxes[0])] + [len(p) for p in local_props])
        out = self.aggregator(
            key=RoiRows(raw[0], sampled.boxes[0]),
            local_frames=[RoiRows(f, b) for f, b in zip(raw[1:], local_props)],
            global_pool=global_pool,
            memory=memory,
        )
        class_logits, box_regression = self.box_head.predictor(out.features)
        return {**rpn_losses, **self.box_head.loss_computation.loss(class_logits, box_regression, sampled)}


def build_mega_detector(cfg: Config) -> MEGADetector:
    """MEGA from a config; loads ``model.backbone.weights`` (a local file) into the C4 body and res5."""
    m, h = cfg.model, cfg.model.roi_head
    if m.rpn.ref_pre_nms_top_n != m.rpn.pre_nms_top_n_test:
        raise ConfigError(
            "config key 'model.rpn.ref_pre_nms_top_n': must equal model.rpn.pre_nms_top_n_test for MEGA "
            f"(reference proposals are the first of each frame's test proposals), got "
            f"{m.rpn.ref_pre_nms_top_n} and {m.rpn.pre_nms_top_n_test}"
        )
    backbone = build_backbone(m.backbone)
    pooler_args = dict(
        res5=build_res5_head(m.backbone),
        reduce_channels=h.reduced_channels if h.reduce_channel else None,
        resolution=h.pooler_resolution,
        scale=h.pooler_scale,
        sampling_ratio=h.sampling_ratio,
    )
    pooled = (pooler_args["reduce_channels"] or pooler_args["res5"].out_channels) * h.pooler_resolution**2
    extractor = MEGAFeatureExtractor(pooler_args, MEGAAggregator.from_config(cfg, pooled))
    box_coder = BoxCoder(tuple(h.bbox_reg_weights))
    box_head = MEGABoxHead(
        extractor,
        FPNPredictor(h.representation_size, h.num_classes),
        FastRCNNLossComputation(box_coder, h.fg_iou_thresh, h.bg_iou_thresh, h.batch_size_per_image, h.positive_fraction),
        BoxPostProcessor(box_coder, h.score_thresh, h.nms_thresh, h.detections_per_img),
    )
    detector = MEGADetector(backbone, build_rpn(m.rpn, backbone.out_channels), box_head,
                            m.rpn.ref_post_nms_top_n, cfg.relation.temporal_embedding)
    if m.backbone.weights:
        load_pretrained_resnet(m.backbone.weights, backbone.body, extractor.head)
    return detector
