"""Traceable forms of the detector's test-time pieces, for the ONNX graphs (docs/architecture.md#export-and-onnx-runtime).

The PyTorch modules (:mod:`megavod.models`) branch in Python on row counts and image sizes (a loop over
classes in the box postprocess, chunked geometry terms, ``min(pre_nms_top_n, anchors)``, per-frame row
lists); a traced graph would freeze those numbers. The functions here compute the same values from the
same parameters with the counts kept as tensors, so one graph serves any image size and any number of
rows. Every formula is the model's own (cited per function); tests/test_export_onnx.py checks that ONNX
Runtime's detections equal PyTorch's.

Boxes follow the authors' +1 convention (docs/conventions.md#legacy-plus-one-boxes) exactly as in
:mod:`megavod.models.box_coder`: NMS shifts x2, y2 by one pixel so that ONNX's ``NonMaxSuppression``
(like torchvision's kernel, which the exporter maps to it) measures +1 areas and suppresses at IoU > t.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import nms as tv_nms
from torchvision.ops import roi_align

# The relation module's private pieces are reused, not copied, so the graph's geometry term is the
# PyTorch path's formula (docs/conventions.md#relation-module).
from megavod.models.box_coder import nms, plus_one, top_k
from megavod.models.relation import RelationModule, _frequencies
from megavod.models.roi_heads import BoxPostProcessor, ResNetC5RoIPooler
from megavod.models.rpn import RPN

INT64_MAX = sys.maxsize


# -- boxes (megavod.models.box_coder) ---------------------------------------------------------------------


def clip_to_image(boxes: Tensor, image_size: Tensor) -> Tensor:
    """:func:`clip_boxes` with the image's (height, width) as a tensor: [N, 4k] into [0, W-1] x [0, H-1]."""
    hw = image_size.to(boxes.dtype)
    upper = torch.stack([hw[1] - 1, hw[0] - 1, hw[1] - 1, hw[0] - 1])
    grouped = boxes.reshape(boxes.shape[0], -1, 4)
    return torch.min(torch.max(grouped, torch.zeros_like(upper)), upper).reshape(boxes.shape[0], -1)


def image_size_of(image: Tensor) -> Tensor:
    """(height, width) of an image tensor [..., H, W] as an int64 tensor (a graph value, not a constant)."""
    return torch._shape_as_tensor(image)[-2:]


# -- RPN (megavod.models.rpn.RPN.select, test-time "key" mode) -------------------------------------------


def anchors(rpn: RPN, c4: Tensor) -> Tensor:
    """:class:`AnchorGenerator`'s [H*W*A, 4] anchors for ``c4`` [1, C, H, W], location-major."""
    generator = rpn.anchor_generator
    h, w = c4.shape[-2:]
    stride = float(generator.stride)
    shifts_x = torch.arange(w, dtype=torch.float32) * stride
    shifts_y = torch.arange(h, dtype=torch.float32) * stride
    sy, sx = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
    shifts = torch.stack((sx, sy, sx, sy), dim=-1).reshape(-1, 1, 4)
    return (shifts + generator.cell_anchors[0].view(1, -1, 4)).reshape(-1, 4)


def proposals(rpn: RPN, c4: Tensor, image_size: Tensor, pre_nms_top_n: int, post_nms_top_n: int | Tensor) -> Tensor:
    """One image's test proposals [P, 4], sorted by objectness (:meth:`RPN.select`, min_size 0)."""
    objectness, deltas = rpn.head(c4)
    num_anchors = objectness.shape[1]
    obj = objectness.permute(0, 2, 3, 1).reshape(-1)
    d = deltas.view(1, num_anchors, 4, deltas.shape[-2], deltas.shape[-1]).permute(0, 3, 4, 1, 2).reshape(-1, 4)
    scores, idx = top_k(obj.sigmoid(), pre_nms_top_n)  # min(k, anchors) in the graph; ties: index order
    boxes = rpn.box_coder.decode(d[idx], anchors(rpn, c4)[idx])  # BoxCoder.decode traces as is
    boxes = clip_to_image(boxes, image_size)
    keep = nms(boxes, scores, rpn.nms_thresh)[:post_nms_top_n]
    return boxes[keep]


