"""Seq-NMS and BLR (docs/departures.md#seq-nms-post-processing,
docs/departures.md#blr-as-megavod-reads-the-paper): hand-built tubes, reference oracles, CLI round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from megavod.apps.cli import main as cli_main
from megavod.data.predictions import FramePrediction, VideoPredictions, read_predictions, write_predictions
from megavod.postprocess import apply_postprocess, seq_nms
from megavod.postprocess import box_linking_with_relations as blr
from megavod.postprocess import seqnms as seqnms_module
from megavod.postprocess.seqnms import PathSearch, VideoBoxes, pair_iou, plus_one
from megavod.structures import Detections

# 100 x 100 boxes in the +1 convention: a shift of dx gives IoU (100 - dx) / (100 + dx), so
# dx = 40 -> 0.43 (suppressed, not linked), dx = 60 -> 0.25 (neither).
A = [0, 0, 99, 99]
NEAR = [40, 0, 139, 99]  # IoU 0.43 with A
SIDE = [60, 0, 159, 99]  # IoU 0.25 with A
FAR = [500, 500, 599, 599]


def rec(frame: int, boxes, scores, labels=None) -> FramePrediction:
    n = len(boxes)
    labels = [1] * n if labels is None else labels
    det = Detections(
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(scores, dtype=torch.float32),
        torch.tensor(labels, dtype=torch.int64),
    )
    return FramePrediction(frame, f"{frame:06d}.JPEG", det)


def as_set(r: FramePrediction) -> set[tuple]:
    """A frame's output as {(box, label, score rounded)} for order-free comparison."""
    d = r.detections
    return {
        (tuple(b), int(lab), round(float(s), 5))
        for b, lab, s in zip(d.boxes.tolist(), d.labels.tolist(), d.scores.tolist())
    }


def box_set(*items) -> set[tuple]:
    return {(tuple(float(x) for x in b), lab, round(s, 5)) for b, lab, s in items}


# --------------------------------------------------------------------------------------------------
# Hand-built tubes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rescore, expected", [("avg", 0.72), ("max", 0.95)])
def test_weak_box_on_strong_track_is_raised(rescore, expected):
    scores = [0.9, 0.8, 0.1, 0.85, 0.95]  # mean 0.72, max 0.95
    out = seq_nms([rec(t, [A], [s]) for t, s in enumerate(scores)], rescore=rescore)
    assert [r.detections.scores.tolist() for r in out] == [[pytest.approx(expected)]] * 5
    assert [r.frame for r in out] == list(range(5))
    assert all(r.detections.boxes.tolist() == [[0.0, 0.0, 99.0, 99.0]] for r in out)


def test_rescore_avg_and_max_hand_computed():
    records = [rec(t, [A], [s]) for t, s in enumerate([0.2, 0.5, 0.8])]
    assert float(seq_nms(records)[0].detections.scores[0]) == pytest.approx(0.5)
    assert float(seq_nms(records, rescore="max")[1].detections.scores[0]) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="rescore"):
        seq_nms(records, rescore="median")


def test_lone_false_positive_is_not_raised_and_other_classes_are_untouched():
    # Track A (class 1) in frames 0-3; a lone class-1 box far away in frame 1; a class-2 box exactly on
    # A in frame 2: other classes neither link to nor suppress A.
    records = [rec(t, [A], [0.6]) for t in range(4)]
    records[1] = rec(1, [A, FAR], [0.6, 0.3])
    records[2] = rec(2, [A, A], [0.6, 0.2], [1, 2])
    out = seq_nms(records)
    assert as_set(out[1]) == box_set((A, 1, 0.6), (FAR, 1, 0.3))
    assert as_set(out[2]) == box_set((A, 1, 0.6), (A, 2, 0.2))


def test_lone_box_overlapping_a_path_box_is_suppressed_even_if_stronger():
    # Frame 1 has an unlinked box on NEAR scoring 0.95 > A's 0.9: plain NMS would keep it and drop
    # A; Seq-NMS takes A's path first (sum 2.7) and deletes it.
    records = [rec(t, [A], [0.9]) for t in range(3)]
    records[1] = rec(1, [A, NEAR], [0.9, 0.95])
    out = seq_nms(records)
    assert as_set(out[1]) == box_set((A, 1, 0.9))


