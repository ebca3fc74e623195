"""The relation methods' ONNX graphs: what MEGA, the base model and RDN share (rows of RoIs, BLR's relation
weights), and RDN's (docs/architecture.md#export-and-onnx-runtime). MEGA's are in
:mod:`megavod.export.mega_graphs`.

The per-frame graph gives a frame's proposals and raw RoI features; the key graphs take the rows the engine
holds, concatenated with per-frame counts, and give with the detections each one's query row in the last
location-based relation module, for BLR (graph ``blr`` gives the relation weights of two frames' rows).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.onnx.operators import shape_as_tensor

from megavod.errors import ConfigError
from megavod.models.contract import KeyFrameInputs, KeyFrameOutput
from megavod.models.relation_detector import RelationQueryTap
from megavod.structures import Detections, FrameFeatures, RelationInputs
from megavod.export.graphs import (
    BOX_SETTINGS,
    DETECTION_OUTPUTS,
    RPN_SETTINGS,
    Feeds,
    GraphIO,
    GraphRunner,
    MethodGraphs,
    NamedGraph,
    box_settings,
    detection_axes,
    image_axes,
    rows_axes,
    scaled,
    size_feed,
)


# -- what MEGA, the base model and RDN share: rows of RoIs ---------------------------------------------


class _RoIRowsGraph(NamedGraph):
    """The relation methods' per-frame pass (``RelationDetector.frame_features``): C4, the test
    proposals, their raw RoI features."""

    io = GraphIO(["image", *RPN_SETTINGS], ["boxes", "feats"], {**image_axes("image"), "boxes": rows_axes("proposals"),
                                                  "feats": rows_axes("proposals")})

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def compute(self, t: Feeds) -> tuple[Tensor, ...]:
        image = t["image"]
        # The size as a graph value (the graph serves any image size), not the traced tensor's numbers.
        return self.model.frame_rows(image, shape_as_tensor(image)[-2:], t["post_nms_top_n"])


#: The key graphs' outputs for BLR: each detection's query row in the last location-based relation module
#: and its proposal box (:class:`~megavod.structures.RelationInputs`), row for row with the detections.
RELATION_OUTPUTS = ("relation_feats", "relation_boxes")


def key_detections(model: nn.Module, features: Tensor, key_boxes: Tensor, t: Feeds,
                   tap: RelationQueryTap) -> tuple[Tensor, ...]:
    """``RelationDetector.predict`` in the key graph: the box predictor and the model's per-image postprocess
    (:meth:`~megavod.models.roi_heads.BoxPostProcessor.image_detections`, with the graph's
    :data:`~megavod.export.graphs.BOX_SETTINGS`) on the key's aggregated ``features``; with BLR, each
    detection's query row in the last location-based relation module (``tap``, from
    :meth:`~megavod.models.relation_detector.RelationDetector.capture_relation_query`) and its proposal box
    (:data:`RELATION_OUTPUTS`)."""
    head = model.box_head
    class_logits, box_regression = head.predictor(features)
    *detections, rows = head.postprocessor.image_detections(class_logits, box_regression, key_boxes,
                                                             t["image_size"], **box_settings(t))
    relation = () if tap.inputs is None else (tap.inputs.feats[rows], tap.inputs.boxes[rows])
    return (*detections, *relation)


#: The ``blr`` graph's inputs and outputs.
BLR_IO = GraphIO(["a_feats", "a_boxes", "b_feats", "b_boxes"], ["weights"],
                 {"a_feats": rows_axes("a_rows"), "a_boxes": rows_axes("a_rows"), "b_feats": rows_axes("b_rows"),
                  "b_boxes": rows_axes("b_rows"), "weights": {0: "a_rows", 1: "b_rows"}})


class _BLRWeightsGraph(NamedGraph):
    """BLR's relation weights (:meth:`RelationDetector.blr_relation_weights`): the last location-based
    module's softmax weights of ``a``'s query rows over ``b``'s, mean over heads, [n_a, n_b]."""

    io = BLR_IO

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = model.blr_relation_module()

    def compute(self, t: Feeds) -> tuple[Tensor, ...]:
        weights = self.module.attention_weights(t["a_feats"], t["b_feats"], t["a_boxes"], t["b_boxes"])
        return (weights.mean(0),)


def _refuse_temporal_embedding(cfg: Any) -> None:
    if cfg.relation.temporal_embedding:
        raise ConfigError("config key 'relation.temporal_embedding': the ONNX export does not support the "
                          "temporal embedding (off in every preset)")


