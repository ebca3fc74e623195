"""Relation module (docs/conventions.md#relation-module): the authors' reference vectors, the fast path
against the plain formula, hand-computed examples, parameter layout."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from megavod.models import relation as relation_mod
from megavod.models.relation import RelationModule, box_geometry_embedding, relative_box_geometry

from reference_data import load_relation_vector  # noqa: E402


def plain_relation(module: RelationModule, x, refs, x_boxes=None, ref_boxes=None, x_frames=None, ref_frames=None):
    """The authors' attention_module_multi_head written out: per head aggregate the *raw* references,
    then the grouped 1x1 conv Wv over the 16 x 1024 channels."""
    n, m = x.shape[0], refs.shape[0]
    h, c = module.num_heads, module.feat_dim
    d = c // h
    q = module.Wq(x).reshape(n, h, d).permute(1, 0, 2)
    k = module.Wk(refs).reshape(m, h, d).permute(1, 0, 2)
    aff = torch.bmm(q, k.transpose(1, 2))
    if module.u is not None:
        aff = aff + torch.bmm(module.u, k.transpose(1, 2))
    aff = (aff / math.sqrt(d)).permute(1, 0, 2)  # [N, h, M]
    if module.location_based:
        embedding = box_geometry_embedding(
            x_boxes, ref_boxes, module.embed_dim, module.wave_length, x_frames, ref_frames
        )
        position = F.relu(module.Wg(embedding.permute(2, 0, 1)[None]))  # [1, h, N, M]
        aff = (position[0].permute(1, 0, 2) + 1e-6).log() + aff
    weights = aff.softmax(dim=2)
    aggregated = (weights.reshape(n * h, m) @ refs).reshape(n, h * c, 1, 1)
    return module.Wv(aggregated).flatten(1)


def random_boxes(n, generator):
    xy = torch.rand(n, 2, generator=generator) * 200
    wh = torch.rand(n, 2, generator=generator) * 100 + 4
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize(
    "name, location_based, content_bias",
    [
        ("relation_mega_location_based.npz", True, True),
        ("relation_mega_location_free.npz", False, True),
        ("relation_rdn.npz", True, False),
    ],
)
def test_matches_authors_vectors(name, location_based, content_bias):
    # The shipped vectors keep two heads (tests/data/reference/README.md): full-size weights with those
    # heads' rows in place, compared on those heads' output columns (test_heads_are_separable).
    data = load_relation_vector(name)
    module = RelationModule(location_based=location_based, content_bias=content_bias)
    weights = {k: v for k, v in data.items() if k.split(".")[0] in ("Wg", "Wq", "Wk", "Wv", "u")}
    # Checkpoint conversion is a rename: the authors' tensors load with strict=True, no reshaping.
    module.load_state_dict(weights, strict=True)
    with torch.no_grad():
        out = module(data["roi_feat"], data["ref_feat"], data.get("rois"), data.get("ref_rois"))
        plain = plain_relation(module, data["roi_feat"], data["ref_feat"], data.get("rois"), data.get("ref_rois"))
    columns = data["columns"]
    expected = data["output"]
    scale = expected.abs().max()
    assert out.shape == (6, 1024) and expected.shape == (6, len(columns)) and len(columns) >= 128
    assert (out[:, columns] - expected).abs().max() / scale < 1e-4
    assert (plain[:, columns] - expected).abs().max() / scale < 1e-4
    if location_based:
        embedding = box_geometry_embedding(data["rois"], data["ref_rois"])
        # sin/cos of 100 * log(...): float32 rounding of the argument gives ~3e-5 absolute.
        assert torch.allclose(embedding, data["position_embedding"][0].permute(1, 2, 0), atol=1e-4)


def test_heads_are_separable():
    # Why the shipped vectors may keep two heads: output channels [64g, 64g + 64) of the full-size module
    # depend only on head g's rows of Wq, Wk, Wv (and its biases, Wg channel and u). Changing every
    # other head's parameters leaves them unchanged, on the fast path and the plain formula.
    g = torch.Generator().manual_seed(8)
    module = RelationModule(location_based=True, content_bias=True)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(std=0.05, generator=g)
    x, refs = torch.randn(6, 1024, generator=g), torch.randn(9, 1024, generator=g)
    boxes = random_boxes(6, g), random_boxes(9, g)
    kept = [0, 15]
    columns = torch.cat([torch.arange(64 * h, 64 * h + 64) for h in kept])
    other_heads = torch.tensor([h for h in range(16) if h not in kept])
    other_rows = torch.cat([torch.arange(64 * h, 64 * h + 64) for h in other_heads])
    with torch.no_grad():
        before = module(x, refs, *boxes), plain_relation(module, x, refs, *boxes)
        for linear in (module.Wq, module.Wk, module.Wv):
            linear.weight[other_rows] = torch.randn(linear.weight[other_rows].shape, generator=g)
            linear.bias[other_rows] = torch.randn(len(other_rows), generator=g)
        module.Wg.weight[other_heads] = torch.randn(module.Wg.weight[other_heads].shape, generator=g)
        module.Wg.bias[other_heads] = torch.randn(len(other_heads), generator=g)
        module.u[other_heads] = torch.randn(module.u[other_heads].shape, generator=g)
        after = module(x, refs, *boxes), plain_relation(module, x, refs, *boxes)
    for b, a in zip(before, after):
        assert not torch.allclose(b, a)  # the other heads' columns did change
        assert (a[:, columns] - b[:, columns]).abs().max() <= 1e-6 * b.abs().max()


@pytest.mark.parametrize("location_based", [True, False])
@pytest.mark.parametrize("content_bias", [True, False])
def test_fast_path_equals_plain_formula(location_based, content_bias):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    module = RelationModule(64, 4, 16, location_based=location_based, content_bias=content_bias)
    with torch.no_grad():  # larger weights than the init so that geometry and appearance both matter
        for p in module.parameters():
            p.normal_(std=0.3)
    x, refs = torch.randn(7, 64, generator=g), torch.randn(11, 64, generator=g)
    boxes = (random_boxes(7, g), random_boxes(11, g)) if location_based else (None, None)
    fast = module(x, refs, *boxes)
    # The plain formula in float64 is the exact value; the fast path (float32, w/h terms factored,
    # value projection first) must be within float32 rounding of it, as the plain formula in float32 is.
    exact_module = copy.deepcopy(module).double()
    exact = plain_relation(exact_module, x.double(), refs.double(), *(b if b is None else b.double() for b in boxes))
    plain = plain_relation(module, x, refs, *boxes)
    scale = exact.abs().max()
    # Float32 budget (one side; tests/error_budget.py): the appearance logit (Wq, 64, then q.k, 16) loses at
    # most 80 u of its operands sum|(q + u)_i k_i| / 4 <= 34 here: 1.6e-4; softmax weights move by at most
    # 2 max|d logit| in sum, the output by that x max|v| (<= 1.2 scale): 3.9e-4; Wv adds 64 u. The geometry
    # term (angles <= 315 rad: 5.6e-5 each, x sum|Wg| ~ 4) enters through w ~ relu(z) + 1e-6 with z ~ 0.1-3.
    # 4e-4 x scale; realised 1.2e-5 x scale (AVX2, ATen avx2 and default). A wrong head order is ~1e-1.
    assert (fast.double() - exact).abs().max() <= 4e-4 * scale
    assert (plain.double() - exact).abs().max() <= 4e-4 * scale
    # Same gradients too (training uses the fast path).
    fast_grads = torch.autograd.grad(fast.square().sum(), list(module.parameters()))
    exact_grads = torch.autograd.grad(exact.square().sum(), list(exact_module.parameters()))
    # Compared on the scale of all gradients: Wk.bias's true gradient is 0 (softmax ignores a per-query
    # constant), so its float noise is compared against that scale, not against itself.
    scale = max(g.abs().max() for g in exact_grads)
    for a, b in zip(fast_grads, exact_grads):
        # Backward runs the forward's chain again (through the same softmax): 2 x the forward's 4e-4.
        # Realised 5.5e-5 x scale (Wk.bias, true value 0: pure noise).
        assert (a.double() - b).abs().max() <= 8e-4 * scale


def test_geometry_bias_equals_the_embedding_formula():
    # The w/h terms enter through per-box factors (RelationModule._scale_factors), the x/y terms through
    # the per-pair embedding: together Wg . E_ij of the whole embedding, to float rounding.
    g = torch.Generator().manual_seed(3)
    for temporal in (False, True):
        module = RelationModule(32, 4, 16, location_based=True, content_bias=False, temporal_embedding=temporal)
        with torch.no_grad():
            module.Wg.weight.normal_(std=0.5, generator=g)
            module.Wg.bias.normal_(std=0.5, generator=g)
        qb, rb = random_boxes(13, g), random_boxes(17, g)
        qf, rf = (torch.randint(0, 50, (13,), generator=g), torch.randint(0, 50, (17,), generator=g)) if temporal else (None, None)
        with torch.no_grad():
            bias = module.geometry_bias(qb, rb, qf, rf)
            m64 = copy.deepcopy(module).double()
            embedding = box_geometry_embedding(qb.double(), rb.double(), 16, 1000.0,
                                               None if qf is None else qf, None if rf is None else rf)
            pre = F.linear(embedding, m64.Wg.weight.view(4, -1), m64.Wg.bias).permute(2, 0, 1)
            embedding32 = box_geometry_embedding(qb, rb, 16, 1000.0, qf, rf)  # the whole embedding in float32
            pre32 = F.linear(embedding32, module.Wg.weight.view(4, -1), module.Wg.bias).permute(2, 0, 1)
        # log(relu(.) + 1e-6) is ill-conditioned near 0, so compare relu(logit) = exp(bias) - 1e-6, and
        # against float32 rounding as the whole float32 embedding has it (sin/cos of 100 * dt are large
        # arguments).
        assert 0.3 < (pre > 0).double().mean() < 0.7
        error = (bias.double().exp() - 1e-6 - F.relu(pre)).abs().max()
        error32 = (F.relu(pre32).double() - F.relu(pre)).abs().max()
        assert error <= 2 * error32 + 1e-6 * pre.abs().max()
        clipped = pre < -1e-4
        assert (bias[clipped] - math.log(1e-6)).abs().max() < 1e-5


def test_attention_weights_reproduce_the_output():
    g = torch.Generator().manual_seed(2)
    module = RelationModule(32, 4, 8, location_based=True, content_bias=True)
    x, refs = torch.randn(5, 32, generator=g), torch.randn(6, 32, generator=g)
    xb, rb = random_boxes(5, g), random_boxes(6, g)
    with torch.no_grad():
        w = module.attention_weights(x, refs, xb, rb)  # [h, N, M]
        assert torch.allclose(w.sum(2), torch.ones(4, 5))
        aggregated = torch.einsum("hnm,mc->nhc", w, refs).reshape(5, 4 * 32, 1, 1)
        assert torch.allclose(module.Wv(aggregated).flatten(1), module(x, refs, xb, rb), atol=1e-6)


def hand_module(location_based):
    """One head, C = 2, E = 8: Wq = Wk = Wv = identity, u = (0.5, 0), Wv bias (0.25, -0.25)."""
    module = RelationModule(2, 1, 8, location_based=location_based, content_bias=True)
    with torch.no_grad():
        for linear in (module.Wq, module.Wk):
            linear.weight.copy_(torch.eye(2))
            linear.bias.zero_()
        module.u.copy_(torch.tensor([[[0.5, 0.0]]]))
        module.Wv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        module.Wv.bias.copy_(torch.tensor([0.25, -0.25]))
    return module


X = torch.tensor([[1.0, 0.0]])
REFS = torch.tensor([[1.0, 0.0], [0.0, 2.0]])


def test_hand_example_location_free():
    # a_0 = ((q + u) . k_0) / sqrt(2) = 1.5 / sqrt(2) = 1.06066, a_1 = (1.5, 0) . (0, 2) / sqrt(2) = 0.
    # w_0 = e^1.06066 / (e^1.06066 + 1) = 0.742817; out = w_0 (1, 0) + w_1 (0, 2) + (0.25, -0.25).
    with torch.no_grad():
        out = hand_module(False)(X, REFS)
    assert torch.allclose(out, torch.tensor([[0.992817, 0.264367]]), atol=1e-5)


def test_hand_example_location_based():
    module = hand_module(True)
    with torch.no_grad():
        module.Wg.weight.zero_()
        module.Wg.weight[0, 0] = 0.1  # sin(100 g_x)
        module.Wg.weight[0, 4] = -1.0  # -sin(100 g_w)
        module.Wg.bias.fill_(0.05)
    query = torch.tensor([[0.0, 0.0, 9.0, 9.0]])  # w = h = 10, centre (4.5, 4.5)
    refs_boxes = torch.tensor([[0.0, 0.0, 9.0, 9.0], [10.0, 0.0, 29.0, 9.0]])  # same box; w = 20, centre x 19.5
    # docs/conventions.md#relation-module by hand: g_x = log(|dx| / w_query + 1e-3), g_w = log(w_query / w_ref).
    g_x = [math.log(0 / 10 + 1e-3), math.log(15 / 10 + 1e-3)]
    g_w = [math.log(10 / 10), math.log(10 / 20)]
    geometry = [max(0.0, 0.1 * math.sin(100 * gx) - math.sin(100 * gw) + 0.05) for gx, gw in zip(g_x, g_w)]
    logits = [1.5 / math.sqrt(2) + math.log(geometry[0] + 1e-6), 0.0 + math.log(geometry[1] + 1e-6)]
    w0 = 1 / (1 + math.exp(logits[1] - logits[0]))
    expected = torch.tensor([[w0 + 0.25, 2 * (1 - w0) - 0.25]])
    with torch.no_grad():
        out = module(X, REFS, query, refs_boxes)
        weights = module.attention_weights(X, REFS, query, refs_boxes)
    # Float32 budget: the angles 100 g reach 690 rad (g_x = log(1e-3)) and 69 rad (g_w = log 0.5), each off
    # by ~3 u |100 g| (log, x 100, / wave_length^(k/F)): 1.2e-5 and 1.2e-5 on the geometry terms (Wg 0.1 and
    # 1.0), relative to them (0.087, 0.27) in the logits: 1.4e-4 and 4.8e-5; w0 (1 - w0) x their sum = 4.8e-5.
    # Realised 4.5e-6 (AVX2, ATen avx2 and default); a +1 px width convention moves w0 by ~1e-1.
    assert torch.allclose(weights[0, 0], torch.tensor([w0, 1 - w0]), atol=5e-5)
    assert torch.allclose(out, expected, atol=1e-4)  # out = (w0, 2 (1 - w0)) + bias: 2 x 4.8e-5
    # The geometry overrides appearance here: ref 1 wins although ref 0 has the larger appearance logit.
    assert w0 < 0.5


def test_relative_geometry_by_hand():
    query = torch.tensor([[0.0, 0.0, 9.0, 19.0]])  # w 10, h 20, centre (4.5, 9.5)
    ref = torch.tensor([[4.0, 9.0, 9.0, 19.0]])  # w 6, h 11, centre (6.5, 14)
    geometry = relative_box_geometry(query, ref)[0, 0]
    expected = [math.log(2 / 10 + 1e-3), math.log(4.5 / 20 + 1e-3), math.log(10 / 6), math.log(20 / 11)]
    assert torch.allclose(geometry, torch.tensor(expected), atol=1e-6)


def test_embedding_layout_and_temporal_term():
    g = torch.Generator().manual_seed(3)
    qb, rb = random_boxes(3, g), random_boxes(4, g)
    spatial = box_geometry_embedding(qb, rb)
    assert spatial.shape == (3, 4, 64)
    geometry = relative_box_geometry(qb, rb)
    # coordinate c, frequency k: sin at 16c + k, cos at 16c + 8 + k, t = 100 g / 1000^(k/8)
    c, k = 2, 5
    t = 100 * geometry[..., c] / 1000 ** (k / 8)
    assert torch.allclose(spatial[..., 16 * c + k], t.sin(), atol=1e-5)
    assert torch.allclose(spatial[..., 16 * c + 8 + k], t.cos(), atol=1e-5)
    qf, rf = torch.tensor([5, 5, 6]), torch.tensor([0, 5, 7, 9])
    full = box_geometry_embedding(qb, rb, query_frames=qf, ref_frames=rf)
    assert full.shape == (3, 4, 80)
    assert torch.equal(full[..., :64], spatial)
    dt = (rf[None, :] - qf[:, None]).float()
    assert torch.allclose(full[..., 64 + 3], (100 * dt / 1000 ** (3 / 8)).sin(), atol=1e-5)
    assert torch.allclose(full[1, 1, 64:], torch.tensor([0.0] * 8 + [1.0] * 8))  # same frame: dt = 0
    with pytest.raises(ValueError, match="together"):
        box_geometry_embedding(qb, rb, query_frames=qf)


def test_temporal_module_matches_plain_formula():
    g = torch.Generator().manual_seed(4)
    module = RelationModule(32, 4, 16, location_based=True, content_bias=True, temporal_embedding=True)
    assert module.Wg.weight.shape == (4, 20, 1, 1)
    x, refs = torch.randn(3, 32, generator=g), torch.randn(5, 32, generator=g)
    boxes = random_boxes(3, g), random_boxes(5, g)
    frames = torch.tensor([4, 4, 4]), torch.tensor([0, 1, 2, 3, 4])
    with torch.no_grad():
        fast = module(x, refs, *boxes, *frames)
        # Float32 budget, both sides: the plain formula embeds every term in float32, angles up to
        # 100 |g| = 475 rad (and 100 |dt| = 400) off by ~u |t| = 2.8e-5 (the fast path takes the w/h ones in
        # float64), x ~sqrt(20) Wg weights of 0.01: dz ~ 1.3e-6 against z ~ 0.03 (w ~ relu(z) + 1e-6, z <= 0.06):
        # weights move by ~4e-5 relative, the output by <= 2 x 4e-5 x max|v| (0.21) = 1.8e-5; x 4 (largest
        # element, other kernels): 1e-4 (out ~0.16). Realised 4.8e-7 (AVX2, ATen avx2 and default).
        assert torch.allclose(fast, plain_relation(module, x, refs, *boxes, *frames), atol=1e-4)
    with pytest.raises(ValueError, match="x_frames"):
        module(x, refs, *boxes)


def test_parameter_layout():
    mega_local = RelationModule(location_based=True, content_bias=True)
    shapes = {k: tuple(v.shape) for k, v in mega_local.state_dict().items()}
    assert shapes == {
        "Wq.weight": (1024, 1024), "Wq.bias": (1024,),
        "Wk.weight": (1024, 1024), "Wk.bias": (1024,),
        "Wv.weight": (1024, 1024, 1, 1), "Wv.bias": (1024,),
        "Wg.weight": (16, 64, 1, 1), "Wg.bias": (16,),
        "u": (16, 1, 64),
    }  # fmt: skip
    location_free = RelationModule(location_based=False, content_bias=True)
    assert location_free.Wg is None
    assert set(location_free.state_dict()) == set(shapes) - {"Wg.weight", "Wg.bias"}
    rdn = RelationModule(location_based=True, content_bias=False)
    assert rdn.u is None and set(rdn.state_dict()) == set(shapes) - {"u"}
    with pytest.raises(ValueError, match="geometry_bias"):
        location_free.geometry_bias(torch.zeros(1, 4), torch.zeros(1, 4))


def test_empty_sets_and_missing_boxes():
    module = RelationModule(16, 2, 8, location_based=True, content_bias=True)
    x, boxes = torch.randn(3, 16), torch.tensor([[0.0, 0.0, 5.0, 5.0]] * 3)
    assert torch.equal(module(x, torch.zeros(0, 16), boxes, torch.zeros(0, 4)), torch.zeros(3, 16))
    assert module(torch.zeros(0, 16), x, torch.zeros(0, 4), boxes).shape == (0, 16)
    with pytest.raises(ValueError, match="x_boxes and ref_boxes"):
        module(x, x)


def test_geometry_bias_chunking_is_exact(monkeypatch):
    g = torch.Generator().manual_seed(5)
    module = RelationModule(16, 2, 8, location_based=True, content_bias=False)
    qb, rb = random_boxes(9, g), random_boxes(7, g)
    with torch.no_grad():
        whole = module.geometry_bias(qb, rb)
        monkeypatch.setattr(relation_mod, "_GEOMETRY_CHUNK_ELEMENTS", 2 * 7 * 2)  # 2 heads x 7 refs x 2 query rows
        chunked = module.geometry_bias(qb, rb)
    with_grad = module.geometry_bias(qb, rb)  # the autograd path (no in-place relu/log)
    assert whole.shape == (2, 9, 7)
    assert torch.allclose(whole, chunked, atol=1e-6)
    assert with_grad.requires_grad and torch.allclose(with_grad, chunked, atol=1e-6)


def test_reference_projection_cache_hits_refreshes_and_forgets():
    from megavod.models.relation import ReferenceProjectionCache

    g = torch.Generator().manual_seed(6)
    module = RelationModule(16, 2, 8, location_based=False, content_bias=True)
    cache = ReferenceProjectionCache()

    class Owner:  # stands for a FrameFeatures / memory entry
        pass

    owner, rows = Owner(), torch.randn(5, 16, generator=g)
    with torch.no_grad():
        k, v = cache.get(owner, rows, module)
        assert cache.get(owner, rows, module)[0] is k  # hit: the same tensors, not recomputed
        expected = module.project_refs(rows)
        assert torch.equal(k, expected[0]) and torch.equal(v, expected[1])
        module.Wv.weight.mul_(2)  # weights changed in place (a training step, load_state_dict)
        k2, v2 = cache.get(owner, rows, module)
        assert torch.equal(v2, 2 * v) and len(cache) == 1
        other = RelationModule(16, 2, 8, location_based=False, content_bias=True)
        cache.get(owner, rows, other)  # one entry per (owner, module)
        assert len(cache) == 2
    del owner
    cache.prune()
    assert len(cache) == 0
    copy.deepcopy(cache)  # a model holding a cache can be copied (the copy starts empty)


def test_location_based_module_under_bf16_autocast():
    # CUDA training runs under bf16 autocast (train/engine.py); the geometry term stays float32 inside.
    g = torch.Generator().manual_seed(7)
    module = RelationModule(32, 4, 16, location_based=True, content_bias=True)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(std=0.3, generator=g)
    x, refs = torch.randn(5, 32, generator=g), torch.randn(9, 32, generator=g)
    xb, rb = random_boxes(5, g), random_boxes(9, g)
    reference = module(x, refs, xb, rb)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert module.geometry_bias(xb, rb).dtype == torch.float32
        out = module(x, refs, xb, rb)
    out.float().square().sum().backward()  # the autograd path works under autocast too
    assert module.Wg.weight.grad is not None and torch.isfinite(module.Wg.weight.grad).all()
    assert (out.float() - reference).abs().max() < 0.05 * reference.abs().max()


def test_given_geometry_and_projected_references_equal_the_plain_call():
    """forward's two short cuts (references projected earlier, ``ref_kv``; the geometry term of the last
    query rows computed earlier, ``geometry``: MEGA's memory and window rows) give the plain call's numbers:
    the split attends the other query rows apart (rows are independent)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(11)
    module = RelationModule(64, 4, 16, location_based=True, content_bias=True)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(std=0.3)
        x, refs = torch.randn(9, 64, generator=g), torch.randn(12, 64, generator=g)
        x_boxes, ref_boxes = random_boxes(9, g), random_boxes(12, g)
        plain = module(x, refs, x_boxes, ref_boxes)
        kv = module.project_refs(refs[5:])
        window = module.geometry_bias(x_boxes[4:], ref_boxes)
        given = module(x, refs[:5], x_boxes, ref_boxes, ref_kv=kv, geometry=window)
        only_kv = module(x, None, x_boxes, ref_boxes, ref_kv=module.project_refs(refs))
        exact = plain_relation(copy.deepcopy(module).double(), x.double(), refs.double(), x_boxes.double(),
                               ref_boxes.double())
    # Within test_fast_path_equals_plain_formula's float32 budget of the exact value, as the plain call is
    # (realised: the same numbers up to the attention kernel's blocking).
    scale = exact.abs().max()
    for out in (plain, given, only_kv):
        assert (out.double() - exact).abs().max() <= 4e-4 * scale