def test_strong_lone_box_is_a_path_while_links_remain():
    # A lone box scoring more than any linked path is taken first as a path of one box: its score
    # stays, its overlapping neighbour goes, and the weak track is still taken afterwards.
    records = [rec(0, [FAR, [540, 500, 639, 599], A], [0.95, 0.5, 0.3]), rec(1, [A], [0.2])]
    out = seq_nms(records)
    assert as_set(out[0]) == box_set((FAR, 1, 0.95), (A, 1, 0.25))
    assert as_set(out[1]) == box_set((A, 1, 0.25))


def test_two_overlapping_tracks_weaker_one_is_deleted():
    records = [rec(t, [A, NEAR], [0.9, 0.6]) for t in range(4)]
    out = seq_nms(records)
    assert all(as_set(r) == box_set((A, 1, 0.9)) for r in out)


def test_two_side_by_side_tracks_are_rescored_separately():
    a_scores, b_scores = [0.9, 0.5, 0.7], [0.4, 0.2, 0.3]
    records = [rec(t, [A, SIDE], [a, b]) for t, (a, b) in enumerate(zip(a_scores, b_scores))]
    out = seq_nms(records)
    assert all(as_set(r) == box_set((A, 1, 0.7), (SIDE, 1, 0.3)) for r in out)


def test_suppression_removes_links_of_deleted_boxes():
    # A (0.9) in frames 0-2; B on NEAR in frames 0-5. A's path deletes B in frames 0-2 together with
    # its links, so what is left of B (frames 3-5) is a path of its own with mean (0.2+0.4+0.6)/3.
    b_scores = [0.3, 0.3, 0.3, 0.2, 0.4, 0.6]
    records = [rec(t, [A, NEAR] if t < 3 else [NEAR], [0.9, s] if t < 3 else [s]) for t, s in enumerate(b_scores)]
    out = seq_nms(records)
    for t in range(3):
        assert as_set(out[t]) == box_set((A, 1, 0.9))
    for t in range(3, 6):
        assert as_set(out[t]) == box_set((NEAR, 1, 0.4))


def test_deletion_lowers_path_scores_downstream():
    # A (0.9, frames 0-3, sum 3.6) beats chain C (0.4, frames 0-7, sum 3.2) and deletes C0-C3, so
    # C4-C7 is worth 1.6 only: less than D (0.9 in frames 6-7, overlapping C there at IoU 0.43), which
    # must come next and delete C6-C7. Scoring C with its old 3.2 would take C first and delete D.
    C, D = NEAR, [40, 40, 139, 139]
    records = []
    for t in range(8):
        boxes, scores = [C], [0.4]
        if t < 4:
            boxes, scores = [A, C], [0.9, 0.4]
        if t >= 6:
            boxes, scores = [C, D], [0.4, 0.9]
        records.append(rec(t, boxes, scores))
    out = seq_nms(records)
    assert [as_set(r) for r in out] == (
        [box_set((A, 1, 0.9))] * 4 + [box_set((C, 1, 0.4))] * 2 + [box_set((D, 1, 0.9))] * 2
    )


def test_per_frame_nms_runs_after_the_linking():
    # Track A in frames 0-2 is the only path; frame 4's boxes have no links, so the loop stops and
    # leaves both; the final NMS at 0.3 then drops the one at IoU 0.43 and keeps the one at 0.25.
    records = [rec(t, [A], [0.5]) for t in range(3)]
    records.append(rec(3, [], []))
    records.append(rec(4, [FAR, [540, 500, 639, 599], [560, 500, 659, 599]], [0.5, 0.45, 0.4]))
    search = PathSearch(VideoBoxes(records))
    search.run()
    assert search.alive[4].tolist() == [True, True, True]  # untouched by Seq-NMS itself
    out = search.results(records)
    assert as_set(out[4]) == box_set((FAR, 1, 0.5), ([560, 500, 659, 599], 1, 0.4))
    assert as_set(out[3]) == set()
    # One frame: nothing links, only the NMS acts.
    single = seq_nms([rec(7, [A, NEAR, SIDE], [0.8, 0.7, 0.6])])
    assert as_set(single[0]) == box_set((A, 1, 0.8), (SIDE, 1, 0.6))


