"""YOLOV's selection, feature aggregation and post-processing (megavod/models/yolov_head.py): equal to the
authors' own functions on the vectors of tests/data/reference (make_yolov_vectors.py), hand-computed
cases, and the invariants the schedule relies on (queried rows = whole batch, frame order, the two
affinities)."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from megavod.models.yolov_head import (
    YOLOVAggregation,
    base_detections,
    class_aware_nms,
    refined_detections,
    select_proposals,
)

from error_budget import U, chain_budget  # noqa: E402
from reference_data import load_yolov_vector  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

AGGREGATION_KEYS = ("msa.qkv_cls.weight", "msa.qkv_reg.weight", "linear1.weight", "linear1.bias",
                    "linear2.weight", "linear2.bias")


def aggregation_budget(width: int, heads: int, rows: int, magnitude: float, sides: int = 2) -> float:
    """Worst-case float32 error of an output of the aggregation (tests/error_budget.py): the q/k/v
    projections (W), the per-head cosine (d, plus its two norms), whose absolute error the softmax of
    25 cos(.) c_j turns into 25 times as large a relative error of A, A v (N rows, weights summing to 1),
    linear1 (2W), the pooling over N rows, linear2 (4W); x4 for the operands' magnitudes (sum |a_i b_i|
    of a random layer exceeds |sum a_i b_i|) and other kernels."""
    d = width // heads
    lengths = (width, 25 * (d + 2), rows, 2 * width, rows, 4 * width)
    return chain_budget(lengths, magnitude=magnitude, sides=sides, margin=4.0)


def corners(cxcywh: torch.Tensor) -> torch.Tensor:
    """x1y1x2y2 as the authors' postpro_woclass computes them."""
    cx, cy, w, h = cxcywh.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def reference_module(data, affinity: str) -> YOLOVAggregation:
    width = data["cls_feats"].shape[1]
    module = YOLOVAggregation(width, heads=4, scale=25.0, sim_thresh=0.75, affinity=affinity).eval()
    module.load_state_dict({k: data[k] for k in AGGREGATION_KEYS}, strict=True)
    return module