def pool(pooler: ResNetC5RoIPooler, feature_map: Tensor, boxes: Tensor) -> Tensor:
    """:meth:`ResNetC5RoIPooler.pool` of one image's ``boxes`` [N, 4] -> [N, C*r*r] (legacy RoIAlign)."""
    return roi_align(feature_map, [boxes], pooler.resolution, pooler.scale, pooler.sampling_ratio,
                     aligned=False).flatten(1)


# -- box postprocess (megavod.models.roi_heads.BoxPostProcessor) -----------------------------------------


def _scalar_input(g, value, dtype: torch.dtype):
    """A symbolic's scalar argument as a graph value: a constant, or the graph input it already is (the
    postprocess's thresholds are graph inputs, megavod.export.graphs.SETTINGS)."""
    if isinstance(value, torch._C.Value):
        return value
    return g.op("Constant", value_t=torch.tensor([value], dtype=dtype))


class PerClassNMS(torch.autograd.Function):
    """Per-class +1 NMS after the score threshold, as :class:`BoxPostProcessor` runs it (one
    torchvision NMS per class, classes ascending, each by score; :func:`detections` passes distinct
    priorities as scores, so no two entries of a class tie). In the graph it is one ONNX
    ``NonMaxSuppression`` with the classes as its batch (every class has its own boxes), which returns
    the kept entries in the same order. Returns [S, 2]: (class column, proposal row)."""

    @staticmethod
    def forward(ctx, boxes: Tensor, scores: Tensor, score_thresh: float, iou_thresh: float) -> Tensor:
        kept = []
        for c in range(boxes.shape[0]):
            rows = torch.nonzero(scores[c] > score_thresh).squeeze(1)
            rows = rows[tv_nms(boxes[c, rows], scores[c, rows], float(iou_thresh))]
            kept.append(torch.stack([torch.full_like(rows, c), rows], dim=1))
        return torch.cat(kept) if kept else boxes.new_zeros(0, 2, dtype=torch.int64)

    @staticmethod
    def symbolic(g, boxes, scores, score_thresh: float, iou_thresh: float):
        # boxes [C, N, 4] as C batches; scores [C, N] -> [C, 1, N] (one "class" per batch).
        axes = g.op("Constant", value_t=torch.tensor([1], dtype=torch.int64))
        selected = g.op(
            "NonMaxSuppression", boxes, g.op("Unsqueeze", scores, axes),
            g.op("Constant", value_t=torch.tensor([INT64_MAX], dtype=torch.int64)),
            _scalar_input(g, iou_thresh, torch.float32),
            _scalar_input(g, score_thresh, torch.float32),
        )  # [S, 3]: (batch = class, 0, box)
        return g.op("Gather", selected, g.op("Constant", value_t=torch.tensor([0, 2], dtype=torch.int64)), axis_i=1)


