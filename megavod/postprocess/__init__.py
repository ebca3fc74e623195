"""Video-level post-processing of detections: Seq-NMS (docs/departures.md#seq-nms-post-processing) and BLR
(docs/departures.md#blr-as-megavod-reads-the-paper)."""

from __future__ import annotations

from typing import Sequence

from megavod.data.predictions import FramePrediction
from megavod.postprocess.blr import RelationWeights, box_linking_with_relations
from megavod.postprocess.seqnms import seq_nms

METHODS = ("seqnms", "blr")


def apply_postprocess(
    records: Sequence[FramePrediction],
    method: str,
    relation_weights: RelationWeights | None = None,
) -> list[FramePrediction]:
    """Post-process one video's frame predictions (given in frame order) with ``method``.

    ``"seqnms"``: Seq-NMS with mean rescoring; ``"blr"``: box linking with relations, where
    ``relation_weights`` (optional, see
    :func:`~megavod.postprocess.blr.box_linking_with_relations`) are the detector's
    relation weights between boxes of adjacent frames. Returns new records; the input is not changed.
    """
    if method == "seqnms":
        if relation_weights is not None:
            raise ValueError("relation_weights are only used by method 'blr', not 'seqnms'")
        return seq_nms(records)
    if method == "blr":
        return box_linking_with_relations(records, relation_weights)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


__all__ = ["METHODS", "RelationWeights", "apply_postprocess", "box_linking_with_relations", "seq_nms"]
