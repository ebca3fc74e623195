"""MEGA aggregation head (docs/conventions.md#mega-aggregation-head,
docs/conventions.md#mega-inference-schedule, docs/conventions.md#training-forward,
docs/departures.md#ablations-the-released-code-cannot-run): parameter layout against the authors' keys, the
pipeline against the stage table of docs/conventions.md#mega-aggregation-head written out, memory push,
ablations, training memory."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from megavod.models.mega_head import MEGAAggregator, RoiRows
from reference_data import authors_listing as full_listing

PREFIX = "roi_heads.box.feature_extractor."

# Small sizes for the behaviour tests: C = 32, 4 heads, 16-d geometry, 5 rows per frame, D = 2 per frame.
IN, C, HEADS, EMBED, ADV = 20, 32, 4, 16, 2


def small(**kwargs) -> MEGAAggregator:
    torch.manual_seed(0)
    agg = MEGAAggregator(IN, C, HEADS, EMBED, advanced_num=ADV, **kwargs)
    with torch.no_grad():  # weights large enough that every term moves the output
        for p in agg.parameters():
            p.normal_(std=0.2)
    return agg


def frame_rows(n, seed, frame=None, dim=C):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=g) * 50], dim=1)
    return RoiRows.of_frame(torch.randn(n, dim, generator=g), boxes, frame)


def authors_listing(config):
    """The aggregator's part of the authors' listing: feature-extractor keys without PREFIX, less the res5
    head and the reduce conv."""
    _, _, shapes = full_listing(config)
    return {key[len(PREFIX) :]: shape for key, shape in shapes.items()
            if key.startswith(PREFIX) and ".head.layer4." not in key and not key.startswith(PREFIX + "conv.")}


@pytest.mark.parametrize(
    "config, in_features, global_res_stages",
    [("vid_R_101_C4_MEGA_1x", 2048 * 49, 1), ("vid_R_50_C4_MEGA_1x", 256 * 49, 0)],
)
def test_parameters_map_one_to_one_to_authors_keys(config, in_features, global_res_stages):
    with torch.device("meta"):  # shapes only: fcs[0] alone is 100352 x 1024
        agg = MEGAAggregator(in_features, global_res_stages=global_res_stages)
    ours = dict(agg.named_parameters())
    mapping = agg.authors_key_mapping()
    assert set(mapping) == set(ours)
    assert {mapping[k]: tuple(v.shape) for k, v in ours.items()} == authors_listing(config)


def test_r101_aggregation_parameter_count():
    with torch.device("meta"):
        agg = MEGAAggregator(2048 * 49)  # R-101 defaults: N_g 1, N_l 3, one global residual stage
    linear = 1024 * 1024 + 1024
    expected = (
        (100352 * 1024 + 1024) + 2 * linear  # l_fcs.0 (raw fc6), l_fcs.1-2
        + 3 * (16 * 64 + 16)  # l_Wgs
        + 3 * linear * 3  # l_Wqs, l_Wks, l_Wvs ([1024,1024,1,1] grouped conv + bias)
        + 3 * 1024  # l_us [16,1,64]
        + 2 * (3 * linear + 1024)  # g_Wqs/g_Wks/g_Wvs/g_us, global stage + residual stage
    )  # fmt: skip
    assert expected == 120_612_912
    assert sum(p.numel() for p in agg.parameters()) == expected
    assert len(agg.local_stages) == 3 and len(agg.global_stages) == 2 and len(agg.fcs) == 3
    assert all(m.Wg is None for m in agg.global_stages) and all(m.Wg is not None for m in agg.local_stages)


def spec_pipeline(agg, key, frames, pool, memory):
    """docs/conventions.md#mega-aggregation-head / docs/conventions.md#mega-inference-schedule written out the
    authors' way: key, local refs and the distilled set D are separate tensors, each updated by the global
    stage; then the stage table; then the global residual stages."""
    G = pool.feats
    n0 = len(frames[0])
    x, xb = key.feats, key.boxes
    refs = torch.cat([f.feats for f in frames])
    refs_b = torch.cat([f.boxes for f in frames])
    dis = torch.cat([f.feats[:ADV] for f in frames])
    dis_b = torch.cat([f.boxes[:ADV] for f in frames])
    for g in agg.global_stages[: agg.N_g]:
        x, refs, dis = x + g(x, G), refs + g(refs, G), dis + g(dis, G)
    pushes = []
    for i, stage in enumerate(agg.local_stages):
        level_refs, level_b = (refs, refs_b) if i == 0 else (dis, dis_b)
        pushes.append(level_refs[: n0 if i == 0 else ADV])
        all_refs = torch.cat([level_refs, memory[i].feats])
        all_b = torch.cat([level_b, memory[i].boxes])
        if i < agg.N_l - 1:
            q, qb = torch.cat([x, dis]), torch.cat([xb, dis_b])
            q = F.relu(agg.fcs[i + 1](q + stage(q, all_refs, qb, all_b)))
            x, dis = q[: len(x)], q[len(x) :]
        else:  # last stage: key queries only, no FC
            x = x + stage(x, all_refs, xb, all_b)
    for g in agg.global_stages[agg.N_g :]:
        x = x + g(x, G)
    return x, pushes


def test_forward_follows_the_spec_stage_table():
    agg = small(N_g=1, N_l=3, global_res_stages=1)
    key = frame_rows(4, 1)
    frames = [frame_rows(5, 10 + t) for t in range(3)]
    pool = frame_rows(6, 2)
    memory = [frame_rows(10, 3), frame_rows(4, 4), frame_rows(4, 5)]  # 2 frames at each level
    with torch.no_grad():
        out = agg(key, frames, pool, memory)
        expected, pushes = spec_pipeline(agg, key, frames, pool, memory)
    assert out.features.shape == (4, C)
    assert torch.allclose(out.features, expected, atol=1e-5)
    # Pushed: the oldest window frame's 5 rows at level 0, its 2 distilled rows at levels 1 and 2.
    assert [len(p) for p in out.memory_push] == [5, ADV, ADV]
    for got, want in zip(out.memory_push, pushes):
        assert torch.allclose(got.feats, want, atol=1e-5)
    assert torch.equal(out.memory_push[0].boxes, frames[0].boxes)
    assert torch.equal(out.memory_push[2].boxes, frames[0].boxes[:ADV])
    # Each memory level is actually a reference set: changing level 2 alone changes the output.
    changed = [memory[0], memory[1], RoiRows(memory[2].feats + 1, memory[2].boxes)]
    with torch.no_grad():
        assert not torch.allclose(agg(key, frames, pool, changed).features, out.features, atol=1e-4)


def test_no_memory_equals_empty_memory():
    agg = small()
    key, frames, pool = frame_rows(3, 1), [frame_rows(5, 2), frame_rows(5, 3)], frame_rows(5, 4)
    empty = [RoiRows(torch.zeros(0, C), torch.zeros(0, 4))] * 3
    with torch.no_grad():
        a, b = agg(key, frames, pool, None), agg(key, frames, pool, empty)
    assert torch.equal(a.features, b.features)
    assert all(torch.equal(x.feats, y.feats) for x, y in zip(a.memory_push, b.memory_push))
    with pytest.raises(ValueError, match="N_l = 3 levels"):
        agg(key, frames, pool, empty[:2])


def test_no_local_stage_key_queries_global_pool_only():
    agg = small(N_g=4, N_l=0, global_res_stages=0)  # Table 4: N_g = 4, N_l = 0
    assert len(agg.local_stages) == 0 and len(agg.fcs) == 1 and len(agg.global_stages) == 4
    key, pool = frame_rows(3, 1), frame_rows(6, 2)
    with torch.no_grad():
        out = agg(key, [frame_rows(5, 7)], pool)
        x = key.feats
        for g in agg.global_stages:  # stacked location-free modules over the raw pool
            x = x + g(x, pool.feats)
        assert torch.allclose(out.features, x, atol=1e-6)
        assert torch.equal(agg(key, [], pool).features, out.features)  # local frames play no part
    assert out.memory_push == []


def test_no_global_stage_ignores_the_global_pool():
    agg = small(N_g=0, N_l=3, global_res_stages=0)  # Table 4: N_g = 0
    assert len(agg.global_stages) == 0
    key, frames = frame_rows(3, 1), [frame_rows(5, 2), frame_rows(5, 3)]
    with torch.no_grad():
        a = agg(key, frames, frame_rows(6, 4)).features
        b = agg(key, frames, frame_rows(2, 5)).features
    assert torch.equal(a, b)


def test_single_local_stage_queries_key_over_all_local_rows():
    agg = small(N_g=1, N_l=1, global_res_stages=0)
    key, frames, pool = frame_rows(3, 1), [frame_rows(5, 2), frame_rows(4, 3)], frame_rows(6, 4)
    memory = [frame_rows(5, 6)]
    with torch.no_grad():
        out = agg(key, frames, pool, memory)
        g = agg.global_stages[0]
        x = key.feats + g(key.feats, pool.feats)
        refs = torch.cat([f.feats for f in frames] + [memory[0].feats])
        refs = refs + torch.cat([g(refs[:9], pool.feats), torch.zeros(5, C)])  # memory rows are not updated
        boxes = torch.cat([f.boxes for f in frames] + [memory[0].boxes])
        expected = x + agg.local_stages[0](x, refs, key.boxes, boxes)
    assert torch.allclose(out.features, expected, atol=1e-5)
    assert [len(p) for p in out.memory_push] == [5]


def test_location_based_global_stage():
    agg = small(N_g=1, N_l=2, global_res_stages=1, location_based_global=True)
    assert all(m.Wg is not None for m in agg.global_stages)
    assert "g_Wgs.1.weight" in agg.authors_key_mapping().values()
    key, frames, pool = frame_rows(3, 1), [frame_rows(5, 2)], frame_rows(6, 4)
    with torch.no_grad():
        out = agg(key, frames, pool)
        g = agg.global_stages[0]
        assert torch.allclose(
            agg.global_stage(key, pool).feats, key.feats + g(key.feats, pool.feats, key.boxes, pool.boxes)
        )
        with pytest.raises(ValueError, match="x_boxes and ref_boxes"):
            agg(key, frames, RoiRows(pool.feats))
    assert out.features.shape == (3, C)


def test_temporal_embedding_needs_frame_indices():
    agg = small(N_l=2, temporal_embedding=True)
    assert agg.local_stages[0].Wg.weight.shape == (HEADS, EMBED + EMBED // 4, 1, 1)
    pool = frame_rows(4, 9)
    with torch.no_grad():
        out = agg(frame_rows(3, 1, frame=7), [frame_rows(5, 2, frame=6), frame_rows(5, 3, frame=7)], pool)
        assert torch.equal(out.memory_push[1].frames, torch.full((ADV,), 6))
        with pytest.raises(ValueError, match="x_frames"):
            agg(frame_rows(3, 1), [frame_rows(5, 2)], pool)


def test_training_memory_and_backward():
    """docs/conventions.md#training-forward: memory frames go through global + local stages among themselves
    under no_grad; the key/local pass backpropagates into every parameter."""
    agg = small(N_g=1, N_l=3, global_res_stages=1)
    g = torch.Generator().manual_seed(0)

    def raw(n, seed):  # raw features from pooled RoIs through fcs[0] (with gradient)
        rows = frame_rows(n, seed, dim=IN)
        return RoiRows(agg.embed(torch.randn(n, IN, 1, 1, generator=g)), rows.boxes)

    pool = RoiRows.cat([raw(5, 1), raw(5, 2)])
    mem_frames = [raw(5, 10 + t) for t in range(3)]
    memory = agg.memory_from_frames(mem_frames, pool)
    assert [len(level) for level in memory] == [15, 3 * ADV, 3 * ADV]
    assert not any(level.feats.requires_grad for level in memory)
    with torch.no_grad():  # level 1 = D after the global stage, stage 0 over all memory rows, fcs[1]+ReLU
        gs = agg.global_stages[0]
        rows = torch.cat([f.feats for f in mem_frames])
        rows = rows + gs(rows, pool.feats)
        boxes = torch.cat([f.boxes for f in mem_frames])
        d_index = torch.tensor([0, 1, 5, 6, 10, 11])
        d = rows[d_index]
        level1 = F.relu(agg.fcs[1](d + agg.local_stages[0](d, rows, boxes[d_index], boxes)))
    assert torch.allclose(memory[0].feats, rows, atol=1e-5)
    assert torch.allclose(memory[1].feats, level1, atol=1e-5)
    assert torch.equal(memory[2].boxes, boxes[d_index])

    out = agg(raw(8, 3), [raw(5, 4), raw(5, 5), raw(5, 6)], pool, memory)
    out.features.square().sum().backward()
    assert [n for n, p in agg.named_parameters() if p.grad is None] == []
    # Wk.bias adds a per-query constant to the logits, which the softmax ignores: its gradient is ~0.
    zero = [n for n, p in agg.named_parameters() if not n.endswith("Wk.bias") and not p.grad.abs().sum() > 0]
    assert zero == []


def test_from_config_synthetic_and_r101():
    config = pytest.importorskip("megavod.config")
    cfg = config.load_config("synthetic_mega")
    agg = MEGAAggregator.from_config(cfg, in_features=64 * 49)
    assert agg.advanced_num == 5  # int(25 * 0.2)
    assert agg.N_l == 2 and len(agg.global_stages) == 2 and agg.local_stages[0].num_heads == 8
    assert agg.fcs[0].weight.shape == (256, 64 * 49)
    with torch.device("meta"):
        r101 = MEGAAggregator.from_config(config.load_config("mega_R_101"), in_features=2048 * 49)
    assert r101.advanced_num == 15 and r101.N_g == 1 and len(r101.global_stages) == 2
