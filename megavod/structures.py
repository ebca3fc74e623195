"""Typed containers for what travels between megavod's parts (detections, ground truth).

Boxes are ``(x1, y1, x2, y2)`` in pixels with the legacy "+1" convention of the authors' code
(width = x2 - x1 + 1), float32 tensors of shape ``[N, 4]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


def _check_rows(name: str, boxes: Tensor, *others: tuple[str, Tensor]) -> None:
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name}.boxes must have shape [N, 4], got {tuple(boxes.shape)}")
    for other_name, t in others:
        if t.shape[0] != boxes.shape[0]:
            raise ValueError(
                f"{name}.{other_name} has {t.shape[0]} rows but boxes has {boxes.shape[0]}"
            )


@dataclass
class RelationInputs:
    """Per detection, its query row in the detector's last location-based relation module: the
    feature row ``feats`` [N, C] and the proposal box ``boxes`` [N, 4] (resized-image pixels, as the
    module saw it). BLR (docs/departures.md#blr-as-megavod-reads-the-paper) computes relation weights between
    adjacent frames from them."""

    feats: Tensor
    boxes: Tensor

    def __post_init__(self) -> None:
        _check_rows("RelationInputs", self.boxes, ("feats", self.feats))

    def __getitem__(self, index: Tensor | slice) -> "RelationInputs":
        return RelationInputs(self.feats[index], self.boxes[index])

    def to(self, device: torch.device | str) -> "RelationInputs":
        return RelationInputs(self.feats.to(device), self.boxes.to(device))


@dataclass
class Detections:
    """Detections of one frame: boxes [N,4], scores [N], labels [N] (1..30, 0 is background).

    ``relation`` (optional, only when asked for, see ``RelationDetector.record_relation_inputs``):
    each detection's relation-module input, row for row, for BLR."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    relation: RelationInputs | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_rows("Detections", self.boxes, ("scores", self.scores), ("labels", self.labels))
        if self.relation is not None and len(self.relation.boxes) != len(self.boxes):
            raise ValueError(
                f"Detections.relation has {len(self.relation.boxes)} rows but boxes has {self.boxes.shape[0]}"
            )

    @classmethod
    def empty(cls) -> "Detections":
        return cls(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def __getitem__(self, index: Tensor | slice) -> "Detections":
        relation = None if self.relation is None else self.relation[index]
        return Detections(self.boxes[index], self.scores[index], self.labels[index], relation)

    def to(self, device: torch.device | str) -> "Detections":
        relation = None if self.relation is None else self.relation.to(device)
        return Detections(self.boxes.to(device), self.scores.to(device), self.labels.to(device), relation)

    def scale(self, sx: float, sy: float) -> "Detections":
        """Rescale boxes as the authors' ``BoxList.resize`` does: coordinates times the ratio, no +1.
        ``relation`` is kept as is (its boxes are the relation module's own, in its pixels)."""
        factors = torch.tensor([sx, sy, sx, sy], dtype=self.boxes.dtype, device=self.boxes.device)
        return Detections(self.boxes * factors, self.scores, self.labels, self.relation)


@dataclass
class FrameAnnotation:
    """Ground truth of one frame as the ILSVRC XML gives it (docs/conventions.md#annotations-and-classes).

    ``video`` is the frame's video directory relative to ``Data/VID`` (e.g.
    ``val/ILSVRC2015_val_00000000``) or, for a still DET image, its path without extension; ``frame``
    is the frame number (0 for DET). Boxes are clamped to the image as the authors' loader does.
    ``track_ids`` are the XML ``trackid`` fields (-1 where absent, e.g. DET).
    """

    video: str
    frame: int
    width: int
    height: int
    boxes: Tensor
    labels: Tensor
    track_ids: Tensor
    occluded: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    generated: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))

    def __post_init__(self) -> None:
        n = self.boxes.shape[0]
        if self.occluded.numel() == 0 and n:
            self.occluded = torch.zeros(n, dtype=torch.bool)
        if self.generated.numel() == 0 and n:
            self.generated = torch.zeros(n, dtype=torch.bool)
        _check_rows(
            "FrameAnnotation",
            self.boxes,
            ("labels", self.labels),
            ("track_ids", self.track_ids),
            ("occluded", self.occluded),
            ("generated", self.generated),
        )

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


@dataclass
class FrameFeatures:
    """One frame's per-frame pass (backbone, RPN, RoI features), computed once per frame.

    ``boxes`` [P, 4] are the frame's test-time proposals in resized-image pixels, sorted by descending
    objectness (P <= 300); ``feats`` [P, C] their raw RoI features (fc6 + ReLU). A frame met as a
    reference (local, global or memory) uses the first ``ref_post_nms_top_n`` (75) rows: the same RPN
    pass and NMS order give exactly the authors' separate "ref" RPN's proposals (docs/conventions.md#rpn).
    ``image_size`` is the resized (height, width); ``original_size`` the frame's own.
    """

    index: int
    boxes: Tensor
    feats: Tensor
    image_size: tuple[int, int]
    original_size: tuple[int, int]

    def __post_init__(self) -> None:
        if self.boxes.shape[0] != self.feats.shape[0]:
            raise ValueError(f"FrameFeatures: {self.boxes.shape[0]} boxes but {self.feats.shape[0]} feature rows")


@dataclass
class FrameMaps:
    """One frame's per-frame pass for the methods that work on feature maps (single frame, FGFA, DFF).

    image: [3, H, W] the normalised input (FlowNet reads it); c4: [C, h, w] the backbone's map (None for
    a DFF frame that is not a key frame: its map is propagated from the key frame's); embed: [2C, h, w]
    FGFA's embedding (None for the other methods); image_size / original_size: (height, width) resized /
    of the frame.
    """

    index: int
    image: Tensor
    c4: Tensor | None
    embed: Tensor | None
    image_size: tuple[int, int]
    original_size: tuple[int, int]
