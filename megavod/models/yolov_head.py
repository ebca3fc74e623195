"""YOLOV's video parts on top of the YOLOX head (YOLOV, AAAI 2023; the authors' ``YuHengsss/YOLOV``):
the per-frame feature selection, the feature aggregation over a batch of frames, and the two outputs'
post-processing. Pure functions and one module on per-anchor / per-proposal tensors; the detector
(:mod:`megavod.models.yolov`) gathers the frames and owns the schedule.

* :func:`select_proposals`: the authors' ``yolox/models/yolovp_msa.py::YOLOXHead.postpro_woclass`` at
  inference: the top ``pre_top`` (750) anchors by objectness, class-aware NMS (IoU ``nms_thresh`` 0.75)
  on score = objectness x max class score with the class = argmax, then the first ``keep`` (30) kept.
* :class:`YOLOVAggregation`: ``yolox/models/post_trans.py::MSA_yolov`` with its ``Attention_msa`` (the
  head's ``trans``; parameter names are the authors' ``head.trans.*`` keys).
* :func:`refined_detections`: the refined output of ``yolox/models/post_process.py::postprocess``;
  :func:`base_detections`: its ``output_ori`` / ``YOLOXHead.postprocess_single_img`` (the proposals'
  base scores).

Detections carry labels 1..30 (class index + 1; 0 is megavod's background) and score = objectness x class
score. Boxes are the YOLOX decode's x1y1x2y2 in input pixels (no +1 convention: the authors' NMS is
torchvision's, widths x2 - x1).

**Ties** (docs/conventions.md#ties): every selection is by decreasing value with equal values in
increasing index order. ``torch.topk`` (their top 750) and torchvision's NMS kernels promise no order among
equal values; here the top 750 is :func:`megavod.models.box_coder.top_k` and the NMS receives its boxes in
that order with strictly decreasing priorities (:func:`class_aware_nms`). Without ties the results are the
authors' exactly (same kept set, same order); with ties the authors' own choice depends on the kernel.

**Dtypes.** The authors' NMS and thresholds run in float32 even in their float16 evaluation
(``model.half()``): ``postpro_woclass`` builds its detections with ``torch.cat`` of float16 columns and
``class_pred.float()``, which promotes the whole table to float32, and ``postprocess`` writes the refined
(float16) sigmoid scores into that float32 table. So here the boxes and scores go to float32 before any
product, threshold or NMS; the refined sigmoid itself runs in the logits' dtype, as theirs does. The
aggregation runs in the features' dtype (float16 on CUDA works) except the average pooling's
renormalisation, which their code does in float32 (the 0/1 mask is built from float32 ``ones`` /
``zeros``, and float32 x float16 promotes) and casts back to the features' dtype before the product.

**The two commits** (28ff8b0, 2022, the released YOLOV weights; fe777cb, current), everything that differs
at inference for YOLOV (``gmode``, no ``lmode``, no ``reconf``):

1. ``Attention_msa.forward``: the regression branch's logits are ``25 cos(q_reg_i, k_reg_j) obj_j`` in
   28ff8b0 and ``25 cos(q_reg_i, k_reg_j)`` in fe777cb ("modified in 2023.12.5"):
   ``YOLOVAggregation(affinity="2022" | "2023")``. The class branch keeps ``cls_conf_j`` in both.
2. fe777cb also computes ``v_reg``'s aggregation and a 0.99 cosine ``obj_mask`` for the regression
   features; without ``reconf`` (YOLOV) nothing reads them. (Its ``obj_mask`` divides by a row sum that
   is never 0: a row's own cosine is 1 > 0.99.) The ``local_mask`` option is off by default.
3. ``MSA_yolov.forward`` returns ``(cls, None)`` in fe777cb (``(cls)`` in 28ff8b0); the head then
   overwrites its ``fg_scores`` with that ``None``, read only by ``lmode``.
4. The head reshapes ``linear_pred``'s output as ``[B, -1, C + 1]`` (28ff8b0) or ``[-1, 30, C + 1]``
   (fe777cb): the same when every frame has exactly 30 proposals (a frame with fewer misaligns the
   authors' rows in both; megavod keeps each frame's own rows).
5. ``post_process.py::postprocess``: fe777cb takes the class maximum per frame in a loop (same values),
   can replace the objectness by ``conf_output`` (``None`` for YOLOV), and drops a ``.squeeze()`` of the
   base branch's mask: 28ff8b0's ``postprocess`` raises an IndexError on a frame with exactly one
   proposal, fe777cb's does not (megavod handles any count).
6. ``postpro_woclass`` (fe777cb) is split into ``process_prediction`` and takes the training-only
   ``ota_idxs``; at inference it is unchanged.

Edge cases the authors' code does not handle and megavod does: fewer than 750 anchors (their
``torch.topk(k=750)`` raises; here all anchors go to the NMS), fewer than 30 proposals kept by the NMS
(their head's reshape assumes 30; here the frame has fewer rows), and a frame with no refined detection
(their ``postprocess`` then also skips the base branch: ``output_ori`` is ``None``; here
:func:`base_detections` is its own function).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from megavod.models.box_coder import top_k
from megavod.structures import Detections

Affinity = Literal["2022", "2023"]
Queries = slice | Tensor | None

#: Proposals kept per frame, anchors before the NMS, the NMS IoU (``exps/yolov/yolov_*.py`` through
#: ``YOLOXHead(defualt_p=30, defulat_pre=750, pre_nms=0.75)``), and the final thresholds
#: (``postprocess(conf_thre=0.001, nms_thre=0.5)``).
PROPOSALS = 30
PRE_TOP = 750
SELECT_NMS = 0.75
CONF_THRESH = 0.001
FINAL_NMS = 0.5


def class_aware_nms(boxes: Tensor, scores: Tensor, classes: Tensor, iou_threshold: float) -> Tensor:
    """torchvision's ``batched_nms`` (suppress at IoU > ``iou_threshold`` within a class, widths x2 - x1),
    with equal scores taken in increasing index order (docs/conventions.md#ties). Returns kept indices by
    decreasing score.

    The boxes go to ``torchvision.ops.batched_nms`` itself, so it picks the same path as the authors' call
    (the coordinate-offset trick or the per-class loop, by size and device) and computes the same IoUs;
    only the priorities differ: the :func:`top_k` order as n, n-1, ..., 1 in float32 (exact below 2**24)
    instead of the scores, which fixes the kernel's order among equal scores and changes nothing else.
    """
    n = scores.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=scores.device)
    order = top_k(scores, n)[1]
    priority = torch.arange(n, 0, -1, dtype=torch.float32, device=scores.device)
    kept = torchvision.ops.batched_nms(boxes[order].float(), priority, classes[order], iou_threshold)
    return order[kept]


def select_proposals(boxes: Tensor, objectness: Tensor, class_scores: Tensor, pre_top: int = PRE_TOP,
                     nms_thresh: float = SELECT_NMS, keep: int = PROPOSALS) -> Tensor:
    """Indices into one frame's A anchors of its YOLOV proposals, best first
    (``yolox/models/yolovp_msa.py::YOLOXHead.postpro_woclass``).

    boxes [A, 4] x1y1x2y2, objectness [A] and class_scores [A, C] (sigmoids): the ``min(pre_top, A)``
    anchors of highest objectness, class-aware NMS at IoU > ``nms_thresh`` on objectness x max class
    score, the class being the argmax (first of equal maxima), then the first ``keep`` kept. Returns
    int64 [<= keep], fewer where the NMS keeps fewer.
    """
    candidates = top_k(objectness, pre_top)[1]
    class_conf, class_pred = class_scores[candidates].max(dim=1)
    scores = objectness[candidates].float() * class_conf.float()
    kept = class_aware_nms(boxes[candidates], scores, class_pred, nms_thresh)
    return candidates[kept[:keep]]


def _detections(boxes: Tensor, scores: Tensor, classes: Tensor, conf_thresh: float,
                nms_thresh: float) -> Detections:
    """Candidates scoring >= ``conf_thresh``, class-aware NMS, as megavod Detections (labels = class + 1)."""
    passing = torch.nonzero(scores >= conf_thresh).squeeze(1)
    boxes, scores, classes = boxes[passing].float(), scores[passing], classes[passing]
    kept = class_aware_nms(boxes, scores, classes, nms_thresh)
    return Detections(boxes[kept], scores[kept], classes[kept].to(torch.int64) + 1)


def refined_detections(boxes: Tensor, objectness: Tensor, class_logits: Tensor,
                       conf_thresh: float = CONF_THRESH, nms_thresh: float = FINAL_NMS) -> Detections:
    """YOLOV's output for one frame (``yolox/models/post_process.py::postprocess``, the refined branch).

    boxes [P, 4] and objectness [P] of the frame's proposals (the base detector's: boxes are never
    refined), class_logits [P, C] (``linear_pred``'s output without its last logit). Every (proposal,
    class) with sigmoid(logit) >= ``conf_thresh`` is a candidate (row-major: proposal, then class) scored
    objectness x sigmoid(logit); those scoring >= ``conf_thresh`` go to a class-aware NMS at
    ``nms_thresh``.
    """
    class_scores = class_logits.sigmoid()  # in the logits' dtype, as theirs (fc_outputs[i].sigmoid())
    rows, classes = torch.nonzero(class_scores >= conf_thresh, as_tuple=True)
    scores = objectness.float()[rows] * class_scores[rows, classes].float()
    return _detections(boxes[rows], scores, classes, conf_thresh, nms_thresh)


def base_detections(boxes: Tensor, objectness: Tensor, class_scores: Tensor,
                    conf_thresh: float = CONF_THRESH, nms_thresh: float = FINAL_NMS) -> Detections:
    """The proposals' own detections (``postprocess``'s ``output_ori``,
    ``yolovp_msa.py::YOLOXHead.postprocess_single_img``): one per proposal, its top class (argmax, first
    of equal maxima) scored objectness x that class's score; those >= ``conf_thresh``, class-aware NMS at
    ``nms_thresh``. boxes [P, 4], objectness [P], class_scores [P, C] (sigmoids)."""
    class_conf, classes = class_scores.max(dim=1)
    return _detections(boxes, objectness.float() * class_conf.float(), classes, conf_thresh, nms_thresh)


class YOLOVAttention(nn.Module):
    """The parameters of ``post_trans.py::Attention_msa``: the q, k, v projections (no bias) of the class
    features (``qkv_cls``) and of the regression features (``qkv_reg``), [3W, W] each: rows [0, W) are q,
    [W, 2W) k, [2W, 3W) v, each split into ``heads`` contiguous heads. The computation is
    :meth:`YOLOVAggregation.forward`."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.qkv_cls = nn.Linear(width, 3 * width, bias=False)
        self.qkv_reg = nn.Linear(width, 3 * width, bias=False)


