"""YOLOX and YOLOV as megavod detectors: the protocol's chunks end to end through the streaming engine.

A small YOLOV (width 0.125, 64 px letterbox) with random weights; the objectness biases are raised so that
scores straddle the 0.001 threshold instead of all falling under it (docs/yolov.md).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import megavod
from megavod.inference.engine import OnlineStream
from megavod.config import load_config
from megavod.errors import ConfigError
from megavod.inference.schedules import permutation_chunks
from megavod.methods import build_detector
from megavod.models.contract import KeyFrameInputs
from megavod.models.yolov import YOLOVDetector
from megavod.models.yolov_head import base_detections, refined_detections
from megavod.models.yolox import yolox_detections
from yolo_clips import moving_square

SMALL = ["yolov.width=0.125", "input.letterbox=64", "yolov.gframe=6"]


def small_detector(preset: str, *overrides: str) -> megavod.Detector:
    """``preset`` with random weights (seed 0), objectness biases at 0 so scores straddle 0.001."""
    cfg = load_config(preset, list(overrides))
    torch.manual_seed(0)
    model = build_detector(cfg)
    with torch.no_grad():
        for conv in model.head.obj_preds:
            conv.bias.fill_(0.0)
    return megavod.Detector(model, cfg, device="cpu")


def small_yolov(*overrides: str) -> megavod.Detector:
    return small_detector("yolov_s", *SMALL, *overrides)


def video(n: int, seed: int = 0) -> list[np.ndarray]:
    return moving_square(n, seed)


def passes(detector: megavod.Detector, frames: list[np.ndarray]):
    """Every frame's per-frame pass (its proposals)."""
    out = []
    for i, frame in enumerate(frames):
        image, size = detector.prepare(frame)
        out.append(detector.model.frame_features(image, i, size))
    return out


def assert_same(a, b) -> None:
    assert torch.equal(a.labels, b.labels)
    assert torch.allclose(a.boxes, b.boxes, atol=1e-4) and torch.allclose(a.scores, b.scores, rtol=1e-5, atol=1e-7)


def test_offline_stream_is_the_protocol():
    """Each frame's detections = the authors' head on its chunk (the chunk's frames in the permutation's
    order, a batch), its own rows taken out; the tail chunk of 2 frames gives the base detector's output."""
    detector = small_yolov()
    model: YOLOVDetector = detector.model
    frames = video(14)
    results = list(detector.stream(frames, mode="offline"))
    chunks = permutation_chunks(14, 6, 41)
    assert [len(c) for c in chunks] == [6, 6, 2]
    fp = passes(detector, frames)
    ratio = min(64 / 48, 64 / 80)
    for chunk in chunks:
        rows = [fp[t] for t in chunk]
        logits = model.chunk_logits(rows)  # every row of the chunk at once
        offsets = np.cumsum([0] + [len(r) for r in rows])
        for i, t in enumerate(chunk):
            f = fp[t]
            if len(chunk) <= 4:
                expected = base_detections(f.boxes, f.objectness, f.class_scores)
            else:
                expected = refined_detections(f.boxes, f.objectness, logits[offsets[i]:offsets[i + 1], :-1])
            assert len(expected) > 0
            assert_same(results[t].detections, expected.scale(1 / ratio, 1 / ratio))


def test_a_frame_keeps_its_chunk_result_however_it_is_stepped():
    """Row separability: the key's rows alone (no cache) = the chunk's rows from the cache; two videos
    interleaved through one model = each alone (exactly, with the per-frame passes unbatched)."""
    detector = small_yolov()
    model = detector.model
    frames = passes(detector, video(6))
    cache = model.new_stream_cache()
    for k in (3, 0, 5):
        cached = model.detect_key(KeyFrameInputs(frames[k], frames, k), cache).detections
        alone = model.detect_key(KeyFrameInputs(frames[k], frames, k), None).detections
        assert_same(cached, alone)
    a, b = video(9, seed=1), video(13, seed=2)
    together = {}
    for i, result in detector.stream_many([a, b], mode="offline", batch_frames=False):
        together.setdefault(i, []).append(result.detections)
    for i, frames_i in enumerate((a, b)):
        for alone, interleaved in zip(detector.stream(frames_i, mode="offline"), together[i]):
            assert_same(alone.detections, interleaved)


def test_online_equals_offline_where_the_window_is_the_chunk():
    """A video no longer than a chunk is one chunk offline; online, its last frame's window is the whole
    video, in arrival order. The aggregation does not depend on the order of the frames, so the last
    frame's refined logits are the offline ones up to float rounding (the sums run in another order)."""
    detector = small_yolov()
    model = detector.model
    frames = passes(detector, video(6))
    (chunk,) = permutation_chunks(6, 6, 41)
    offline = model.chunk_logits([frames[t] for t in chunk])
    start = sum(len(frames[t]) for t in chunk[:chunk.index(5)])
    online = model.chunk_logits(frames)[-len(frames[5]):]
    assert torch.allclose(online, offline[start:start + len(frames[5])], rtol=1e-4, atol=1e-5)
    plan = detector.schedule.online_planner()
    assert [plan.plan(k).local for k in range(6)][-1] == tuple(range(6))


