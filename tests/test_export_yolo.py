"""YOLOX and YOLOV exported to ONNX (megavod/export/yolo_graphs.py): ONNX Runtime gives PyTorch's
detections offline (chunks of 6 and a tail chunk of 2, which gives the base output) and online; the graph
modules run in PyTorch through the runtime's adapters give the detector's detections exactly (its chunk
cache and base-output rule); ``test_conf`` is a graph input (an override is honoured), the NMS thresholds
and the network are constants (an override is refused).

A small network (width 0.125, 64 px letterbox, 3 classes so that the class-aware NMS meets boxes of one
class) with random weights, its BatchNorm statistics set from the clip (unit-scale activations) and its
biases moved so that the scores straddle the 0.001 threshold and boxes overlap; 50 anchors before the
selection's NMS (of 84), so the top-k is exercised too.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import box_iou

import megavod
from megavod.config import load_config
from megavod.errors import ConfigError
from megavod.export.exporter import export_onnx
from megavod.export.runtime import load_onnx_detector, torch_graph_detector
from megavod.methods import build_detector
from error_budget import typical_chain
from yolo_clips import moving_square

PRESETS = {"yolox": "yolox_s_vid", "yolov": "yolov_s"}
SIZE = 64  # the letterbox side; the export traces 128 x 192 frames, so the graphs' sizes are dynamic
FRAMES = 14  # offline: chunks of 6, 6 and 2 (permutation_chunks(14, 6, 41))
# Small tensors: one intra-op thread (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def small_config(method: str, *extra: str):
    s = method
    more = ["yolov.gframe=6", "yolov.pre_top=50"] if method == "yolov" else []
    return load_config(PRESETS[method], [f"{s}.width=0.125", f"{s}.num_classes=3", f"input.letterbox={SIZE}",
                                         *more, *extra])


def video(n: int = FRAMES, seed: int = 0) -> list[np.ndarray]:
    return moving_square(n, seed)


def calibrated(cfg, frames: list[np.ndarray]) -> nn.Module:
    """A random model with unit-scale activations: every BatchNorm's statistics those of the clip (one
    training-mode pass with a cumulative average), then the biases moved so that about half the scores pass
    0.001: objectness 0 (~0.5), classes -6.2, ``linear_pred`` -6.4 (its weights x 5: logits spread by ~0.35);
    box sizes x e^1.5 (neighbouring boxes overlap)."""
    torch.manual_seed(0)
    model = build_detector(cfg).eval()
    images = torch.stack([megavod.Detector(model, cfg, device="cpu").prepare(f)[0] for f in frames])
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        model.predictions(images)
        model.eval()
        for conv in model.head.obj_preds:
            conv.bias.fill_(0.0)
        for conv in model.head.cls_preds:
            conv.bias.fill_(-6.2)
        for conv in model.head.reg_preds:
            conv.bias[2:].add_(1.5)
        if hasattr(model.head, "linear_pred"):
            model.head.linear_pred.weight.mul_(5.0)
            model.head.linear_pred.bias.fill_(-6.4)
    for bn in norms:
        bn.momentum = 0.03
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    made = {}

    def get(method):
        if method not in made:
            cfg = small_config(method)
            model = calibrated(cfg, video())
            out = tmp_path_factory.mktemp(method) / "export"
            export_onnx(model, cfg, out)
            made[method] = (cfg, model, out)
        return made[method]

    return get


# Float32 budget, PyTorch vs ONNX Runtime (tests/error_budget.py). The chain to the head's outputs: every
# convolution of the network (89, sum of reductions 1.37e4: an over-count, the branches do not all chain),
# both sides erring, typical sqrt(2 x 1.37e4) u ~ 1e-5 of the operands' magnitude; the operands' sum |w x| is
# up to ~4x the unit-scale output (default init, 3x3 convolutions); x 16 (the largest of ~1e4 values, other
# CPUs' kernels): DELTA ~ 6e-4 on the head's logits. Realised on this AVX2 machine: ~4e-5.
CONV_REDUCTIONS = 13700
DELTA = typical_chain([CONV_REDUCTIONS], magnitude=4.0, sides=2, margin=16)
# A box corner is (t_xy + grid) s -+ exp(t_wh) s / 2: off by DELTA (s + w / 2) in input pixels (s <= 32).
# Scores obj x class: both sigmoids' relative errors <= DELTA, so |ds| <= 2 DELTA s. YOLOV's refined score
# reads the aggregation, whose affinity is 25 cos(q, k) (scale 25): its softmax weights move by up to
# 2 x 25 DELTA relative, so the refined logits by ~50 DELTA of their operands: |ds| <= 2 x 50 DELTA s.
# Realised on this AVX2 machine (ATen avx2 and default): boxes within 0.1 of their tolerance, scores within
# 9e-5 relative, refined ones included.
REFINED_GAIN = 50
# An IoU of boxes whose corners move by DELTA (s + w / 2) moves by ~4 x that relative to the side: 4 x 3 DELTA
# for the smallest boxes here (w ~ s); x ~1.5: IOU_TOL ~ 0.01.
IOU_TOL = 16 * DELTA


def box_tolerance(boxes: torch.Tensor, ratio: float) -> torch.Tensor:
    """Per detection [N], the frame's pixels: DELTA (s + w / 2) <= DELTA (32 + max side) in input pixels, / r."""
    side = (boxes[:, 2:] - boxes[:, :2]).abs().max(dim=1).values
    return DELTA * (32 / ratio + side)