def clustered_rows(n: int, width: int, clusters: int = 3, noise: float = 0.05, seed: int = 0):
    """Rows near ``clusters`` random centres (mean cosines far from 0.75 for most pairs), scores in (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    owner = torch.randint(0, clusters, (n,), generator=g)
    cls = torch.randn(clusters, width, generator=g)[owner] + noise * torch.randn(n, width, generator=g)
    reg = torch.randn(clusters, width, generator=g)[owner] + noise * torch.randn(n, width, generator=g)
    conf = 0.05 + 0.9 * torch.rand(n, generator=g)
    obj = 0.05 + 0.9 * torch.rand(n, generator=g)
    return cls, reg, conf, obj


# ------------------------------------------------------------------------------------------------
# The authors' vectors


def test_selection_equals_authors():
    """postpro_woclass's indices on 2 frames of 840 anchors (the 750 cut, the NMS and the 30 cut each
    change the result there: make_yolov_vectors.py asserts it). Integer decisions on the same float32
    values: exactly equal."""
    data = load_yolov_vector("yolov_selection.npz")
    pred = data["pred"]
    for frame, expected in zip(pred, data["index"]):
        got = select_proposals(corners(frame[:, :4]), frame[:, 4], frame[:, 5:])
        assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("affinity", ["2022", "2023"])
def test_aggregation_equals_authors(affinity):
    """MSA_yolov of 28ff8b0 (2022) and fe777cb (2023) on 3 frames x 30 rows, width 32, 4 heads."""
    data = load_yolov_vector(f"yolov_aggregation_{affinity}.npz")
    assert data["affinity"] == affinity
    module = reference_module(data, affinity)
    with torch.no_grad():
        got = module(data["cls_feats"], data["reg_feats"], data["cls_conf"], data["objectness"])
    expected = data["output"]
    budget = aggregation_budget(32, 4, expected.shape[0], expected.abs().max().item())
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= budget


@pytest.mark.parametrize("affinity", ["2022", "2023"])
def test_authors_pooling_is_the_documented_formula(affinity):
    """The authors' pooling weights (Attention_msa's sim_round2) are YOLOVAggregation's docstring formula,
    computed here in float64 from their inputs: M = [mean_h cos(v_i, v_j) > 0.75], P = softmax of the
    mean over heads of A = (A_cls + A_reg) / 2, W = M P / rowsum; the mask is partly 0 and partly 1."""
    data = load_yolov_vector(f"yolov_aggregation_{affinity}.npz")
    x_cls, x_reg = data["cls_feats"].double(), data["reg_feats"].double()
    conf, obj = data["cls_conf"].double(), data["objectness"].double()
    n, heads = x_cls.shape[0], 4

    def split(x, weight):
        return (x @ weight.double().T).reshape(n, 3, heads, -1).permute(1, 2, 0, 3)  # [3, H, N, d]

    def unit(x):
        return x / x.norm(dim=-1, keepdim=True)

    q, k, v = split(x_cls, data["msa.qkv_cls.weight"])
    qr, kr, _ = split(x_reg, data["msa.qkv_reg.weight"])
    a_cls = (25 * (unit(q) @ unit(k).transpose(1, 2)) * conf).softmax(-1)
    reg_factor = obj if affinity == "2022" else 1.0
    a_reg = (25 * (unit(qr) @ unit(kr).transpose(1, 2)) * reg_factor).softmax(-1)
    attn = (a_cls + a_reg) / 2
    mask = ((unit(v) @ unit(v).transpose(1, 2)).mean(0) > 0.75).double()
    weights = mask * attn.mean(0).softmax(-1)
    weights = weights / weights.sum(-1, keepdim=True)
    assert torch.equal(mask.bool(), data["mask"])
    assert 0.2 <= data["mask"].float().mean().item() <= 0.8
    # float32 against float64: one side of the budget up to the pooling (no linear layers).
    budget = chain_budget((32, 25 * 10, n), magnitude=1.0, sides=1, margin=4.0)
    assert (weights - data["pooling"].double()).abs().max().item() <= budget


def test_two_commits_share_inputs_and_differ_in_output():
    """Both files hold the same inputs and weights (one seed); their outputs differ (objectness in the
    2022 regression branch) by far more than rounding."""
    old, new = load_yolov_vector("yolov_aggregation_2022.npz"), load_yolov_vector("yolov_aggregation_2023.npz")
    for key in AGGREGATION_KEYS + ("cls_feats", "reg_feats", "cls_conf", "objectness", "mask"):
        assert torch.equal(old[key], new[key]), key
    assert (old["output"] - new["output"]).abs().max().item() > 1e-2


def test_postprocess_equals_authors():
    """postprocess's refined output and output_ori (= postprocess_single_img) on 2 frames of 30
    proposals: same boxes and classes in the same order; scores objectness x sigmoid within a few ulp
    (the sigmoid's vectorised and scalar kernels may differ in the last bit)."""
    data = load_yolov_vector("yolov_postprocess.npz")
    for i, (rows, logits) in enumerate(zip(data["proposals"], data["logits"])):
        boxes, obj, scores = rows[:, :4], rows[:, 4], rows[:, 7:]
        for name, got in (("refined", refined_detections(boxes, obj, logits)),
                          ("base", base_detections(boxes, obj, scores))):
            expected = data[f"{name}_{i}"]
            assert len(got) == len(expected), name
            assert torch.equal(got.boxes, expected[:, :4]), name
            assert torch.equal(got.labels, expected[:, 6].long() + 1), name
            want = expected[:, 4] * expected[:, 5]
            assert torch.allclose(got.scores, want, rtol=8 * U, atol=0), name


# ------------------------------------------------------------------------------------------------
# Invariants of the aggregation


@pytest.mark.parametrize("queries", [slice(30, 60), slice(0, 90), torch.tensor([89, 3, 47, 3]),
                                     slice(0, 75), torch.arange(10)])
def test_queried_rows_equal_whole_batch(queries):
    """Any queried rows (few: the SDPA path; most: the whole-A path) give the whole batch's rows."""
    data = load_yolov_vector("yolov_aggregation_2022.npz")
    module = reference_module(data, "2022")
    args = (data["cls_feats"], data["reg_feats"], data["cls_conf"], data["objectness"])
    with torch.no_grad():
        whole = module(*args)
        part = module(*args, queries=queries)
    expected = whole[queries]
    budget = aggregation_budget(32, 4, 90, expected.abs().max().item())
    assert part.shape == expected.shape
    assert (part - expected).abs().max().item() <= budget


def test_reordering_frames_permutes_outputs():
    """The aggregation is over a set of rows: frames (blocks of 30 rows) in another order give the same
    rows in that order."""
    data = load_yolov_vector("yolov_aggregation_2023.npz")
    module = reference_module(data, "2023")
    args = [data["cls_feats"], data["reg_feats"], data["cls_conf"], data["objectness"]]
    order = torch.cat([torch.arange(60, 90), torch.arange(0, 30), torch.arange(30, 60)])
    with torch.no_grad():
        whole = module(*args)
        permuted = module(*[a[order] for a in args])
    budget = aggregation_budget(32, 4, 90, whole.abs().max().item())
    assert (permuted - whole[order]).abs().max().item() <= budget


def test_affinities_differ_only_through_objectness():
    """2022 and 2023 are one module with one switch: equal (bit for bit) when every objectness is 1,
    different otherwise."""
    cls, reg, conf, obj = clustered_rows(60, 32)
    old = YOLOVAggregation(32, affinity="2022").eval()
    new = YOLOVAggregation(32, affinity="2023").eval()
    new.load_state_dict(old.state_dict())
    with torch.no_grad():
        ones = torch.ones(60)
        assert torch.equal(old(cls, reg, conf, ones), new(cls, reg, conf, ones))
        assert torch.equal(old(cls, reg, conf, ones, queries=slice(0, 10)),
                           new(cls, reg, conf, ones, queries=slice(0, 10)))
        assert (old(cls, reg, conf, obj) - new(cls, reg, conf, obj)).abs().max().item() > 1e-3


def test_parameter_names_and_shapes():
    """The authors' head.trans.* keys and shapes (YOLOV-S: width 128, spec listing yolov_s.txt)."""
    module = YOLOVAggregation(128)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert shapes == {
        "msa.qkv_cls.weight": (384, 128), "msa.qkv_reg.weight": (384, 128),
        "linear1.weight": (256, 256), "linear1.bias": (256,),
        "linear2.weight": (512, 512), "linear2.bias": (512,),
    }
    with pytest.raises(ValueError, match="affinity"):
        YOLOVAggregation(128, affinity="2024")


def float16_against_float32(device: str) -> None:
    """float16 weights and inputs on ``device`` (the authors' model.half()) give a float16 output there,
    close to float32 on the CPU on the same float16-exact values. Clustered rows keep the mask's decisions
    far from 0.75 (asserted), so only float16 rounding separates the two: a typical float16 chain
    (u = 2**-11, sqrt of the summed lengths of both sides, x4)."""
    cls, reg, conf, obj = clustered_rows(90, 32)
    module = YOLOVAggregation(32).eval()
    module.load_state_dict({k: v.half().float() for k, v in module.state_dict().items()})
    inputs = [t.half().float() for t in (cls, reg, conf, obj)]
    with torch.no_grad():
        v = module.msa.qkv_cls(inputs[0])[:, 64:].reshape(90, 4, 8).transpose(0, 1)
        v = v / v.norm(dim=-1, keepdim=True)
        cosine = (v @ v.transpose(1, 2)).mean(0)
        assert (cosine - 0.75).abs().min().item() > 0.05
        full = module(*inputs)
        module.half().to(device)
        low_inputs = [t.half().to(device) for t in inputs]
        low = module(*low_inputs)
        low_part = module(*low_inputs, queries=slice(0, 30))
    for out in (low, low_part):
        assert out.dtype == torch.float16 and out.device.type == device
    lengths = (32, 25 * 10, 90, 64, 90, 128)
    budget = 4 * math.sqrt(2 * sum(lengths)) * 2.0**-11 * full.abs().max().item()
    assert (low.float().cpu() - full).abs().max().item() <= budget
    assert (low_part.float().cpu() - full[:30]).abs().max().item() <= budget


def test_float16_follows_the_inputs():
    float16_against_float32("cpu")


# ------------------------------------------------------------------------------------------------
# Selection and post-processing by hand


def box(x1, y1, x2, y2):
    return [float(x1), float(y1), float(x2), float(y2)]


def test_selection_by_hand():
    """Top by objectness, class-aware NMS on objectness x max class (suppress at IoU > 0.75 only),
    first ``keep`` by that score."""
    boxes = torch.tensor([
        box(0, 0, 10, 10),   # 0: obj .9, class 0 .5 -> .45
        box(0, 0, 10, 11),   # 1: IoU 10/11 = .91 with 0, class 0 .9 -> .72: kept, suppresses 0
        box(0, 0, 10, 10),   # 2: same box as 0, class 1 -> other class: kept
        box(0, 0, 16, 10),   # 3: IoU with 1 = 100/(110+160-100) = .588: kept (class 0)
        box(50, 50, 60, 60),  # 4: lowest objectness: cut by pre_top=4
    ])
    obj = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    cls = torch.tensor([[0.5, 0.1], [0.9, 0.0], [0.2, 0.4], [0.3, 0.1], [1.0, 0.0]])
    assert select_proposals(boxes, obj, cls, pre_top=4).tolist() == [1, 2, 3]
    assert select_proposals(boxes, obj, cls, pre_top=4, keep=2).tolist() == [1, 2]
    # Without the cut anchor 4 (score .5) comes second.
    assert select_proposals(boxes, obj, cls, pre_top=750).tolist() == [1, 4, 2, 3]
    # IoU exactly 0.75 is not suppressed (torchvision: IoU > threshold): 0 vs [0, 0, 10, 7.5].
    pair = torch.tensor([box(0, 0, 10, 10), box(0, 0, 10, 7.5)])
    assert select_proposals(pair, torch.tensor([0.9, 0.8]), torch.ones(2, 1)).tolist() == [0, 1]


def test_selection_fewer_anchors_than_pre_top():
    """An image with fewer anchors than 750 (the authors' topk would raise): all of them go to the NMS,
    the same as ranking them all."""
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(120, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 5 + 40 * torch.rand(120, 2, generator=g)], dim=1)
    obj, cls = torch.rand(120, generator=g), torch.rand(120, 5, generator=g)
    got = select_proposals(boxes, obj, cls)
    assert torch.equal(got, select_proposals(boxes, obj, cls, pre_top=120))
    conf, label = cls.max(1)
    order = torch.argsort(obj * conf, descending=True)
    kept = torchvision.ops.batched_nms(boxes[order], (obj * conf)[order], label[order], 0.75)
    assert got.tolist() == order[kept][:30].tolist()


