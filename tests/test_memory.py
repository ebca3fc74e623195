"""Long Range Memory (docs/conventions.md#long-range-memory,
docs/departures.md#memory-length-as-its-own-parameter): bounded per-level queues, read-before-push with the
aggregator, detached storage, T_m = 0 == no memory."""

from __future__ import annotations

import pytest
import torch

from megavod.inference.memory import LongRangeMemory
from megavod.models.mega_head import MEGAAggregator, RoiRows

C = 16


def entry(n, value, frame=None):
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(n, 1) + value
    return RoiRows.of_frame(torch.full((n, C), float(value)), boxes, frame)


def test_never_more_than_T_m_frames_and_oldest_first():
    memory = LongRangeMemory(num_levels=3, T_m=4, feat_dim=C)
    for k in range(10):
        memory.push([entry(5, k, frame=k), entry(2, k), entry(2, k)])
        for level in range(3):
            assert memory.num_frames(level) == min(k + 1, 4)
        feats, boxes = memory.read_rows(0).feats, memory.read_rows(0).boxes
        assert feats.shape == (5 * min(k + 1, 4), C) and boxes.shape == (feats.shape[0], 4)
    # Holds frames 6..9, oldest first, at every level.
    assert memory.read_rows(0).feats[::5, 0].tolist() == [6.0, 7.0, 8.0, 9.0]
    assert memory.read_rows(2).feats[::2, 0].tolist() == [6.0, 7.0, 8.0, 9.0]
    assert memory.read_rows(0).frames.tolist() == [f for f in (6, 7, 8, 9) for _ in range(5)]


def test_empty_read_and_bad_push():
    memory = LongRangeMemory(num_levels=2, T_m=3, feat_dim=C)
    feats, boxes = memory.read_rows(1).feats, memory.read_rows(1).boxes
    assert feats.shape == (0, C) and boxes.shape == (0, 4)
    assert [memory.num_frames(i) for i in range(2)] == [0, 0]
    assert memory.levels() == [[], []]
    with pytest.raises(ValueError, match="expected 2 level entries"):
        memory.push([entry(3, 1)])


def test_stores_detached_rows():
    memory = LongRangeMemory(num_levels=1, T_m=2, feat_dim=C)
    feats = torch.ones(3, C, requires_grad=True)
    memory.push([RoiRows(feats * 2, torch.zeros(3, 4))])
    stored = memory.read_rows(0).feats
    assert not stored.requires_grad and torch.equal(stored, torch.full((3, C), 2.0))


def small_aggregator():
    torch.manual_seed(0)
    agg = MEGAAggregator(8, C, 2, 8, N_g=1, N_l=3, global_res_stages=1, advanced_num=2)
    with torch.no_grad():
        for p in agg.parameters():
            p.normal_(std=0.2)
    return agg


def rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 50
    return RoiRows(torch.randn(n, C, generator=g), torch.cat([xy, xy + 10], dim=1))


def stream(agg, memory, num_frames, window=3, per_frame=4):
    """A streaming loop as the engine runs it: read every level, aggregate, then push."""
    outputs, sizes = [], []
    for k in range(num_frames):
        local = [rows(per_frame, 100 + k + t) for t in range(window)]  # frames k..k+2, oldest first
        read = [memory.read_rows(i) for i in range(memory.num_levels)]
        sizes.append([len(level) for level in read])
        out = agg(rows(3, k), local, rows(5, 1000 + k), read)
        memory.push(out.memory_push)
        outputs.append(out.features)
    return outputs, sizes


def test_streaming_memory_levels_sizes():
    agg = small_aggregator()
    memory = LongRangeMemory(num_levels=3, T_m=2, feat_dim=C)
    with torch.no_grad():
        _, sizes = stream(agg, memory, 4)
    # Read before push: frame 0 sees nothing, then 1 and 2 (= T_m) frames: 4 rows at level 0, 2 at 1-2.
    assert sizes == [[0, 0, 0], [4, 2, 2], [8, 4, 4], [8, 4, 4]]


def test_memory_off_equals_empty_memory():
    agg = small_aggregator()
    with torch.no_grad():
        off, _ = stream(agg, LongRangeMemory(num_levels=3, T_m=0, feat_dim=C), 3)
        on, _ = stream(agg, LongRangeMemory(num_levels=3, T_m=2, feat_dim=C), 3)
        no_memory = [
            agg(rows(3, k), [rows(4, 100 + k + t) for t in range(3)], rows(5, 1000 + k), None).features
            for k in range(3)
        ]
    assert all(torch.equal(a, b) for a, b in zip(off, no_memory))
    assert torch.equal(off[0], on[0])  # the first frame has an empty memory either way
    assert not torch.allclose(off[2], on[2], atol=1e-4)
