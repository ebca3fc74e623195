"""ImageNet VID evaluation (docs/conventions.md#evaluation-protocol, docs/departures.md#motion-iou-from-track-ids,
docs/departures.md#ilsvrc-small-object-protocol): AP by hand, the authors' reference case, an independent loop
implementation on random cases, motion IoU, and the on-disk entry point."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from megavod.data.image_sets import ImageSetEntry, write_image_set
from megavod.data.predictions import FramePrediction, VideoPredictions, write_predictions
from megavod.data.vid_xml import write_annotation
from megavod.errors import MegavodError
from megavod.data.motion import bucket_shares, motion_ious_for_video
from megavod.evaluation.vid_eval import evaluate_dataset, evaluate_vid
from megavod.structures import Detections, FrameAnnotation
from reference_data import VID_EVAL_CASE as CASE


def gt(boxes, labels, video="v", frame=0, tracks=None, size=(640, 480)) -> FrameAnnotation:
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    t = torch.arange(len(b)) if tracks is None else torch.tensor(tracks, dtype=torch.int64)
    return FrameAnnotation(video, frame, size[0], size[1], b, torch.tensor(labels, dtype=torch.int64), t)


def det(boxes, scores, labels) -> Detections:
    return Detections(
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(scores, dtype=torch.float32),
        torch.tensor(labels, dtype=torch.int64),
    )


# ---------------------------------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------------------------------


def test_hand_computed_duplicate_empty_frame_and_small_object():
    gts = [
        gt([[0, 0, 99, 99]], [1]),
        gt([], []),  # no ground truth at all
        gt([[200, 200, 299, 299], [10, 10, 17, 17]], [1, 2]),
    ]
    preds = [
        det([[0, 0, 99, 99], [1, 1, 99, 99]], [0.9, 0.8], [1, 1]),  # exact hit, then a duplicate
        det([[50, 50, 90, 90]], [0.7], [1]),  # in the frame without GT: a full FP
        det([[200, 200, 299, 299], [13, 13, 20, 20]], [0.6, 0.5], [1, 2]),
    ]
    # Class 1 by score: 0.9 TP, 0.8 FP (its GT is taken), 0.7 FP, 0.6 TP; 2 positives.
    # precision 1, 1/2, 1/3, 2/4 at recall 1/2, 1/2, 1/2, 1 -> envelope 1 then 1/2:
    # AP = 1/2 * 1 + 1/2 * 1/2 = 0.75.
    # Class 2: the 8x8 GT [10,10,17,17] and the prediction [13,13,20,20]. The authors' +1 shift makes
    # both 9 wide: intersection 6 x 6 = 36, union 81 + 81 - 36 = 126, IoU = 2/7 = 0.2857 < 0.5 -> FP,
    # AP 0. Under the devkit rule the GT's threshold is 8*8 / (18*18) = 0.1975 <= 2/7 -> TP, AP 1.
    authors = evaluate_vid(gts, preds)
    assert authors.ranges["all"].ap[1] == pytest.approx(0.75, abs=1e-12)
    assert authors.ranges["all"].ap[2] == pytest.approx(0.0, abs=1e-12)
    assert authors.map == pytest.approx(0.375, abs=1e-12)
    assert authors.ranges["all"].num_tp[1] == 2 and authors.ranges["all"].num_fp[1] == 2
    ilsvrc = evaluate_vid(gts, preds, protocol="ilsvrc")
    assert ilsvrc.ranges["all"].ap[2] == pytest.approx(1.0, abs=1e-12)
    assert ilsvrc.map == pytest.approx(0.875, abs=1e-12)
    # Classes without ground truth are NaN, not 0, and stay out of the mean.
    assert np.isnan(authors.ranges["all"].ap[0]) and np.isnan(authors.ranges["all"].ap[3:]).all()
    assert list(authors.ranges) == ["all"]


def test_hand_computed_motion_buckets_fractional_false_positives():
    # Frame 0: GT a (slow, motion 0.95) and b (fast, 0.5), class 1. Frame 1: no GT.
    gts = [gt([[0, 0, 99, 99], [200, 0, 299, 99]], [1, 1]), gt([], [], frame=1)]
    motion = [torch.tensor([0.95, 0.5]), torch.zeros(0)]
    preds = [
        det(
            [
                [0, 0, 29, 99],  # p5 0.99: IoU with a = 31/101 = 0.307 (after the +1 shift)
                [500, 300, 550, 350],  # p3 0.95: overlaps nothing
                [0, 0, 99, 99],  # p1 0.85: on a
                [200, 0, 299, 99],  # p2 0.80: on b
            ],
            [0.99, 0.95, 0.85, 0.80],
            [1, 1, 1, 1],
        ),
        det([[10, 10, 50, 50]], [0.9], [1]),  # p4 0.90 in the frame without GT
    ]
    r = evaluate_vid(gts, preds, motion)
    # Motion entries: 0.95, 0.5 and 0 for the empty frame -> empty_weight fast 2/3, slow 1/3.
    assert r.ranges["fast"].empty_weight == pytest.approx(2 / 3)
    assert r.ranges["slow"].empty_weight == pytest.approx(1 / 3)
    assert r.ranges["all"].empty_weight == 0.0
    # all: nothing ignored, order p5 FP, p3 FP, p4 FP, p1 TP, p2 TP -> precision 1/4 at recall 1/2
    # and 2/5 at recall 1: envelope 2/5 everywhere, AP = 0.4.
    assert r.ranges["all"].ap[1] == pytest.approx(0.4, abs=1e-12)
    # fast (a ignored): p5's best IoU is with the ignored a (0.307 > 0) -> p = 1, not counted;
    # p3 ties at 0 with both -> p = 1 ignored / 2 GTs = 1/2 -> FP weight 1/2; p4 weight 2/3;
    # p1 matches the ignored a -> neither; p2 TP. Precision 1 / (1 + 1/2 + 2/3) = 6/13.
    assert r.ranges["fast"].ap[1] == pytest.approx(6 / 13, abs=1e-12)
    assert r.ranges["fast"].num_pos[1] == 1 and r.ranges["fast"].num_ignored_gt[1] == 1
    # slow (b ignored): p5 FP 1 (best IoU with the counted a), p3 FP 1/2, p4 FP 1/3, p1 TP, p2
    # matched to ignored b. Precision 1 / (1 + 1 + 1/2 + 1/3) = 6/17.
    assert r.ranges["slow"].ap[1] == pytest.approx(6 / 17, abs=1e-12)
    # medium: no GT in range -> NaN everywhere.
    assert math.isnan(r.ranges["medium"].map)


def test_hand_computed_subsets_by_mask():
    # The motion-bucket case above, with subsets given by mask instead of motion IoU: a subset's FP
    # weight is its share of the GT boxes (1 of 2 here; the empty frame adds no entry, unlike a bucket).
    gts = [gt([[0, 0, 99, 99], [200, 0, 299, 99]], [1, 1]), gt([], [], frame=1)]
    preds = [
        det([[0, 0, 29, 99], [500, 300, 550, 350], [0, 0, 99, 99], [200, 0, 299, 99]],
            [0.99, 0.95, 0.85, 0.80], [1, 1, 1, 1]),
        det([[10, 10, 50, 50]], [0.9], [1]),
    ]
    none = torch.zeros(0, dtype=torch.bool)
    r = evaluate_vid(gts, preds, subsets={
        "a": [torch.tensor([True, False]), none],
        "b": [np.array([False, True]), none],
        "everything": [torch.tensor([True, True]), none],
    })
    assert list(r.ranges) == ["all", "a", "b", "everything"]
    assert r.ranges["a"].empty_weight == pytest.approx(0.5) and r.ranges["a"].low is None
    # a (b ignored): p5 FP 1, p3 FP 1/2 (tie at IoU 0), p4 FP 1/2, p1 TP, p2 on the ignored b.
    assert r.ranges["a"].ap[1] == pytest.approx(1 / 3, abs=1e-12)
    # b (a ignored): p5 and p1 on the ignored a, p3 FP 1/2, p4 FP 1/2, p2 TP.
    assert r.ranges["b"].ap[1] == pytest.approx(1 / 2, abs=1e-12)
    # A subset holding every box is "all" (share 1 read as 0: full FPs).
    assert r.ranges["everything"].empty_weight == 0.0
    assert r.ranges["everything"].ap[1] == pytest.approx(r.ranges["all"].ap[1], abs=1e-12)
    with pytest.raises(ValueError, match="subset 'a' has 1 frames"):
        evaluate_vid(gts, preds, subsets={"a": [torch.tensor([True, False])]})
    with pytest.raises(ValueError, match=r"subset 'a'\[0\] has 1 values"):
        evaluate_vid(gts, preds, subsets={"a": [torch.tensor([True]), none]})
    with pytest.raises(ValueError, match="taken by a motion range"):
        evaluate_vid(gts, preds, subsets={"fast": [torch.tensor([True, False]), none]})


def test_equal_iou_prefers_non_ignored_ground_truth():
    # Two identical GTs; the first is slow, the second fast. One prediction on them.
    gts = [gt([[10, 10, 60, 60], [10, 10, 60, 60]], [3, 3])]
    motion = [torch.tensor([0.95, 0.3])]
    preds = [det([[10, 10, 60, 60], [12, 12, 60, 60]], [0.9, 0.5], [3, 3])]
    r = evaluate_vid(gts, preds, motion)
    # fast: the first prediction must take the non-ignored second GT (TP); the second prediction then
    # matches the ignored one (neither), so AP = 1. Matching the first GT would have given AP 0.
    # (1 - 2e-16, not 1: precision is tp / (tp + fp + eps) as in the authors' code.)
    assert r.ranges["fast"].ap[3] == pytest.approx(1.0, abs=1e-12) and r.ranges["fast"].num_fp[3] == 0
    assert r.ranges["fast"].num_tp[3] == 1
    assert r.ranges["slow"].ap[3] == pytest.approx(1.0, abs=1e-12)
    assert r.ranges["all"].ap[3] == pytest.approx(1.0, abs=1e-12)


def test_equal_iou_between_ignored_ground_truths_takes_the_last():
    # a and b ignored in "fast" (slow objects), c counted and identical to a.
    a, b, c = [0, 0, 99, 99], [20, 0, 119, 99], [0, 0, 99, 99]
    gts = [gt([a, b, c], [7, 7, 7])]
    motion = [torch.tensor([0.95, 0.95, 0.5], dtype=torch.float64)]
    preds = [det([c, [10, 0, 109, 99], [-20, 0, 79, 99]], [0.9, 0.8, 0.7], [7, 7, 7])]
    r = evaluate_vid(gts, preds, motion)
    # 0.9 sits on a and c: takes the counted c (TP). 0.8 sits halfway between a and b (IoU 91/111 with
    # each): the authors' loop takes the *last* ignored one, b. 0.7 overlaps a and c at 81/121 and b
    # at 61/141 < 0.5: a is still free, so it matches an ignored GT and counts nowhere. (Had 0.8 taken
    # a, 0.7 would be unmatched with equal best IoU to ignored and counted GTs: FP weight 2/3.)
    assert r.ranges["fast"].num_tp[7] == 1 and r.ranges["fast"].num_fp[7] == 0


def test_reference_case_of_the_authors_code():
    case = json.loads(CASE.read_text())
    gts, preds, motion = [], [], []
    for i, f in enumerate(case["frames"]):
        g = np.asarray(f["gt"], dtype=np.float64).reshape(-1, 6)
        p = np.asarray(f["pred"], dtype=np.float64).reshape(-1, 6)
        gts.append(gt(g[:, :4], g[:, 4].astype(int), frame=i))
        preds.append(det(p[:, :4], p[:, 5], p[:, 4].astype(int)))
        motion.append(torch.from_numpy(g[:, 5]))
    r = evaluate_vid(gts, preds, motion)
    for name, expected in case["expected"].items():
        got = r.ranges[name]
        assert got.map == pytest.approx(expected["map"], abs=1e-9), name
        for c, ap in enumerate(expected["ap_per_class"]):
            if ap is None:
                assert math.isnan(got.ap[c]), (name, c)
            else:
                assert got.ap[c] == pytest.approx(ap, abs=1e-9), (name, c)
        assert np.isnan(got.ap[len(expected["ap_per_class"]) :]).all()


def test_ground_truth_as_predictions_scores_one_in_every_bucket():
    # Three tracks over 12 frames: static (slow), 3 px/frame (medium-ish), 12 px/frame (fast),
    # and a one-frame object (no neighbour: ignored in the buckets).
    frames, preds = [], []
    for f in range(12):
        boxes = [[100, 100, 159, 159], [300 + 3 * f, 50, 359 + 3 * f, 109], [12 * f, 300, 59 + 12 * f, 359]]
        labels, tracks = [1, 2, 3], [0, 1, 2]
        if f == 5:
            boxes.append([500, 400, 539, 439])
            labels.append(4)
            tracks.append(3)
        frames.append(gt(boxes, labels, frame=f, tracks=tracks))
        preds.append(det(boxes, np.linspace(0.9, 0.5, len(boxes)), labels))
    motion = motion_ious_for_video(frames)
    r = evaluate_vid(frames, preds, motion)
    for name, rr in r.ranges.items():
        assert rr.map == pytest.approx(1.0, abs=1e-12), name
        assert (rr.num_fp == 0).all()
    assert not math.isnan(r.ranges["fast"].ap[3]) and not math.isnan(r.ranges["slow"].ap[1])
    assert math.isnan(r.ranges["slow"].ap[4])  # the one-frame object is in no bucket


def test_no_predictions_and_bad_inputs():
    r = evaluate_vid([gt([[0, 0, 9, 9]], [5])], [Detections.empty()])
    assert r.ranges["all"].ap[5] == 0.0 and r.map == 0.0
    r = evaluate_vid([gt([], [])], [det([[0, 0, 9, 9]], [0.5], [5])])
    assert math.isnan(r.map) and r.ranges["all"].num_fp[5] == 1
    with pytest.raises(ValueError, match="protocol"):
        evaluate_vid([], [], protocol="coco")
    with pytest.raises(ValueError, match="frames"):
        evaluate_vid([gt([], [])], [])
    with pytest.raises(ValueError, match="label 31"):
        evaluate_vid([gt([], [])], [det([[0, 0, 9, 9]], [0.5], [31])])
    with pytest.raises(ValueError, match="motion_ious"):
        evaluate_vid([gt([[0, 0, 9, 9]], [5])], [Detections.empty()], [torch.zeros(2)])


# ---------------------------------------------------------------------------------------------------
# An independent, literal implementation of docs/conventions.md#evaluation-protocol on random cases full of ties
# ---------------------------------------------------------------------------------------------------


def _iou32(p, g) -> np.float32:
    """The authors' float32 IoU of one pair: +1 on x2/y2, then +1 widths."""
    one = np.float32(1)
    p = [np.float32(v) for v in p]
    g = [np.float32(v) for v in g]
    p[2], p[3], g[2], g[3] = p[2] + one, p[3] + one, g[2] + one, g[3] + one
    ap = (p[2] - p[0] + one) * (p[3] - p[1] + one)
    ag = (g[2] - g[0] + one) * (g[3] - g[1] + one)
    w = max(min(p[2], g[2]) - max(p[0], g[0]) + one, np.float32(0))
    h = max(min(p[3], g[3]) - max(p[1], g[1]) + one, np.float32(0))
    inter = w * h
    return inter / (ap + ag - inter)


