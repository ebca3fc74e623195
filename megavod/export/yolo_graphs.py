"""YOLOX's and YOLOV's ONNX graphs (docs/architecture.md#export-and-onnx-runtime).

* YOLOX (:class:`YOLOXGraphs`): the frame graph is the whole network (:meth:`YOLOXDetector.predictions`:
  every anchor's decoded box, objectness and class scores), the key graph the authors' post-processing
  (:func:`~megavod.models.yolox.yolox_detections`).
* YOLOV (:class:`YOLOVGraphs`): the frame graph is the YOLOX pass plus the feature selection
  (:func:`~megavod.models.yolov_head.select_proposals`: the frame's proposals and their features); graph
  ``aggregate`` is :meth:`YOLOVDetector.chunk_logits` on the rows of a chunk (any count), the refined
  logits of every row; the key graph turns the key's rows and its logits into both of its outputs, the
  refined detections (:func:`~megavod.models.yolov_head.refined_detections`) and the base detector's
  (:func:`~megavod.models.yolov_head.base_detections`), of which the runtime keeps the one the PyTorch
  detector gives (:meth:`YOLOVDetector.detect_key`: the base output for chunks of at most ``base_below``
  frames). A chunk is aggregated once: its other frames' logits wait in the stream's cache, the PyTorch
  detector's own :class:`~megavod.models.yolov.ChunkLogits`.

Settings: ``test_conf`` (the score threshold of the output) is a 0-d graph input, fed from the config
the graphs are made for, so an export honours an override of it; the schedule's values (``gframe``,
``shuffle_seed``, ``base_below``) are the runtime's, never in a graph. Every other value is a constant
(:attr:`YOLOXGraphs.baked`): the NMS thresholds too, since torchvision's ONNX symbolic for ``nms`` takes
its IoU threshold as a constant. Boxes leave the graphs in pixels of the letterboxed input; the runtime
divides them by the letterbox ratio as the detector does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from megavod.export.graphs import (DETECTION_OUTPUTS, Feeds, GraphIO, GraphRunner, MethodGraphs, NamedGraph, image_axes,
                                   rows_axes)
from megavod.models.contract import KeyFrameInputs, KeyFrameOutput
from megavod.models.yolov import AnchorFrame, ChunkLogits, ProposalFrame, gives_base_output, to_frame_pixels
from megavod.models.yolov_head import base_detections, refined_detections, select_proposals
from megavod.models.yolox import yolox_detections
from megavod.structures import Detections

#: The score threshold's graph input (the section's ``test_conf``).
TEST_CONF = "test_conf"
BASE_OUTPUTS = tuple(f"base_{n}" for n in DETECTION_OUTPUTS)
#: A frame's YOLOV proposals as they cross the graphs (:class:`~megavod.models.yolov.ProposalFrame`'s fields).
PROPOSAL_FIELDS = ("boxes", "objectness", "class_scores", "cls_features", "reg_features")
ANCHOR_FIELDS = ("boxes", "objectness", "class_scores")
#: Their graph names (distinct from the key graphs' outputs ``boxes``, ``scores``, ``labels``).
PROPOSALS = tuple(f"proposal_{n}" for n in PROPOSAL_FIELDS)
ANCHORS = tuple(f"anchor_{n}" for n in ANCHOR_FIELDS)
#: The key's proposals as YOLOV's key graph takes them.
KEY_PROPOSALS = PROPOSALS[:3]


def rows_feeds(frame: Any, fields: tuple[str, ...], prefix: str) -> Feeds:
    """A per-frame pass's ``fields`` as graph inputs ``prefix + field``."""
    return {prefix + n: getattr(frame, n) for n in fields}


def _axes(names: tuple[str, ...] | list[str], rows: str) -> dict[str, dict[int, str]]:
    return {n: rows_axes(rows) for n in names}


def frame_pixels(boxes: Tensor, scores: Tensor, labels: Tensor, image_size: tuple[int, int],
                 original_size: tuple[int, int]) -> Detections:
    """A graph's detections in the frame's pixels (the detector's :func:`to_frame_pixels`)."""
    return to_frame_pixels(Detections(boxes, scores, labels), image_size, original_size)


# -- YOLOX ----------------------------------------------------------------------------------------------


