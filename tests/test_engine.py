"""The streaming engine (Algorithm 1): schedules, invariants, and equivalences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from megavod.config import load_config
from megavod.inference.engine import detect_offline, detect_online
from megavod.inference.schedules import (
    OnlineGlobalPool,
    build_schedule,
    global_order,
    offline_global_pools,
    offline_local_window,
    online_local_window,
)
from megavod.inference.feature_store import FeatureStore
from megavod.methods import build_detector

SMALL = ["mega.T_l=5", "mega.T_g=3", "mega.T_m=4", "mega.N_l=2",
         "model.rpn.post_nms_top_n_test=40", "model.rpn.ref_post_nms_top_n=10"]


@pytest.fixture(scope="module")
def cfg():
    return load_config("synthetic_mega", SMALL)


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return build_detector(cfg).eval()


@pytest.fixture(scope="module")
def frames():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(3, 64, 96, generator=g) * 40 for _ in range(12)]


def _run_offline(model, frames, settings):
    return list(detect_offline(model, lambda t: (frames[t], (64, 96)), len(frames), settings))


def _same(a, b):
    assert len(a) == len(b)
    for (ka, da), (kb, db) in zip(a, b):
        assert ka == kb
        torch.testing.assert_close(da.boxes, db.boxes, rtol=0, atol=0)
        torch.testing.assert_close(da.scores, db.scores, rtol=0, atol=0)
        assert torch.equal(da.labels, db.labels)


# -- schedules, as docs/conventions.md#mega-inference-schedule describes the authors' code -----------


def test_offline_window_pads_with_first_and_last_frames():
    assert offline_local_window(0, 12, 100) == [0] * 13 + list(range(1, 13))
    assert offline_local_window(50, 12, 100) == list(range(38, 63))
    assert offline_local_window(99, 12, 100) == list(range(87, 100)) + [99] * 12


def test_online_window_is_causal():
    assert online_local_window(0, 25) == [0] * 25
    assert online_local_window(30, 25) == list(range(6, 31))
    assert max(online_local_window(7, 5)) == 7


def test_global_pool_follows_the_codes_queue():
    L, S = 40, global_order(40, True, seed=0)
    pools = list(offline_global_pools(L, 10, S))
    assert pools[0] == [S[i] for i in range(9, -1, -1)]  # S9..S0
    for k in range(1, 10):  # {S0..S_{9-k}} u {S10..S_{k+9}}
        assert set(pools[k]) == set(S[: 10 - k]) | set(S[10 : k + 10])
    for k in range(10, L):  # exactly {S_k..S_{k+9}} (mod L)
        assert set(pools[k]) == {S[(k + i) % L] for i in range(10)}
    assert all(len(p) == 10 for p in pools)


def test_global_order_is_seeded_and_can_be_switched_off():
    assert global_order(50, True, 3) == global_order(50, True, 3)
    assert global_order(50, True, 3) != global_order(50, True, 4)
    assert sorted(global_order(50, True, 3)) == list(range(50))
    assert global_order(50, False, 3) == list(range(50))


def test_online_pool_is_a_bounded_sample_of_the_past():
    pool = OnlineGlobalPool(T_g=4, seed=0)
    counts = np.zeros(200)
    for k in range(200):
        pool.offer(k)
        assert len(pool.frames) == min(k + 1, 4) and max(pool.frames) <= k
    # Uniform over the past: over many seeds, every early frame is as likely to be held as a late one.
    for seed in range(300):
        p = OnlineGlobalPool(T_g=4, seed=seed)
        for k in range(200):
            p.offer(k)
        counts[p.frames] += 1
    assert counts[:100].sum() == pytest.approx(counts[100:].sum(), rel=0.2)


# -- invariants ---------------------------------------------------------------------------------------


def test_each_frame_is_computed_exactly_once_offline(model, cfg, frames):
    calls = []
    backbone = model.backbone
    handle = backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    settings = build_schedule(cfg)
    store = FeatureStore(lambda t: model.frame_features(frames[t], t, (64, 96)), max_in_memory=3)
    try:
        out = list(detect_offline(model, None, len(frames), settings, store=store))
    finally:
        handle.remove()
    assert [k for k, _ in out] == list(range(len(frames)))
    assert sorted(store.computed) == list(range(len(frames)))  # every frame once, spilled or not
    assert sum(calls) == len(frames)


def test_feature_store_spills_and_reloads_exactly(model, frames):
    store = FeatureStore(lambda t: model.frame_features(frames[t], t, (64, 96)), max_in_memory=2)
    first = [store.get(t) for t in range(5)]
    assert store.in_memory == 2 and len(store) == 5
    again = store.get(0)  # from disk
    assert torch.equal(again.feats, first[0].feats) and torch.equal(again.boxes, first[0].boxes)
    assert store.computed == [0, 1, 2, 3, 4]
    store.close()


def test_online_never_reads_ahead(model, cfg, frames):
    log = []

    def source():
        for t, f in enumerate(frames):
            log.append(("read", t))
            yield f, (64, 96)

    for k, _ in detect_online(model, source(), build_schedule(cfg)):
        log.append(("emit", k))
    for k in range(len(frames) - 1):
        assert log.index(("emit", k)) < log.index(("read", k + 1))


def test_memory_never_holds_more_than_T_m_frames(model, cfg, frames, monkeypatch):
    settings = build_schedule(cfg)
    seen = []
    original = model.detect_key

    def spy(inputs, cache=None):
        seen.append([len(level) for level in inputs.memory])
        assert len(inputs.local) == cfg.mega.T_l and len(inputs.global_pool) == min(cfg.mega.T_g, len(frames))
        return original(inputs, cache)

    monkeypatch.setattr(model, "detect_key", spy)
    _run_offline(model, frames, settings)
    assert seen[0] == [0, 0]
    assert max(max(s) for s in seen) == cfg.mega.T_m
    assert seen[-1] == [cfg.mega.T_m] * cfg.mega.N_l


def test_proposal_rows_for_references_are_the_ref_mode_rpn(model, frames):
    """A frame's first 75 (here 10) test proposals are exactly the authors' separate ref-mode RPN."""
    feats = model.frame_features(frames[0], 0, (64, 96))
    with torch.no_grad():
        c4 = model.backbone(frames[0][None])
        ref = model.rpn.proposals(c4, [(64, 96)], "ref")[0].boxes
    assert torch.equal(feats.boxes[: len(ref)], ref)


# -- equivalences -------------------------------------------------------------------------------------


def test_offline_is_deterministic_with_a_seed(model, cfg, frames):
    settings = build_schedule(cfg)
    _same(_run_offline(model, frames, settings), _run_offline(model, frames, settings))


def test_memory_off_is_the_base_model(model, cfg, frames):
    """The base model is MEGA without memory: same weights, and the same output while memory is empty
    (frame 0); once memory holds frames, MEGA's output differs."""
    base_cfg = load_config("synthetic_base", SMALL)
    base = build_detector(base_cfg).eval()
    assert base.state_dict().keys() == model.state_dict().keys()
    base.load_state_dict(model.state_dict())
    mega_out = _run_offline(model, frames, build_schedule(cfg))
    base_out = _run_offline(base, frames, build_schedule(base_cfg))
    _same(mega_out[:1], base_out[:1])
    assert any(not torch.equal(a.scores, b.scores) for (_, a), (_, b) in zip(mega_out[1:], base_out[1:]))