def _loop_eval(frames, protocol, low=None, high=None, n_cls=4):
    entries = [v for f in frames for v in (f["motion"] if len(f["motion"]) else [0.0])]
    ew = 0.0
    if low is not None:
        ew = sum(low <= v <= high for v in entries) / len(entries)
        ew = 0.0 if ew == 1 else ew
    recs = {c: [] for c in range(n_cls)}  # (score, matched, p)
    n_pos = np.zeros(n_cls)
    for f in frames:
        ign = [low is not None and not (low <= v <= high) for v in f["motion"]]
        for c in range(1, n_cls):
            gi = [k for k in range(len(f["gl"])) if f["gl"][k] == c]
            pi = [j for j in range(len(f["pl"])) if f["pl"][j] == c]
            pi.sort(key=lambda j: (-f["ps"][j], -j))
            n_pos[c] += sum(not ign[k] for k in gi)
            taken = set()
            for j in pi:
                if not gi:
                    recs[c].append((f["ps"][j], False, ew))
                    continue
                ious = {k: _iou32(f["pb"][j], f["gb"][k]) for k in gi}
                best_ig = max([-1.0] + [ious[k] for k in gi if ign[k]])
                best_nig = max([-1.0] + [ious[k] for k in gi if not ign[k]])
                cands = []
                for k in gi:
                    b = f["gb"][k]
                    thr = 0.5
                    if protocol == "ilsvrc":
                        w, h = b[2] - b[0] + 1.0, b[3] - b[1] + 1.0
                        thr = min(0.5, w * h / ((w + 10) * (h + 10)))
                    if k not in taken and ious[k] >= thr and ious[k] > 0:
                        cands.append(k)
                if cands:
                    top = max(ious[k] for k in cands)
                    tied = [k for k in cands if ious[k] == top]
                    free = [k for k in tied if not ign[k]]
                    k = free[0] if free else tied[-1]
                    taken.add(k)
                    recs[c].append((f["ps"][j], True, float(ign[k])))
                else:
                    p = 0.0 if best_nig > best_ig else 1.0 if best_ig > best_nig else sum(ign[k] for k in gi) / len(gi)
                    recs[c].append((f["ps"][j], False, p))
    aps = np.full(n_cls, np.nan)
    for c in range(1, n_cls):
        if n_pos[c] == 0:
            continue
        rows = sorted(enumerate(recs[c]), key=lambda t: (-t[1][0], -t[0]))
        tp = fp = 0.0
        prec, rec = [], []
        for _, (s, m, p) in rows:
            if p != 1:
                if m:
                    tp += 1
                else:
                    fp += 1 if p == 0 else p
            prec.append(tp / (tp + fp + np.spacing(1)))
            rec.append(tp / n_pos[c])
        mrec, mpre = [0.0] + rec + [1.0], [0.0] + prec + [0.0]
        for i in range(len(mpre) - 2, -1, -1):
            mpre[i] = max(mpre[i], mpre[i + 1])
        aps[c] = sum((mrec[i + 1] - mrec[i]) * mpre[i + 1] for i in range(len(mrec) - 1) if mrec[i + 1] != mrec[i])
    return aps


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("protocol", ["authors", "ilsvrc"])
def test_matches_a_literal_loop_implementation(seed, protocol):
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(25):
        ng = int(rng.integers(0, 5))
        xy = rng.integers(0, 16, (ng, 2))
        gb = np.concatenate([xy, xy + rng.integers(0, 10, (ng, 2))], 1).astype(float)
        if ng >= 2 and rng.uniform() < 0.5:
            gb[1] = gb[0]  # identical boxes: exact IoU ties
        gl = rng.integers(1, 4, ng)
        npred = int(rng.integers(0, 7))
        src = rng.integers(0, max(ng, 1), npred)
        pb = (gb[src] if ng else np.zeros((npred, 4))) + rng.integers(-2, 3, (npred, 4))
        pb[:, 2:] = np.maximum(pb[:, 2:], pb[:, :2])
        pl = np.where(rng.uniform(size=npred) < 0.8, gl[src] if ng else 1, rng.integers(1, 4, npred))
        ps = rng.choice([0.2, 0.4, 0.6, 0.8], npred).astype(np.float32)  # score ties too
        motion = rng.choice([0.5, 0.7, 0.8, 0.9, 0.95, -1.0], ng)
        frames.append(dict(gb=gb, gl=gl, pb=pb, pl=pl, ps=ps, motion=motion))
    gts = [gt(f["gb"], f["gl"]) for f in frames]
    preds = [det(f["pb"], f["ps"], f["pl"]) for f in frames]
    r = evaluate_vid(gts, preds, [torch.from_numpy(f["motion"]) for f in frames], protocol=protocol)
    ranges = {"all": (None, None), "fast": (0.0, 0.7), "medium": (0.7, 0.9), "slow": (0.9, 1.0)}
    for name, (low, high) in ranges.items():
        expected = _loop_eval(frames, protocol, low, high)
        np.testing.assert_allclose(r.ranges[name].ap[:4], expected, atol=1e-12, err_msg=name)