class _AnchorsGraph(NamedGraph):
    """:meth:`YOLOXDetector.predictions` of one image: every anchor's box, objectness and class scores."""

    io = GraphIO(["image"], list(ANCHORS), {**image_axes("image"), **_axes(ANCHORS, "anchors")})

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def compute(self, t: Feeds) -> tuple[Tensor, ...]:
        p = self.model.predictions(t["image"])
        return p.boxes[0], p.objectness[0], p.class_scores[0]


class _YOLOXDetectionsGraph(NamedGraph):
    """:meth:`YOLOXDetector.detect_key`: :func:`yolox_detections` of the key's anchors."""

    io = GraphIO([*ANCHORS, TEST_CONF], list(DETECTION_OUTPUTS),
                 {**_axes(ANCHORS, "anchors"), **_axes(DETECTION_OUTPUTS, "detections")})

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def compute(self, t: Feeds) -> tuple[Tensor, ...]:
        det = yolox_detections(*(t[n] for n in ANCHORS), t[TEST_CONF], self.model.nms_thresh)
        return det.boxes, det.scores, det.labels


class YOLOXGraphs(MethodGraphs):
    """YOLOX: frame graph image -> every anchor's box, objectness, class scores; key graph -> the
    detections (``test_conf`` an input, the NMS threshold a constant)."""

    frame_io = _AnchorsGraph.io
    key_io = _YOLOXDetectionsGraph.io
    #: The network (the section's size and classes) and the NMS thresholds are the graphs'; ``test_conf``
    #: is an input; ``prior_prob`` and ``use_l1`` are training's (the export holds the weights).
    section_baked = ("depth", "width", "num_classes", "nms_thresh")

    def __init__(self, cfg: Any) -> None:
        self.section = cfg.section_key
        self.test_conf = float(cfg.section.test_conf)
        self.baked = (*MethodGraphs.baked, *(f"{self.section}.{k}" for k in self.section_baked))

    def frame_graph(self, model: nn.Module) -> NamedGraph:
        return _AnchorsGraph(model)

    def key_graph(self, model: nn.Module) -> NamedGraph:
        return _YOLOXDetectionsGraph(model)

    def conf_feeds(self) -> Feeds:
        return {TEST_CONF: torch.tensor(self.test_conf, dtype=torch.float32)}

    def frame_value(self, outputs: Feeds | None, image: Tensor, index: int,
                    original_size: tuple[int, int]) -> AnchorFrame:
        return AnchorFrame(index, *(outputs[n] for n in ANCHORS), tuple(image.shape[-2:]), original_size)

    def key_feeds(self, inputs: KeyFrameInputs, cache: Any = None,
                  extra: Mapping[str, GraphRunner] | None = None) -> Feeds:
        return {**rows_feeds(inputs.key, ANCHOR_FIELDS, "anchor_"), **self.conf_feeds()}

    def key_output(self, outputs: Feeds, inputs: KeyFrameInputs) -> KeyFrameOutput:
        key = inputs.key
        detections = (outputs[n] for n in DETECTION_OUTPUTS)
        return KeyFrameOutput(frame_pixels(*detections, key.image_size, key.original_size))


# -- YOLOV ----------------------------------------------------------------------------------------------


class _ProposalsGraph(NamedGraph):
    """:meth:`YOLOVDetector.frame_features`: the YOLOX pass, then the frame's proposals
    (:func:`select_proposals`) with their features."""

    io = GraphIO(["image"], list(PROPOSALS), {**image_axes("image"), **_axes(PROPOSALS, "proposals")})

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def compute(self, t: Feeds) -> tuple[Tensor, ...]:
        m = self.model
        p = m.predictions(t["image"])
        keep = select_proposals(p.boxes[0], p.objectness[0], p.class_scores[0], m.pre_top, m.pre_nms_thresh,
                                m.proposals)
        return tuple(getattr(p, n)[0][keep] for n in PROPOSAL_FIELDS)


class _AggregateGraph(NamedGraph):
    """:meth:`YOLOVDetector.chunk_logits` of a chunk's rows (its frames' proposals stacked in the chunk's
    order, as one :class:`ProposalFrame`): the refined logits [N, C + 1] of every row."""

    io = GraphIO(list(PROPOSALS), ["class_logits"], _axes((*PROPOSALS, "class_logits"), "chunk_rows"))

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def compute(self, t: Feeds) -> tuple[Tensor, ...]:
        # One frame of all the chunk's rows (the sizes play no part).
        rows = ProposalFrame(0, *(t[n] for n in PROPOSALS), (0, 0), (0, 0))
        return (self.model.chunk_logits([rows]),)


