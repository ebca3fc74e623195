"""GeometryBiasCache: the geometry term built from blocks kept between key frames equals computing it
whole, reuses exactly the (query frame, reference frame) pairs met before, and stays bounded."""

import copy

import torch

from megavod.models.geometry_cache import GeometryBiasCache
from megavod.models.relation import RelationModule

from error_budget import chain_budget

KEY_ROWS, FRAME_ROWS, DISTILLED, WINDOW, MEMORY = 8, 6, 2, 3, 2


def random_boxes(n, generator):
    xy = torch.rand(n, 2, generator=generator) * 200
    wh = torch.rand(n, 2, generator=generator) * 100 + 4
    return torch.cat([xy, xy + wh], dim=1)


def sliding_calls(module, cache, steps=8, seed=0):
    """A stream as local stage 0 sees it: queries [key; D of every window frame], references [window
    frames; memory frames]; the window slides by one frame per key, the oldest window frame moving to
    memory with its boxes. Yields (cached bias, whole bias, pairs computed at this key frame)."""
    g = torch.Generator().manual_seed(seed)
    frames = [random_boxes(FRAME_ROWS, g) for _ in range(steps + WINDOW)]
    for k in range(steps):
        memory = frames[max(0, k - MEMORY) : k]
        window = frames[k : k + WINDOW]
        key = random_boxes(KEY_ROWS, g)
        queries = torch.cat([key, *[f[:DISTILLED] for f in window]])
        refs = torch.cat([*window, *memory])
        before = cache.computed_pairs
        cache.next_frame()
        bias = cache.bias(module, queries, [KEY_ROWS] + [DISTILLED] * WINDOW, refs,
                          [FRAME_ROWS] * (WINDOW + len(memory)), uncached_queries=1)
        yield bias, module.geometry_bias(queries, refs), cache.computed_pairs - before


def make_module():
    module = RelationModule(16, 4, 16, location_based=True, content_bias=True)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(std=0.3, generator=torch.Generator().manual_seed(1))
    return module


@torch.no_grad()
def test_cached_blocks_equal_the_whole_term_and_only_new_pairs_are_computed():
    module, cache = make_module(), GeometryBiasCache()
    refs_full = (WINDOW + MEMORY) * FRAME_ROWS
    for k, (bias, whole, computed) in enumerate(sliding_calls(module, cache)):
        # Compared as relu(z) + 1e-6 = exp(bias), where the float32 budget is linear (log(. + 1e-6) would
        # divide it by the smallest positive z). z = Wg . E + b sums 17 terms of operands sum|w_i e_i| + |b|
        # <= ~4 (Wg ~ N(0, 0.3^2), |e| <= 1), in blocks of other shapes here than in the whole term (other
        # blocking, vectorised vs scalar sin/cos tails): both sides err, 2 x 17 u x 4 = 8.1e-6. Realised
        # 2.4e-7 (AVX2 and ATen default). A stale block (the previous key frame's) moves it by 2.5.
        torch.testing.assert_close(bias.exp(), whole.exp(), rtol=0, atol=chain_budget([17], magnitude=4, sides=2))
        if k == 0:
            assert computed == (KEY_ROWS + WINDOW * DISTILLED) * WINDOW * FRAME_ROWS  # nothing to reuse
        elif k >= MEMORY:  # steady state: the key and the newest window frame against every reference,
            # the other window frames' distilled rows against the newest window frame; the frame that
            # moved into memory keeps its blocks.
            assert computed == (KEY_ROWS + DISTILLED) * refs_full + (WINDOW - 1) * DISTILLED * FRAME_ROWS
        # Bounded: what this key frame used (the window frames' query groups x every reference frame)
        # and what the previous one used and this one did not (dropped at the next key frame).
        assert len(cache) <= 2 * WINDOW * (WINDOW + MEMORY)
    cache.next_frame()
    assert len(cache) == WINDOW * (WINDOW + MEMORY)