def test_low_scores_are_dropped_and_input_is_not_changed():
    records = [rec(t, [A, FAR], [0.5, 0.001]) for t in range(2)]
    before = [r.detections.scores.clone() for r in records]
    out = seq_nms(records)
    assert all(as_set(r) == box_set((A, 1, 0.5)) for r in out)
    assert all(torch.equal(r.detections.scores, b) for r, b in zip(records, before))
    assert seq_nms([]) == [] and blr([]) == []


def test_empty_frames_break_tracks():
    records = [rec(0, [A], [0.9]), rec(1, [], []), rec(2, [A], [0.1])]
    out = seq_nms(records)
    assert [r.detections.scores.tolist() for r in out] == [[pytest.approx(0.9)], [], [pytest.approx(0.1)]]


def test_pair_iou_is_box_iou_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    boxes = torch.rand(40, 4, generator=g) * 200
    boxes[:, 2:] = boxes[:, :2] + torch.rand(40, 2, generator=g) * 120 - 1  # some zero-size (+1) boxes
    b1 = plus_one(boxes)
    area = (b1[:, 2] - b1[:, 0]) * (b1[:, 3] - b1[:, 1])
    row, col = torch.meshgrid(torch.arange(40), torch.arange(40), indexing="ij")
    got = pair_iou(b1, area, row.flatten(), col.flatten()).view(40, 40)
    assert torch.equal(got.nan_to_num(-1), box_iou(b1, b1).nan_to_num(-1))
    # And the +1 shift gives the legacy IoU: 100 x 100 boxes shifted by 40 -> 60 / 140.
    legacy = plus_one(torch.tensor([A, NEAR], dtype=torch.float32))
    assert float(box_iou(legacy[:1], legacy[1:])) == pytest.approx(60 / 140)


def test_video_boxes_layout():
    records = [
        rec(0, [A, FAR, NEAR], [0.5, 0.7, 0.0001], [2, 1, 1]),
        rec(1, [], []),
        rec(2, [A, NEAR], [0.2, 0.3], [2, 2]),
    ]
    v = VideoBoxes(records)
    assert len(v) == 3 and v.num_classes == 3 and v.base == [0, 2, 2, 4]
    assert [k.tolist() for k in v.keep] == [[1, 0], [], [0, 1]]  # sorted by label, stable
    assert v.labels.tolist() == [1, 2, 2, 2]
    assert v.offsets == [[0, 0, 1, 2], [0, 0, 0, 0], [0, 0, 0, 2]]


# --------------------------------------------------------------------------------------------------
# BLR
# --------------------------------------------------------------------------------------------------

P, Q1, Q2 = A, [10, 0, 109, 99], [0, 12, 99, 111]  # IoU(P,Q1)=0.82 > IoU(P,Q2)=0.79; IoU(Q1,Q2)=0.66


def _blr_case():
    return [rec(0, [P], [0.6]), rec(1, [Q1, Q2], [0.7, 0.6])]


def test_blr_without_weights_follows_scores_and_iou():
    out = blr(_blr_case())
    # Link P-Q1 scores 0.6+0.7+0.82 > P-Q2's 0.6+0.6+0.79: path P-Q1, mean 0.65, Q2 deleted.
    assert as_set(out[0]) == box_set((P, 1, 0.65))
    assert as_set(out[1]) == box_set((Q1, 1, 0.65))


