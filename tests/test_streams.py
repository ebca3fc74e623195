"""Stream state belongs to the stream: one model serves several streams, interleaved frame by frame, and
each gets exactly the detections it gets alone (docs/architecture.md#stream-state)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import megavod
from megavod.methods import build_detector

SIZE = ["input.min_size_test=48", "input.max_size_test=64"]
CONFIGS = {
    "mega": ("synthetic_mega", ["mega.T_l=5", "mega.T_g=3", "mega.T_m=3", "mega.N_l=2",
                                "model.rpn.post_nms_top_n_test=40", "model.rpn.ref_post_nms_top_n=10", *SIZE]),
    "fgfa": ("synthetic_single", ["method=fgfa", "fgfa.min_offset=-2", "fgfa.max_offset=2", *SIZE]),
}


def _clip(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    # A moving bright square over a fixed background, so consecutive frames differ but relate.
    frames = []
    for t in range(n):
        frame = base.copy()
        x = 4 + 3 * t
        frame[10:30, x: x + 16] = 255
        frames.append(frame)
    return frames


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def detector(request):
    name, overrides = CONFIGS[request.param]
    cfg = megavod.load_config(name, overrides)
    torch.manual_seed(0)
    model = build_detector(cfg).eval()
    with torch.no_grad():  # relation terms that matter (the init's Wv is ~0)
        for module in model.modules():
            if type(module).__name__ == "RelationModule":
                for p in module.parameters():
                    p.normal_(std=0.2)
    return megavod.Detector(model, cfg, "cpu")


def _alone(detector, clip, mode):
    return [(r.frame, r.boxes, r.scores, r.labels) for r in detector.stream(clip, mode)]


def _interleaved(detector, clips, mode):
    streams = [detector.stream(clip, mode) for clip in clips]
    out: list[list] = [[] for _ in clips]
    active = list(range(len(clips)))
    while active:
        for i in list(active):
            result = next(streams[i], None)
            if result is None:
                active.remove(i)
            else:
                out[i].append((result.frame, result.boxes, result.scores, result.labels))
    return out


def _equal(a, b):
    assert [k for k, *_ in a] == [k for k, *_ in b]
    for (_, boxes_a, scores_a, labels_a), (_, boxes_b, scores_b, labels_b) in zip(a, b):
        assert torch.equal(boxes_a, boxes_b) and torch.equal(scores_a, scores_b) and torch.equal(labels_a, labels_b)


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_two_streams_interleaved_give_what_each_gives_alone(detector, mode):
    clips = [_clip(1, 9), _clip(2, 6)]  # of unequal length: the shorter one ends first
    alone = [_alone(detector, clip, mode) for clip in clips]
    assert all(len(a) == len(c) for a, c in zip(alone, clips))
    assert any(len(boxes) for _, boxes, _, _ in alone[0])  # the comparison is not of empty lists
    together = _interleaved(detector, clips, mode)
    for a, t in zip(alone, together):
        _equal(a, t)


def test_each_stream_gets_its_own_cache(detector, monkeypatch):
    made = []
    new_stream_cache = detector.model.new_stream_cache
    monkeypatch.setattr(detector.model, "new_stream_cache", lambda: made.append(new_stream_cache()) or made[-1])
    _interleaved(detector, [_clip(1, 4), _clip(2, 4)], "online")
    assert len(made) == 2
    if made[0] is not None:  # MEGA keeps keys/values and geometry blocks per stream
        assert made[0] is not made[1]
        assert made[0].projections is not made[1].projections and made[0].geometry is not made[1].geometry
    assert not any(isinstance(v, torch.Tensor) for v in vars(detector.model).values())  # weights only
