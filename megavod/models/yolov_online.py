"""The online YOLOV (the authors' ``yolov_*_online`` rows): each frame aggregated with a memory bank of
earlier frames, then blended with the last 20 frames' outputs.

The authors' loop (``tools/val_to_imdb_online.py::imageflow_demo``, the same in
``tools/yolov_demo_online.py``) feeds one frame at a time and keeps two lists per video:

* ``tmp_bank``: of every earlier frame, the 30 proposals' class features (``cls_convs2``), regression
  features (``reg_convs``), class confidences (max class score) and objectness; the last 600 frames.
  Before each frame, ``yolox/models/post_process.py::online_previous_selection`` shuffles it *in place*
  (``random.seed(42); random.shuffle(...)``, once per list, so the lists stay aligned) and hands the
  first 31 frames' rows to the head; with fewer than 2 frames in the bank it hands nothing, and the
  head returns the base detector's output (``yolov_msa_online.py::YOLOXHead.postprocess_single_img``).
* ``local_bank``: of every frame whose step aggregated, its 30 rows' aggregated features (the
  ``linear2`` output before the blend, ``res_dict['msa']``), boxes, class confidences and objectness;
  the last 20 enter the blend (they keep 600, only 20 are ever read).

The key step (``yolox/models/yolov_msa_online.py::YOLOXHead.forward``, ``post_trans.py::
MSA_yolov_online``): the key's rows first, then the chosen frames' rows, all through the offline YOLOV
aggregation with the 2022 affinity (``Attention_msa_online`` is ``Attention_msa`` without ``use_mask``,
unchanged in fe777cb: the online rows keep the objectness factor), the key's rows' outputs blended with
the local bank (:func:`local_blend`), then ``linear_pred`` (the background logit dropped).

Here the two lists are one :class:`OnlineBank` per stream (it belongs in the detector's stream cache,
``new_stream_cache``; the detector holds weights only), and the step is :func:`online_key_logits`. A
detector's key step, once per frame in stream order (frames without proposals too: theirs shuffles the
bank before its head runs), with ``key`` the frame's pass (any :class:`ProposalRows`)::

    step = online_key_logits(head.trans, head.linear_pred, key, bank)  # reads (and reorders) the bank
    if step is None:   # frames 0 and 1: the base output (yolov_msa_online.py::postprocess_single_img)
        det = base_detections(key.boxes, key.objectness, key.class_scores, 0.001, 0.5)
    else:              # the refined output (post_process.py::postprocess_pure, nms_thre 0.5)
        det = refined_detections(key.boxes, key.objectness, step.logits, 0.001, 0.5)
    bank.push(key, None if step is None else step.features)

There is no chunk and no small-chunk fallback online: only the first two frames give the base output.
The online head's parameters are the offline YOLOV head's (the same 152 ``state_dict`` keys: their
README runs the online demo on the YOLOV weights).

**The shuffle.** The authors re-seed the global ``random`` module with 42 before every shuffle, so the
permutation a step applies depends only on the bank's length; the bank's order compounds, because the
shuffle is in place and the new frame is appended after it (and the bank is cut to its last 600
*after* the append, so the frame that leaves is the one the last shuffle put first). :class:`OnlineBank`
reproduces that sequence with a ``random.Random`` it owns, re-seeded the same way before each shuffle
(``random.seed(s); random.shuffle(x)`` and ``Random(s).shuffle(x)`` draw the same numbers). It does not
differ from theirs in what it selects: because they re-seed immediately before each shuffle, nothing
else drawing from the global generator can change their selection. What differs is only the side
effect: their step leaves the process-wide generator re-seeded every frame (and several streams in one
process would still select independently, as here, since each shuffle re-seeds).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn
from torchvision.ops import box_iou

#: Frames the bank keeps (``tmp_bank[i][-600:]``).
BANK_FRAMES = 600
#: Frames whose rows a key step reads (``online_previous_selection(frame_num=31)``).
CHOSEN_FRAMES = 31
#: Frames of aggregated rows the local blend reads (``local_bank[...][-20:]``).
LOCAL_FRAMES = 20
#: Frames the bank must hold before a step aggregates (``if len(tmp_bank[0]) < 2: return []``).
MIN_BANK_FRAMES = 2
#: The shuffle's seed (``random.seed(42)``).
SHUFFLE_SEED = 42
#: The local blend's softmax scale (``torch.softmax(25 * cos_sim * thresh_map)``).
LOCAL_SCALE = 25.0
#: A local row enters the blend's softmax with its cosine only where its score is above the key row's
#: score minus this margin (``other_scores - pre_scores > -0.3``); elsewhere with logit 0.
LOCAL_SCORE_MARGIN = 0.3


class ProposalRows(Protocol):
    """One frame's proposals as YOLOV's selection gives them (``yolov_msa_online.py::YOLOXHead.
    find_feature_score``; :func:`megavod.models.yolov_head.select_proposals` picks them; the detector's
    ``ProposalFrame`` is one), P rows: boxes [P, 4] x1y1x2y2 in network-input pixels; objectness [P]
    (their ``fg_scores``); class_confidence [P] the largest class score (their ``cls_scores``,
    ``predictions[:, 5]``); cls_features [P, W] from ``cls_convs2``; reg_features [P, W] from
    ``reg_convs``."""

    @property
    def boxes(self) -> Tensor: ...
    @property
    def objectness(self) -> Tensor: ...
    @property
    def class_confidence(self) -> Tensor: ...
    @property
    def cls_features(self) -> Tensor: ...
    @property
    def reg_features(self) -> Tensor: ...


@dataclass(frozen=True)
class KeyRows:
    """What the bank keeps of one frame (a :class:`ProposalRows`, detached; the fields as there)."""

    boxes: Tensor
    objectness: Tensor
    class_confidence: Tensor
    cls_features: Tensor
    reg_features: Tensor

    @classmethod
    def of(cls, rows: ProposalRows) -> "KeyRows":
        return cls(rows.boxes.detach(), rows.objectness.detach(), rows.class_confidence.detach(),
                   rows.cls_features.detach(), rows.reg_features.detach())


@dataclass(frozen=True)
class LocalRows:
    """Rows of the local bank, oldest frame first (one frame's entry, or the last 20 concatenated):
    features [R, 4W] the aggregated features before the blend (``res_dict['msa']``), boxes [R, 4],
    class_confidence [R], objectness [R]."""

    features: Tensor
    boxes: Tensor
    class_confidence: Tensor
    objectness: Tensor

    @staticmethod
    def cat(entries: "list[LocalRows]") -> "LocalRows":
        return LocalRows(*(torch.cat(parts) for parts in zip(
            *((e.features, e.boxes, e.class_confidence, e.objectness) for e in entries))))


@dataclass(frozen=True)
class BankReferences:
    """What a key step reads from the bank: the chosen frames' rows (bank order after the shuffle,
    concatenated: ``cls_features`` [R, W], ``reg_features`` [R, W], ``class_confidence`` [R], ``objectness``
    [R]) and the local rows (None before the first step that aggregated: their ``local_results = []``,
    no blend); ``frames`` and ``local_frames``: which frames of the stream those are (0 = the first frame
    pushed), in that order."""

    cls_features: Tensor
    reg_features: Tensor
    class_confidence: Tensor
    objectness: Tensor
    frames: tuple[int, ...]
    local: LocalRows | None
    local_frames: tuple[int, ...] = ()


class OnlineBank:
    """One stream's memory of earlier frames (``tmp_bank`` and ``local_bank`` of the authors' loop).

    Holds at most ``keep`` frames' :class:`KeyRows` (each P rows) and ``local`` frames'
    :class:`LocalRows`: memory is bounded whatever the stream's length. Call :meth:`references` exactly
    once per key frame (it reorders the bank, as theirs does) and :meth:`push` once after the step.
    """

    def __init__(self, seed: int = SHUFFLE_SEED, keep: int = BANK_FRAMES, chosen: int = CHOSEN_FRAMES,
                 local: int = LOCAL_FRAMES, min_frames: int = MIN_BANK_FRAMES) -> None:
        if keep < 1 or chosen < 1 or local < 1 or min_frames < 1:
            raise ValueError(f"keep, chosen, local and min_frames must be >= 1, got {keep}, {chosen}, {local}, "
                             f"{min_frames}")
        self.seed = seed
        self.keep = keep
        self.chosen = chosen
        self.min_frames = min_frames
        #: (frame number, rows), in the bank's current order (the authors' list order).
        self.frames: list[tuple[int, KeyRows]] = []
        #: (frame number, rows) of the last ``local`` frames whose step aggregated, oldest first.
        self.local: deque[tuple[int, LocalRows]] = deque(maxlen=local)
        self.pushed = 0  # frames pushed so far (the next frame's number in this stream)
        self._rng = random.Random(seed)
        self._permutation: tuple[int, list[int]] = (-1, [])

    def order(self, n: int) -> list[int]:
        """The permutation their ``random.seed(seed); random.shuffle(x)`` applies to a list of ``n``:
        after the shuffle, ``x[j]`` is the element that was at ``order(n)[j]``."""
        if self._permutation[0] != n:
            perm = list(range(n))
            self._rng.seed(self.seed)
            self._rng.shuffle(perm)
            self._permutation = (n, perm)
        return self._permutation[1]

    def references(self) -> BankReferences | None:
        """``post_process.py::online_previous_selection``: None while the bank holds fewer than
        ``min_frames`` frames; else shuffle the bank in place and return its first ``chosen`` frames'
        rows and the last frames of the local bank."""
        if len(self.frames) < self.min_frames:
            return None
        self.frames = [self.frames[i] for i in self.order(len(self.frames))]
        picked = [rows for _, rows in self.frames[:self.chosen]]
        local = LocalRows.cat([rows for _, rows in self.local]) if self.local else None
        return BankReferences(
            cls_features=torch.cat([r.cls_features for r in picked]),
            reg_features=torch.cat([r.reg_features for r in picked]),
            class_confidence=torch.cat([r.class_confidence for r in picked]),
            objectness=torch.cat([r.objectness for r in picked]),
            frames=tuple(t for t, _ in self.frames[:self.chosen]),
            local=local,
            local_frames=tuple(t for t, _ in self.local),
        )

    def push(self, key: ProposalRows, features: Tensor | None) -> None:
        """After frame k's step (whether or not it aggregated): its rows go to the end of the bank, and past
        ``keep`` frames the bank's first frame leaves (the one the last shuffle put first, not the oldest:
        their ``[-600:]`` after the append); with ``features`` (the step aggregated:
        :attr:`OnlineKeyStep.features`) its rows also enter the local bank."""
        rows = KeyRows.of(key)
        self.frames.append((self.pushed, rows))
        del self.frames[:-self.keep]
        if features is not None:
            self.local.append((self.pushed, LocalRows(features.detach(), rows.boxes, rows.class_confidence,
                                                      rows.objectness)))
        self.pushed += 1


def local_blend(features: Tensor, key: ProposalRows, local: LocalRows) -> Tensor:
    """``post_trans.py::MSA_yolov_online.local_agg``: each key row's aggregated features averaged with a
    weighted mean of the local rows' features, the weights ``softmax_j(25 cos_ij [s_j - s_i > -0.3])
    * IoU_ij`` renormalised over j (s = class confidence x objectness).

    As theirs: the score map zeroes the logit (a row below it still enters with ``exp(0)``); the
    cosine and the scores are in the features' dtype, the softmax and the renormalisation in float32
    (their ``ones_matrix`` is float32), the IoU computed in float32 and rounded to float16 whatever the
    dtype (``compute_geo_sim`` returns ``iou.to(torch.float16)``; ``generalized_box_iou``'s ``iou`` is
    the plain IoU, ``torchvision.ops.box_iou``'s formula). A key row that overlaps none of the local
    rows gets 0/0: NaN features, NaN logits, and no detection (``postprocess_pure`` keeps scores
    ``>= 0.001``, which NaN is not), as in their code.
    """
    cos = _unit(features) @ _unit(local.features).T
    iou = box_iou(key.boxes.float(), local.boxes.float()).to(torch.float16)
    key_score = key.class_confidence * key.objectness
    local_score = local.class_confidence * local.objectness
    above = (local_score[None, :] - key_score[:, None]) > -LOCAL_SCORE_MARGIN
    weights = torch.softmax((LOCAL_SCALE * cos).float() * above, dim=-1) * iou
    weights = (weights / weights.sum(dim=-1, keepdim=True)).to(features.dtype)
    return (weights @ local.features + features) / 2


def _unit(x: Tensor) -> Tensor:
    """Rows divided by their norm, as the authors write it (no epsilon, unlike ``F.normalize``)."""
    return x / torch.norm(x, dim=-1, keepdim=True)


class Aggregation(Protocol):
    """``megavod.models.yolov_head.YOLOVAggregation``'s call: every row is a reference, the output rows of
    the queried rows ([Q, 4W], the ``linear2`` output)."""

    def __call__(self, cls_feats: Tensor, reg_feats: Tensor, cls_conf: Tensor, objectness: Tensor,
                 queries: slice | Tensor | None = None) -> Tensor: ...


@dataclass(frozen=True)
class OnlineKeyStep:
    """A key step's result: ``logits`` [P, C] the refined class logits of the key's rows (background
    dropped; feed to ``refined_detections`` with the key's boxes and objectness); ``features`` [P, 4W]
    the key rows' aggregated features before the blend, for :meth:`OnlineBank.push`; ``frames`` the
    bank frames the step read."""

    logits: Tensor
    features: Tensor
    frames: tuple[int, ...]


def online_key_logits(aggregation: Aggregation | nn.Module, linear_pred: nn.Linear, key: ProposalRows,
                      bank: OnlineBank) -> OnlineKeyStep | None:
    """The online key step (``yolov_msa_online.py::YOLOXHead.forward`` from ``find_feature_score`` to
    ``fc_output``): None when the bank gives nothing (the caller returns the base detections);
    otherwise the key's rows, then the chosen frames' rows, aggregated (``aggregation`` with the 2022
    affinity), the key's outputs blended with the local bank when it holds anything, and ``linear_pred``
    without its last (background) logit. Reads the bank once (:meth:`OnlineBank.references`); does not
    push (call ``bank.push(key, step.features)`` after, or ``bank.push(key, None)`` when this is None)."""
    refs = bank.references()
    if refs is None:
        return None
    key = KeyRows.of(key)
    p = key.boxes.shape[0]
    out = aggregation(
        torch.cat([key.cls_features, refs.cls_features]),
        torch.cat([key.reg_features, refs.reg_features]),
        torch.cat([key.class_confidence, refs.class_confidence]),
        torch.cat([key.objectness, refs.objectness]),
        queries=slice(0, p),
    )
    blended = out if refs.local is None else local_blend(out, key, refs.local)
    return OnlineKeyStep(linear_pred(blended)[:, :-1], out, refs.frames)