# ---------------------------------------------------------------------------------------------------
# Motion IoU
# ---------------------------------------------------------------------------------------------------


def test_motion_iou_static_fast_lonely_and_gap():
    frames = []
    for f in range(3):
        frames.append(
            gt(
                [[40, 40, 79, 79], [5 * f, 0, 5 * f + 9, 9], [200, 200, 220, 220]] if f == 1 else
                [[40, 40, 79, 79], [5 * f, 0, 5 * f + 9, 9]],
                [1, 2, 3] if f == 1 else [1, 2],
                frame=f,
                tracks=[0, 1, 2] if f == 1 else [0, 1],
            )
        )
    frames.append(gt([[0, 0, 9, 9]], [4], frame=14, tracks=[7]))
    frames.append(gt([[0, 0, 9, 9]], [4], frame=3, tracks=[-1]))  # no track id
    m = motion_ious_for_video(frames)
    # Static track: IoU 1 with every neighbour.
    assert [float(x[0]) for x in m[:3]] == [1.0, 1.0, 1.0]
    # 10x10 box moving 5 px per frame: IoU(f0, f1) = 50 / 150 = 1/3, IoU(f0, f2) = 0.
    # f0: mean(1/3, 0) = 1/6; f1: mean(1/3, 1/3) = 1/3; f2: 1/6.
    assert [float(x[1]) for x in m[:3]] == pytest.approx([1 / 6, 1 / 3, 1 / 6], abs=1e-15)
    assert float(m[1][2]) == -1.0  # present in one frame only
    assert float(m[3][0]) == -1.0 and float(m[4][0]) == -1.0
    assert m[0].dtype == torch.float64
    # A radius of 1 sees only adjacent frames.
    m1 = motion_ious_for_video(frames[:3], radius=1)
    assert float(m1[0][1]) == pytest.approx(1 / 3)
    # Track 7 at frame 14 and a hypothetical frame 3 neighbour of the same id: 11 frames apart.
    far = motion_ious_for_video([gt([[0, 0, 9, 9]], [4], frame=3, tracks=[7]), frames[3]])
    assert [float(x[0]) for x in far] == [-1.0, -1.0]
    with pytest.raises(ValueError, match="one video"):
        motion_ious_for_video([gt([], [], video="a"), gt([], [], video="b")])


