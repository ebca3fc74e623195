"""FGFA's and DFF's ONNX graphs: C4 maps warped by flow (docs/architecture.md#export-and-onnx-runtime)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from megavod.errors import ConfigError
from megavod.models.contract import KeyFrameInputs, KeyFrameOutput
from megavod.structures import FrameMaps
from megavod.export.graphs import (
    BackboneGraph,
    DETECTION_OUTPUTS,
    Feeds,
    GraphIO,
    GraphRunner,
    MAP_AXES,
    MethodGraphs,
    NamedGraph,
    SETTINGS,
    c4_detections,
    detection_axes,
    image_axes,
    scaled,
    size_feed,
)


# -- FGFA and DFF: warped C4 maps -------------------------------------------------------------------------


def _refuse_raft(method_cfg: Any, key: str) -> None:
    if method_cfg.flow_network != "flownet_s":
        raise ConfigError(f"config key '{key}.flow_network': the ONNX export supports flownet_s only, "
                          f"got {method_cfg.flow_network!r}")


class _FGFAFrameGraph(NamedGraph):
    io = GraphIO(["image"], ["c4", "embed"], {**image_axes("image"), "c4": MAP_AXES, "embed": MAP_AXES})

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def compute(self, t: Feeds) -> tuple[Tensor, ...]:
        return self.model.frame_maps(t["image"])


class _FGFAKeyGraph(NamedGraph):
    """``FGFADetector.detect_key``: :meth:`FGFADetector.aggregate_maps` (flow from the key to every window
    frame, warp [C4, embedding], per-pixel softmax weights, the weighted sum), then the single-frame head."""

    io = GraphIO(["image_size", "key_index", "images", "c4", "embed", *SETTINGS], list(DETECTION_OUTPUTS),
                 {"images": {0: "window", 2: "height", 3: "width"}, "c4": {0: "window", **MAP_AXES},
                  "embed": {0: "window", **MAP_AXES}, **detection_axes()})

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def compute(self, t: Feeds) -> tuple[Tensor, ...]:
        maps = torch.cat([t["c4"], t["embed"]], dim=1)  # FrameMaps' two maps, as FGFADetector.aggregate stacks them
        feats, _ = self.model.aggregate_maps(t["images"], maps, t["key_index"])
        return c4_detections(self.model, feats, t["image_size"], t)


class FGFAGraphs(MethodGraphs):
    """FGFA: frame graph image -> (C4, embedding); key graph: the window's images, C4 maps and
    embeddings, the key's place in it -> detections."""

    frame_io = _FGFAFrameGraph.io
    key_io = _FGFAKeyGraph.io
    # The flow network is part of the graphs (the window's offsets are not: the window is a dynamic axis).
    baked = (*MethodGraphs.baked, "fgfa.flow_network")

    def __init__(self, cfg: Any) -> None:
        _refuse_raft(cfg.fgfa, "fgfa")

    def frame_graph(self, model: nn.Module) -> NamedGraph:
        return _FGFAFrameGraph(model)

    def key_graph(self, model: nn.Module) -> NamedGraph:
        return _FGFAKeyGraph(model)

    def frame_value(self, outputs: Feeds | None, image: Tensor, index: int, original_size: tuple[int, int]) -> FrameMaps:
        return FrameMaps(index, image, outputs["c4"][0], outputs["embed"][0], tuple(image.shape[-2:]), original_size)

    def key_feeds(self, inputs: KeyFrameInputs, cache: Any = None, extra: Mapping[str, GraphRunner] | None = None) -> Feeds:
        window = list(inputs.local)
        key = window[inputs.key_index]
        return {"image_size": size_feed(key.image_size), "key_index": torch.tensor([inputs.key_index]),
                "images": torch.stack([f.image for f in window]), "c4": torch.stack([f.c4 for f in window]),
                "embed": torch.stack([f.embed for f in window])}

    def key_output(self, outputs: Feeds, inputs: KeyFrameInputs) -> KeyFrameOutput:
        key = inputs.local[inputs.key_index]
        return KeyFrameOutput(scaled(*(outputs[n] for n in DETECTION_OUTPUTS), key.image_size, key.original_size))


class _DFFKeyGraph(NamedGraph):
    """``DFFDetector.detect_key``: :meth:`DFFDetector.propagate` (flow(frame, key frame), warp the key frame's
    C4, times the scale map), then the single-frame head."""

    io = GraphIO(["image_size", "image", "key_image", "key_c4", *SETTINGS], list(DETECTION_OUTPUTS),
                 {**image_axes("image", "key_image"), "key_c4": MAP_AXES, **detection_axes()})

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def compute(self, t: Feeds) -> tuple[Tensor, ...]:
        feats = self.model.propagate(t["image"], t["key_image"], t["key_c4"])
        return c4_detections(self.model, feats, t["image_size"], t)


class DFFGraphs(MethodGraphs):
    """DFF: frame graph image -> C4, run on key frames only; key graph: the frame's and its key frame's
    images and the key frame's C4 -> detections."""

    frame_io = BackboneGraph.io
    key_io = _DFFKeyGraph.io
    # The flow network is part of the key graph (key_interval is not: the runtime applies it, frame_feeds).
    baked = (*MethodGraphs.baked, "dff.flow_network")

    def __init__(self, cfg: Any) -> None:
        _refuse_raft(cfg.dff, "dff")
        self.key_interval = cfg.dff.key_interval

    def frame_graph(self, model: nn.Module) -> NamedGraph:
        return BackboneGraph(model)

    def key_graph(self, model: nn.Module) -> NamedGraph:
        return _DFFKeyGraph(model)

    def frame_feeds(self, image: Tensor, index: int) -> Feeds | None:
        return {"image": image[None]} if index % self.key_interval == 0 else None  # DFFDetector.is_key_frame

    def frame_value(self, outputs: Feeds | None, image: Tensor, index: int, original_size: tuple[int, int]) -> FrameMaps:
        c4 = None if outputs is None else outputs["c4"][0]
        return FrameMaps(index, image, c4, None, tuple(image.shape[-2:]), original_size)

    def key_feeds(self, inputs: KeyFrameInputs, cache: Any = None, extra: Mapping[str, GraphRunner] | None = None) -> Feeds:
        frame, key = inputs.key, inputs.local[0]
        return {"image_size": size_feed(frame.image_size), "image": frame.image[None],
                "key_image": key.image[None], "key_c4": key.c4[None]}

    def key_output(self, outputs: Feeds, inputs: KeyFrameInputs) -> KeyFrameOutput:
        key = inputs.key
        return KeyFrameOutput(scaled(*(outputs[n] for n in DETECTION_OUTPUTS), key.image_size, key.original_size))
