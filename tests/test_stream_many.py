"""Many streams through one model (Detector.stream_many, docs/architecture.md#many-streams): each stream
gets what it gets alone, for every method and both modes, with streams of unequal length and size."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import megavod
from megavod.errors import MegavodError, StreamError
from megavod.inference.engine import FrameRequest, frame_passes
from megavod.methods import build_detector
from megavod.models.contract import KeyFrameInputs

from megavod.checkpoint_files import read_weights
from megavod.data.synthetic_render import make_scene, render_frame

# The shipped synthetic_mega weights: every method is built from their config and takes the trained
# backbone, RPN and box head (and MEGA's relation modules), so that detections are well separated. With
# random weights, float rounding of a batched convolution (below) can swap near-tied proposals and the
# top-ratio or top-100 selections downstream; with trained ones it moves boxes by ~1e-4 px.
WEIGHTS = Path(megavod.__file__).parent / "weights"
WINDOWS = ["mega.T_l=5", "mega.T_g=3", "mega.T_m=3"]
CONFIGS = {
    "single": ["method=single"],
    "dff": ["method=dff", "dff.key_interval=3"],
    "fgfa": ["method=fgfa", "fgfa.min_offset=-1", "fgfa.max_offset=1"],
    "rdn": ["method=rdn", "rdn.min_offset=-2", "rdn.max_offset=2"],
    "base": [*WINDOWS, "mega.memory=false", "mega.N_g=0"],
    "mega": WINDOWS,
}
# Error budget of batched vs alone: float rounding of a batched convolution, not a modelling difference.
# A batched call sums the same products in another order (CPU kernels block the batch differently), so a
# layer's outputs differ in rounding: for a float32 dot product of K terms, of the order of sqrt(K) ulps of
# the output's magnitude (K <= 256 x 3 x 3 = 2304 here: sqrt(K) ~ 48), and over D layers these add up as
# a random walk, ~ sqrt(D). Limits are relative to the largest magnitude of what is compared, with a
# safety factor of 4: 4 x 48 ulps x sqrt(D).
EPS = torch.finfo(torch.float32).eps


def rounding_limit(depth: int) -> float:
    """Relative limit (to the compared tensor's max abs) for a float32 stack of ``depth`` layers."""
    return 4 * 48 * EPS * math.sqrt(depth)


# The per-frame pass of the synthetic backbone: stem conv, 1 + 1 + 2 bottlenecks of 3 convs to C4 (13),
# RPN conv and heads (2), res5's bottleneck (3), fc6 (1): depth 19, limit 1.0e-4 (measured: <= 11 ulps,
# 1.4e-6, on every method's C4, embedding, proposals and RoI features).
FEATURE_LIMIT = rounding_limit(19)
# Detections: the per-frame pass, then the key-frame step (the relation methods' 4 relation modules of ~3
# layers and the fcs between, fc7, the predictor): depth <= 40, limit 1.45e-4; boxes in pixels of frames
# at most 128 px wide, scores in [0, 1]. What `pytest tests/test_stream_many.py -s -k batched_equal` prints
# per method and mode: docs/architecture.md#many-streams.
DETECTION_LIMIT = rounding_limit(40)
BOX_TOL, SCORE_TOL = DETECTION_LIMIT * 128, DETECTION_LIMIT


def _clip(seed: int, n: int, width: int = 128, height: int = 96) -> list[np.ndarray]:
    scene = make_scene(np.random.default_rng([seed, 7, 0]), n, width, height, motion="medium")
    return [render_frame(scene, t) for t in range(n)]


@pytest.fixture(scope="module")
def trained_state():
    return read_weights(WEIGHTS / "synthetic_mega.safetensors").state_dict


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def detector(request, trained_state):
    cfg = megavod.load_config(str(WEIGHTS / "synthetic_mega.yaml"), CONFIGS[request.param])
    torch.manual_seed(0)
    model = build_detector(cfg).eval()
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in trained_state.items() if k in own and own[k].shape == v.shape},
                          strict=False)
    detector = megavod.Detector(model, cfg, "cpu")
    detector.case = request.param  # for the printed figures (base is cfg.method "mega" too)
    return detector


def _results(pairs) -> list[list[tuple]]:
    out: dict[int, list[tuple]] = {}
    for i, r in pairs:
        out.setdefault(i, []).append((r.frame, r.boxes, r.scores, r.labels))
    return [out[i] for i in sorted(out)]