def test_bucket_shares_counts_empty_frames_as_zero():
    f64 = torch.float64
    s = bucket_shares([torch.tensor([0.95, 0.5], dtype=f64), torch.zeros(0), torch.tensor([-1.0, 0.7], dtype=f64)])
    # Entries 0.95, 0.5, 0 (empty frame), -1, 0.7: 0.7 is in both fast and medium (inclusive ranges,
    # compared in float64: a float32 0.7 is 0.69999999 and would miss medium).
    assert s["fast"] == 3 / 5 and s["medium"] == 1 / 5 and s["slow"] == 1 / 5
    assert s["no_neighbour"] == 1 / 5 and s["entries"] == 5


# ---------------------------------------------------------------------------------------------------
# Whole dataset on disk
# ---------------------------------------------------------------------------------------------------


def _make_dataset(root: Path) -> list[FrameAnnotation]:
    anns = []
    entries = []
    for v, video in enumerate(["val/ILSVRC2015_val_00000000", "val/ILSVRC2015_val_00000001"]):
        for f in range(4):
            boxes = [[10 + v * 50, 20, 110 + v * 50, 120]] if (v, f) != (1, 3) else []
            ann = gt(boxes, [v + 1] * len(boxes), video=video, frame=f, tracks=[0] * len(boxes), size=(320, 240))
            xml = root / "Annotations" / "VID" / video / f"{f:06d}.xml"
            xml.parent.mkdir(parents=True, exist_ok=True)
            write_annotation(xml, ann, video, f"{f:06d}")
            anns.append(ann)
            entries.append(ImageSetEntry(video, f, 4, len(entries) + 1))
    (root / "ImageSets").mkdir(parents=True)
    write_image_set(root / "ImageSets" / "VID_val_videos.txt", entries)
    return anns


