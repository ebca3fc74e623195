"""Per-class AP and mAP on ImageNet VID, computed exactly as the authors' evaluation does
(docs/conventions.md#evaluation-protocol).

The authors' ``vid_eval.py`` loops over images, classes, predictions and ground truths in Python.
This module reproduces its numbers (to the last bit on the reference case) with vectorised numpy:

* **IoU** in float32 as their ``boxlist_iou``: 1 is added to x2 and y2 of both boxes and the IoU itself
  uses +1 widths, so the effective width is x2 - x1 + 2 (kept for parity).
* **Matching**, per image and class, predictions in descending score: each takes the not-yet-matched
  ground truth (GT) with the highest IoU >= the threshold; among equal IoUs the first non-ignored GT (in
  annotation order), or the last ignored one if all are ignored. The greedy loop is run in *rounds*:
  round r handles the r-th competing prediction of every (image, class) group at once, and only
  predictions with some IoU >= threshold compete (the others cannot match whatever the order).
* **FP weight** of an unmatched prediction from its ignore value p (docs/conventions.md#evaluation-protocol):
  1 if p = 0, 0 if p = 1, else p; a prediction matched to an ignored GT is neither TP nor FP.
* **AP**: VOC all-point AP with sentinels; mAP = mean over classes with non-ignored GT (NaN elsewhere).

Protocols (docs/departures.md#ilsvrc-small-object-protocol): ``"authors"`` uses IoU >= 0.5 for every box;
``"ilsvrc"`` uses the official devkit's per-GT threshold min(0.5, wh / ((w + 10)(h + 10))) with
w = x2 - x1 + 1 and h = y2 - y1 + 1 of the GT box (``eval_vid_detection.m``), everything else as the authors'.

Tie orders the authors leave to numpy's unstable sort are fixed here: equal scores are taken later
index first (what numpy's argsort reversed gives on small arrays). An IoU that is NaN (two boxes of
zero area) counts as no overlap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from megavod.data.classes import VID_CLASSES
from megavod.data.coco_vid import read_coco_vid
from megavod.data.image_sets import read_image_set
from megavod.data.predictions import read_predictions
from megavod.data.vid_xml import read_annotation
from megavod.errors import MegavodError
from megavod.evaluation.matching import match_all
from megavod.data.motion import MOTION_RANGES, bucket_shares, motion_ious_for_video
from megavod.evaluation.report import format_table, write_report
from megavod.evaluation.results import PRCurve, RangeResult, VIDEvalResult
from megavod.structures import Detections, FrameAnnotation

PROTOCOLS = ("authors", "ilsvrc")
IOU_THRESHOLD = 0.5
PIXEL_TOLERANCE = 10.0  # the devkit's small-object slack, in pixels


# --------------------------------------------------------------------------------------------------
# Flattening the per-frame inputs
# --------------------------------------------------------------------------------------------------


def _cat(tensors: list[Tensor], dtype: torch.dtype, width: int | None = None) -> np.ndarray:
    if not tensors:
        return torch.zeros((0, width) if width else (0,), dtype=dtype).numpy()
    # Detections / FrameAnnotation already checked the shapes; one cat, one copy to the CPU.
    return torch.cat(tensors).detach().to("cpu", dtype).reshape((-1, width) if width else (-1,)).numpy()


def _check_labels(labels: np.ndarray, num_classes: int, what: str) -> None:
    if labels.size and (labels.min() < 1 or labels.max() >= num_classes):
        bad = labels[(labels < 1) | (labels >= num_classes)][0]
        raise ValueError(f"{what} label {int(bad)} is outside 1..{num_classes - 1}")


def _gt_thresholds(boxes: np.ndarray, protocol: str) -> np.ndarray:
    if protocol == "authors":
        return np.full(len(boxes), IOU_THRESHOLD)
    w = boxes[:, 2].astype(np.float64) - boxes[:, 0] + 1.0
    h = boxes[:, 3].astype(np.float64) - boxes[:, 1] + 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        thr = (w * h) / ((w + PIXEL_TOLERANCE) * (h + PIXEL_TOLERANCE))
    return np.minimum(IOU_THRESHOLD, np.nan_to_num(thr, nan=IOU_THRESHOLD))


# --------------------------------------------------------------------------------------------------
# Precision, recall, AP
# --------------------------------------------------------------------------------------------------


def voc_ap(rec: np.ndarray, prec: np.ndarray) -> float:
    """VOC 2010+ all-point AP: area under the right-to-left max envelope, sentinels (0,0), (1,0)."""
    mpre = np.concatenate(([0.0], np.nan_to_num(prec), [0.0]))
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _range_result(
    name: str,
    low: float,
    high: float,
    empty_weight: float,
    matched: np.ndarray,
    pign: np.ndarray,
    order: np.ndarray,
    class_bounds: np.ndarray,
    num_pos: np.ndarray,
    num_ignored: np.ndarray,
) -> RangeResult:
    n_cls = len(num_pos)
    ap = np.full(n_cls, np.nan)
    num_det = np.diff(class_bounds)
    num_tp = np.zeros(n_cls, dtype=np.int64)
    num_fp = np.zeros(n_cls)
    curves: dict[int, PRCurve] = {}
    m_all, p_all = matched[order], pign[order]
    for c in range(1, n_cls):
        m = m_all[class_bounds[c] : class_bounds[c + 1]]
        p = p_all[class_bounds[c] : class_bounds[c + 1]].copy()
        tps = np.logical_and(m, p != 1)
        fps = np.logical_and(~m, p != 1)
        p[p == 0] = 1
        fps = fps * p
        tp = np.cumsum(tps)
        fp = np.cumsum(fps)
        num_tp[c] = int(tp[-1]) if len(tp) else 0
        num_fp[c] = float(fp[-1]) if len(fp) else 0.0
        if num_pos[c] == 0:
            continue
        prec = tp / (fp + tp + np.spacing(1))
        rec = tp / num_pos[c]
        ap[c] = voc_ap(rec, prec)
        keep = np.flatnonzero(tps)
        if len(tps) and (not len(keep) or keep[-1] != len(tps) - 1):
            keep = np.r_[keep, len(tps) - 1]
        curves[c] = PRCurve(recall=rec[keep], precision=np.nan_to_num(prec[keep]))
    return RangeResult(
        name=name,
        low=low,
        high=high,
        empty_weight=empty_weight,
        ap=ap,
        num_pos=num_pos,
        num_ignored_gt=num_ignored,
        num_det=num_det,
        num_tp=num_tp,
        num_fp=num_fp,
        curves=curves,
    )


def evaluate_vid(
    gts: Sequence[FrameAnnotation],
    preds: Sequence[Detections],
    motion_ious: Sequence[Tensor | np.ndarray] | None = None,
    protocol: str = "authors",
    *,
    classes: Sequence[str] = VID_CLASSES,
    subsets: Mapping[str, Sequence[Tensor | np.ndarray]] | None = None,
) -> VIDEvalResult:
    """AP50 per class and mAP of ``preds`` against ``gts`` (docs/conventions.md#evaluation-protocol,
    docs/departures.md#motion-iou-from-track-ids, docs/departures.md#ilsvrc-small-object-protocol).

    Args:
        gts: ground truth per frame, boxes in original pixels (as clamped by the XML reader).
        preds: detections of the same frames, aligned with ``gts`` index by index, in original pixels.
        motion_ious: optional per-frame, per-GT-box motion IoU (``motion.motion_ious_for_video``);
            with it the fast / medium / slow buckets are evaluated too (GTs outside a bucket are
            ignored, -1 entries always), without it only "all". Compared in float64 against the
            inclusive bounds 0.7 / 0.9, so pass float64 (a float32 0.7 is 0.69999999).
        protocol: ``"authors"`` (IoU >= 0.5) or ``"ilsvrc"`` (devkit small-object threshold).
        classes: class names, index 0 = background; labels must lie in 1..len(classes)-1.
        subsets: optional ``{name: per-frame boolean mask over the frame's GT boxes}``, each evaluated
            exactly as a motion bucket: GT outside the subset ignored, a prediction matching one counts
            neither way, an unmatched prediction a false positive weighted by the subset's share of the
            GT boxes (1 read as 0, as the authors read a bucket holding everything). E.g. the synthetic
            benchmark's boxes whose class cue is hidden.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if len(gts) != len(preds):
        raise ValueError(f"gts has {len(gts)} frames but preds has {len(preds)}")
    if motion_ious is not None and len(motion_ious) != len(gts):
        raise ValueError(f"motion_ious has {len(motion_ious)} frames but gts has {len(gts)}")
    n_cls = len(classes)
    n_frames = len(gts)

    g_counts = np.array([len(g) for g in gts], dtype=np.int64)
    g_boxes = _cat([g.boxes for g in gts], torch.float32, 4)
    g_labels = _cat([g.labels for g in gts], torch.int64)
    g_frame = np.repeat(np.arange(n_frames, dtype=np.int64), g_counts)
    _check_labels(g_labels, n_cls, "ground-truth")

    p_counts = np.array([len(p) for p in preds], dtype=np.int64)
    p_boxes = _cat([p.boxes for p in preds], torch.float32, 4)
    p_scores = _cat([p.scores for p in preds], torch.float32)
    p_labels = _cat([p.labels for p in preds], torch.int64)
    p_frame = np.repeat(np.arange(n_frames, dtype=np.int64), p_counts)
    _check_labels(p_labels, n_cls, "prediction")

    ranges: list[tuple[str, float, float]] = [("all", *MOTION_RANGES["all"])]
    ignores_raw = [np.zeros(len(g_labels), dtype=bool)]
    weights = [0.0]  # "all": nothing ignored and every unmatched prediction a full FP
    shares = None
    if motion_ious is not None:
        mi = []
        for i, (m, g) in enumerate(zip(motion_ious, gts)):
            arr = np.asarray(m, dtype=np.float64).reshape(-1)
            if arr.size != len(g):
                raise ValueError(f"motion_ious[{i}] has {arr.size} values but frame {i} has {len(g)} boxes")
            mi.append(arr)
        motion = np.concatenate(mi) if mi else np.zeros(0)
        shares = bucket_shares(mi)
        for name, (low, high) in MOTION_RANGES.items():
            if name == "all":
                continue
            ranges.append((name, low, high))
            ignores_raw.append(~((motion >= low) & (motion <= high)))
            # The authors reset a share of exactly 1 to 0 (it is how "all" gets full FPs).
            weights.append(0.0 if shares[name] == 1 else shares[name])
    for name, masks in (subsets or {}).items():
        if name in MOTION_RANGES:
            raise ValueError(f"subset name {name!r} is taken by a motion range")
        if len(masks) != n_frames:
            raise ValueError(f"subset {name!r} has {len(masks)} frames but gts has {n_frames}")
        parts = []
        for i, (mask, g) in enumerate(zip(masks, gts)):
            arr = np.asarray(mask, dtype=bool).reshape(-1)
            if arr.size != len(g):
                raise ValueError(f"subset {name!r}[{i}] has {arr.size} values but frame {i} has {len(g)} boxes")
            parts.append(arr)
        inside = np.concatenate(parts) if parts else np.zeros(0, dtype=bool)
        share = float(inside.mean()) if inside.size else 0.0
        ranges.append((name, None, None))
        ignores_raw.append(~inside)
        weights.append(0.0 if share == 1 else share)

    # GT grouped by (frame, class), annotation order kept inside a group (it breaks IoU ties).
    gkey_raw = g_frame * n_cls + g_labels
    g_order = np.argsort(gkey_raw, kind="stable")
    gkey, g_boxes_s = gkey_raw[g_order], g_boxes[g_order]
    ignores = [ig[g_order] for ig in ignores_raw]
    gthr = _gt_thresholds(g_boxes_s, protocol)

    # Predictions grouped by (frame, class), descending score, equal scores later index first.
    n_pred = len(p_labels)
    rev = np.arange(n_pred)[::-1]
    by_score = rev[np.argsort(-p_scores[rev], kind="stable")]
    p_order = by_score[np.argsort((p_frame * n_cls + p_labels)[by_score], kind="stable")]
    pkey = (p_frame * n_cls + p_labels)[p_order]
    p_boxes_s, p_scores_s, p_labels_s = p_boxes[p_order], p_scores[p_order], p_labels[p_order]

    outcomes = match_all(p_boxes_s, pkey, g_boxes_s, gkey, gthr, ignores, weights)

    # The authors concatenate each class's per-image sorted predictions in frame order, then sort
    # by descending score (ties: later position first).
    by_score = rev[np.argsort(-p_scores_s[rev], kind="stable")]
    glob = by_score[np.argsort(p_labels_s[by_score], kind="stable")]
    class_bounds = np.searchsorted(p_labels_s[glob], np.arange(n_cls + 1))
    g_labels_s = g_labels[g_order]
    results = {}
    for (name, low, high), ignore, w, (matched, pign) in zip(ranges, ignores, weights, outcomes):
        num_pos = np.bincount(g_labels_s[~ignore], minlength=n_cls).astype(np.int64)
        num_ig = np.bincount(g_labels_s[ignore], minlength=n_cls).astype(np.int64)
        results[name] = _range_result(
            name, low, high, w, matched, pign, glob, class_bounds, num_pos, num_ig
        )
    return VIDEvalResult(
        protocol=protocol,
        classes=tuple(classes),
        num_frames=n_frames,
        num_gt=int(len(g_labels)),
        num_det=int(n_pred),
        ranges=results,
        bucket_shares=shares,
    )


# --------------------------------------------------------------------------------------------------
# Whole dataset on disk
# --------------------------------------------------------------------------------------------------


def _gt_frames(data_dir: Path, image_set: str | None) -> tuple[list[tuple[str, int]], str]:
    """(video, frame) of every evaluated frame, in list order, and a description of the source."""
    name = image_set or "VID_val_videos"
    set_path = data_dir / "ImageSets" / f"{name}.txt"
    if set_path.is_file():
        frames = []
        for e in read_image_set(set_path):
            if e.frame is not None:
                frames.append((e.path, e.frame))
                continue
            # 2-column lists name the frame itself: <video>/<%06d>.
            video, _, stem = e.path.rpartition("/")
            if not video or not stem.isdigit():
                raise MegavodError(f"{set_path}: {e.path!r} is not <video>/<frame number>")
            frames.append((video, int(stem)))
        return frames, str(set_path)
    if image_set is not None:
        raise MegavodError(f"{set_path}: image set not found")
    # No list: every annotated frame of the val split, videos and frames in name order.
    val = data_dir / "Annotations" / "VID" / "val"
    frames = [
        (f"val/{xml.parent.name}", int(xml.stem))
        for xml in sorted(val.glob("*/*.xml"))
        if xml.stem.isdigit()
    ]
    if not frames:
        raise MegavodError(f"{data_dir}: neither {set_path} nor any {val}/*/*.xml to evaluate on")
    return frames, f"{val}/*/*.xml"


def evaluate_dataset(
    data_dir: str | Path,
    pred_file: str | Path,
    protocol: str = "authors",
    out_dir: str | Path | None = None,
    *,
    image_set: str | None = None,
    plots: bool = True,
    log: Callable[[str], None] | None = print,
) -> VIDEvalResult:
    """Evaluate a prediction file against an ILSVRC2015-layout folder or a COCO-VID file (``megavod eval``).

    Args:
        data_dir: the dataset root holding ``Annotations/VID`` and ``ImageSets``, or a COCO-VID
            ``.json`` file (``megavod.data.coco_vid``): then every image of the file is evaluated,
            videos named as its ``videos[].name`` and frames numbered by its ``frame_id``.
        pred_file: a prediction file (``megavod.data.predictions``), boxes in original pixels.
        protocol: ``"authors"`` or ``"ilsvrc"`` (docs/departures.md#ilsvrc-small-object-protocol).
        out_dir: where ``eval.json``, ``result.txt`` and ``pr_curves/`` go (nothing written if None).
        image_set: the list of frames to evaluate, ``ImageSets/<image_set>.txt``. By default
            ``VID_val_videos`` if present, else every XML under ``Annotations/VID/val``. Not for a
            COCO-VID file.
        plots: whether to draw ``pr_curves/<class>.png``.
        log: receives a progress line and then the terminal table (None: silent).

    Every listed frame is evaluated; a listed frame without a prediction entry counts as having no
    detections (and is counted in the table). Predictions for a video or frame not in the list, or
    for a video whose recorded size differs from its annotation, are errors. Motion buckets come
    from the annotations' track ids (docs/departures.md#motion-iou-from-track-ids).
    """
    if protocol not in PROTOCOLS:
        raise MegavodError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    gts, preds, missing = load_for_evaluation(data_dir, pred_file, image_set=image_set, log=log)
    return evaluate_loaded(gts, preds, missing, protocol, out_dir, plots=plots, log=log)


def evaluate_loaded(
    gts: list[FrameAnnotation],
    preds: list[Detections],
    missing: int,
    protocol: str = "authors",
    out_dir: str | Path | None = None,
    *,
    plots: bool = True,
    log: Callable[[str], None] | None = print,
) -> VIDEvalResult:
    """The second half of :func:`evaluate_dataset`, on what :func:`load_for_evaluation` returned:
    motion IoU from the annotations' tracks, AP in every bucket, the report."""
    by_video: dict[str, list[int]] = {}
    for i, g in enumerate(gts):
        by_video.setdefault(g.video, []).append(i)
    motion: list[Tensor] = [torch.zeros(0)] * len(gts)
    for idx in by_video.values():
        for i, m in zip(idx, motion_ious_for_video([gts[i] for i in idx])):
            motion[i] = m

    result = evaluate_vid(gts, preds, motion, protocol)
    result.frames_without_predictions = missing
    if out_dir is not None:
        table = write_report(result, out_dir, plots=plots)
    else:
        table = format_table(result)
    if log is not None:
        log(table)
    return result


def load_for_evaluation(
    data_dir: str | Path,
    pred_file: str | Path,
    *,
    image_set: str | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[list[FrameAnnotation], list[Detections], int]:
    """The ground truth of every evaluated frame and the predictions aligned with it, index by index
    (see :func:`evaluate_dataset` for the arguments and the checks); also the number of listed frames
    the prediction file has no entry for (they get no detections)."""
    data_dir = Path(data_dir)
    coco = data_dir.suffix.lower() == ".json"
    ann_root = data_dir / "Annotations" / "VID"
    if coco and image_set is not None:
        raise MegavodError(
            f"{data_dir}: a COCO-VID file is evaluated whole; image set {image_set!r} does not apply"
        )
    if not coco and not ann_root.is_dir():
        raise MegavodError(f"{data_dir}: no Annotations/VID folder (expected the ILSVRC2015 layout)")
    videos = read_predictions(pred_file)
    if coco:
        gts, source = read_coco_vid(data_dir).annotations(), str(data_dir)
        frames = [(g.video, g.frame) for g in gts]
        if log is not None:
            log(f"read {len(frames)} annotated frames from {source}")
    else:
        frames, source = _gt_frames(data_dir, image_set)
        if log is not None:
            log(f"reading {len(frames)} annotations listed in {source}")
        gts = [read_annotation(ann_root / v / f"{f:06d}.xml", v, f) for v, f in frames]
    position = {key: i for i, key in enumerate(frames)}
    size = {}
    for g in gts:
        size.setdefault(g.video, (g.width, g.height))
    # `megavod detect clip.mp4` names a video by its file name; accept it for the GT video of that
    # name (e.g. "ILSVRC2015_val_00000000" for "val/ILSVRC2015_val_00000000") when that is unambiguous.
    by_name: dict[str, list[str]] = {}
    for name in size:
        by_name.setdefault(Path(name).name, []).append(name)
    for v in videos:
        if v.video not in size and len(by_name.get(v.video, [])) == 1:
            v.video = by_name[v.video][0]
    dets: list[Detections | None] = [None] * len(gts)
    for v in videos:
        if v.video not in size:
            raise MegavodError(f"{pred_file}: video {v.video!r} is not in the ground truth ({source})")
        if (v.width, v.height) != size[v.video]:
            w, h = size[v.video]
            raise MegavodError(
                f"{pred_file}: video {v.video!r} is {v.width}x{v.height} in the predictions but "
                f"{w}x{h} in its annotations; boxes must be in original-frame pixels"
            )
        for fp in v.frames:
            i = position.get((v.video, fp.frame))
            if i is None:
                raise MegavodError(
                    f"{pred_file}: video {v.video!r} frame {fp.frame} is not in the ground truth ({source})"
                )
            dets[i] = fp.detections
    missing = sum(d is None for d in dets)
    preds = [Detections.empty() if d is None else d for d in dets]
    return gts, preds, missing