@pytest.mark.filterwarnings("ignore:`torch.jit.trace_method` is deprecated")  # the ONNX exporter's tracer
def test_traced_geometry_bias_follows_the_row_counts():
    """Traced (as the ONNX export does), geometry_bias takes its row counts from the inputs (16 chunks
    whose rows follow the count, no in-place writes) and gives the eager numbers at other sizes."""
    g = torch.Generator().manual_seed(12)
    module = RelationModule(16, 2, 8, location_based=True, content_bias=False)
    with torch.no_grad():
        traced = torch.jit.trace_module(module, {"geometry_bias": (random_boxes(20, g), random_boxes(6, g))},
                                        check_trace=False).geometry_bias
        for n, m in ((9, 7), (40, 13), (3, 30)):
            qb, rb = random_boxes(n, g), random_boxes(m, g)
            got, eager = traced(qb, rb), module.geometry_bias(qb, rb)
            assert got.shape == (2, n, m)
            # The same float32 operations per pair as the eager chunks (test_geometry_bias_chunking_is_exact).
            assert torch.allclose(got, eager, atol=1e-6)


def test_reference_projection_cache_keeps_a_graphs_outputs():
    """The ONNX Runtime backend keeps its ``project`` graph's outputs in the same cache, under its own source:
    ``missing`` names each owner once, ``put``/``kept`` store and find them, sources never mix."""
    from megavod.models.relation import ReferenceProjectionCache

    class Owner:
        pass

    cache, a, b = ReferenceProjectionCache(), Owner(), Owner()
    assert cache.missing([a, b, a], "project") == [a, b]
    tensors = (torch.ones(2, 3, 4), torch.zeros(2, 3, 4))
    cache.put(a, "project", tensors)
    assert cache.kept(a, "project") is tensors and cache.kept(a, "other") is None
    assert cache.missing([a, b], "project") == [b] and cache.missing([a], "project", version=1) == [a]
    del a
    cache.prune()
    assert len(cache) == 0