def test_evaluate_dataset_writes_report(tmp_path):
    anns = _make_dataset(tmp_path / "ILSVRC2015")
    videos = {}
    for a in anns[:-1]:  # the last frame has no prediction entry
        v = videos.setdefault(a.video, VideoPredictions(a.video, 320, 240, []))
        v.frames.append(FramePrediction(a.frame, f"{a.frame:06d}.JPEG", Detections(a.boxes, torch.full((len(a),), 0.9), a.labels)))
    pred = tmp_path / "pred.json"
    write_predictions(pred, list(videos.values()))
    lines: list[str] = []
    out = tmp_path / "out"
    r = evaluate_dataset(tmp_path / "ILSVRC2015", pred, "authors", out, log=lines.append)
    assert r.map == pytest.approx(1.0, abs=1e-12) and r.num_frames == 8 and r.num_gt == 7 and r.frames_without_predictions == 1
    assert r.ranges["slow"].map == pytest.approx(1.0, abs=1e-12)  # static objects
    assert lines[0].startswith("reading 8 annotations listed in") and "VID_val_videos.txt" in lines[0]
    table = lines[-1]
    assert "AP50 | motion=   all = 1.0000" in table and "airplane" in table and "antelope" in table
    data = json.loads((out / "eval.json").read_text())
    assert data["map"]["all"] == pytest.approx(1.0, abs=1e-12) and data["map"]["fast"] is None
    assert data["ranges"]["all"]["classes"]["airplane"]["num_pos"] == 4
    assert data["ranges"]["all"]["classes"]["antelope"]["precision_at_recall"][-1] == 1.0
    assert data["ranges"]["all"]["classes"]["bear"]["ap"] is None
    assert sorted(p.name for p in (out / "pr_curves").iterdir()) == ["airplane.png", "antelope.png"]
    assert (out / "result.txt").read_text().strip() == table

    # Without an image-set file every XML under Annotations/VID/val is evaluated.
    (tmp_path / "ILSVRC2015" / "ImageSets" / "VID_val_videos.txt").unlink()
    again = evaluate_dataset(tmp_path / "ILSVRC2015", pred, "ilsvrc", log=None)
    assert again.num_frames == 8 and again.map == pytest.approx(r.map, abs=1e-15)
    with pytest.raises(MegavodError, match="VID_val_frames.txt: image set not found"):
        evaluate_dataset(tmp_path / "ILSVRC2015", pred, image_set="VID_val_frames", log=None)

    # Errors: a video that is not in the ground truth, and boxes in resized pixels.
    write_predictions(pred, [VideoPredictions("val/ILSVRC2015_val_00000009", 320, 240, [])])
    with pytest.raises(MegavodError, match="ILSVRC2015_val_00000009' is not in the ground truth"):
        evaluate_dataset(tmp_path / "ILSVRC2015", pred, log=None)
    write_predictions(pred, [VideoPredictions(anns[0].video, 600, 450, [])])
    with pytest.raises(MegavodError, match="600x450 in the predictions but 320x240"):
        evaluate_dataset(tmp_path / "ILSVRC2015", pred, log=None)
    write_predictions(pred, [VideoPredictions(anns[0].video, 320, 240, [FramePrediction(9, None, Detections.empty())])])
    with pytest.raises(MegavodError, match="frame 9 is not in the ground truth"):
        evaluate_dataset(tmp_path / "ILSVRC2015", pred, log=None)
