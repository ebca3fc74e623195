"""What MEGA and RDN share: a C4 detector whose box features are aggregated over other frames' RoIs.

Both keep the single-frame backbone and RPN; their box head pools RoIs from res5 and hands the raw
per-RoI features (the authors' fc6 + ReLU) to an aggregator. Per frame, :meth:`RelationDetector.frame_features`
runs once (C4, the 300 test proposals, their raw features); a frame met as a reference uses the first
``ref_proposals`` (75) rows, which are exactly the authors' separate "ref" RPN's proposals (same RPN
pass and NMS order, so ``rpn.ref_pre_nms_top_n`` must equal ``rpn.pre_nms_top_n_test``). In training,
the key images of the batch and their local references share one backbone batch and each key is also a
reference frame of its own sample (its first 75 proposals, docs/conventions.md#training-forward /
docs/conventions.md#rdn): :meth:`RelationDetector.keys_and_references`; B samples per process,
docs/conventions.md#key-frames-per-process.

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
from megavod.models.training_batch import mean_losses, pad_images, sample_key_rois
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
        boxes, feats = self.frame_rows(image[None], size)
        return FrameFeatures(index, boxes, feats, size, original_size)

    def frame_rows(self, image: Tensor, image_size: tuple[int, int] | Tensor,
                   post_nms_top_n: int | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The per-frame pass of one frame [1, 3, H, W] of ``image_size`` (H, W): its test proposals
        [P, 4] (:meth:`RPN.test_proposals`, ``post_nms_top_n`` overriding the count) and their raw RoI
        features [P, C]. Traceable with the size and the count as graph values: the ONNX per-frame graph
        is this method."""
        c4 = self.backbone(image)
        boxes = self.rpn.test_proposals(c4, image_size, post_nms_top_n).boxes
        return boxes, self.box_head.feature_extractor.raw_features(c4, [boxes])

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

    def forward(self, batch: Sequence[Any]) -> dict[str, Tensor]:
        """Training losses of a batch of :class:`~megavod.data.vid_dataset.TrainSample`: the mean over the
        samples of :meth:`sample_losses` (docs/departures.md#batch-loss-normalisation)."""
        if not self.training:
            raise ValueError(f"{type(self).__name__}.forward computes training losses; use the streaming engine "
                             "to detect")
        if not batch:
            raise ValueError("a training batch needs at least one sample")
        return mean_losses(self.sample_losses(batch))

    def sample_losses(self, batch: Sequence[Any]) -> list[dict[str, Tensor]]:
        """The 4 losses of each sample of ``batch`` (MEGA and RDN each define theirs)."""
        raise NotImplementedError

    def keys_and_references(self, samples: Sequence[Any],
                            ref_images: Sequence[Sequence[Tensor]]) -> list[KeyAndReferences]:
        """Per sample: its key image and its ``ref_images``, all samples' in one backbone batch (keys
        first, then each sample's references; zero-padded to the largest): key-mode RPN (300 + GT) with
        its losses, 128 sampled key RoIs, and the references' ref-mode proposals, the key's own first 75
        leading. Raw features of all of them, with gradient, in one res5 + RoIAlign call."""
        b = len(samples)
        sizes = [sample.image_size for sample in samples]
        ref_sizes = [size for size, images in zip(sizes, ref_images) for _ in images]
        c4 = self.backbone(pad_images([s.image for s in samples] + [im for images in ref_images for im in images]))
        keys = sample_key_rois(self.rpn, self.box_head.loss_computation, c4[:b], sizes,
                               [s.target for s in samples])
        ref_props = [p.boxes for p in self.rpn.proposals(c4[b:], ref_sizes, "ref")] if ref_sizes else []
        own = []
        for key, sample in zip(keys, samples):
            n_own = len(key.proposals) - len(sample.target["boxes"])  # the RPN's own proposals, before the GT
            own.append(key.proposals.boxes[: min(self.ref_proposals, n_own)])
        # One RoIAlign per image: each key image holds its sampled RoIs and its own reference rows.
        key_boxes = [torch.cat([key.sampled.boxes[0], own_rows]) for key, own_rows in zip(keys, own)]
        raw = self.box_head.feature_extractor.raw_features(c4, key_boxes + ref_props)
        raw = list(raw.split([len(boxes) for boxes in key_boxes + ref_props]))
        key_raw, ref_raw = raw[:b], raw[b:]
        out, start = [], 0
        for key, own_rows, own_and_key, images in zip(keys, own, key_raw, ref_images):
            n_key, stop = len(key.sampled.boxes[0]), start + len(images)
            out.append(KeyAndReferences(key.sampled, own_and_key[:n_key], [own_rows, *ref_props[start:stop]],
                                        [own_and_key[n_key:], *ref_raw[start:stop]], key.rpn_losses))
            start = stop
        return out

    def reference_rows(self, samples: Sequence[Any],
                       ref_images: Sequence[Sequence[Tensor]]) -> list[list[tuple[Tensor, Tensor]]]:
        """Per sample, per image of its ``ref_images``: (ref-mode proposals [n, 4], raw features [n, C]),
        all samples' images in one backbone batch (zero-padded to the largest), each with its sample's size."""
        sizes = [size for sample, images in zip(samples, ref_images) for size in [sample.image_size] * len(images)]
        if not sizes:
            return [[] for _ in samples]
        c4 = self.backbone(pad_images([im for images in ref_images for im in images]))
        boxes = [p.boxes for p in self.rpn.proposals(c4, sizes, "ref")]
        feats = self.box_head.feature_extractor.raw_features(c4, boxes).split([len(b) for b in boxes])
        rows = list(zip(boxes, feats))
        out, start = [], 0
        for images in ref_images:
            out.append(rows[start : start + len(images)])
            start += len(images)
        return out

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
