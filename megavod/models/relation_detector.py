"""What MEGA and RDN share: a C4 detector whose box features are aggregated over other frames' RoIs.

Both keep the single-frame backbone and RPN; their box head pools RoIs from res5 and hands the raw
per-RoI features (the authors' fc6 + ReLU) to an aggregator. Per frame, :meth:`RelationDetector.frame_features`
runs once (C4, the 300 test proposals, their raw features); a frame met as a reference uses the first
``ref_proposals`` (75) rows, which are exactly the authors' separate "ref" RPN's proposals (same RPN
pass and NMS order, so ``rpn.ref_pre_nms_top_n`` must equal ``rpn.pre_nms_top_n_test``). In training,
the key image and its local references share one backbone batch and the key is also a reference
frame (its first 75 proposals, docs/conventions.md#training-forward / docs/conventions.md#rdn):
:meth:`RelationDetector.key_and_references`.

For BLR (docs/departures.md#blr-as-megavod-reads-the-paper) the detector can also hand back, per detection,
its query row in the last location-based relation module (when the stream asks for it,
:attr:`KeyFrameInputs.relation_inputs`, as ``megavod detect --postprocess blr`` does): a forward pre-hook on
that module reads the key rows it is given (no change to the aggregation or its numbers), and
:meth:`RelationDetector.predict` keeps the rows of the proposals the kept detections came from.
:meth:`RelationDetector.blr_relation_weights` then gives the relation weights between two frames' detections.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from megavod.config import Config
from megavod.errors import ConfigError
from megavod.models.backbone import C4Backbone, build_backbone, load_pretrained_resnet
from megavod.models.relation import RelationModule
from megavod.models.roi_heads import RoIBoxHead, SampledRoIs, build_box_head
from megavod.models.rpn import RPN, build_rpn
from megavod.structures import Detections, FrameFeatures, RelationInputs


@dataclass
class KeyAndReferences:
    """Training rows of one sample: the key's sampled RoIs and every reference frame's proposals
    (the key's own first 75 first), with their raw features, plus the RPN losses."""

    sampled: SampledRoIs
    key_feats: Tensor
    ref_boxes: list[Tensor]
    ref_feats: list[Tensor]
    rpn_losses: dict[str, Tensor]


class RelationQueryTap:
    """A forward pre-hook for a :class:`RelationModule`: keeps the queries ``x`` and ``x_boxes`` of the
    module's last call as :class:`RelationInputs` (the aggregation itself is untouched)."""

    _ARGS = ("x", "refs", "x_boxes")

    def __init__(self) -> None:
        self.inputs: RelationInputs | None = None

    def hook(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        given = {**dict(zip(self._ARGS, args)), **kwargs}
        self.inputs = RelationInputs(given["x"], given["x_boxes"])


class RelationDetector(nn.Module):
    """Backbone, RPN and ``roi_heads["box"]`` (names as the authors', docs/conventions.md#state-dict-names) of
    MEGA and RDN."""

    def __init__(self, backbone: C4Backbone, rpn: RPN, box_head: RoIBoxHead, ref_proposals: int = 75) -> None:
        super().__init__()
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = nn.ModuleDict({"box": box_head})
        self.ref_proposals = ref_proposals

    @property
    def box_head(self) -> RoIBoxHead:
        return self.roi_heads["box"]

    @property
    def aggregator(self) -> nn.Module:
        return self.box_head.feature_extractor.aggregator

    def new_stream_cache(self) -> object | None:
        """Nothing kept between key frames (MEGA overrides this)."""
        return None

    @torch.no_grad()
    def frame_features(self, image: Tensor, index: int, original_size: tuple[int, int]) -> FrameFeatures:
        """The per-frame pass, once per frame: C4, the 300 test proposals, their raw RoI features."""
        size = (int(image.shape[-2]), int(image.shape[-1]))
        c4 = self.backbone(image[None])
        boxes = self.rpn.proposals(c4, [size], "key")[0].boxes
        feats = self.box_head.feature_extractor.raw_features(c4, [boxes])
        return FrameFeatures(index, boxes, feats, size, original_size)

    @torch.no_grad()
    def frame_features_batch(self, images: Tensor, indices: Sequence[int],
                             original_sizes: Sequence[tuple[int, int]]) -> list[FrameFeatures]:
        """:meth:`frame_features` of B frames of one size [B, 3, H, W] in one backbone, RPN and RoI call."""
        size = (int(images.shape[-2]), int(images.shape[-1]))
        c4 = self.backbone(images)
        boxes = [p.boxes for p in self.rpn.proposals(c4, [size] * len(images), "key")]
        feats = self.box_head.feature_extractor.raw_features(c4, boxes).split([len(b) for b in boxes])
        return [FrameFeatures(index, b, f, size, original) for index, b, f, original
                in zip(indices, boxes, feats, original_sizes)]

    def predict(self, key: FrameFeatures, features: Tensor, relation_query: RelationInputs | None = None) -> Detections:
        """Box predictor and test-time postprocess on the key's aggregated features, in original pixels.

        With ``relation_query`` (the last location-based relation module's query rows and boxes, one per
        key proposal, see :meth:`capture_relation_query`) the detections carry, row for row, the query
        of the proposal each came from (:attr:`Detections.relation`); the detections are the same."""
        class_logits, box_regression = self.box_head.predictor(features)
        args = (class_logits, box_regression, [key.boxes], [key.image_size])
        if relation_query is None:
            detections = self.box_head.postprocessor(*args)[0]
        else:
            if len(relation_query.boxes) != len(key.boxes):
                raise ValueError(f"the relation module's queries have {len(relation_query.boxes)} rows, the key "
                                 f"frame {len(key.boxes)} proposals")
            (detections,), (rows,) = self.box_head.postprocessor(*args, return_indices=True)
            detections.relation = relation_query[rows]
        (h, w), (oh, ow) = key.image_size, key.original_size
        return detections.scale(ow / w, oh / h)

    # -- BLR's relation weights (docs/departures.md#blr-as-megavod-reads-the-paper) ---------------------

    def blr_relation_module(self) -> RelationModule | None:
        """The last location-based relation module, whose queries give BLR's relation weights; None
        when the detector has none (BLR then uses w = 0)."""
        return None

    @contextmanager
    def capture_relation_query(self, enabled: bool) -> Iterator[RelationQueryTap]:
        """Within the block, a forward pre-hook on :meth:`blr_relation_module` keeps the query rows and
        boxes of its last call in the yielded tap's ``inputs`` (left None when not ``enabled`` or when
        there is no such module). The hook lives for one key-frame step: the model keeps no flag."""
        tap = RelationQueryTap()
        module = self.blr_relation_module() if enabled else None
        if module is None:
            yield tap
            return
        handle = module.register_forward_pre_hook(tap.hook, with_kwargs=True)
        try:
            yield tap
        finally:
            handle.remove()

    @torch.inference_mode()
    def blr_relation_weights(self, a: RelationInputs, b: RelationInputs, frame_a: int, frame_b: int) -> Tensor:
        """Relation weights [n_a, n_b] between the detections of two frames
        (docs/departures.md#blr-as-megavod-reads-the-paper): the last location-based module's softmax weights
        of ``a``'s query rows over ``b``'s, mean over heads; on the CPU. ``frame_a``/``frame_b`` tag the rows
        for the temporal embedding (docs/departures.md#temporal-embedding)."""
        module = self.blr_relation_module()
        if module is None:
            raise ValueError(f"{type(self).__name__} has no location-based relation module")
        n, m = len(a.boxes), len(b.boxes)
        if n == 0 or m == 0:
            return torch.zeros(n, m)
        device = next(module.parameters()).device
        frames = {}
        if module.temporal_embedding:
            frames = {"x_frames": torch.full((n,), frame_a, device=device),
                      "ref_frames": torch.full((m,), frame_b, device=device)}
        a, b = a.to(device), b.to(device)
        return module.attention_weights(a.feats, b.feats, a.boxes, b.boxes, **frames).mean(0).float().cpu()

    def key_and_references(self, sample: Any, ref_images: Sequence[Tensor]) -> KeyAndReferences:
        """The key image and ``ref_images`` in one backbone batch: key-mode RPN (300 + GT) with its
        losses, 128 sampled key RoIs, and the references' ref-mode proposals, the key's own first 75
        leading. Raw features of all of them, with gradient."""
        size, target = sample.image_size, sample.target
        c4 = self.backbone(torch.stack([sample.image, *ref_images]))
        key_props, rpn_losses = self.rpn(c4[:1], [size], [target])
        key_boxes = key_props[0].boxes
        n_own = len(key_boxes) - len(target["boxes"])  # the RPN's own proposals, before the GT
        ref_boxes = [key_boxes[: min(self.ref_proposals, n_own)]]
        if ref_images:
            ref_boxes += [p.boxes for p in self.rpn.proposals(c4[1:], [size] * len(ref_images), "ref")]
        sampled = self.box_head.loss_computation.subsample([key_boxes], [target])
        n_key = len(sampled.boxes[0])
        # One RoIAlign per image: the key image holds its sampled RoIs and its own reference rows.
        raw = self.box_head.feature_extractor.raw_features(
            c4, [torch.cat([sampled.boxes[0], ref_boxes[0]]), *ref_boxes[1:]])
        key_feats, *ref_feats = raw.split([n_key] + [len(b) for b in ref_boxes])
        return KeyAndReferences(sampled, key_feats, ref_boxes, list(ref_feats), rpn_losses)

    def losses(self, parts: KeyAndReferences, features: Tensor) -> dict[str, Tensor]:
        """The 4 losses: the RPN's and the Fast R-CNN loss on the key's aggregated features."""
        class_logits, box_regression = self.box_head.predictor(features)
        return {**parts.rpn_losses,
                **self.box_head.loss_computation.loss(class_logits, box_regression, parts.sampled)}


def build_relation_detector(
    cfg: Config,
    cls: type[RelationDetector],
    make_aggregator: Callable[[int], nn.Module],
    **kwargs: Any,
) -> RelationDetector:
    """``cls`` with the config's backbone, RPN and a box head whose aggregator is
    ``make_aggregator(pooled_features)``; loads ``model.backbone.weights`` (a local file) if set."""
    m = cfg.model
    if m.rpn.ref_pre_nms_top_n != m.rpn.pre_nms_top_n_test:
        raise ConfigError(
            f"config key 'model.rpn.ref_pre_nms_top_n': must equal model.rpn.pre_nms_top_n_test for {cfg.method} "
            f"(reference proposals are the first of each frame's test proposals), got "
            f"{m.rpn.ref_pre_nms_top_n} and {m.rpn.pre_nms_top_n_test}"
        )
    backbone = build_backbone(m.backbone)
    box_head = build_box_head(m, make_aggregator)
    detector = cls(backbone, build_rpn(m.rpn, backbone.out_channels), box_head, m.rpn.ref_post_nms_top_n, **kwargs)
    if m.backbone.weights:
        load_pretrained_resnet(m.backbone.weights, backbone.body, box_head.feature_extractor.head)
    return detector