def test_projection_cache_gives_the_uncached_result(cfg, frames, monkeypatch):
    """Global frames' and memory entries' keys/values are projected once per (rows, module), and the
    local stages' geometry blocks are kept per (query frame, reference frame); over a whole video the
    aggregated features equal computing both anew at every key frame (the authors)."""
    from megavod.models.geometry_cache import GeometryBiasCache
    from megavod.models.mega_head import MEGAAggregator
    from megavod.models.relation import ReferenceProjectionCache

    torch.manual_seed(0)
    model = build_detector(cfg).eval()
    with torch.no_grad():  # relation terms that matter (the init's Wv is ~0)
        for module in [*model.aggregator.local_stages, *model.aggregator.global_stages]:
            for p in module.parameters():
                p.normal_(std=0.2)
    from megavod.models.relation import RelationModule

    outputs, projections, pairs = {}, {"cached": 0, "uncached": 0}, {"cached": 0, "uncached": 0}
    original_forward, original_project = MEGAAggregator.forward, RelationModule.project_refs
    original_geometry = RelationModule.geometry_bias

    def forward(self, *args, **kwargs):
        out = original_forward(self, *args, **kwargs)
        outputs.setdefault(run, []).append(out.features)
        return out

    def project_refs(self, refs):
        projections[run] += 1
        return original_project(self, refs)

    def geometry_bias(self, x_boxes, ref_boxes, *args):
        pairs[run] += x_boxes.shape[0] * ref_boxes.shape[0]
        return original_geometry(self, x_boxes, ref_boxes, *args)

    monkeypatch.setattr(MEGAAggregator, "forward", forward)
    monkeypatch.setattr(RelationModule, "project_refs", project_refs)
    monkeypatch.setattr(RelationModule, "geometry_bias", geometry_bias)
    settings = build_schedule(cfg)
    caches = []  # the stream's cache, created by the engine for the video
    new_stream_cache = model.new_stream_cache
    monkeypatch.setattr(model, "new_stream_cache", lambda: caches.append(new_stream_cache()) or caches[-1])
    run = "cached"
    _run_offline(model, frames, settings)
    # What is alive at the last key frame: T_g = 3 pool frames x 2 global modules, N_l = 2 levels x
    # T_m = 4 memory entries, and what dropped out at that frame (pruned at the next one): 1 + 1 x 2.
    assert len(caches) == 1 and 0 < len(caches[0].projections) <= 3 * 2 + 2 * 4 + 2 * 2
    run = "uncached"
    monkeypatch.setattr(ReferenceProjectionCache, "get", lambda self, owner, rows, module: module.project_refs(rows))
    monkeypatch.setattr(GeometryBiasCache, "bias", lambda self, module, xb, xc, rb, rc, xf=None, rf=None, **_:
                        module.geometry_bias(xb, rb, xf, rf))
    _run_offline(model, frames, settings)
    assert projections["cached"] < 0.6 * projections["uncached"]
    # Here the key frame's 40 new rows dominate (49,460 vs 56,840 pairs); tests/test_geometry_cache.py
    # counts the reuse exactly.
    assert pairs["cached"] < 0.9 * pairs["uncached"]
    assert len(outputs["cached"]) == len(outputs["uncached"]) == len(frames)
    for a, b in zip(outputs["cached"], outputs["uncached"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert any(not torch.allclose(a, outputs["cached"][0]) for a in outputs["cached"][1:])


def test_file_and_frame_folder_give_identical_detections(model, cfg, tmp_path):
    from megavod.data.video import RandomAccessFrames, open_source, write_video
    from megavod.api import Detector

    rng = np.random.default_rng(0)
    clip = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(6)]
    write_video(tmp_path / "clip.mp4", clip, fps=10)
    decoded = list(open_source(tmp_path / "clip.mp4"))
    (tmp_path / "frames").mkdir()
    for t, f in enumerate(decoded):  # the decoded pixels, losslessly
        Image.fromarray(f).save(tmp_path / "frames" / f"{t:06d}.png")
    small_input = load_config("synthetic_mega", SMALL + ["input.min_size_test=48", "input.max_size_test=64"])
    detector = Detector(model, small_input)
    with RandomAccessFrames(open_source(tmp_path / "clip.mp4")) as a, \
            RandomAccessFrames(open_source(tmp_path / "frames")) as b:
        _same([(r.frame, r.detections) for r in detector.stream(a, "offline")],
              [(r.frame, r.detections) for r in detector.stream(b, "offline")])


def test_mega_R_101_parameter_count_matches_the_authors():
    # checkpoint_keys/vid_R_101_C4_MEGA_1x.txt: 578 keys, 172,877,047 elements (parameters + buffers).
    model = build_detector(load_config("mega_R_101"))
    sd = model.state_dict()
    assert len(sd) == 578
    assert sum(v.numel() for v in sd.values()) == 172_877_047
