"""Write ``yolox_losses.npz``: the YOLOX and YOLOV training losses computed by the authors' own functions.

Usage (from anywhere; the authors' code needs loguru, thop and scipy besides torch, e.g. installed with
``pip install --no-deps --target PKGS loguru thop scipy``)::

    PYTHONPATH=PKGS:CHECKOUT python tests/data/reference/make_yolox_loss_vectors.py CHECKOUT [--out FILE]

``CHECKOUT`` is a checkout of YuHengsss/YOLOV at commit 28ff8b0 (the 2022 code the released YOLOX-VID
and YOLOV weights were trained with). Their files are not edited: ``Tensor.cuda`` is redirected to the
CPU here (their loss path calls ``torch.cuda.empty_cache``, which is harmless without a GPU).

The case: 3 images of 64 x 64 (levels 8 x 8, 4 x 4, 2 x 2: 84 anchors), 3 classes, 4 + 2 + 0 ground-truth
boxes. The raw head outputs are random except near each box, where a few anchors predict a jittered copy of
the box with a raised objectness, so that the assignment has dynamic k above 1, anchors claimed by two boxes,
and YOLOV's selected proposals include foreground anchors, others of IoU >= 0.6 and others below.

What is run, all in float32 on the CPU:
* ``yolox/models/yolo_head.py::YOLOXHead``: ``get_output_and_grid`` on each level's raw map, then
  ``get_losses`` with ``use_l1 = True``;
* ``yolox/models/yolovp_msa.py::YOLOXHead``: ``decode_outputs`` + ``postpro_woclass`` (pre-NMS top 40
  instead of 750, which needs 750 anchors; 10 proposals kept per image) for the proposals, then
  ``get_losses`` with random refined logits, ``use_l1 = True``.
Both ``get_assignments`` calls are recorded (foreground masks, matched boxes, IoUs), and the gradients of
each total loss with respect to the raw outputs (and the refined logits) are stored.

A second file, ``yolox_losses_yolov_head.npz``, holds the whole YOLOV head in training: their
``yolovp_msa.py::YOLOXHead`` (width 1/16: 16 channels, 4 heads; BatchNorm eps 1e-3, momentum 0.03 as
``get_model``'s ``init_yolo``; biases at prior 0.01) built from ``--head-seed``, its ``forward`` in training
mode on random PAFPN maps of the 3 images (selection with pre-NMS top 40 and 10 proposals, aggregation,
``linear_pred``, ``get_losses`` with ``use_l1``): its weights (``state.*``, their keys), the maps, the
ground truth (per image with boxes, jittered copies of the random head's most confident predictions, so
that the selected proposals include foregrounds), the proposals, the assignment, the losses and the
gradients of the parts YOLOV trains (``grad.*``).

The script checks that the case is far from every discrete decision of the assignment (dynamic k's
floor, the k-th cheapest cost, the 0.6 IoU threshold), so that float32 rounding elsewhere (another CPU,
another vector width, ``torchvision.ops.box_iou`` instead of their IoU) cannot flip one.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

NUM_CLASSES = 3
SIZE = 64
STRIDES = (8, 16, 32)
PROPOSALS = 10
GT = [
    # x1, y1, x2, y2, class (input pixels)
    [(6.0, 9.5, 30.25, 41.0, 0), (33.0, 4.0, 58.5, 22.75, 2), (20.5, 30.0, 61.0, 62.0, 1), (9.0, 12.0, 33.5, 45.0, 1)],
    [(3.25, 3.0, 27.0, 24.5, 1), (26.0, 20.0, 60.0, 58.0, 0)],
    [],
]


def redirect_cuda() -> None:
    """Their code may move tensors with ``.cuda()`` / ``.to('cuda')``: keep them on the CPU."""
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    to = torch.Tensor.to

    def to_cpu(self, *args, **kwargs):
        args = tuple("cpu" if (isinstance(a, str) and a.startswith("cuda")) else a for a in args)
        if isinstance(kwargs.get("device"), str) and kwargs["device"].startswith("cuda"):
            kwargs["device"] = "cpu"
        return to(self, *args, **kwargs)

    torch.Tensor.to = to_cpu


def make_raw(gen: torch.Generator) -> tuple[list[torch.Tensor], np.ndarray]:
    """Per level [B, 5 + C, h, w] raw outputs, and the same flattened [B, A, 5 + C] in the authors' order."""
    levels = []
    for stride in STRIDES:
        n = SIZE // stride
        raw = torch.randn(len(GT), 5 + NUM_CLASSES, n, n, generator=gen) * 0.5
        raw[:, 4] -= 2.0  # objectness mostly low
        for b, boxes in enumerate(GT):
            for x1, y1, x2, y2, cls in boxes:
                cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
                col, row = int(cx // stride), int(cy // stride)
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        r, c = row + dy, col + dx
                        if not (0 <= r < n and 0 <= c < n) or torch.rand((), generator=gen) < 0.5:
                            continue
                        jitter = torch.randn(4, generator=gen) * torch.tensor([0.12, 0.12, 0.15, 0.15])
                        raw[b, 0, r, c] = cx / stride - c + jitter[0] * w / stride
                        raw[b, 1, r, c] = cy / stride - r + jitter[1] * h / stride
                        raw[b, 2, r, c] = math.log(w / stride) + jitter[2]
                        raw[b, 3, r, c] = math.log(h / stride) + jitter[3]
                        raw[b, 4, r, c] = 1.0 + torch.randn((), generator=gen).item()
                        raw[b, 5 + cls, r, c] += 1.5
        levels.append(raw)
    flat = torch.cat([x.flatten(2) for x in levels], dim=2).permute(0, 2, 1)
    return levels, flat.numpy().copy()


def labels_tensor(gt=None) -> torch.Tensor:
    """Their label layout [B, max_gt, 5] (class, cx, cy, w, h): ``xyxy2cxcywh`` on float64, stored float32."""
    gt = GT if gt is None else gt
    labels = np.zeros((len(gt), 8, 5))
    for b, boxes in enumerate(gt):
        for i, (x1, y1, x2, y2, cls) in enumerate(boxes):
            b64 = np.array([x1, y1, x2, y2], dtype=np.float32).astype(np.float64)
            w, h = b64[2] - b64[0], b64[3] - b64[1]
            labels[b, i] = (cls, b64[0] + 0.5 * w, b64[1] + 0.5 * h, w, h)
    return torch.from_numpy(labels.astype(np.float32))


class Recorder:
    """Wraps a head's ``get_assignments`` and keeps what it returns, per image."""

    def __init__(self, head):
        self.calls = {}
        original = head.get_assignments

        def wrapped(batch_idx, *args, **kwargs):
            out = original(batch_idx, *args, **kwargs)
            self.calls[batch_idx] = [t.clone() if torch.is_tensor(t) else t for t in out]
            return out

        head.get_assignments = wrapped

    def arrays(self, num_anchors: int) -> dict[str, np.ndarray]:
        fg = np.zeros((len(GT), num_anchors), dtype=bool)
        matched, ious = [], []
        for b in range(len(GT)):
            if b in self.calls:
                classes, fg_mask, pred_ious, matched_inds, _ = self.calls[b]
                fg[b] = fg_mask.numpy()
                matched.append(matched_inds.numpy())
                ious.append(pred_ious.numpy())
        return {"fg_mask": fg, "matched_gt": np.concatenate(matched).astype(np.int64),
                "matched_iou": np.concatenate(ious).astype(np.float32)}


def check_margins(head, levels, labels, radius: float) -> None:
    """Fail unless every discrete decision of the assignment is far from its threshold."""
    check_output_margins(head, *decoded(head, levels), labels, radius)


def check_output_margins(head, outputs, x_shifts, y_shifts, strides, labels, radius: float, gt=None) -> None:
    """:func:`check_margins` on decoded training outputs [B, A, 5 + C]."""
    from yolox.utils import bboxes_iou

    for b, boxes in enumerate(GT if gt is None else gt):
        if not boxes:
            continue
        gt = labels[b, : len(boxes), 1:5]
        fg_mask, in_both = head.get_in_boxes_info(gt, strides, x_shifts, y_shifts, outputs.shape[1], len(boxes))
        ious = bboxes_iou(gt, outputs[b, fg_mask, :4], False)
        top = torch.topk(ious, min(10, ious.shape[1]), dim=1).values.sum(1)
        frac = (top - top.floor()).min().item(), (top.floor() + 1 - top).min().item()
        assert min(frac) > 1e-3, f"image {b}: dynamic k sum too close to an integer {top.tolist()}"
        ks = torch.clamp(top.int(), min=1)
        scores = (outputs[b, fg_mask, 5:].sigmoid() * outputs[b, fg_mask, 4:5].sigmoid()).sqrt()
        one_hot = torch.nn.functional.one_hot(labels[b, : len(boxes), 0].long(), NUM_CLASSES)
        cls_cost = torch.nn.functional.binary_cross_entropy(
            scores[None].expand(len(boxes), -1, -1), one_hot[:, None].float().expand(-1, scores.shape[0], -1),
            reduction="none").sum(-1)
        cost = cls_cost + 3.0 * -torch.log(ious + 1e-8) + 1e5 * (~in_both)
        sorted_cost = cost.sort(1).values
        for g, k in enumerate(ks.tolist()):
            if k < cost.shape[1]:
                gap = (sorted_cost[g, k] - sorted_cost[g, k - 1]).item()
                assert gap > 0.05, f"image {b} box {g}: k-th / (k+1)-th cost gap {gap}"
                assert sorted_cost[g, k - 1] < 1e5, f"image {b} box {g}: takes an out-of-centre anchor"
        taken = torch.zeros_like(cost, dtype=torch.bool)
        for g, k in enumerate(ks.tolist()):
            taken[g, cost[g].argsort()[:k]] = True
        shared = taken.sum(0) > 1
        if shared.any():
            two = cost[:, shared].sort(0).values
            assert (two[1] - two[0]).min().item() > 0.05, f"image {b}: cost tie between two boxes"
        print(f"image {b}: dynamic k {ks.tolist()}, candidates {cost.shape[1]}, shared {int(shared.sum())}")
    print(f"margins ok (centre radius {radius})")


def check_refined_margin(recorder, labels, pred_result) -> None:
    """Fail unless every proposal's largest IoU with the matched boxes is 1e-3 away from 0.6."""
    from yolox.utils.box_op import box_cxcywh_to_xyxy, generalized_box_iou

    for b, call in recorder.calls.items():
        matched = labels[b, call[3], 1:5]
        _, iou = generalized_box_iou(pred_result[b][:, :4], box_cxcywh_to_xyxy(matched))
        gap = (iou.max(1).values - 0.6).abs().min().item()
        assert gap > 1e-3, f"image {b}: a proposal's IoU is {gap} from 0.6"
    print("refined IoU margin ok")


def decoded(head, levels):
    """``get_output_and_grid`` on each level (on a copy: it writes into a view of its input, as it may on a
    conv output), concatenated as ``YOLOXHead.forward`` passes them to ``get_losses``."""
    outputs, xs, ys, ss = [], [], [], []
    for k, (raw, stride) in enumerate(zip(levels, STRIDES)):
        out, grid = head.get_output_and_grid(raw.clone(), k, stride, raw.type())
        outputs.append(out)
        xs.append(grid[:, :, 0])
        ys.append(grid[:, :, 1])
        ss.append(torch.zeros(1, grid.shape[1]).fill_(stride).type_as(raw))
    return torch.cat(outputs, 1), torch.cat(xs, 1), torch.cat(ys, 1), torch.cat(ss, 1)


def origin_preds(levels):
    return [raw[:, :4].permute(0, 2, 3, 1).reshape(raw.shape[0], -1, 4).clone() for raw in levels]


def run_yolox(levels_np, labels):
    from yolox.models.yolo_head import YOLOXHead

    head = YOLOXHead(NUM_CLASSES, width=0.125)
    head.use_l1 = True
    levels = [torch.tensor(x, requires_grad=True) for x in levels_np]
    check_margins(head, [x.detach() for x in levels], labels, 2.5)
    recorder = Recorder(head)
    outputs, xs, ys, ss = decoded(head, levels)
    loss, iou, obj, cls, l1, fg_ratio = head.get_losses(None, [xs], [ys], [ss], labels, outputs,
                                                        origin_preds(levels), dtype=torch.float32)
    loss.backward()
    grad = torch.cat([x.grad.flatten(2) for x in levels], dim=2).permute(0, 2, 1)
    result = {"loss_total": loss, "loss_iou": iou, "loss_obj": obj, "loss_cls": cls, "loss_l1": l1}
    out = {f"yolox_{k}": np.float32(v.item()) for k, v in result.items()}
    out.update({f"yolox_{k}": v for k, v in recorder.arrays(sum(x.shape[-1] * x.shape[-2] for x in levels)).items()})
    out["yolox_grad_raw"] = grad.numpy().copy()
    print("yolox", {k: round(v.item(), 6) for k, v in result.items()}, "fg/gt", fg_ratio)
    return out


def run_yolov(levels_np, labels, gen):
    from yolox.models.yolovp_msa import YOLOXHead

    head = YOLOXHead(NUM_CLASSES, width=0.125)
    head.use_l1 = True
    head.Prenum = 40  # their 750 needs 750 anchors
    levels = [torch.tensor(x, requires_grad=True) for x in levels_np]
    check_margins(head, [x.detach() for x in levels], labels, 4.5)
    recorder = Recorder(head)
    # Selection as their forward does it: decode sigmoid outputs, postpro_woclass.
    with torch.no_grad():
        head.hw = [x.shape[-2:] for x in levels]
        scores = [torch.cat([x[:, :4], x[:, 4:5].sigmoid(), x[:, 5:].sigmoid()], 1) for x in levels]
        flat = torch.cat([x.flatten(start_dim=2) for x in scores], dim=2).permute(0, 2, 1).contiguous()
        decode_res = head.decode_outputs(flat, dtype=flat.type())
        pred_result, pred_idx = head.postpro_woclass(decode_res, num_classes=NUM_CLASSES, nms_thre=0.75,
                                                     topK=PROPOSALS)
    assert all(len(i) == PROPOSALS for i in pred_idx), [len(i) for i in pred_idx]
    refined = torch.randn(len(GT), PROPOSALS, NUM_CLASSES, generator=gen).requires_grad_(True)
    outputs, xs, ys, ss = decoded(head, levels)
    loss, iou, obj, ref, l1, fg_ratio = head.get_losses(None, [xs], [ys], [ss], labels, outputs,
                                                        origin_preds(levels), torch.float32, refined_cls=refined,
                                                        idx=pred_idx, pred_res=pred_result)
    loss.backward()
    check_refined_margin(recorder, labels, pred_result)
    grad = torch.cat([x.grad.flatten(2) for x in levels], dim=2).permute(0, 2, 1)
    # Their total is 3 iou + obj + 2 ref + l1 + cls and returns no cls term: recover it.
    cls = loss - iou - obj - ref - l1
    result = {"loss_total": loss, "loss_iou": iou, "loss_obj": obj, "loss_refined": ref, "loss_l1": l1,
              "loss_cls": cls}
    out = {f"yolov_{k}": np.float32(v.item()) for k, v in result.items()}
    out.update({f"yolov_{k}": v for k, v in recorder.arrays(flat.shape[1]).items()})
    out["yolov_proposals"] = torch.stack(pred_idx).numpy().astype(np.int64)
    out["yolov_refined_logits"] = refined.detach().numpy().copy()
    out["yolov_grad_raw"] = grad.numpy().copy()
    out["yolov_grad_refined"] = refined.grad.numpy().copy()
    # How the proposals split (for the test's coverage check): foreground, IoU >= 0.6, below.
    print("yolov", {k: round(v.item(), 6) for k, v in result.items()}, "fg/gt", fg_ratio)
    return out


#: The YOLOV head of the whole-forward case: width 1/16 (16 channels, 4 heads of 4), as get_model builds it
#: (BatchNorm eps 1e-3, momentum 0.03; biases at prior 0.01); PAFPN inputs of 16, 32, 64 channels.
HEAD_WIDTH = 0.0625
HEAD_GRADS = ("cls_preds", "obj_preds", "cls_convs2", "trans", "linear_pred")  # what YOLOV trains


def probe_ground_truth(head, xin) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """Ground truth the random head can hit: per image with boxes in ``GT`` (same counts and classes), a
    jittered copy of the predicted box of each of its most confident anchors (in training mode, on a copy
    of the head, so that the run itself starts from the stored state), so that YOLOV's selected proposals
    include foregrounds. Returns the boxes as stored (x1y1x2y2, labels, counts) and their label tensor."""
    import copy

    probe = copy.deepcopy(head)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        levels = []
        for k, x in enumerate(xin):
            x = probe.stems[k](x)
            reg_feat = probe.reg_convs[k](x)
            levels.append(torch.cat([probe.reg_preds[k](reg_feat), probe.obj_preds[k](reg_feat),
                                     probe.cls_preds[k](probe.cls_convs[k](x))], 1))
        outputs = decoded(probe, levels)[0]
    counts = [len(g) for g in GT]
    boxes = np.zeros((len(GT), max(counts), 4), dtype=np.float32)
    classes = np.zeros((len(GT), max(counts)), dtype=np.int64)
    for b, n in enumerate(counts):
        order = outputs[b, :, 4].argsort(descending=True).tolist()
        chosen = []
        for a in order if n else []:
            cx, cy, w, h = outputs[b, a, :4].tolist()
            box = torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
            box = box * (1 + 0.05 * torch.randn(4, generator=gen))
            box = box.clamp(0, SIZE)
            if (box[2:] - box[:2]).min() < 4 or any(float(_iou(box, c)) > 0.3 for c in chosen):
                continue
            chosen.append(box)
            if len(chosen) == n:
                break
        for i, box in enumerate(chosen):
            boxes[b, i] = box.numpy()
            classes[b, i] = GT[b][i][4]
    global GT_HEAD
    GT_HEAD = [[(*boxes[b, i].tolist(), int(classes[b, i])) for i in range(n)] for b, n in enumerate(counts)]
    stored = {"gt_boxes": boxes, "gt_labels": classes, "gt_count": np.array(counts, dtype=np.int64)}
    return stored, labels_tensor(GT_HEAD)


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import box_iou

    return box_iou(a[None], b[None])[0, 0]


def run_yolov_head(seed: int) -> dict[str, np.ndarray]:
    """``yolovp_msa.py::YOLOXHead.forward`` in training on random PAFPN maps of the 3 images: their
    selection (pre-NMS top 40, 10 proposals: their 750 and 30 need 750 anchors), aggregation,
    ``linear_pred`` and ``get_losses`` (``use_l1``). Stores the head's weights, the maps, the proposals,
    the losses and the gradients of what YOLOV trains."""
    import torch.nn as nn
    from yolox.models.yolovp_msa import YOLOXHead

    torch.manual_seed(seed)
    head = YOLOXHead(NUM_CLASSES, width=HEAD_WIDTH, heads=4, drop=0.0)
    for m in head.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps, m.momentum = 1e-3, 0.03
    head.initialize_biases(1e-2)
    head.Prenum, head.Afternum, head.simN = 40, PROPOSALS, PROPOSALS
    head.use_l1 = True
    head.train()
    state = {f"state.{k}": v.detach().numpy().copy() for k, v in head.state_dict().items()}
    channels = [int(c * HEAD_WIDTH) for c in (256, 512, 1024)]
    xin = [torch.randn(len(GT), c, SIZE // s, SIZE // s) for c, s in zip(channels, STRIDES)]
    gt_boxes, labels = probe_ground_truth(head, xin)
    seen = {}
    select = head.postpro_woclass

    def recording_select(*args, **kwargs):
        out = select(*args, **kwargs)
        seen["idx"] = [i.clone() for i in out[1]]
        seen["result"] = [r.detach().clone() for r in out[0]]
        return out

    head.postpro_woclass = recording_select
    get_losses = head.get_losses

    def checked_losses(imgs, x_shifts, y_shifts, strides, labels_, outputs, *args, **kwargs):
        check_output_margins(head, outputs.detach(), torch.cat(x_shifts, 1), torch.cat(y_shifts, 1),
                             torch.cat(strides, 1), labels_, 4.5, GT_HEAD)
        return get_losses(imgs, x_shifts, y_shifts, strides, labels_, outputs, *args, **kwargs)

    head.get_losses = checked_losses
    recorder = Recorder(head)
    loss, iou, obj, ref, l1, _ = head(xin, labels, torch.zeros(len(GT), 3, SIZE, SIZE))
    loss.backward()
    check_refined_margin(recorder, labels, seen["result"])
    cls = loss - iou - obj - ref - l1
    out = dict(state)
    out.update({f"xin{k}": x.numpy() for k, x in enumerate(xin)})
    out.update(gt_boxes)
    out["proposals"] = torch.stack(seen["idx"]).numpy().astype(np.int64)
    out.update({k: np.float32(v.item()) for k, v in (("loss_total", loss), ("loss_iou", iou), ("loss_obj", obj),
                                                      ("loss_refined", ref), ("loss_l1", l1), ("loss_cls", cls))})
    out.update(recorder.arrays(sum((SIZE // s) ** 2 for s in STRIDES)))
    for name, p in head.named_parameters():
        if name.split(".")[0] in HEAD_GRADS:
            out[f"grad.{name}"] = p.grad.numpy().copy()
    print("yolov head", {k: round(float(out[k]), 6) for k in ("loss_total", "loss_iou", "loss_obj", "loss_refined",
                                                              "loss_l1", "loss_cls")}, "fg", int(out["fg_mask"].sum()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="YuHengsss/YOLOV at 28ff8b0")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "yolox_losses.npz")
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--head-seed", type=int, default=0)
    args = parser.parse_args()
    sys.path.insert(0, str(args.checkout.resolve()))
    redirect_cuda()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(args.seed)
    levels, flat = make_raw(gen)
    levels_np = [x.numpy().copy() for x in levels]
    labels = labels_tensor()
    data = {
        "raw": flat.astype(np.float32),
        "feature_sizes": np.array([[SIZE // s, SIZE // s] for s in STRIDES], dtype=np.int64),
        "strides": np.array(STRIDES, dtype=np.int64),
        "gt_boxes": np.zeros((len(GT), max(len(g) for g in GT), 4), dtype=np.float32),
        "gt_labels": np.zeros((len(GT), max(len(g) for g in GT)), dtype=np.int64),
        "gt_count": np.array([len(g) for g in GT], dtype=np.int64),
    }
    for b, boxes in enumerate(GT):
        for i, (x1, y1, x2, y2, cls) in enumerate(boxes):
            data["gt_boxes"][b, i] = (x1, y1, x2, y2)
            data["gt_labels"][b, i] = cls
    data.update(run_yolox(levels_np, labels))
    data.update(run_yolov(levels_np, labels, gen))
    np.savez_compressed(args.out, **data)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    head_out = args.out.with_name(args.out.stem + "_yolov_head.npz")
    np.savez_compressed(head_out, **run_yolov_head(args.head_seed))
    print(f"wrote {head_out} ({head_out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