def test_blr_relation_weights_change_the_path():
    w = [torch.tensor([[0.0, 0.5]])]  # w(P, Q2) = 0.5 lifts P-Q2 above P-Q1
    for weights in (w, lambda t: w[t], [torch.stack([w[0], w[0]])]):  # list, function, with heads
        out = blr(_blr_case(), weights)
        assert as_set(out[0]) == box_set((P, 1, 0.6))
        assert as_set(out[1]) == box_set((Q2, 1, 0.6))
    assert apply_postprocess(_blr_case(), "blr", w)[1].detections.boxes.tolist() == [list(map(float, Q2))]


def test_blr_weights_follow_the_records_box_order():
    # A box at score <= 1e-3 leads frame 1: weights are indexed by the records' own order.
    records = [rec(0, [P], [0.6]), rec(1, [FAR, Q1, Q2], [0.0005, 0.7, 0.6])]
    out = blr(records, [torch.tensor([[9.0, 0.0, 0.5]])])
    assert as_set(out[1]) == box_set((Q2, 1, 0.6))
    with pytest.raises(ValueError, match="shape"):
        blr(records, [torch.zeros(1, 2)])
    with pytest.raises(ValueError, match="one entry per"):
        blr(records, [None, None])


def test_apply_postprocess_rejects_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        apply_postprocess(_blr_case(), "nms")
    with pytest.raises(ValueError, match="only used by method 'blr'"):
        apply_postprocess(_blr_case(), "seqnms", [None])


# --------------------------------------------------------------------------------------------------
# Oracles: FGFA's reference Seq-NMS (ported literally), and a BLR that redoes the whole DP per path
# --------------------------------------------------------------------------------------------------


def _iou_rows(box, boxes):
    x1, y1 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x2, y2 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.maximum(0.0, x2 - x1 + 1) * np.maximum(0.0, y2 - y1 + 1)
    area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    return inter / ((box[2] - box[0] + 1) * (box[3] - box[1] + 1) + area - inter)


def fgfa_seq_nms(dets):
    """FGFA's lib/nms/seq_nms.py (createLinks, maxPath, findMaxPath, deleteLink) for one class.

    ``dets``: per frame [n, 5] (x1, y1, x2, y2, score); returns per frame (kept indices, scores).
    """
    dets = [d.copy() for d in dets]
    F = len(dets)
    links = [[[k for k, o in enumerate(_iou_rows(b, dets[t + 1])) if o >= 0.5] for b in dets[t]] for t in range(F - 1)]
    delete_sets = [[] for _ in range(F)]
    delete_single_box = []
    sum_links = sum(len(x) for f in links for x in f)
    while True:
        max_boxes = max(len(d) for d in dets)
        if max_boxes == 0:
            break
        a = np.zeros((F, max_boxes))
        b = np.full((F, max_boxes), -1)
        used = np.zeros((F, max_boxes))
        for r, j in delete_single_box:
            used[r, j] = 1
        for t in range(F):
            for j in range(len(dets[t])):
                if used[t, j] == 0:
                    a[t, j] = dets[t][j][-1]
        for t in range(1, F):
            for k, nexts in enumerate(links[t - 1]):
                for j in nexts:
                    w = a[t - 1, k] + dets[t][j][-1]
                    if w > a[t, j]:
                        a[t, j], b[t, j] = w, k
        t, j = np.unravel_index(a.argmax(), a.shape)
        path, maxsum = [j], a[t, j]
        while b[t, j] != -1:
            path.append(b[t, j])
            j, t = b[t, j], t - 1
        root, path = t, path[::-1]
        if maxsum < 1e-2 or sum_links == 0:
            break
        if len(path) == 1:
            delete_single_box.append([root, path[0]])
        for i, j in enumerate(path):
            dets[root + i][j][4] = maxsum / len(path)
        delete_set = []
        for i, j in enumerate(path):
            t = root + i
            deletes = [k for k, o in enumerate(_iou_rows(dets[t][j], dets[t])) if o >= 0.3]
            delete_set.append(deletes)
            if t < len(links):
                for k in deletes:
                    sum_links -= len(links[t][k])
                    links[t][k] = []
            if t > 0:
                for prior in links[t - 1]:
                    for k in deletes:
                        if k in prior:
                            prior.remove(k)
                            sum_links -= 1
        for i, j in enumerate(path):
            delete_set[i].remove(j)
            delete_single_box.append([root + i, j])
            for k in delete_set[i]:
                dets[root + i][k] = np.zeros(5)
            delete_sets[root + i] += delete_set[i]
    return [(sorted(set(range(len(d))) - set(delete_sets[t])), d[:, 4]) for t, d in enumerate(dets)]