def test_ties_lower_index_first():
    """Equal objectness at the pre_top cut keeps the lower indices; equal scores at the NMS go in index
    order (docs/conventions.md#ties), whatever the kernels do with ties."""
    boxes = torch.tensor([box(10 * i, 0, 10 * i + 8, 8) for i in range(6)])  # disjoint
    obj = torch.tensor([0.5, 0.9, 0.5, 0.5, 0.9, 0.5])
    cls = torch.ones(6, 1)
    assert select_proposals(boxes, obj, cls, pre_top=3).tolist() == [1, 4, 0]
    same = torch.tensor([box(0, 0, 10, 10)] * 4)  # identical boxes, equal scores: the first survives
    assert select_proposals(same, torch.full((4,), 0.5), torch.ones(4, 1)).tolist() == [0]
    assert class_aware_nms(same, torch.full((4,), 0.5), torch.tensor([1, 0, 1, 0]), 0.5).tolist() == [0, 1]


def test_refined_detections_by_hand():
    """Every (proposal, class) with sigmoid >= 0.001, scored objectness x sigmoid, >= 0.001, class-aware
    NMS 0.5; labels = class + 1."""
    boxes = torch.tensor([box(0, 0, 10, 10), box(1, 0, 11, 10), box(40, 40, 50, 50)])
    obj = torch.tensor([0.8, 0.5, 0.001])
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    logits = torch.tensor([
        [logit(0.9), logit(0.0005), logit(0.3)],   # .72, class 1 below 0.001 (dropped), .24
        [logit(0.95), logit(0.6), logit(0.0015)],  # .475 suppressed by .72 (IoU .82), .3, .00075 < .001
        [logit(0.9), logit(0.3), logit(0.6)],      # .001 x p < .001: none
    ])
    det = refined_detections(boxes, obj, logits)
    assert det.labels.tolist() == [1, 2, 3]
    assert torch.allclose(det.scores, torch.tensor([0.8 * 0.9, 0.5 * 0.6, 0.8 * 0.3]), rtol=1e-6)
    assert torch.equal(det.boxes, boxes[[0, 1, 0]])