def _heads(x: Tensor, heads: int) -> Tensor:
    """[N, W] -> [H, N, W / H] (head h: channels [h d, (h + 1) d), the authors' reshape)."""
    return x.unflatten(-1, (heads, -1)).transpose(0, 1)


def _affinity(q_reg: Tensor, k_reg: Tensor, q_cls: Tensor, k_cls: Tensor) -> Tensor:
    """A = (softmax_j(q_reg k_reg^T) + softmax_j(q_cls k_cls^T)) / 2 per head, [H, Q, N] (the key factors
    are already in k)."""
    return ((q_reg @ k_reg.transpose(1, 2)).softmax(dim=-1) + (q_cls @ k_cls.transpose(1, 2)).softmax(dim=-1)) / 2


def _unit(x: Tensor) -> Tensor:
    """x / ||x|| over the last axis (the authors' ``x / torch.norm(x, dim=-1, keepdim=True)``, no epsilon)."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)


class YOLOVAggregation(nn.Module):
    """YOLOV's feature aggregation (``yolox/models/post_trans.py::MSA_yolov`` and ``Attention_msa``) over
    the N proposals of a batch of frames, every row both query and reference (its own frame included).

    With W channels in H heads of d = W / H, per head h (the class branch's q, k, v; the regression
    branch's q', k'; c_j the reference's max class score, o_j its objectness):

        A_cls = softmax_j(scale cos(q_i, k_j) c_j)
        A_reg = softmax_j(scale cos(q'_i, k'_j) o_j)      affinity "2022" (28ff8b0, the released weights)
        A_reg = softmax_j(scale cos(q'_i, k'_j))          affinity "2023" (fe777cb)
        A     = (A_cls + A_reg) / 2
        Y_i   = linear1([concat_h (A v)_i, v_i])                                       [N, 2W]
        M_ij  = [sum_h cos(v_i^h, v_j^h) / H > sim_thresh],  P_i = softmax_j(sum_h A_ij / H)
        W_ij  = M_ij P_ij / sum_j M_ij P_ij
        out_i = linear2([sum_j W_ij Y_j, Y_i])                                         [N, 4W]

    ``out`` goes to the head's ``linear_pred``. Each output row depends on all rows but no output row on
    another (row-separable), so ``forward`` computes the queried rows' outputs only; every row's Y is
    still needed as a reference. Parameter names: ``msa.qkv_cls``, ``msa.qkv_reg``, ``linear1``,
    ``linear2`` (the head's ``trans.*`` keys).
    """

    def __init__(self, width: int, heads: int = 4, scale: float = 25.0, sim_thresh: float = 0.75,
                 affinity: Affinity = "2022") -> None:
        super().__init__()
        if affinity not in ("2022", "2023"):
            raise ValueError(f"affinity must be '2022' or '2023', got {affinity!r}")
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.width, self.heads, self.scale = width, heads, float(scale)
        self.sim_thresh, self.affinity = float(sim_thresh), affinity
        self.msa = YOLOVAttention(width, heads)
        self.linear1 = nn.Linear(2 * width, 2 * width)
        self.linear2 = nn.Linear(4 * width, 4 * width)

    def forward(self, cls_feats: Tensor, reg_feats: Tensor, cls_conf: Tensor, objectness: Tensor,
                queries: Queries = None) -> Tensor:
        """cls_feats, reg_feats [N, W] (the proposals' ``cls_convs2`` and ``reg_convs`` features),
        cls_conf [N] (max class score), objectness [N]; ``queries`` (a slice or int64 indices of rows,
        None = all) selects the output rows. Returns [Q, 4W] in the features' dtype."""
        width, heads, n = self.width, self.heads, cls_feats.shape[0]
        q_cls, k_cls, v_cls = self.msa.qkv_cls(cls_feats).split(width, dim=-1)
        # The regression branch's v is unused at inference: its q and k only (rows [0, 2W) of the weight).
        q_reg, k_reg = F.linear(reg_feats, self.msa.qkv_reg.weight[: 2 * width]).split(width, dim=-1)
        v = _heads(v_cls, heads)  # [H, N, d]
        # Unit q and k per head; the key factors (scale x c_j, scale x o_j or scale) folded into k: the
        # logits are then one product each (the authors scale the [N, N] products, the same to rounding).
        key_cls = self.scale * cls_conf.to(v.dtype)
        key_reg = self.scale * (objectness.to(v.dtype) if self.affinity == "2022" else torch.ones_like(key_cls))
        q_cls, k_cls = _unit(_heads(q_cls, heads)), _unit(_heads(k_cls, heads)) * key_cls[:, None]
        q_reg, k_reg = _unit(_heads(q_reg, heads)), _unit(_heads(k_reg, heads)) * key_reg[:, None]
        rows = slice(None) if queries is None else queries
        num_queries = len(range(n)[rows]) if isinstance(rows, slice) else rows.shape[0]
        if 2 * num_queries <= n:
            # At most half the rows queried: every reference's A v by SDPA (no [H, N, N] matrix), A for the
            # queried rows only (slower than the whole matrix when every row is queried). On 960 rows, one
            # thread, W = 128 / 256 / 320, the time over all rows' (benchmarks/yolov_aggregation.py):
            # 0.39 / 0.49 / 0.43 for 30 queried rows, 0.64 / 0.66 / 0.59 for 240, 0.82 / 0.86 / 0.81 for 480.
            aggregated = (F.scaled_dot_product_attention(q_reg, k_reg, v, scale=1.0)
                          + F.scaled_dot_product_attention(q_cls, k_cls, v, scale=1.0)) / 2
            attn = _affinity(q_reg[:, rows], k_reg, q_cls[:, rows], k_cls)
        else:
            # Most rows queried: the whole A once.
            attn = _affinity(q_reg, k_reg, q_cls, k_cls)
            aggregated = attn @ v
            attn = attn[:, rows]
        refs = self.linear1(torch.cat([aggregated.transpose(0, 1).reshape(-1, width), v_cls], dim=-1))
        pooling = self._pooling_weights(attn, v[:, rows], v)
        return self.linear2(torch.cat([pooling @ refs, refs[rows]], dim=-1))

    def _pooling_weights(self, attn: Tensor, v_query: Tensor, v: Tensor) -> Tensor:
        """W [Q, N]: the average pooling over references (``Attention_msa``'s ``sim_round2``). attn
        [H, Q, N] the queried rows' affinities, v_query [H, Q, d] and v [H, N, d] the class values."""
        heads = self.heads
        cosine = (_unit(v_query) @ _unit(v).transpose(1, 2)).sum(dim=0) / heads
        mask = (cosine > self.sim_thresh).float()
        weights = mask * torch.softmax(attn.sum(dim=0) / heads, dim=-1)
        # float32 here, as theirs (the mask is float32; float32 x float16 promotes); back to the features'.
        return (weights / weights.sum(dim=-1, keepdim=True)).to(v.dtype)