def naive_blr(dets, weights):
    """BLR with the whole DP redone after every path (no incremental tricks), for one class."""
    F = len(dets)
    scores = [d[:, 4].copy() for d in dets]
    alive = [np.ones(len(d), bool) for d in dets]
    iou = [np.array([_iou_rows(b, dets[t + 1]) for b in dets[t]]).reshape(len(dets[t]), len(dets[t + 1]))
           for t in range(F - 1)]
    links = [x >= 0.5 for x in iou]
    edges = [scores[t][:, None] + scores[t + 1][None, :] + iou[t] + weights[t] for t in range(F - 1)]
    while any(x.any() for x in links):
        a = [np.zeros(len(d)) for d in dets]
        b = [np.full(len(d), -1) for d in dets]
        for t in range(1, F):
            for j in range(len(dets[t])):
                for k in np.flatnonzero(links[t - 1][:, j]):
                    if a[t - 1][k] + edges[t - 1][k, j] > max(a[t][j], 0):
                        a[t][j], b[t][j] = a[t - 1][k] + edges[t - 1][k, j], k
        best = max((a[t][j], -t, -j) for t in range(F) for j in range(len(dets[t])))
        if best[0] < 1e-2:
            break
        t, j = -best[1], -best[2]
        path = [(t, j)]
        while b[t][j] >= 0:
            t, j = t - 1, b[t][j]
            path.append((t, j))
        new = np.mean([dets[t][j][4] for t, j in path])
        for t, j in path:
            dead = _iou_rows(dets[t][j], dets[t]) >= 0.3
            if t > 0:
                links[t - 1][:, dead] = False
            if t < F - 1:
                links[t][dead] = False
            alive[t][dead] = False
            alive[t][j] = True
            scores[t][j] = new
    return [(np.flatnonzero(alive[t]).tolist(), scores[t]) for t in range(F)]


def random_video(seed: int, frames: int = 16, classes: int = 2):
    """Moving objects with clouds of jittered boxes, clutter and a few scores below 1e-3."""
    g = np.random.default_rng(seed)
    objects = [(g.uniform(0, 200, 2), g.uniform(-8, 8, 2), g.uniform(40, 90, 2)) for _ in range(4)]
    records = []
    for t in range(frames):
        boxes, labels = [], []
        for pos, vel, size in objects:
            for _ in range(g.integers(0, 6)):
                c = pos + vel * t + g.normal(0, 10, 2)
                wh = size * g.uniform(0.85, 1.15, 2)
                boxes.append([*(c - wh / 2), *(c + wh / 2)])
                labels.append(int(g.integers(1, classes + 1)))
        for _ in range(g.integers(0, 3)):
            c, wh = g.uniform(0, 300, 2), g.uniform(20, 80, 2)
            boxes.append([*(c - wh / 2), *(c + wh / 2)])
            labels.append(int(g.integers(1, classes + 1)))
        scores = g.uniform(0.002, 1.0, len(boxes))
        scores[g.uniform(size=len(boxes)) < 0.1] = 0.0005
        records.append(rec(t, boxes, scores.tolist(), labels))
    return records


def _per_class_input(records, label):
    """One class's boxes above 1e-3 as the oracles take them, with their indices in the records."""
    dets, index = [], []
    for r in records:
        d = r.detections
        m = ((d.labels == label) & (d.scores > 1e-3)).nonzero().flatten()
        dets.append(torch.cat([d.boxes[m], d.scores[m, None]], 1).double().numpy())
        index.append(m.tolist())
    return dets, index


