"""BLR, box linking with relations (RDN, Deng et al. 2019), as megavod reads the paper
(docs/departures.md#blr-as-megavod-reads-the-paper).

The authors released no code. megavod runs Seq-NMS (:mod:`megavod.postprocess.seqnms`: same
candidates, links, greedy path extraction, suppression and final NMS) with one change: a path is
scored by its *links* instead of its boxes. The score of the link between box i in frame t and box
j in frame t+1 (same class, IoU >= 0.5) is

    s_i + s_j + IoU_ij + w_ij

with s the detection scores, IoU in the +1 convention and w_ij the relation weight between the two
boxes from the detector's last location-based relation module, averaged over heads (0 when the
detector has none or no weights are given). The best path maximises the sum of its link scores
(a path may start and end anywhere; a lone box scores 0, so it is never a path), the path's boxes
are rescored with the mean of their detection scores, and the loop stops when the best path's sum
is < 1e-2 or no link of the class remains.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
from torch import Tensor

from megavod.data.predictions import FramePrediction
from megavod.postprocess.seqnms import (
    LINK_IOU, NMS_IOU, SCORE_THRESH, STOP_SCORE, SUPPRESS_IOU, PathSearch, VideoBoxes,
)

# Relation weights of pair t (records t and t+1): a [n_t, n_{t+1}] tensor (or [heads, n_t, n_{t+1}],
# averaged over heads) indexed by the records' own detection order, or None for "no weights".
RelationWeights = Union[Sequence[Union[Tensor, None]], Callable[[int], Union[Tensor, None]]]


def _weights_getter(weights: RelationWeights | None, num_pairs: int) -> Callable[[int], Tensor | None]:
    if weights is None:
        return lambda t: None
    if callable(weights):
        return weights
    if len(weights) != num_pairs:
        raise ValueError(
            f"relation_weights must have one entry per adjacent frame pair ({num_pairs}), got {len(weights)}"
        )
    return lambda t: weights[t]


def box_linking_with_relations(
    records: Sequence[FramePrediction],
    relation_weights: RelationWeights | None = None,
    *,
    score_thresh: float = SCORE_THRESH,
    link_iou: float = LINK_IOU,
    suppress_iou: float = SUPPRESS_IOU,
    stop_score: float = STOP_SCORE,
    nms_iou: float = NMS_IOU,
) -> list[FramePrediction]:
    """BLR over one video's frame predictions (in frame order); returns new records.

    ``relation_weights``: a sequence with one entry per adjacent pair of records, or a function of
    the pair index t (records t and t+1); each entry a tensor ``[n_t, n_{t+1}]`` (or with a leading
    heads dimension, averaged) over the records' detections in their own order, or None.
    """
    if not records:
        return []
    video = VideoBoxes(records, score_thresh)
    get = _weights_getter(relation_weights, len(records) - 1)

    def link_scores(t: int, row: Tensor, col: Tensor, iou: Tensor) -> Tensor:
        scores = video.scores[video.base[t] + row] + video.scores[video.base[t + 1] + col] + iou
        w = get(t)
        if w is None:
            return scores
        w = torch.as_tensor(w).detach().cpu().float()
        if w.ndim == 3:
            w = w.mean(0)
        expected = (len(records[t].detections), len(records[t + 1].detections))
        if tuple(w.shape) != expected:
            raise ValueError(
                f"relation weights of frame pair {t} must have shape {list(expected)}, got {list(w.shape)}"
            )
        return scores + w[video.keep[t][row], video.keep[t + 1][col]]

    search = PathSearch(
        video, node_scores=False, edge_fn=link_scores, rescore="avg", link_iou=link_iou,
        suppress_iou=suppress_iou, stop_score=stop_score,
    )
    search.run()
    return search.results(records, nms_iou)