CLIPS = [_clip(1, 6), _clip(2, 4), _clip(3, 5, 112, 80), _clip(4, 2)]  # unequal lengths, two sizes
_alone_cache: dict[tuple[str, str], list[list[tuple]]] = {}


def _alone(detector, mode) -> list[list[tuple]]:
    """Each clip through :meth:`Detector.stream` on its own (computed once per detector and mode)."""
    key = (repr(detector) + str(id(detector)), mode)
    if key not in _alone_cache:
        _alone_cache[key] = [_results((0, r) for r in detector.stream(clip, mode))[0] for clip in CLIPS]
    return _alone_cache[key]


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_many_streams_unbatched_give_exactly_what_each_gives_alone(detector, mode):
    alone = _alone(detector, mode)
    assert any(len(boxes) for _, boxes, _, _ in alone[0])  # the comparison is not of empty lists
    together = _results(detector.stream_many(CLIPS, mode, batch_frames=False))
    for a, t in zip(alone, together, strict=True):
        assert [k for k, *_ in a] == [k for k, *_ in t] == list(range(len(a)))
        for (_, ba, sa, la), (_, bt, st, lt) in zip(a, t):
            assert torch.equal(ba, bt) and torch.equal(sa, st) and torch.equal(la, lt)


def _unmatched(a: tuple, b: tuple) -> tuple[list[int], float, float]:
    """Detections of frame result ``a`` with no detection in ``b`` of the same label within BOX_TOL px
    and SCORE_TOL in score (each used once; order does not matter: two detections whose scores are
    within rounding of each other may come out in either order), and the largest box and score
    differences of the matched pairs."""
    (_, boxes_a, scores_a, labels_a), (_, boxes_b, scores_b, labels_b) = a, b
    free = list(range(len(boxes_b)))
    missing, worst_box, worst_score = [], 0.0, 0.0
    for i in range(len(boxes_a)):
        match = next((j for j in free if labels_b[j] == labels_a[i]
                      and abs(float(scores_b[j] - scores_a[i])) <= SCORE_TOL
                      and float((boxes_b[j] - boxes_a[i]).abs().max()) <= BOX_TOL), None)
        if match is None:
            missing.append(i)
        else:
            free.remove(match)
            worst_box = max(worst_box, float((boxes_b[match] - boxes_a[i]).abs().max()))
            worst_score = max(worst_score, abs(float(scores_b[match] - scores_a[i])))
    return missing, worst_box, worst_score


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_many_streams_batched_equal_each_alone(detector, mode):
    alone = _alone(detector, mode)
    together = _results(detector.stream_many(CLIPS, mode))
    worst = [0.0, 0.0]
    frame_box: dict[tuple[int, int], float] = {}  # (stream, frame) -> its largest box difference
    for stream, (a, t) in enumerate(zip(alone, together, strict=True)):
        assert [k for k, *_ in a] == [k for k, *_ in t]
        for frame_a, frame_t in zip(a, t):
            assert len(frame_a[1]) == len(frame_t[1])
            for x, y in ((frame_a, frame_t), (frame_t, frame_a)):
                missing, box, score = _unmatched(x, y)
                worst = [max(worst[0], box), max(worst[1], score)]
                frame_box[stream, frame_a[0]] = max(frame_box.get((stream, frame_a[0]), 0.0), box)
                # Only a detection at the cut-off (detections_per_img) may be replaced by a near-tie.
                floor = float(x[2].min()) if len(x[2]) else 0.0
                assert all(float(x[2][i]) <= floor + SCORE_TOL for i in missing), (frame_a[0], missing)
    print(f"{detector.case} {mode}: max box difference {worst[0]:.2e} px, max score difference {worst[1]:.2e} "
          f"(limits {BOX_TOL:.1e} px, {SCORE_TOL:.1e}); per (stream, frame), largest first: "
          + ", ".join(f"{k}: {v:.1e}" for k, v in sorted(frame_box.items(), key=lambda kv: -kv[1])[:3]))


@pytest.fixture(scope="module")
def single(trained_state):
    cfg = megavod.load_config(str(WEIGHTS / "synthetic_mega.yaml"), CONFIGS["single"])
    model = build_detector(cfg).eval()
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in trained_state.items() if k in own}, strict=False)
    return megavod.Detector(model, cfg, "cpu")