def _compare(search, records, oracle, label):
    dets, index = _per_class_input(records, label)
    for t, (kept, scores) in enumerate(oracle(dets)):
        v = search.v
        ours = {
            int(v.keep[t][i]): float(search.out_scores[t][i])
            for i in np.flatnonzero(search.alive[t]) if int(v.labels[v.base[t] + i]) == label
        }
        theirs = {index[t][k]: float(scores[k]) for k in kept}
        assert ours.keys() == theirs.keys(), f"frame {t} class {label}"
        for k in ours:
            assert ours[k] == pytest.approx(theirs[k], abs=1e-5), f"frame {t} box {k}"


@pytest.mark.parametrize("seed", range(12))
def test_seq_nms_matches_fgfa_reference(seed, monkeypatch):
    if seed % 2:  # links are computed for chunks of frames: cross chunk borders too
        monkeypatch.setattr(seqnms_module, "_CHUNK_PAIRS", 150)
    records = random_video(seed)
    search = PathSearch(VideoBoxes(records))
    search.run()
    for label in (1, 2):
        _compare(search, records, fgfa_seq_nms, label)


@pytest.mark.parametrize("seed", range(8))
def test_blr_matches_full_recomputation(seed):
    records = random_video(100 + seed)
    g = torch.Generator().manual_seed(seed)
    low = -1.2 if seed % 2 else 0.0  # negative weights make some links worth less than nothing
    weights = [low + (0.5 - low) * torch.rand(len(a.detections), len(b.detections), generator=g)
               for a, b in zip(records[:-1], records[1:])]
    video = VideoBoxes(records)

    def link_scores(t, row, col, iou):
        s, base, keep = video.scores, video.base, video.keep
        return s[base[t] + row] + s[base[t + 1] + col] + iou + weights[t][keep[t][row], keep[t + 1][col]]

    search = PathSearch(video, node_scores=False, edge_fn=link_scores)
    search.run()
    for label in (1, 2):
        dets, index = _per_class_input(records, label)
        w = [weights[t][index[t]][:, index[t + 1]].double().numpy() for t in range(len(records) - 1)]
        _compare(search, records, lambda d: naive_blr(d, w), label)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _write_pred(path):
    videos = [
        VideoPredictions("val/a", 640, 480, random_video(1, frames=6)),
        VideoPredictions("val/b", 320, 240, [rec(t, [A, NEAR], [0.9, 0.6]) for t in range(3)]),
    ]
    write_predictions(path, videos)
    return read_predictions(path)


@pytest.mark.parametrize("method", ["seqnms", "blr"])
def test_cli_round_trip(tmp_path, method):
    videos = _write_pred(tmp_path / "pred.json")
    rc = cli_main(["postprocess", "--method", method, str(tmp_path / "pred.json"), str(tmp_path / "out.json")])
    assert rc == 0
    got = read_predictions(tmp_path / "out.json")
    assert [(v.video, v.width, v.height) for v in got] == [("val/a", 640, 480), ("val/b", 320, 240)]
    for v, g in zip(videos, got):
        want = apply_postprocess(v.frames, method)
        assert [f.frame for f in g.frames] == [f.frame for f in want]
        for a, b in zip(g.frames, want):
            assert a.file == b.file
            assert torch.equal(a.detections.boxes, b.detections.boxes)
            assert torch.equal(a.detections.scores, b.detections.scores)
            assert torch.equal(a.detections.labels, b.detections.labels)
    assert all(len(f.detections) == 1 for f in got[1].frames)
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temp file


def test_cli_malformed_prediction_file(tmp_path, capsys):
    _write_pred(tmp_path / "pred.json")
    doc = json.loads((tmp_path / "pred.json").read_text())
    doc["videos"][1]["frames"][0]["labels"][0] = 31
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    rc = cli_main(["postprocess", "--method", "seqnms", str(tmp_path / "bad.json"), str(tmp_path / "out.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and err[0].startswith("megavod postprocess: error:")
    assert "bad.json" in err[0] and "label 31" in err[0]
    assert not (tmp_path / "out.json").exists()