def test_online_cache_stays_bounded():
    detector = small_yolov()
    model = detector.model
    stream = OnlineStream(model, detector.schedule)
    for k, frame in enumerate(video(20)):
        image, size = detector.prepare(frame)
        stream.step(model.frame_features(image, k, size))
        assert len(stream.state.cache.chunks) <= 1 and len(stream.state.held) <= 6


@pytest.mark.parametrize("below, expect_base", [(4, True), (0, False)])
def test_small_chunks_give_the_base_output(below, expect_base):
    detector = small_yolov(f"yolov.base_below={below}")
    model = detector.model
    frames = passes(detector, video(3))
    got = model.detect_key(KeyFrameInputs(frames[1], frames, 1), model.new_stream_cache()).detections
    f = frames[1]
    base = base_detections(f.boxes, f.objectness, f.class_scores)
    ratio = min(64 / 48, 64 / 80)
    if expect_base:
        assert_same(got, base.scale(1 / ratio, 1 / ratio))
    else:
        assert len(got) != len(base)  # refined: one row per (proposal, class) passing, not per proposal
    # a single frame is its own chunk: always the base output (their head's postprocess_single_img)
    single = model.detect_key(KeyFrameInputs(frames[1], [frames[1]], 0), None).detections
    assert_same(single, base.scale(1 / ratio, 1 / ratio))


def test_yolox_single_frame_detector_maps_boxes_to_the_frame():
    detector = small_detector("yolox_s_vid", "yolox.width=0.125", "input.letterbox=64")
    model = detector.model
    frame = video(1)[0]
    (result,) = detector.stream([frame])
    image, size = detector.prepare(frame)
    p = model.predictions(image[None])[0]
    ratio = min(64 / 48, 64 / 80)
    expected = yolox_detections(p.boxes[0], p.objectness[0], p.class_scores[0], 0.001, 0.5)
    assert len(expected) > 0
    assert_same(result.detections, expected.scale(1 / ratio, 1 / ratio))


# -- the authors' online YOLOV (the yolov_online row) -------------------------------------------------------


def test_online_row_is_the_bank_protocol_in_both_modes():
    """yolov_online: frame k against the bank of frames 0..k-1 (megavod/models/yolov_online.py), the base
    output while the bank holds fewer than 2 frames; causal, so offline = online; the bank is the stream's."""
    from megavod.models.yolov_online import OnlineBank, online_key_logits

    detector = small_detector("yolov_s_online", "yolov_online.width=0.125", "input.letterbox=64")
    model = detector.model
    frames = video(5)
    offline = [r.detections for r in detector.stream(frames, mode="offline")]
    online = [r.detections for r in detector.stream(frames, mode="online")]
    bank = OnlineBank()
    ratio = min(64 / 48, 64 / 80)
    for k, f in enumerate(passes(detector, frames)):
        step = online_key_logits(model.aggregation, model.head.linear_pred, f, bank)
        if k < 2:
            assert step is None
            expected = base_detections(f.boxes, f.objectness, f.class_scores)
        else:
            expected = refined_detections(f.boxes, f.objectness, step.logits)
        bank.push(f, None if step is None else step.features)
        assert_same(offline[k], expected.scale(1 / ratio, 1 / ratio))
        assert_same(online[k], offline[k])
    assert len(offline[3]) > 0
    with pytest.raises(ConfigError, match="yolov_online.affinity"):
        load_config("yolov_s_online", ["yolov_online.affinity=2023"])


@pytest.mark.cuda
def test_cuda_runs_in_half_precision_as_the_authors():
    """On CUDA the Detector casts YOLOV to float16 (their Predictor's model.half()); its detections stay
    those of float32 on the CPU to float16's rounding (boxes within 0.5 px of these 48 x 80 frames, the same
    labels for the best detections)."""
    cpu = small_yolov()
    model = build_detector(load_config("yolov_s", SMALL))
    model.load_state_dict(cpu.model.state_dict())
    gpu = megavod.Detector(model, cpu.cfg, device="cuda")
    assert next(gpu.model.parameters()).dtype == torch.float16
    frames = video(14)
    for a, b in zip(cpu.stream(frames), gpu.stream(frames)):
        top_a, top_b = a.detections[:5], b.detections[:5].to("cpu")
        assert torch.equal(top_a.labels, top_b.labels)
        assert torch.allclose(top_a.boxes, top_b.boxes, atol=0.5)
        assert torch.allclose(top_a.scores, top_b.scores, rtol=2e-2, atol=1e-4)