def cat_rows(frames: Sequence[FrameFeatures], n: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """The first ``n`` rows of every frame, concatenated: (feats, boxes, rows per frame)."""
    if not frames:
        return torch.zeros(0, width), torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
    return (torch.cat([f.feats[:n] for f in frames]), torch.cat([f.boxes[:n] for f in frames]),
            torch.tensor([min(n, len(f.boxes)) for f in frames], dtype=torch.int64))


class RelationGraphs(MethodGraphs):
    frame_io = _RoIRowsGraph.io
    # Every relation module's heads, embedding and wave length are constants of the key graph.
    baked = (*MethodGraphs.baked, "relation")

    def __init__(self, cfg: Any) -> None:
        _refuse_temporal_embedding(cfg)
        self.ref_proposals = cfg.model.rpn.ref_post_nms_top_n
        self.feat_dim = cfg.model.roi_head.representation_size

    def frame_graph(self, model: nn.Module) -> NamedGraph:
        return _RoIRowsGraph(model)

    def frame_value(self, outputs: Feeds | None, image: Tensor, index: int,
                    original_size: tuple[int, int]) -> FrameFeatures:
        return FrameFeatures(index, outputs["boxes"], outputs["feats"], tuple(image.shape[-2:]), original_size)

    #: Whether the method has a location-based relation module for BLR (graph ``blr``, the key graph's
    #: :data:`RELATION_OUTPUTS`).
    blr = True

    def key_outputs(self) -> list[str]:
        return [*DETECTION_OUTPUTS, *(RELATION_OUTPUTS if self.blr else ())]

    def key_output_axes(self) -> dict[str, dict[int, str]]:
        return {**detection_axes(), **({n: rows_axes("detections") for n in RELATION_OUTPUTS} if self.blr else {})}

    def blr_graphs(self, model: nn.Module) -> dict[str, NamedGraph]:
        return {"blr": _BLRWeightsGraph(model)} if self.blr else {}

    def _detections(self, outputs: Feeds, inputs: KeyFrameInputs) -> Detections:
        key = inputs.key
        detections = scaled(*(outputs[n] for n in DETECTION_OUTPUTS), key.image_size, key.original_size)
        if inputs.relation_inputs and self.blr:
            detections.relation = RelationInputs(*(outputs[n] for n in RELATION_OUTPUTS))
        return detections


class _RDNKeyGraph(NamedGraph):
    """``RDNDetector.detect_key``: the aggregator's own forward (basic stages over the supportive rows, the
    advanced stage), the box predictor and postprocess (:func:`key_detections`)."""

    def __init__(self, model: nn.Module, io: GraphIO, blr: bool) -> None:
        super().__init__()
        self.model, self.io, self.blr = model, io, blr

    def compute(self, t: Feeds) -> tuple[Tensor, ...]:
        key_boxes, support = t["key_boxes"], t["support_feats"]
        # Rows per frame matter to the advanced stage only; without one the graph takes no counts.
        counts = t["support_counts"] if "support_counts" in t else [support.shape[0]]
        with self.model.capture_relation_query(self.blr) as tap:
            features = self.model.aggregator(t["key_feats"], key_boxes, support, t["support_boxes"], counts)
        return key_detections(self.model, features, key_boxes, t, tap)


class RDNGraphs(RelationGraphs):
    """RDN-base and RDN: the key graph takes the key's rows and the window's supportive rows
    (``support_counts`` per frame)."""

    # The stage counts are the key graph's structure; the ratio sets its advanced rows per frame (the
    # window's offsets are not: the support rows are a dynamic axis).
    baked = (*RelationGraphs.baked, "rdn.basic_stages", "rdn.advanced_stages", "rdn.ratio")

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        names = ["image_size", "key_feats", "key_boxes", "support_feats", "support_boxes"]
        if cfg.rdn.advanced_stages:
            names.append("support_counts")
        names += list(BOX_SETTINGS)
        axes = {"key_feats": rows_axes("key_rows"), "key_boxes": rows_axes("key_rows"), "support_feats": rows_axes("support_rows"),
                "support_boxes": rows_axes("support_rows"), "support_counts": rows_axes("support_frames"),
                **self.key_output_axes()}
        outputs = self.key_outputs()
        self.key_io = GraphIO(names, outputs, {k: v for k, v in axes.items() if k in names or k in outputs})
        self.extra_io = {"blr": _BLRWeightsGraph.io}

    def key_graph(self, model: nn.Module) -> NamedGraph:
        return _RDNKeyGraph(model, self.key_io, self.blr)

    def extra_graphs(self, model: nn.Module) -> dict[str, NamedGraph]:
        return self.blr_graphs(model)

    def key_feeds(self, inputs: KeyFrameInputs, cache: Any = None, extra: Mapping[str, GraphRunner] | None = None) -> Feeds:
        key = inputs.key
        feats, boxes, counts = cat_rows(inputs.local, self.ref_proposals, self.feat_dim)
        feeds = {"image_size": size_feed(key.image_size), "key_feats": key.feats, "key_boxes": key.boxes,
                 "support_feats": feats, "support_boxes": boxes, "support_counts": counts}
        return {k: v for k, v in feeds.items() if k in self.key_io.inputs}

    def key_output(self, outputs: Feeds, inputs: KeyFrameInputs) -> KeyFrameOutput:
        return KeyFrameOutput(self._detections(outputs, inputs))