def _at_a_cut(dets, i: int, test_conf: float, nms_thresh: float, score_tol: float) -> bool:
    """Detection ``i`` of ``dets`` sits at one of the post-processing's hard cuts, where float noise may keep
    or drop it: its score at the threshold, or its IoU with a detection of its class at the NMS threshold
    (the other side's NMS may have suppressed it, or kept one that it suppressed here)."""
    if abs(float(dets.scores[i]) - test_conf) <= score_tol:
        return True
    same = torch.nonzero(dets.labels == dets.labels[i]).flatten()
    iou = box_iou(dets.boxes[i:i + 1], dets.boxes[same[same != i]])
    return bool(((iou - nms_thresh).abs() <= IOU_TOL).any())


def assert_same_detections(expected, got, test_conf: float, score_gain: float, ratio: float,
                           nms_thresh: float = 0.5) -> int:
    """Per frame a one-to-one match (same label, boxes and scores within the budget); scores that tie within
    float noise may come out in swapped order, so each detection is matched to an equal one, not compared by
    position. One without a match must sit at a hard cut (:func:`_at_a_cut`). Returns the number matched."""
    assert [k for k, _ in expected] == [k for k, _ in got]
    matched = 0
    for (k, a), (_, b) in zip(expected, got):
        free = torch.ones(len(b), dtype=torch.bool)
        box_tol, score_tol = box_tolerance(a.boxes, ratio), 2 * score_gain * DELTA * a.scores
        for i in range(len(a)):
            ok = (free & (b.labels == a.labels[i]) & ((b.boxes - a.boxes[i]).abs().max(dim=1).values <= box_tol[i])
                  & ((b.scores - a.scores[i]).abs() <= score_tol[i]))
            if not ok.any():
                assert _at_a_cut(a, i, test_conf, nms_thresh, float(score_tol[i])), \
                    f"frame {k}: detection {i} ({int(a.labels[i])}, {float(a.scores[i]):.6f}) has no equal"
                continue
            free[int(torch.nonzero(ok)[0])] = False
            matched += 1
        for j in torch.nonzero(free).flatten().tolist():
            tol = 2 * score_gain * DELTA * float(b.scores[j])
            assert _at_a_cut(b, j, test_conf, nms_thresh, tol), f"frame {k}: ONNX Runtime's detection {j} has no equal"
    return matched


def stream(detector, cfg, frames, mode):
    """(frame, detections) of the frames through ``megavod.Detector`` (the letterbox, the engine)."""
    results = megavod.Detector(detector, cfg, device="cpu").stream(frames, mode=mode)
    return [(k, r.detections) for k, r in enumerate(results)]


def same_exactly(expected, got) -> None:
    for (k, a), (j, b) in zip(expected, got, strict=True):
        assert k == j and torch.equal(a.labels, b.labels) and torch.equal(a.boxes, b.boxes), k
        assert torch.equal(a.scores, b.scores), k


@pytest.mark.parametrize("mode", ["offline", "online"])
@pytest.mark.parametrize("method", ["yolox", "yolov"])
def test_onnxruntime_equals_pytorch(exported, method, mode):
    cfg, model, out = exported(method)
    detector, ort_cfg = load_onnx_detector(out, "cpu", threads=1)
    calls = []
    if method == "yolov":
        aggregate = detector.run_extra["aggregate"]
        detector.run_extra["aggregate"] = lambda feeds: calls.append(len(feeds["proposal_boxes"])) or aggregate(feeds)
    frames = video()
    expected = stream(model, cfg, frames, mode)
    got = stream(detector, ort_cfg, frames, mode)
    # Graph modules in PyTorch behind the same adapters: the detector's numbers exactly (same kernels).
    same_exactly(expected, stream(torch_graph_detector(model, cfg), cfg, frames, mode))
    conf = cfg.section.test_conf
    gain = REFINED_GAIN if method == "yolov" else 1
    matched = assert_same_detections(expected, got, conf, gain, min(SIZE / 48, SIZE / 80))
    total = sum(len(d) for _, d in expected)
    # The thresholds are exercised: every frame has detections, and some anchors fall under 0.001.
    assert all(len(d) for _, d in expected) and matched >= 0.98 * total and total >= 20 * FRAMES, (matched, total)
    if method == "yolov" and mode == "offline":
        assert calls == [sum(len(p) for p in chunk) for chunk in _chunk_rows(model, cfg, frames)], calls
    print(f"{method} {mode}: {matched} of {total} detections matched")


