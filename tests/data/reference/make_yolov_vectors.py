"""Make the YOLOV reference vectors of this folder with the authors' own functions (see README.md here).

    PYTHONPATH=DEPS:CHECKOUT python tests/data/reference/make_yolov_vectors.py CHECKOUT [--out DIR]

CHECKOUT is a copy of the authors' repository (YuHengsss/YOLOV: commit 28ff8b0 for the 2022 code,
fe777cb for the current one); its ``yolox`` package must be importable (CHECKOUT on ``PYTHONPATH``, with
what its modules import: loguru, scipy, thop, timm, pycocotools, matplotlib, opencv; install them in a
folder of their own, DEPS, not in megavod's environment). The script never edits their files: their
``Attention_msa`` hard-codes ``.to('cuda')`` for its mask matrices, which runs on CPU here because
``torch.Tensor.to`` is wrapped (inside this process only) to read a CUDA device as the CPU.

Which code it is is read from ``post_process.postprocess``'s signature (fe777cb added ``conf_output``).
It writes, with numpy's seeded generator (the same values on every machine), into DIR (default: this
script's folder):

* ``yolov_aggregation_2022.npz`` (28ff8b0) or ``yolov_aggregation_2023.npz`` (fe777cb):
  ``post_trans.py::MSA_yolov`` (and its ``Attention_msa``, for the pooling weights) on 3 frames x 30
  proposals, width 32, 4 heads;
* ``yolov_selection.npz``: ``yolovp_msa.py::YOLOXHead.postpro_woclass`` on 2 frames of 840 anchors;
* ``yolov_postprocess.npz``: ``post_process.py::postprocess`` (refined and base outputs) on 2 frames of
  30 proposals, and ``YOLOXHead.postprocess_single_img`` checked equal to the base output.

The last two do not differ between the commits at inference: when the file is already there (written
from the other commit), the script checks that its run gives the same arrays and leaves it unchanged.

Random weights make the authors' selection degenerate (nothing passes 0.001, the 0.75 mask is ~99%
dense), so the inputs are structured: clustered features (mask density asserted in [20%, 80%]),
scores spread across every threshold (some but not all candidates pass each one, asserted), and margins
from every threshold (asserted) so that other CPUs' last-bit differences cannot flip a decision.
Inputs and weights are float16 values (exact: cast to float32 before use, as the run here does);
outputs are float32.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torchvision

HERE = Path(__file__).resolve().parent
NUM_CLASSES = 30
PROPOSALS = 30
WIDTH, HEADS = 32, 4
FRAMES = 3
# Anchors of a 256 x 160 input at strides 8, 16, 32: 32 x 20 + 16 x 10 + 8 x 5.
ANCHORS = 840
SEED = 20221

# Margins from thresholds: float32 values compared on other CPUs (vectorised or not) differ by a few ulp.
COS_MARGIN = 1e-3
IOU_MARGIN = 1e-4
SCORE_MARGIN = 1e-3  # relative, at the 0.001 thresholds


def redirect_cuda_to_cpu() -> None:
    """``tensor.to('cuda')`` (a string or device naming CUDA, as positional argument) stays on the CPU."""
    original = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and isinstance(args[0], (str, torch.device)) and str(args[0]).startswith("cuda"):
            args = ("cpu",) + args[1:]
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return original(self, *args, **kwargs)

    torch.Tensor.to = to


def half(values: np.ndarray) -> np.ndarray:
    """float16 values (stored as such; exact in float32)."""
    return np.asarray(values, dtype=np.float32).astype(np.float16)


def f32(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(values).astype(np.float32))


def distinct_half_values(rng: np.random.Generator, count: int, low: float, high: float) -> np.ndarray:
    """``count`` distinct float16 values in [low, high], in random order."""
    grid = np.arange(np.float16(low).view(np.uint16), np.float16(high).view(np.uint16) + 1, dtype=np.uint16)
    return rng.choice(grid, size=count, replace=False).view(np.float16)


def iou_matrix(boxes: np.ndarray) -> np.ndarray:
    """Pairwise IoU (widths x2 - x1, as torchvision), float64."""
    b = boxes.astype(np.float64)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = np.maximum(b[:, None, :2], b[None, :, :2])
    rb = np.minimum(b[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    return inter / (area[:, None] + area[None, :] - inter)


def check_iou_margin(boxes: np.ndarray, classes: np.ndarray, threshold: float) -> float:
    """Smallest |IoU - threshold| over pairs of one class (the pairs an NMS compares)."""
    iou = iou_matrix(boxes)
    same = (classes[:, None] == classes[None, :]) & ~np.eye(len(boxes), dtype=bool)
    return float(np.abs(iou[same] - threshold).min()) if same.any() else 1.0


def some_not_all(mask, what: str) -> None:
    mask = np.asarray(mask)
    assert 0 < mask.sum() < mask.size, f"{what}: {mask.sum()} of {mask.size} pass; need some but not all"


def clustered_boxes(rng: np.random.Generator, count: int, objects: int, size: tuple[float, float],
                    jitter: float) -> tuple[np.ndarray, np.ndarray]:
    """``count`` cxcywh boxes in a ``size`` = (W, H) frame: each near one of ``objects`` object boxes
    (relative jitter ``jitter``), and the object each belongs to."""
    width, height = size
    centre = rng.uniform([0.15 * width, 0.15 * height], [0.85 * width, 0.85 * height], size=(objects, 2))
    extent = rng.uniform([0.1 * width, 0.1 * height], [0.45 * width, 0.45 * height], size=(objects, 2))
    owner = rng.integers(0, objects, size=count)
    wh = extent[owner] * np.exp(rng.normal(0, jitter, size=(count, 2)))
    cxcy = centre[owner] + rng.normal(0, jitter, size=(count, 2)) * extent[owner]
    return np.concatenate([cxcy, wh], axis=1), owner


def to_corners(cxcywh: torch.Tensor) -> torch.Tensor:
    """x1y1x2y2 exactly as ``postpro_woclass`` computes them (cx - w / 2, ...)."""
    cx, cy, w, h = cxcywh.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


# --------------------------------------------------------------------------------------------------
# Selection: YOLOXHead.postpro_woclass


def selection_frame(rng: np.random.Generator) -> np.ndarray:
    """One frame's [ANCHORS, 35] float16 predictions: boxes near 40 objects, each object preferring one
    class; distinct objectness values (no tie at the 750 cut) and distinct scores at the NMS, every IoU
    of two same-class boxes among the top 750 at least IOU_MARGIN from 0.75 (else redrawn). The 90
    anchors of lowest objectness (outside the top 750) have class scores near 1 and the others at most
    0.35, so that some of them would be among the 30 without the 750 cut."""
    for _ in range(1000):
        cxcywh, owner = clustered_boxes(rng, ANCHORS, objects=40, size=(256.0, 160.0), jitter=0.08)
        objectness = distinct_half_values(rng, ANCHORS, 0.3, 0.98).astype(np.float32)
        low = np.argsort(objectness)[: ANCHORS - 750]
        object_class = rng.integers(0, NUM_CLASSES, size=40)
        scores = rng.uniform(0.001, 0.04, size=(ANCHORS, NUM_CLASSES))
        preferred = np.where(rng.random(ANCHORS) < 0.8, object_class[owner], rng.integers(0, NUM_CLASSES, ANCHORS))
        top_score = rng.uniform(0.05, 0.35, size=ANCHORS)
        top_score[low] = rng.uniform(0.97, 0.99, size=len(low))
        scores[np.arange(ANCHORS), preferred] = top_score
        frame = half(np.concatenate([cxcywh, objectness[:, None], scores], axis=1))
        pred = f32(frame)
        top = torch.topk(pred[:, 4], 750).indices
        conf, label = pred[top, 5:].max(dim=1)
        score = (pred[top, 4] * conf).numpy()
        corners = to_corners(pred[top, :4]).numpy()
        if (len(np.unique(frame[:, 4])) == ANCHORS and len(np.unique(score)) == len(score)
                and check_iou_margin(corners, label.numpy(), 0.75) > IOU_MARGIN):
            return frame
    raise RuntimeError("no selection frame met the margins")


def selection_case(rng: np.random.Generator, head_class) -> dict[str, np.ndarray]:
    """2 frames of ANCHORS decoded predictions (cx, cy, w, h, objectness, 30 class scores) and the indices
    ``postpro_woclass`` returns (top 750 by objectness, class-aware NMS 0.75, first 30)."""
    pred = np.stack([selection_frame(rng) for _ in range(2)])
    prediction = f32(pred)
    head = types.SimpleNamespace(Prenum=750)  # postpro_woclass reads self.Prenum and sets self.topK
    output, index = head_class.postpro_woclass(head, prediction.clone(), num_classes=NUM_CLASSES,
                                               nms_thre=0.75, topK=PROPOSALS)
    index = torch.stack(index).numpy()

    corners = to_corners(prediction[..., :4])
    for i in range(2):
        obj, cls = prediction[i, :, 4], prediction[i, :, 5:]
        top = torch.topk(obj, 750).indices.numpy()
        conf, label = cls.max(dim=1)
        score = (obj * conf).numpy()
        kept_by_nms = _nms_count(corners[i, top], torch.from_numpy(score[top]), label[top])
        assert PROPOSALS < kept_by_nms < len(top), f"NMS keeps {kept_by_nms} of {len(top)}: no cut exercised"
        outside = np.setdiff1d(np.arange(ANCHORS), top)
        assert score[outside].max() > score[index[i]].min(), "the 750 cut excludes nothing that would be kept"
        assert np.array_equal(output[i][:, :4].numpy(), corners[i, index[i]].numpy())
        print(f"selection frame {i}: NMS keeps {kept_by_nms} of 750, the first {PROPOSALS} returned")
    return {"pred": pred, "index": index.astype(np.int64)}


def _nms_count(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> int:
    return int(torchvision.ops.batched_nms(boxes, scores, labels, 0.75).numel())


# --------------------------------------------------------------------------------------------------
# Aggregation: post_trans.py::MSA_yolov / Attention_msa


def aggregation_case(rng: np.random.Generator, msa_class, affinity: str) -> dict[str, np.ndarray]:
    """MSA_yolov(dim 32, out 128, 4 heads, scale 25) on FRAMES x 30 rows; its Attention_msa's pooling
    weights (``sim_round2``) and the 0.75 mask they come from."""
    n = FRAMES * PROPOSALS
    torch.manual_seed(SEED)
    module = msa_class(dim=WIDTH, out_dim=4 * WIDTH, num_heads=HEADS, attn_drop=0.0, scale=25).eval()
    # Weights as float16 values (default init, rounded), under the authors' names.
    weights = {k: half(v.detach().numpy()) for k, v in module.state_dict().items()}
    module.load_state_dict({k: f32(v) for k, v in weights.items()})

    # Clustered features: 3 objects seen in every frame (tight rows), plus loose rows; the regression
    # features are clustered the same way with their own centres.
    def rows(centres: np.ndarray, owner: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return centres[owner] + noise[:, None] * rng.normal(size=(n, WIDTH))

    owner = rng.integers(0, 3, size=n)
    noise = np.where(rng.random(n) < 0.85, 0.15, 1.2)
    cls_feats = half(rows(rng.normal(size=(3, WIDTH)), owner, noise))
    reg_feats = half(rows(rng.normal(size=(3, WIDTH)), owner, noise))
    cls_conf = distinct_half_values(rng, n, 0.05, 0.99)
    objectness = distinct_half_values(rng, n, 0.05, 0.99)

    x_cls, x_reg = f32(cls_feats)[None], f32(reg_feats)[None]
    conf, obj = f32(cls_conf), f32(objectness)
    with torch.no_grad():
        out = module(x_cls, x_reg, conf, obj, sim_thresh=0.75, ave=True, use_mask=False)
        out = out[0] if isinstance(out, tuple) else out  # fe777cb returns (cls, obj = None)
        pooling = module.msa(x_cls, x_reg, conf, obj, sim_thresh=0.75, ave=True, use_mask=False)[2]
        v = module.msa.qkv_cls(x_cls)[0, :, 2 * WIDTH:].reshape(n, HEADS, -1).transpose(0, 1)
        v = v / torch.norm(v, dim=-1, keepdim=True)
        cosine = (v @ v.transpose(1, 2)).sum(0) / HEADS
    mask = cosine.numpy() > 0.75
    density = mask.mean()
    print(f"aggregation: mask density {density:.2f}, closest mean cosine to 0.75: "
          f"{np.abs(cosine.numpy() - 0.75).min():.1e}")
    assert 0.2 <= density <= 0.8, f"mask density {density:.2f}"
    assert np.abs(cosine.numpy() - 0.75).min() > COS_MARGIN, "a mean cosine near 0.75"
    assert np.array_equal(mask, pooling.numpy() > 0), "pooling weights outside the mask"
    return {
        **{k: v for k, v in weights.items()},
        "cls_feats": cls_feats, "reg_feats": reg_feats, "cls_conf": cls_conf, "objectness": objectness,
        "mask": mask, "pooling": pooling.numpy().astype(np.float32), "output": out.numpy().astype(np.float32),
        "affinity": np.array(affinity),
    }


# --------------------------------------------------------------------------------------------------
# Post-processing: post_process.py::postprocess, YOLOXHead.postprocess_single_img


def postprocess_case(rng: np.random.Generator, postprocess, head_class, is_2023: bool) -> dict[str, np.ndarray]:
    """2 frames of 30 proposals as ``postpro_woclass`` returns them (x1, y1, x2, y2, objectness, max class
    score, its class, 30 class scores) and ``linear_pred``'s 30 class logits per proposal; the refined
    and base outputs ([K, 7]: box, objectness, score, class)."""
    proposals, logits = [], []
    for _ in range(2):
        cxcywh, owner = clustered_boxes(rng, PROPOSALS, objects=8, size=(256.0, 160.0), jitter=0.2)
        corners = to_corners(f32(half(cxcywh))).numpy()
        objectness = distinct_half_values(rng, PROPOSALS, 0.0005, 0.99).astype(np.float32)
        scores = rng.uniform(0.0005, 0.1, size=(PROPOSALS, NUM_CLASSES))
        scores[np.arange(PROPOSALS), rng.integers(0, 5, PROPOSALS)] = rng.uniform(0.2, 0.99, PROPOSALS)
        scores = half(scores).astype(np.float32)
        table = np.concatenate([corners, objectness[:, None], scores.max(1, keepdims=True),
                                scores.argmax(1)[:, None].astype(np.float32), scores], axis=1)
        proposals.append(half(table).astype(np.float32))
        # Logits: a few classes per proposal well above the 0.001 sigmoid threshold, the rest spread
        # around it (logit(0.001) = -6.9).
        frame_logits = rng.uniform(-11.0, -3.0, size=(PROPOSALS, NUM_CLASSES))
        hot = rng.integers(0, 5, size=(PROPOSALS, 2))
        frame_logits[np.arange(PROPOSALS)[:, None], hot] = rng.uniform(-2.0, 4.0, size=(PROPOSALS, 2))
        logits.append(frame_logits)
    proposals = np.stack(proposals)
    logits = half(np.stack(logits))
    assert np.array_equal(half(proposals).astype(np.float32), proposals)

    prediction = [torch.from_numpy(p.copy()) for p in proposals]
    fc = f32(logits)
    with torch.no_grad():
        if is_2023:
            refined, base = postprocess(prediction, NUM_CLASSES, fc, None, conf_thre=0.001, nms_thre=0.5)
        else:
            refined, base = postprocess(prediction, NUM_CLASSES, fc, conf_thre=0.001, nms_thre=0.5)
        single, _ = head_class.postprocess_single_img(None, [torch.from_numpy(p.copy()) for p in proposals],
                                                      NUM_CLASSES, conf_thre=0.001, nms_thre=0.5)
    out = {"proposals": half(proposals), "logits": logits}
    for i in range(2):
        assert np.array_equal(single[i][:, :7].numpy(), base[i].numpy()), "postprocess_single_img != output_ori"
        sig = torch.sigmoid(fc[i]).numpy()
        assert np.abs(sig / 0.001 - 1).min() > SCORE_MARGIN, "a class score near 0.001"
        some_not_all(sig >= 0.001, "refined: sigmoid >= 0.001")
        candidate = proposals[i][:, 4:5] * sig
        passing = candidate[sig >= 0.001]
        assert np.abs(passing / 0.001 - 1).min() > SCORE_MARGIN, "a refined score near 0.001"
        some_not_all(passing >= 0.001, "refined: objectness x score >= 0.001")
        base_score = proposals[i][:, 4] * proposals[i][:, 5]
        assert np.abs(base_score / 0.001 - 1).min() > SCORE_MARGIN, "a base score near 0.001"
        some_not_all(base_score >= 0.001, "base: objectness x score >= 0.001")
        assert len(refined[i]) < (candidate >= 0.001).sum(), "refined NMS suppresses nothing"
        assert len(base[i]) < (base_score >= 0.001).sum(), "base NMS suppresses nothing"
        rows, cols = np.nonzero(candidate >= 0.001)
        margin = check_iou_margin(proposals[i][rows, :4], cols, 0.5)
        assert margin > IOU_MARGIN, f"a refined IoU within {margin:.1e} of 0.5"
        margin = check_iou_margin(proposals[i][:, :4], proposals[i][:, 6], 0.5)
        assert margin > IOU_MARGIN, f"a base IoU within {margin:.1e} of 0.5"
        for name, rows_out in (("refined", refined[i]), ("base", base[i])):
            s = (rows_out[:, 4] * rows_out[:, 5]).numpy()
            assert len(np.unique(s)) == len(s), f"{name}: equal scores"
            out[f"{name}_{i}"] = rows_out.numpy().astype(np.float32)
    return out


# --------------------------------------------------------------------------------------------------


def write(path: Path, arrays: dict[str, np.ndarray], shared: bool) -> None:
    if shared and path.exists():
        with np.load(path) as old:
            same = set(old.files) == set(arrays) and all(np.array_equal(old[k], arrays[k]) for k in arrays)
        if not same:
            raise SystemExit(f"{path.name}: this checkout's values differ from the file's (the other commit's)")
        print(f"{path.name}: equal to the existing file, left unchanged")
        return
    np.savez_compressed(path, **arrays)
    print(f"{path.name}: written ({path.stat().st_size / 1024:.0f} KiB)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="the authors' repository (holds yolox/)")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.checkout.resolve()))
    torch.set_num_threads(1)
    redirect_cuda_to_cpu()

    from yolox.models.post_process import postprocess
    from yolox.models.post_trans import MSA_yolov
    from yolox.models.yolovp_msa import YOLOXHead

    is_2023 = "conf_output" in inspect.signature(postprocess).parameters
    affinity = "2023" if is_2023 else "2022"
    print(f"{args.checkout}: the {affinity} code ({'fe777cb' if is_2023 else '28ff8b0'})")
    args.out.mkdir(parents=True, exist_ok=True)
    # One generator per case, so that each file's values do not depend on the others.
    write(args.out / f"yolov_aggregation_{affinity}.npz",
          aggregation_case(np.random.default_rng(SEED), MSA_yolov, affinity), shared=False)
    write(args.out / "yolov_selection.npz", selection_case(np.random.default_rng(SEED + 1), YOLOXHead), shared=True)
    write(args.out / "yolov_postprocess.npz",
          postprocess_case(np.random.default_rng(SEED + 2), postprocess, YOLOXHead, is_2023), shared=True)


if __name__ == "__main__":
    main()