def detections(post: BoxPostProcessor, class_logits: Tensor, box_regression: Tensor, boxes: Tensor,
               image_size: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:class:`BoxPostProcessor` for one image: (boxes [D, 4], scores [D], labels [D], the proposal row each
    detection came from [D] (its ``return_indices``)) in the pixels of the resized image, in its order
    (classes ascending, by score), the top ``detections_per_img`` by the kth-value threshold (ties at the
    threshold kept, as the authors')."""
    probs = F.softmax(class_logits.float(), -1)
    num_classes = probs.shape[1]
    decoded = post.box_coder.decode(box_regression, boxes)
    decoded = clip_to_image(decoded, image_size).reshape(-1, num_classes, 4)[:, 1:]
    per_class_boxes = decoded.permute(1, 0, 2)  # [K-1, N, 4]
    per_class_scores = probs[:, 1:].permute(1, 0)  # [K-1, N]
    # Each class's entries in :func:`top_k` order (score, ties by proposal row) as strictly decreasing
    # priorities, 0 below the score threshold: NonMaxSuppression then takes them in the order
    # BoxPostProcessor's NMS does, whatever its own tie rule (docs/conventions.md#ties).
    num_rows = per_class_scores.shape[1]
    order = top_k(per_class_scores, num_rows)[1]
    ranks = torch.zeros_like(order).scatter(1, order, torch.arange(num_rows).expand_as(order))
    priority = (num_rows - ranks).to(torch.float32) * (per_class_scores > post.score_thresh)
    kept = PerClassNMS.apply(plus_one(per_class_boxes), priority, 0.0, post.nms_thresh)
    cls, rows = kept[:, 0], kept[:, 1]
    out_boxes = per_class_boxes[cls, rows]
    out_scores = per_class_scores[cls, rows]
    labels = cls + 1
    # kthvalue(scores, n - D + 1) is the D-th largest score; with D or fewer detections (or D <= 0: no
    # limit) the cut is -1, below every probability, and nothing goes. D may be a graph input (a 0-d tensor,
    # megavod.export.graphs.SETTINGS), so no Python branch or size on it. (-1, not -inf: the exporter's
    # shape inference reads a one-element float constant as an int64 and fails on -inf.)
    limit = torch.as_tensor(post.detections_per_img, dtype=torch.int64)
    below = torch.full((1,), -1.0, dtype=out_scores.dtype)
    ranked = torch.cat([out_scores.sort(descending=True)[0], below])
    at = torch.clamp(torch.minimum(limit - 1, torch._shape_as_tensor(out_scores)[0]), min=0)
    keep = torch.nonzero(out_scores >= torch.where(limit > 0, ranked.index_select(0, at.reshape(1)), below)).squeeze(1)
    out_boxes, out_scores, labels, rows = out_boxes[keep], out_scores[keep], labels[keep], rows[keep]
    return out_boxes, out_scores, labels, rows


# -- relation module (megavod.models.relation.RelationModule.forward, no cache) ---------------------------


#: Query-row chunks of the geometry term (a fixed count: a traced graph cannot loop a data-dependent number
#: of times). RelationModule.geometry_bias chunks for the same reason, the per-pair embedding of all
#: pairs at once being far larger than the CPU caches; 16 chunks of MEGA's 675 x 3750 local stage 0
#: (~42 rows, ~2.5M logits each) took 0.72 s in ONNX Runtime on one thread against 1.47 s unchunked
#: (benchmarks/README.md#onnx-runtime).
GEOMETRY_CHUNKS = 16


def _geometry_logits(weights: tuple[Tensor, Tensor, Tensor], module: RelationModule, x_boxes: Tensor,
                     ref_boxes: Tensor) -> Tensor:
    """log(relu(Wg . E + bg) + 1e-6) of ``x_boxes`` x ``ref_boxes`` as [M_h, n, m]; the per-pair terms are
    laid out term-major ([2f, n*m]), so both products are plain [M_h, 2f] x [2f, n*m] (no transposed copy)."""
    w_sin, w_cos, scale_weight = weights
    h, f = module.num_heads, module.embed_dim // 8
    query_factors, ref_factors = module._scale_factors(x_boxes, ref_boxes, scale_weight)
    freqs = _frequencies(f, module.wave_length, x_boxes.device, x_boxes.dtype)
    # _relative_centre_offsets, term-major: log(|c_q - c_r| / wh_q + 1e-3), [2, n, m].
    q_wh = (x_boxes[:, 2:] - x_boxes[:, :2] + 1).T
    q_c = (0.5 * (x_boxes[:, :2] + x_boxes[:, 2:])).T
    r_c = (0.5 * (ref_boxes[:, :2] + ref_boxes[:, 2:])).T
    offsets = ((q_c[:, :, None] - r_c[:, None, :]).abs() / q_wh[:, :, None] + 1e-3).log()
    angles = (offsets.reshape(2, 1, -1) * freqs.view(1, f, 1)).reshape(2 * f, -1)  # [(term, f), n*m]
    logits = torch.bmm(query_factors.expand(h, -1, -1), ref_factors).reshape(h, -1)
    logits = logits + w_sin @ angles.sin() + w_cos @ angles.cos() + module.Wg.bias[:, None]
    return (F.relu(logits) + 1e-6).log().reshape(h, x_boxes.shape[0], ref_boxes.shape[0])


def geometry_bias(module: RelationModule, x_boxes: Tensor, ref_boxes: Tensor) -> Tensor:
    """:meth:`RelationModule.geometry_bias` [M_h, N, M], in :data:`GEOMETRY_CHUNKS` chunks of query rows
    (no in-place ops)."""
    h, f = module.num_heads, module.embed_dim // 8
    x_boxes, ref_boxes = x_boxes.float(), ref_boxes.float()
    weight = module.Wg.weight.view(h, -1)
    direct = torch.cat([weight[:, : 4 * f], weight[:, 8 * f :]], dim=1).view(h, -1, 2, f)
    weights = direct[:, :, 0].flatten(1), direct[:, :, 1].flatten(1), weight[:, 4 * f : 8 * f]
    rows = (x_boxes.shape[0] + GEOMETRY_CHUNKS - 1) // GEOMETRY_CHUNKS
    return torch.cat([_geometry_logits(weights, module, x_boxes[i * rows : (i + 1) * rows], ref_boxes)
                      for i in range(GEOMETRY_CHUNKS)], dim=1)


def references(module: RelationModule, refs: Tensor | None, kv: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Keys and values [M_h, M, d] of the references (:meth:`RelationModule.project_refs`). ``kv``: those of
    the last M' references, projected earlier (the ``ref_kv`` of :meth:`RelationModule.forward`); ``refs``
    then holds the M - M' others (or is None)."""
    if kv is None:
        return module.project_refs(refs)
    if refs is None:
        return kv
    k, v = (torch.cat(pair, dim=1) for pair in zip(module.project_refs(refs), kv))
    return k, v


def attention_logits(module: RelationModule, x: Tensor, k: Tensor, x_boxes: Tensor | None = None,
                     ref_boxes: Tensor | None = None, geometry: Tensor | None = None) -> Tensor:
    """The logits [M_h, N, M] of queries ``x`` over references with keys ``k`` (:func:`references`): the
    appearance term (with the content bias u) plus, for a location-based module, the geometry term, given
    (``geometry``, computed earlier: the ``geometry`` of :meth:`RelationModule.forward`) or computed from
    the boxes."""
    h, d = module.num_heads, module.head_dim
    q = module.Wq(x).reshape(-1, h, d).transpose(0, 1)
    if module.u is not None:
        q = q + module.u
    logits = q @ k.transpose(1, 2) / math.sqrt(d)
    if module.location_based:
        logits = logits + (geometry if geometry is not None else geometry_bias(module, x_boxes, ref_boxes))
    return logits


def attend(module: RelationModule, x: Tensor, k: Tensor, v: Tensor, x_boxes: Tensor | None = None,
           ref_boxes: Tensor | None = None, geometry: Tensor | None = None) -> Tensor:
    """:meth:`RelationModule.forward` [N, C] of queries ``x`` over references given as keys and values
    (:func:`references`), before the residual; needs at least one reference (``geometry``: see
    :func:`attention_logits`). Query rows are independent of each other, so the queries may be attended
    in parts."""
    out = attention_logits(module, x, k, x_boxes, ref_boxes, geometry).softmax(dim=-1) @ v
    return out.transpose(0, 1).reshape(-1, module.feat_dim) + module.Wv.bias


def attention_weights(module: RelationModule, x: Tensor, refs: Tensor, x_boxes: Tensor, ref_boxes: Tensor) -> Tensor:
    """:meth:`RelationModule.attention_weights` [M_h, N, M] (rows sum to 1), BLR's relation weights."""
    h, d = module.num_heads, module.head_dim
    k = module.Wk(refs).reshape(-1, h, d).transpose(0, 1)
    return attention_logits(module, x, k, x_boxes, ref_boxes).softmax(dim=-1)


def relation(module: RelationModule, x: Tensor, refs: Tensor | None, x_boxes: Tensor | None = None,
             ref_boxes: Tensor | None = None, kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """:meth:`RelationModule.forward` [N, C] (before the residual): :func:`attend` over
    :func:`references` ``(refs, kv)``."""
    return attend(module, x, *references(module, refs, kv), x_boxes, ref_boxes)


def first_rows(counts: Tensor, n: int) -> Tensor:
    """:func:`first_rows_index` with ``counts`` a tensor: the first ``n`` rows of every frame of rows
    laid out frame by frame (MEGA's distilled / RDN's advanced set)."""
    starts = torch.cumsum(counts, 0) - counts
    offsets = torch.arange(n, dtype=counts.dtype)
    index = starts[:, None] + offsets[None, :]
    return index[offsets[None, :] < counts[:, None]]