@torch.no_grad()
def test_changed_weights_or_boxes_are_never_served_from_the_cache():
    module, cache = make_module(), GeometryBiasCache()
    g = torch.Generator().manual_seed(3)
    queries, refs = random_boxes(2 + 4, g), random_boxes(5, g)
    first = cache.bias(module, queries, [2, 4], refs, [5], uncached_queries=1)
    module.Wg.weight.mul_(1.5)  # a training step or load_state_dict between two detections
    cache.next_frame()
    second = cache.bias(module, queries, [2, 4], refs, [5], uncached_queries=1)
    torch.testing.assert_close(second, module.geometry_bias(queries, refs), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first, second)
    moved = refs.clone()
    moved[0] += 7.0  # one reference box differs: its frame's blocks are new
    before = cache.computed_pairs
    cache.next_frame()
    third = cache.bias(module, queries, [2, 4], moved, [5], uncached_queries=1)
    torch.testing.assert_close(third, module.geometry_bias(queries, moved), rtol=1e-5, atol=1e-5)
    assert cache.computed_pairs - before == 6 * 5
    other = make_module()  # one set of blocks per module
    cache.next_frame()  # (drops the block of the old reference boxes)
    cache.bias(other, queries, [2, 4], moved, [5], uncached_queries=1)
    assert len(cache) == 2
    assert len(copy.deepcopy(cache)) == 0  # copies of a model start with an empty cache


@torch.no_grad()
def test_temporal_embedding_keys_include_the_frame_index():
    module = RelationModule(16, 4, 16, location_based=True, content_bias=True, temporal_embedding=True)
    with torch.no_grad():
        module.Wg.weight.normal_(std=0.3, generator=torch.Generator().manual_seed(2))
    cache, g = GeometryBiasCache(), torch.Generator().manual_seed(4)
    queries, refs = random_boxes(3, g), random_boxes(4, g)
    for shift in (0, 5):  # same boxes, other frame indices: another dt, another term
        qf, rf = torch.full((3,), 10 + shift), torch.full((4,), 12)
        cache.next_frame()
        bias = cache.bias(module, queries, [3], refs, [4], qf, rf)
        torch.testing.assert_close(bias, module.geometry_bias(queries, refs, qf, rf), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_assemble_with_any_block_function_and_a_reused_buffer():
    """``assemble`` with a block function of its own (what the ONNX runtime passes: a geometry graph) and
    one output buffer reused from key frame to key frame gives the term ``bias`` gives, in that buffer,
    computing the same pairs; blocks of the two sources are never mixed."""
    module = make_module()
    by_module, by_function = GeometryBiasCache(), GeometryBiasCache()
    g = torch.Generator().manual_seed(3)
    frames = [random_boxes(FRAME_ROWS, g) for _ in range(6 + MEMORY + WINDOW)]
    buffer = torch.full((module.num_heads, WINDOW * DISTILLED, (WINDOW + MEMORY) * FRAME_ROWS), float("nan"))
    for k in range(6):
        window, memory = frames[k + MEMORY : k + MEMORY + WINDOW], frames[k : k + MEMORY]
        queries, refs = torch.cat([f[:DISTILLED] for f in window]), torch.cat([*window, *memory])
        counts = [DISTILLED] * WINDOW, [FRAME_ROWS] * (WINDOW + MEMORY)
        by_module.next_frame()
        by_function.next_frame()
        expected = by_module.bias(module, queries, counts[0], refs, counts[1])
        got = by_function.assemble(
            "a geometry graph", module.num_heads,
            lambda qi, ri: module.geometry_bias(queries[qi], refs[ri]),  # noqa: B023 (called here, at once)
            queries, counts[0], refs, counts[1], out=buffer)
        assert got.data_ptr() == buffer.data_ptr()
        assert torch.equal(got, expected)
        assert by_function.computed_pairs == by_module.computed_pairs
    try:
        by_function.assemble("a geometry graph", module.num_heads, lambda qi, ri: None, queries, counts[0], refs,
                             counts[1], out=buffer[:, :1])
    except ValueError as e:
        assert "out is" in str(e)
    else:
        raise AssertionError("a buffer of the wrong shape was accepted")
    other_source = GeometryBiasCache()
    other_source._used = dict(by_function._used)  # the same keys under another source: never a hit
    other_source.next_frame()
    other_source.bias(module, queries, counts[0], refs, counts[1])
    assert other_source.computed_pairs == len(queries) * len(refs)
