"""BLR's relation weights from the detector (docs/departures.md#blr-as-megavod-reads-the-paper): the kept
proposal of each detection, the query rows of the last location-based relation module (MEGA's last local
stage, RDN's last module), the weights handed to BLR by ``megavod detect --postprocess blr``, and w = 0
without a relation module."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from megavod import postprocess
from megavod.config import load_config
from megavod.data.video import open_source, write_video
from megavod.apps.detect import DetectOptions, detect_one
from megavod.api import Detector
from megavod.inference.engine import detect_offline
from megavod.inference.schedules import build_schedule
from megavod.methods import build_detector
from megavod.models.box_coder import BoxCoder, clip_boxes
from megavod.models.roi_heads import BoxPostProcessor

SIZE = ["input.min_size_test=48", "input.max_size_test=64", "model.rpn.post_nms_top_n_test=30",
        "model.rpn.ref_post_nms_top_n=8"]
MEGA = ["mega.T_l=3", "mega.T_g=2", "mega.T_m=3", "mega.N_l=2", *SIZE]
RDN = ["method=rdn", "relation.num_heads=8", "rdn.min_offset=-1", "rdn.max_offset=1", "rdn.advanced_stages=1", *SIZE]


def _model(name, overrides):
    cfg = load_config(name, overrides)
    torch.manual_seed(0)
    return build_detector(cfg).eval(), cfg


@pytest.fixture(scope="module")
def mega():
    return _model("synthetic_mega", MEGA)


@pytest.fixture(scope="module")
def frames():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(3, 48, 64, generator=g) * 40 for _ in range(4)]


def _offline(model, cfg, frames, record):
    settings = build_schedule(cfg)
    return list(detect_offline(model, lambda t: (frames[t], (48, 64)), len(frames), settings, relation_inputs=record))


def _decoded_frames(video: Path) -> list[np.ndarray]:
    source = open_source(str(video))
    try:
        return list(source)
    finally:
        source.close()


def test_postprocessor_indices_name_each_detections_proposal():
    torch.manual_seed(0)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    xy = torch.rand(40, 2) * 60
    proposals = torch.cat([xy, xy + 8 + torch.rand(40, 2) * 30], 1)
    logits, deltas = torch.randn(40, 5) * 3, torch.randn(40, 20) * 0.2
    post = BoxPostProcessor(coder, score_thresh=0.05, nms_thresh=0.5, detections_per_img=12)
    plain = post(logits, deltas, [proposals], [(100, 120)])[0]
    (dets,), (rows,) = post(logits, deltas, [proposals], [(100, 120)], return_indices=True)
    assert torch.equal(dets.boxes, plain.boxes) and torch.equal(dets.scores, plain.scores)
    assert torch.equal(dets.labels, plain.labels) and len(rows) == len(dets) > 0
    # Each detection is its proposal's class-specific decode and softmax score.
    decoded = clip_boxes(coder.decode(deltas, proposals), (100, 120)).view(40, 5, 4)
    torch.testing.assert_close(dets.boxes, decoded[rows, dets.labels])
    torch.testing.assert_close(dets.scores, logits.softmax(1)[rows, dets.labels])


@pytest.mark.parametrize("which", ["mega", "rdn"])
def test_relation_inputs_are_the_last_modules_queries_and_change_nothing(which, mega, frames):
    model, cfg = mega if which == "mega" else _model("synthetic_single", RDN)
    module = model.aggregator.local_stages[-1] if which == "mega" else model.aggregator.relations[-1]
    assert model.blr_relation_module() is module
    caught = []
    handle = module.register_forward_pre_hook(lambda m, args: caught.append((args[0], args[2])))
    try:
        with_rel = _offline(model, cfg, frames[:3], True)
    finally:
        handle.remove()
    plain = _offline(model, cfg, frames[:3], False)
    assert len(caught) == 3  # the module queries the key rows once per key frame
    for (k, d), (_, p), (x, x_boxes) in zip(with_rel, plain, caught):
        assert p.relation is None and d.relation is not None
        assert torch.equal(d.boxes, p.boxes) and torch.equal(d.scores, p.scores) and torch.equal(d.labels, p.labels)
        assert d.relation.feats.shape == (len(d), x.shape[1])
        # Every detection's row is one of the key's query rows, with its own proposal's box.
        match = (d.relation.feats[:, None] == x[None]).all(2) & (d.relation.boxes[:, None] == x_boxes[None]).all(2)
        assert match.any(1).all()


def test_detect_blr_passes_the_detectors_relation_weights(mega, tmp_path, monkeypatch):
    model, cfg = mega
    rng = np.random.default_rng(0)
    video = tmp_path / "clip.mp4"
    write_video(video, (rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(4)), fps=10)
    seen = {}
    real = postprocess.apply_postprocess

    def spy(records, method, relation_weights=None):
        seen.update(records=list(records), method=method, weights=relation_weights)
        return real(records, method, relation_weights)

    monkeypatch.setattr(postprocess, "apply_postprocess", spy)
    detector = Detector(model, cfg)
    out = detect_one(detector, str(video), tmp_path / "out", DetectOptions(postprocess="blr", progress=False))
    assert all((tmp_path / "out" / f"clip.{e}").exists() for e in ("json", "csv", "mp4"))
    assert len(out.frames) == 4 and not hasattr(model, "record_relation_inputs")  # the stream's, not the model's
    records, weights = seen["records"], seen["weights"]
    assert seen["method"] == "blr" and callable(weights)
    assert all(r.detections.relation is None for r in records)  # the rows travel beside the records
    # The records BLR got are the plain detections, and the weights match a direct computation.
    images = [detector.prepare(f)[0] for f in _decoded_frames(video)]
    rel = _offline(model, cfg, images, True)
    plain = _offline(model, cfg, images, False)
    for r, (_, p) in zip(records, plain):
        assert torch.equal(r.detections.scores, p.scores) and torch.equal(r.detections.labels, p.labels)
    for t in range(3):
        w = weights(t)
        n_t, n_u = len(records[t].detections), len(records[t + 1].detections)
        assert w.shape == (n_t, n_u) and n_t * n_u > 0
        torch.testing.assert_close(w.sum(1), torch.ones(n_t))  # softmax over frame t+1's detections
    a, b = rel[1][1].relation, rel[2][1].relation
    direct = model.aggregator.local_stages[-1].attention_weights(a.feats, b.feats, a.boxes, b.boxes)
    assert direct.shape[0] == cfg.relation.num_heads
    torch.testing.assert_close(weights(1), direct.mean(0))


def test_single_frame_detector_blr_uses_zero_weights(tmp_path, monkeypatch):
    """The single-frame detector has no relation module: BLR gets no weights, i.e. w = 0."""
    model, cfg = _model("synthetic_single", SIZE)
    rng = np.random.default_rng(1)
    video = tmp_path / "clip.mp4"
    write_video(video, (rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(3)), fps=10)
    seen = {}
    real = postprocess.apply_postprocess

    def spy(records, method, relation_weights=None):
        seen["weights"] = relation_weights
        return real(records, method, relation_weights)

    monkeypatch.setattr(postprocess, "apply_postprocess", spy)
    detect_one(Detector(model, cfg), str(video), tmp_path / "out", DetectOptions(postprocess="blr", progress=False))
    assert "weights" in seen and seen["weights"] is None
    assert (tmp_path / "out" / "clip.json").exists()
