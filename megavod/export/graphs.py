"""Per-method ONNX graphs: what every method's graphs share, and the single-frame method's
(docs/architecture.md#export-and-onnx-runtime).

Each method's entry (a :class:`MethodGraphs`: its per-frame pass and key-frame step as traceable
modules, and how the runtime turns the engine's values into graph inputs and back) is reached from the
method table (:attr:`megavod.registry.MethodSpec.export`), so the exporter and the runtime never ask which
method they run. The relation methods' graphs are in :mod:`megavod.export.relation_graphs` (shared, RDN)
and :mod:`megavod.export.mega_graphs` (MEGA's kept keys/values and geometry blocks: each choice measured,
benchmarks/README.md#onnx-runtime),
FGFA's and DFF's in :mod:`megavod.export.flow_graphs`. Boxes leave the graphs in pixels of the resized
image; the runtime scales them to the frame as :meth:`RelationDetector.predict` does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from megavod.models.contract import KeyFrameInputs, KeyFrameOutput
from megavod.structures import Detections, FrameMaps

Feeds = dict[str, Tensor]
GraphRunner = Callable[[Feeds], Feeds]

DETECTION_OUTPUTS = ("boxes", "scores", "labels")

#: Post-processing values the graphs take as 0-d inputs instead of constants (input name -> (config key,
#: dtype)): cheap and commonly changed, so an export honours an override of them; the runtime feeds them
#: from its config (:func:`setting_feeds`), in ONNX Runtime and in PyTorch alike. The RPN's count goes to
#: the graph that runs the RPN (the relation methods' per-frame pass; the key step of single frame, FGFA
#: and DFF), the box postprocess's values to the key step. Every other value a method's graphs use is a
#: constant (:attr:`MethodGraphs.baked`).
RPN_SETTINGS = {"post_nms_top_n": ("model.rpn.post_nms_top_n_test", torch.int64)}
BOX_SETTINGS = {"score_thresh": ("model.roi_head.score_thresh", torch.float32),
                "nms_thresh": ("model.roi_head.nms_thresh", torch.float32),
                "detections_per_img": ("model.roi_head.detections_per_img", torch.int64)}
SETTINGS = {**RPN_SETTINGS, **BOX_SETTINGS}


def config_value(cfg: Any, key: str) -> Any:
    """The value of dotted ``key`` in ``cfg``."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def setting_feeds(cfg: Any) -> Feeds:
    """The :data:`SETTINGS` inputs of ``cfg``, 0-d tensors."""
    return {name: torch.tensor(config_value(cfg, key), dtype=dtype) for name, (key, dtype) in SETTINGS.items()}


def box_settings(t: Feeds) -> dict[str, Tensor]:
    """The graph's :data:`BOX_SETTINGS` inputs as the keyword arguments of
    :meth:`~megavod.models.roi_heads.BoxPostProcessor.image_detections`."""
    return {name: t[name] for name in BOX_SETTINGS}


@dataclass
class GraphIO:
    """Input and output names of one graph and their dynamic axes (ONNX ``dynamic_axes``)."""

    inputs: list[str]
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)


class NamedGraph(nn.Module):
    """A graph module called with its inputs in :attr:`GraphIO.inputs` order, returning its outputs in
    :attr:`GraphIO.outputs` order (what ``torch.onnx.export`` traces)."""

    io: GraphIO

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        return self.compute(dict(zip(self.io.inputs, tensors)))

    def compute(self, t: Feeds) -> tuple[Tensor, ...]:
        raise NotImplementedError


def rows_axes(name: str) -> dict[int, str]:
    return {0: name}


#: A C4-like map's own size (image size / 16, rounded by the backbone's convolutions).
MAP_AXES = {2: "map_height", 3: "map_width"}


def image_axes(*names: str) -> dict[str, dict[int, str]]:
    return {n: {2: "height", 3: "width"} for n in names}


def detection_axes() -> dict[str, dict[int, str]]:
    return {n: rows_axes("detections") for n in DETECTION_OUTPUTS}


def scaled(boxes: Tensor, scores: Tensor, labels: Tensor, image_size: tuple[int, int],
           original_size: tuple[int, int]) -> Detections:
    """Detections in the frame's pixels (``Detections.scale``, as the PyTorch detectors return them)."""
    (h, w), (oh, ow) = image_size, original_size
    return Detections(boxes, scores, labels).scale(ow / w, oh / h)


def size_feed(image_size: tuple[int, int]) -> Tensor:
    return torch.tensor(image_size, dtype=torch.int64)