def test_frames_of_one_size_run_as_one_batched_call(single, monkeypatch):
    detector = single
    calls: list[int] = []
    batched = detector.model.frame_features_batch
    monkeypatch.setattr(detector.model, "frame_features_batch",
                        lambda images, *a: calls.append(len(images)) or batched(images, *a))
    list(detector.stream_many(CLIPS, "online"))
    # Clips of 6, 4 and 2 frames at 96x128 and one of 5 at 80x112 (always alone): steps 0-1 batch three
    # frames, steps 2-3 two, steps 4-5 one (no batched call).
    assert calls == [3, 3, 2, 2]


def test_frame_passes_keep_request_order_across_sizes(detector):
    """The batched per-frame pass gives each frame what it gets alone: same order, sizes and index, and
    every tensor of the result (image, C4, embedding; proposals and RoI features) within FEATURE_LIMIT of
    its largest magnitude. Frames 0, 2, 3 (96 x 128) run as one batch, frame 1 (80 x 112) alone."""
    model = detector.model
    frames = [CLIPS[0][0], CLIPS[2][0], CLIPS[1][0], CLIPS[0][3]]
    images = [detector.prepare(frame)[0] for frame in frames]
    requests = [FrameRequest(t, image, image.shape[-2:]) for t, image in enumerate(images)]
    with torch.no_grad():
        batched = frame_passes(model, requests)
        plain = frame_passes(model, requests, batch=False)
    worst, compared = 0.0, 0
    for b, p in zip(batched, plain, strict=True):
        assert type(b) is type(p) and b.image_size == p.image_size and b.index == p.index
        assert b.original_size == p.original_size
        for field in dataclasses.fields(p):
            x, y = getattr(b, field.name), getattr(p, field.name)
            if not isinstance(y, torch.Tensor):
                assert x is None if y is None else x == y, field.name
                continue
            assert x.shape == y.shape and x.dtype == y.dtype, field.name
            scale = float(y.abs().max())
            assert scale > 0, field.name  # not a comparison of zeros
            diff = float((x - y).abs().max()) / scale
            assert diff <= FEATURE_LIMIT, f"frame {p.index} {field.name}: {diff:.2e} of max abs > {FEATURE_LIMIT:.2e}"
            worst, compared = max(worst, diff), compared + 1
    assert compared > len(frames)  # beyond the images: computed tensors (DFF: only its key frames' C4)
    print(f"{detector.case}: per-frame pass, batched vs alone: {compared} tensors, "
          f"max difference {worst:.1e} of max abs")


def test_online_streams_emit_frame_k_before_reading_frame_k_plus_1(single):
    detector = single
    reads = [0, 0, 0]

    def reader(i: int, clip) -> Iterator[np.ndarray]:
        for frame in clip:
            reads[i] += 1
            yield frame

    clips = CLIPS[:3]
    for i, result in detector.stream_many([reader(i, c) for i, c in enumerate(clips)], "online"):
        assert reads[i] == result.frame + 1


def test_a_failing_stream_is_named(single):
    detector = single
    def broken() -> Iterator[np.ndarray]:
        yield CLIPS[0][0]
        raise MegavodError("camera.mp4: decoding failed at frame 1")

    with pytest.raises(StreamError) as caught:
        list(detector.stream_many([CLIPS[1], broken()], "online"))
    assert caught.value.stream == 1 and "camera.mp4" in str(caught.value)


def test_single_frame_key_steps_of_many_streams_run_as_one_call(single, monkeypatch):
    calls: list[int] = []
    batched = single.model.detect_keys
    monkeypatch.setattr(single.model, "detect_keys", lambda inputs, caches: calls.append(len(inputs)) or batched(inputs, caches))
    list(single.stream_many(CLIPS, "online"))
    assert calls == [4, 4, 3, 3, 2]  # clips of 6, 4, 5 and 2 frames; the last step has one stream left


def test_batched_key_steps_group_key_frames_by_size(single):
    model = single.model
    frames = [CLIPS[0][0], CLIPS[2][0], CLIPS[1][0]]  # 96x128, 80x112, 96x128
    inputs = []
    for t, frame in enumerate(frames):
        image, size = single.prepare(frame)
        inputs.append(KeyFrameInputs(key=model.frame_features(image, t, size)))
    alone = [model.detect_key(i).detections for i in inputs]
    together = [out.detections for out in model.detect_keys(inputs, [None] * 3)]
    for a, b in zip(alone, together):
        assert torch.equal(a.labels, b.labels) and len(a.boxes) > 0
        assert float((a.boxes - b.boxes).abs().max()) <= BOX_TOL and float((a.scores - b.scores).abs().max()) <= SCORE_TOL