class _YOLOVDetectionsGraph(NamedGraph):
    """:meth:`YOLOVDetector.detect_key` from the key's proposals and refined logits: the refined detections
    (:func:`refined_detections`, ``class_logits`` without its last column) and the base detector's
    (:func:`base_detections`, ``base_*``)."""

    io = GraphIO([*KEY_PROPOSALS, "class_logits", TEST_CONF], [*DETECTION_OUTPUTS, *BASE_OUTPUTS],
                 {**_axes((*KEY_PROPOSALS, "class_logits"), "proposals"),
                  **_axes(DETECTION_OUTPUTS, "detections"), **_axes(BASE_OUTPUTS, "base_detections")})

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def compute(self, t: Feeds) -> tuple[Tensor, ...]:
        nms, conf = self.model.nms_thresh, t[TEST_CONF]
        boxes, objectness, class_scores = (t[n] for n in KEY_PROPOSALS)
        refined = refined_detections(boxes, objectness, t["class_logits"][:, :-1], conf, nms)
        base = base_detections(boxes, objectness, class_scores, conf, nms)
        return refined.boxes, refined.scores, refined.labels, base.boxes, base.scores, base.labels


class YOLOVGraphs(YOLOXGraphs):
    """YOLOV: frame graph image -> the frame's proposals and features; graph ``aggregate`` a chunk's rows ->
    their refined logits; key graph the key's rows and logits -> its refined and base detections. The
    stream cache is the PyTorch detector's :class:`ChunkLogits`."""

    frame_io = _ProposalsGraph.io
    key_io = _YOLOVDetectionsGraph.io
    extra_io = {"aggregate": _AggregateGraph.io}
    section_baked = (*YOLOXGraphs.section_baked, "proposals", "pre_top", "pre_nms_thresh", "sim_thresh", "heads",
                     "scale", "affinity")

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.base_below = int(cfg.section.base_below)

    def frame_graph(self, model: nn.Module) -> NamedGraph:
        return _ProposalsGraph(model)

    def key_graph(self, model: nn.Module) -> NamedGraph:
        return _YOLOVDetectionsGraph(model)

    def extra_graphs(self, model: nn.Module) -> dict[str, NamedGraph]:
        return {"aggregate": _AggregateGraph(model)}

    def new_stream_cache(self) -> ChunkLogits:
        return ChunkLogits()

    def frame_value(self, outputs: Feeds | None, image: Tensor, index: int,
                    original_size: tuple[int, int]) -> ProposalFrame:
        return ProposalFrame(index, *(outputs[n] for n in PROPOSALS), tuple(image.shape[-2:]), original_size)

    def key_feeds(self, inputs: KeyFrameInputs, cache: Any = None,
                  extra: Mapping[str, GraphRunner] | None = None) -> Feeds:
        key = inputs.key
        feeds = {**rows_feeds(key, ANCHOR_FIELDS, "proposal_"), **self.conf_feeds()}
        frames = list(inputs.local) or [key]
        if len(key) == 0:
            # No proposal, nothing to aggregate (the base output, empty).
            return {**feeds, "class_logits": key.class_scores.new_zeros(0, key.class_scores.shape[1] + 1)}
        return {**feeds, "class_logits": self._key_logits(frames, inputs.key_index, cache, extra["aggregate"])}

    @staticmethod
    def _key_logits(frames: list[ProposalFrame], key_index: int, cache: ChunkLogits | None,
                    aggregate: GraphRunner) -> Tensor:
        """As :meth:`YOLOVDetector.detect_key`: :meth:`ChunkLogits.key_logits` with graph ``aggregate``.
        Chunks that give the base output are aggregated too (unlike the PyTorch detector; at most
        ``base_below`` frames): the export traces ``aggregate`` on a short clip, whose one chunk is that small."""
        def compute(chunk: list[ProposalFrame]) -> Tensor:
            rows = {f"proposal_{n}": torch.cat([getattr(f, n) for f in chunk]) for n in PROPOSAL_FIELDS}
            return aggregate(rows)["class_logits"]
        return (cache if cache is not None else ChunkLogits()).key_logits(frames, key_index, compute)

    def key_output(self, outputs: Feeds, inputs: KeyFrameInputs) -> KeyFrameOutput:
        key = inputs.key
        names = BASE_OUTPUTS if gives_base_output(inputs, self.base_below) else DETECTION_OUTPUTS
        return KeyFrameOutput(frame_pixels(*(outputs[n] for n in names), key.image_size, key.original_size))