def test_base_detections_by_hand():
    """One detection per proposal: its top class, objectness x that score >= 0.001, class-aware NMS 0.5."""
    boxes = torch.tensor([box(0, 0, 10, 10), box(1, 0, 11, 10), box(0, 0, 10, 10), box(40, 40, 50, 50)])
    obj = torch.tensor([0.5, 0.9, 0.4, 0.001])
    cls = torch.tensor([[0.8, 0.1], [0.6, 0.2], [0.1, 0.5], [0.9, 0.0]])
    det = base_detections(boxes, obj, cls)
    # 1 (.54, class 0) suppresses 0 (.40, class 0, IoU .82); 2 (.20, class 1) kept; 3 (.0009) below 0.001.
    assert det.labels.tolist() == [1, 2]
    assert torch.allclose(det.scores, torch.tensor([0.54, 0.2]), rtol=1e-6)
    assert torch.equal(det.boxes, boxes[[1, 2]])
    empty = base_detections(boxes[:0], obj[:0], cls[:0])
    assert len(empty) == 0 and empty.labels.dtype == torch.int64


@pytest.mark.cuda
def test_on_cuda():
    """No device hard-coded: the aggregation in float16 on CUDA (as the authors evaluate), the selection
    and both post-processings on CUDA equal to the CPU (float32 inputs: the same integer decisions)."""
    float16_against_float32("cuda")
    sel = load_yolov_vector("yolov_selection.npz")
    frame = sel["pred"][0].cuda()
    got = select_proposals(corners(frame[:, :4]), frame[:, 4], frame[:, 5:])
    assert got.device.type == "cuda" and got.tolist() == sel["index"][0].tolist()
    half = select_proposals(corners(frame[:, :4].half()), frame[:, 4].half(), frame[:, 5:].half())
    assert half.device.type == "cuda" and len(half) == 30
    post = load_yolov_vector("yolov_postprocess.npz")
    rows, logits = post["proposals"][0].cuda(), post["logits"][0].cuda()
    refined = refined_detections(rows[:, :4], rows[:, 4], logits)
    base = base_detections(rows[:, :4], rows[:, 4], rows[:, 7:])
    assert torch.equal(refined.labels.cpu(), post["refined_0"][:, 6].long() + 1)
    assert torch.equal(base.labels.cpu(), post["base_0"][:, 6].long() + 1)
    refined_half = refined_detections(rows[:, :4].half(), rows[:, 4].half(), logits.half())
    assert refined_half.scores.dtype == torch.float32 and len(refined_half) > 0