def _chunk_rows(model, cfg, frames):
    """Each chunk's proposals, in the order the offline stream aggregates them: chunks of 6, 6, then 2 (the
    tail chunk's base output is ONNX's too; its aggregation, unused, happens once as well)."""
    from megavod.inference.schedules import permutation_chunks

    detector = megavod.Detector(model, cfg, device="cpu")
    passes = []
    for k, frame in enumerate(frames):
        image, size = detector.prepare(frame)
        passes.append(model.frame_features(image, k, size))
    chunks = permutation_chunks(len(frames), cfg.yolov.gframe, cfg.yolov.shuffle_seed)
    assert [len(c) for c in chunks] == [6, 6, 2]
    order = sorted(chunks, key=min)  # the stream reaches a chunk at its first frame
    return [[passes[t] for t in chunk] for chunk in order]


def test_interleaved_streams_on_onnxruntime_are_each_alone(exported):
    """Two videos through one ONNX Runtime detector (``stream_many``, each stream its own ChunkLogits) give
    each video's detections alone, exactly (the same graphs on the same rows)."""
    cfg, _, out = exported("yolov")
    detector = megavod.Detector(*load_onnx_detector(out, "cpu", threads=1), device="cpu")
    a, b = video(9, seed=1), video(13, seed=2)
    together: dict[int, list] = {}
    for i, result in detector.stream_many([a, b], mode="offline"):
        together.setdefault(i, []).append((result.frame, result.detections))
    for i, frames in enumerate((a, b)):
        alone = [(r.frame, r.detections) for r in detector.stream(frames, mode="offline")]
        same_exactly(alone, together[i])


def test_test_conf_is_an_input_and_the_network_a_constant(exported):
    """An override of ``test_conf`` is honoured (a graph input: the detections of a model built with it);
    one of a value the graphs hold (the NMS threshold, the selection, the width) is refused in one line."""
    cfg, model, out = exported("yolov")
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["graphs"]) == ["aggregate", "frame", "key"]
    assert "test_conf" in [i["name"] for i in manifest["graphs"]["key"]["inputs"]]
    detector, ort_cfg = load_onnx_detector(out, "cpu", threads=1, overrides=["yolov.test_conf=0.0015"])
    frames = video(8)
    model.test_conf = 0.0015
    try:
        expected = stream(model, cfg, frames, "offline")
    finally:
        model.test_conf = cfg.yolov.test_conf
    got = stream(detector, ort_cfg, frames, "offline")
    assert min(float(d.scores.min()) for _, d in expected if len(d)) >= 0.0015
    assert assert_same_detections(expected, got, 0.0015, REFINED_GAIN, min(SIZE / 48, SIZE / 80)) > 0
    for key in ("yolov.nms_thresh=0.6", "yolov.pre_nms_thresh=0.7", "yolov.proposals=20", "yolov.width=0.25"):
        with pytest.raises(ConfigError, match=f"'{key.split('=')[0]}'"):
            load_onnx_detector(out, "cpu", overrides=[key])
    # Nothing passes: every graph meets zero rows after its threshold (ONNX Runtime's empty NonZero / NMS).
    for method in ("yolox", "yolov"):
        cfg, _, out = exported(method)
        detector, ort_cfg = load_onnx_detector(out, "cpu", threads=1, overrides=[f"{method}.test_conf=0.9"])
        assert all(len(d) == 0 for _, d in stream(detector, ort_cfg, frames[:6], "offline"))
    # The schedule is the runtime's: an override of it is honoured.
    assert load_onnx_detector(out, "cpu", overrides=["yolov.gframe=4"])[1].yolov.gframe == 4


def test_cli_export_and_detect_on_onnxruntime(tmp_path):
    """``megavod export`` of the YOLOV preset (its small form) and ``megavod detect --backend onnxruntime`` on
    a folder of frames: the export's three graphs, one prediction per frame."""
    import cv2

    from megavod.apps.cli import main as cli_main
    from megavod.data.predictions import read_predictions

    small = ["yolov.width=0.125", f"input.letterbox={SIZE}", "yolov.gframe=6"]
    assert cli_main(["export", str(tmp_path / "onnx"), "--config", "yolov_s", *small]) == 0
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert manifest["method"] == "yolov" and sorted(manifest["graphs"]) == ["aggregate", "frame", "key"]
    clip = tmp_path / "clip"
    clip.mkdir()
    for k, frame in enumerate(video(7)):
        cv2.imwrite(str(clip / f"{k:06d}.png"), frame)
    assert cli_main(["detect", str(clip), "--weights", str(tmp_path / "onnx"), "--backend", "onnxruntime",
                     "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    (prediction,) = read_predictions(next((tmp_path / "out").glob("*.json")))
    assert [r.frame for r in prediction.frames] == list(range(7))