class MethodGraphs:
    """A method's two graphs and their adapters (see the module docstring).

    ``frame_io`` / ``key_io``: the graphs' names; :meth:`frame_graph` / :meth:`key_graph`: the traceable
    modules of a filled PyTorch detector; :meth:`frame_feeds` -> run the frame graph ->
    :meth:`frame_value` (the engine's per-frame value); :meth:`key_feeds` -> run the key graph ->
    :meth:`key_output`.
    """

    frame_io: GraphIO
    key_io: GraphIO
    #: Graphs besides the two (name -> io) that :meth:`key_feeds` runs (MEGA's ``project``, ``geometry_{i}``).
    extra_io: dict[str, GraphIO] = {}
    #: What :meth:`use_stream_caches` keeps (the manifest records it): keys/values, geometry blocks.
    kept_projections = kept_geometry = False
    #: Config keys (dotted, or a whole section) the graphs hold as constants: an export refuses an
    #: override of them, except :data:`SETTINGS` (graph inputs), :func:`megavod.export.runtime.export_config`.
    #: Every method: which graphs exist is the method's; the model section builds the layers and weights
    #: (backbone, anchors, RoI pooler, box coder, class count), and the graph ops take its other test-time
    #: values as constants (the RPN's pre-NMS top-n and NMS threshold, the reference proposal count behind
    #: the distilled/advanced rows). Each method adds the keys its own graphs are built from.
    baked: tuple[str, ...] = ("method", "model")
    #: The :data:`SETTINGS` inputs the runtime feeds to the frame and key graphs (from the config the
    #: graphs were made for, :func:`megavod.export.runtime.method_graphs`).
    settings: Feeds = {}

    def frame_graph(self, model: nn.Module) -> NamedGraph:
        raise NotImplementedError

    def key_graph(self, model: nn.Module) -> NamedGraph:
        raise NotImplementedError

    def extra_graphs(self, model: nn.Module) -> dict[str, NamedGraph]:
        return {}

    def use_stream_caches(self, projections: bool, geometry: bool) -> None:
        """Keep what the stream meets again between key frames in the stream's cache, fed to the key
        graph, or recompute it inside the graph: ``projections``: keys/values of global and memory rows,
        ``geometry``: the local stages' geometry blocks (MEGA's); other methods keep nothing."""

    def new_stream_cache(self) -> Any:
        """What one stream keeps between key frames for :meth:`key_feeds` (None: nothing)."""
        return None

    def frame_feeds(self, image: Tensor, index: int) -> Feeds | None:
        """Inputs of the frame graph for ``image`` [3, H, W]; None: this frame needs no pass (DFF)."""
        return {"image": image[None]}

    def frame_value(self, outputs: Feeds | None, image: Tensor, index: int, original_size: tuple[int, int]) -> Any:
        raise NotImplementedError

    def key_feeds(self, inputs: KeyFrameInputs, cache: Any = None, extra: Mapping[str, GraphRunner] | None = None) -> Feeds:
        """Inputs of the key graph; ``cache``: the stream's :meth:`new_stream_cache`; ``extra``: runners of
        :attr:`extra_io`'s graphs."""
        raise NotImplementedError

    def key_output(self, outputs: Feeds, inputs: KeyFrameInputs) -> KeyFrameOutput:
        raise NotImplementedError


# -- the single-frame head: RPN + box head on a C4 map (single frame, FGFA, DFF) --------------------------


def c4_detections(model: nn.Module, c4: Tensor, image_size: Tensor, t: Feeds) -> tuple[Tensor, Tensor, Tensor]:
    """``SingleFrameDetector.detect_key`` / ``FlowDetectorBase.detect_on_features`` on ``c4`` [1, C, h, w]
    (the model's own traceable per-image steps); ``t``: the graph's inputs, with its :data:`SETTINGS`."""
    rpn, head = model.rpn, model.box_head
    boxes = rpn.test_proposals(c4, image_size, t["post_nms_top_n"]).boxes
    class_logits, box_regression = head.predictor(head.feature_extractor(c4, [boxes]))
    return head.postprocessor.image_detections(class_logits, box_regression, boxes, image_size,
                                               **box_settings(t))[:3]


class BackboneGraph(NamedGraph):
    io = GraphIO(["image"], ["c4"], {**image_axes("image"), "c4": MAP_AXES})

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.backbone = model.backbone

    def compute(self, t: Feeds) -> tuple[Tensor, ...]:
        return (self.backbone(t["image"]),)


class C4HeadGraph(NamedGraph):
    io = GraphIO(["image_size", "c4", *SETTINGS], list(DETECTION_OUTPUTS), {"c4": MAP_AXES, **detection_axes()})

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def compute(self, t: Feeds) -> tuple[Tensor, ...]:
        return c4_detections(self.model, t["c4"], t["image_size"], t)


class SingleFrameGraphs(MethodGraphs):
    """Single-frame Faster R-CNN: frame graph image -> C4; key graph C4 -> detections."""

    frame_io = BackboneGraph.io
    key_io = C4HeadGraph.io

    def __init__(self, cfg: Any) -> None:  # the method table builds every entry from the config
        pass

    def frame_graph(self, model: nn.Module) -> NamedGraph:
        return BackboneGraph(model)

    def key_graph(self, model: nn.Module) -> NamedGraph:
        return C4HeadGraph(model)

    def frame_value(self, outputs: Feeds | None, image: Tensor, index: int, original_size: tuple[int, int]) -> FrameMaps:
        return FrameMaps(index, image, outputs["c4"][0], None, tuple(image.shape[-2:]), original_size)

    def key_feeds(self, inputs: KeyFrameInputs, cache: Any = None, extra: Mapping[str, GraphRunner] | None = None) -> Feeds:
        return {"image_size": size_feed(inputs.key.image_size), "c4": inputs.key.c4[None]}

    def key_output(self, outputs: Feeds, inputs: KeyFrameInputs) -> KeyFrameOutput:
        key = inputs.key
        return KeyFrameOutput(scaled(*(outputs[n] for n in DETECTION_OUTPUTS), key.image_size, key.original_size))
