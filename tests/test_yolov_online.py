"""The online YOLOV's bank and key step (megavod/models/yolov_online.py) against the authors' own code
(tests/data/reference/README.md#the-online-yolov-vectors) and hand-computed cases."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from error_budget import U, chain_budget, typical_chain
from megavod.models.yolov_head import YOLOVAggregation, base_detections, refined_detections
from megavod.models.yolov_online import (
    BANK_FRAMES,
    CHOSEN_FRAMES,
    LOCAL_FRAMES,
    KeyRows,
    LocalRows,
    OnlineBank,
    local_blend,
    online_key_logits,
)
from reference_data import REFERENCE

VECTORS = REFERENCE / "yolov_online.npz"


@pytest.fixture(scope="module")
def vectors() -> dict[str, np.ndarray]:
    with np.load(VECTORS) as data:
        return {k: data[k] for k in data.files}


def tiny_rows(rows: int = 1, width: int = 4) -> KeyRows:
    return KeyRows(torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(rows, 1), torch.ones(rows), torch.ones(rows),
                   torch.ones(rows, width), torch.ones(rows, width))


def rows_at(v: dict[str, np.ndarray], t: int) -> KeyRows:
    f = lambda name: torch.from_numpy(v[f"stream_{name}"][t].astype(np.float32))  # noqa: E731 (float16-exact)
    return KeyRows(f("boxes"), f("objectness"), f("class_conf"), f("cls_features"), f("reg_features"))


def unpad(row: np.ndarray) -> tuple[int, ...]:
    return tuple(int(x) for x in row if x >= 0)


# -- the bank ------------------------------------------------------------------------------------------


def test_selection_sequence_equals_authors(vectors):
    """650 frames: the frames every step reads, and the local frames, are those their
    ``online_previous_selection`` loop reads (through the 600-frame cut and beyond)."""
    chosen, local = vectors["selection_chosen"], vectors["selection_local"]
    bank = OnlineBank()
    rows = tiny_rows()
    for k in range(len(chosen)):
        refs = bank.references()
        if refs is None:
            assert unpad(chosen[k]) == ()
        else:
            assert refs.frames == unpad(chosen[k]), k
            assert refs.local_frames == unpad(local[k]), k
        bank.push(rows, None if refs is None else torch.zeros(1, 16))
    assert len(chosen) > BANK_FRAMES + CHOSEN_FRAMES


def test_order_is_the_seeded_shuffle():
    """A step applies ``random.seed(42); random.shuffle`` to the bank (so the permutation depends only on its
    length), and leaves the process's global generator alone."""
    bank = OnlineBank()
    for n in (2, 3, 31, 600):
        expected = list(range(n))
        random.Random(42).shuffle(expected)
        assert bank.order(n) == expected
        global_state = random.getstate()
        random.seed(42)
        theirs = list(range(n))
        random.shuffle(theirs)
        random.setstate(global_state)
        assert theirs == expected
    state = random.getstate()
    for _ in range(5):
        bank.push(tiny_rows(), None)
        bank.references()
    assert random.getstate() == state


def test_in_place_order_compounds():
    """The bank's order after k steps is the composition of the per-length permutations, the new frame
    appended after each shuffle (hand-built from ``order``)."""
    bank, expected = OnlineBank(), []
    for k in range(8):
        refs = bank.references()
        if len(expected) >= 2:
            perm = bank.order(len(expected))
            expected = [expected[i] for i in perm]
            assert refs.frames == tuple(expected[:CHOSEN_FRAMES])
        else:
            assert refs is None
        expected.append(k)
        bank.push(tiny_rows(), None)
    assert [t for t, _ in bank.frames] == expected


def test_memory_is_bounded():
    """Over a stream longer than the bank, at most 600 frames of rows and 20 local frames are held, and a
    step reads 31 frames of rows and the last 20 aggregated frames."""
    bank = OnlineBank()
    rows = tiny_rows(rows=3)
    for k in range(BANK_FRAMES + 150):
        refs = bank.references()
        if refs is not None:
            assert len(refs.frames) == min(CHOSEN_FRAMES, k)
            assert refs.cls_features.shape[0] == 3 * len(refs.frames)
            if refs.local is not None:
                assert refs.local_frames == tuple(range(max(2, k - LOCAL_FRAMES), k))
                assert refs.local.features.shape[0] == 3 * len(refs.local_frames)
        bank.push(rows, None if refs is None else torch.zeros(3, 16))
        assert len(bank.frames) == min(k + 1, BANK_FRAMES)
        assert len(bank.local) <= LOCAL_FRAMES
    held = [t for t, _ in bank.frames]
    assert len(set(held)) == BANK_FRAMES and held[-1] == BANK_FRAMES + 149


def test_banks_are_independent():
    """Two streams interleaved read what each reads alone (each bank owns its generator)."""
    def run(banks, order):
        seen = {i: [] for i in range(len(banks))}
        for i in order:
            refs = banks[i].references()
            seen[i].append(None if refs is None else refs.frames)
            banks[i].push(tiny_rows(), None)
        return seen
    alone = run([OnlineBank()], [0] * 48)[0]
    mixed = run([OnlineBank(), OnlineBank()], [0, 1, 1, 0, 1] * 16)
    assert mixed[0] == alone[:len(mixed[0])] and mixed[1] == alone[:len(mixed[1])]


# -- the local blend, by hand ---------------------------------------------------------------------------


def test_local_blend_by_hand():
    """One key row, three local rows: cosines 0.1, 0, 1; IoUs 1, 1/3 (float16: 0.333251953125), 1/2; the
    third row's score is 0.4 below the key's, so its logit is 0 (it still enters, with exp(0))."""
    key = KeyRows(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([0.5]), torch.tensor([1.0]),
                  torch.zeros(1, 2), torch.zeros(1, 2))
    features = torch.tensor([[2.0, 0.0]])
    s = math.sqrt(0.99)
    local = LocalRows(
        features=torch.tensor([[0.1, s], [0.0, 3.0], [4.0, 0.0]]),
        boxes=torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [0.0, 0.0, 10.0, 5.0]]),
        class_confidence=torch.tensor([0.9, 0.5, 0.2]),
        objectness=torch.tensor([1.0, 0.6, 0.5]),  # scores 0.9, 0.3, 0.1 against the key's 0.5
    )
    iou_third = 0.333251953125  # float16(1/3): their compute_geo_sim returns float16
    w = np.array([math.exp(25 * 0.1) * 1.0, 1.0 * iou_third, 1.0 * 0.5])  # softmax's denominator cancels
    w /= w.sum()
    expected = (w @ local.features.double().numpy() + features.double().numpy()) / 2
    got = local_blend(features, key, local)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=16 * U * 4)


def test_local_blend_no_overlap_is_nan():
    """A key row that overlaps no local row: 0/0, as theirs (the refined post-processing then drops it)."""
    key = KeyRows(torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]]), torch.ones(2),
                  torch.ones(2), torch.zeros(2, 2), torch.zeros(2, 2))
    local = LocalRows(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0, 5.0, 5.0]]), torch.ones(1), torch.ones(1))
    out = local_blend(torch.tensor([[1.0, 1.0], [1.0, 1.0]]), key, local)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()
    det = refined_detections(key.boxes, key.objectness, torch.stack([torch.zeros(3), torch.full((3,), math.nan)]))
    # the NaN row gives nothing; the other row one detection per class (the NMS is class-aware)
    assert det.labels.tolist() == [1, 2, 3] and torch.equal(det.boxes, key.boxes[[0, 0, 0]])


def test_local_blend_float16():
    """In float16 (the authors' CUDA evaluation) the blend keeps the features' dtype and stays within
    float16 rounding of the float32 blend: 25 cos rounded to float16 moves a softmax weight by up to
    25 u16 relative, the cosines, weights and sums each by a few u16 (u16 = 2**-11)."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(6, 16, generator=g).half()
    boxes = (torch.rand(6, 2, generator=g) * 40).repeat(1, 2) + torch.tensor([0.0, 0.0, 30.0, 30.0])
    local_boxes = (torch.rand(40, 2, generator=g) * 40).repeat(1, 2) + torch.tensor([0.0, 0.0, 30.0, 30.0])
    key = KeyRows(boxes.half(), torch.rand(6, generator=g).half(), torch.rand(6, generator=g).half(),
                  features, features)
    local = LocalRows(torch.randn(40, 16, generator=g).half(), local_boxes.half(),
                      torch.rand(40, generator=g).half(), torch.rand(40, generator=g).half())
    out16 = local_blend(features, key, local)
    as32 = lambda x: x.float()  # noqa: E731
    out32 = local_blend(as32(features), KeyRows(*map(as32, (key.boxes, key.objectness, key.class_confidence,
                                                            features, features))),
                        LocalRows(*map(as32, (local.features, local.boxes, local.class_confidence, local.objectness))))
    assert out16.dtype == torch.float16 and torch.isfinite(out32).all()
    u16 = 2.0**-11
    magnitude = float(local.features.abs().max())
    assert float((out16.float() - out32).abs().max()) <= (2 * 25 + 8) * u16 * magnitude


@torch.no_grad()
def test_rows_may_be_missing():
    """A frame with no proposals still takes its turn: it reads (and shuffles) the bank and enters it, as
    theirs calls ``online_previous_selection`` before its head; its step gives [0, C] logits."""
    from megavod.models.yolov_head import YOLOVAggregation as Aggregation
    aggregation, linear_pred = Aggregation(8, heads=4).eval(), nn.Linear(32, 31)
    bank, frames = OnlineBank(), []
    for k, p in enumerate([3, 0, 3, 0, 3]):
        rows = KeyRows(torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(p, 1), torch.ones(p), torch.ones(p),
                       torch.randn(p, 8), torch.randn(p, 8))
        step = online_key_logits(aggregation, linear_pred, rows, bank)
        if step is not None:
            assert step.logits.shape == (p, 30)
            frames.append(step.frames)
        bank.push(rows, None if step is None else step.features)
    assert frames == [(1, 0), (0, 1, 2), (2, 1, 3, 0)]  # order(2) = [1, 0], order(3) = [1, 0, 2], ...


# -- the key step against the authors' head --------------------------------------------------------------


def authors_modules(v: dict[str, np.ndarray]) -> tuple[YOLOVAggregation, nn.Linear]:
    width = v["stream_cls_features"].shape[-1]
    aggregation = YOLOVAggregation(width, heads=4, scale=25.0, sim_thresh=0.75, affinity="2022")
    linear_pred = nn.Linear(4 * width, 31)
    weights = {k.split(":", 1)[1]: torch.from_numpy(a.astype(np.float32)) for k, a in v.items() if k.startswith("weight:")}
    aggregation.load_state_dict({k[len("trans."):]: w for k, w in weights.items() if k.startswith("trans.")})
    linear_pred.load_state_dict({k[len("linear_pred."):]: w for k, w in weights.items() if k.startswith("linear_pred.")})
    return aggregation.eval(), linear_pred.eval()


def logit_budget(linear_pred: nn.Linear, blended: torch.Tensor, refs: int, width: int) -> tuple[float, float]:
    """Worst-case and typical (5 sigma) float32 error of one logit, two float32 implementations compared
    (error_budget.py): the chain qkv (W), the heads' cosines (W / 4, x25 in the softmax), the attention's
    and the pooling's sums over the references, linear1 (2W), linear2 (4W), the blend's cosine (4W) and
    mean over 600 local rows, linear_pred (4W), at the magnitude of linear_pred's operands
    (sum_i |w_i x_i| + |b|)."""
    magnitude = float((linear_pred.weight.abs() @ blended.abs().T).max() + linear_pred.bias.abs().max())
    lengths = (width, 25 * width // 4, refs, 2 * width, refs, 4 * width, 4 * width, 600, 4 * width)
    return chain_budget(lengths, magnitude, sides=2), typical_chain(lengths, magnitude, sides=2, margin=5)


def cut_margin(logits: torch.Tensor, objectness: torch.Tensor, conf: float = 0.001) -> float:
    """How far (in logit units) the nearest candidate lies from the refined post-processing's cuts
    sigmoid(l) >= conf and objectness x sigmoid(l) >= conf (d log sigmoid / dl <= 1)."""
    logits = logits.double()
    to_class_cut = (logits - math.log(conf / (1 - conf))).abs()
    to_score_cut = (objectness.double()[:, None].log() + torch.nn.functional.logsigmoid(logits) - math.log(conf)).abs()
    return float(torch.minimum(to_class_cut, to_score_cut).min())


@torch.no_grad()
def test_stream_logits_equal_authors(vectors):
    """40 frames through the bank and key step: the frames read, the base output for frames 0-1, the
    refined logits (NaN rows included) and the detections equal the authors' head's
    (``yolov_msa_online.py::YOLOXHead.forward`` driven by ``tools/val_to_imdb_online.py``'s loop).

    Logits within the worst-case budget. The detections (``refined_detections``, ``base_detections``) are
    compared in count, boxes and labels exactly: sound while the logits' error stays below the nearest
    candidate's distance to the 0.001 cuts, which the test checks is above the typical budget."""
    v = vectors
    aggregation, linear_pred = authors_modules(v)
    width = v["stream_cls_features"].shape[-1]
    bank = OnlineBank()
    worst = 0.0
    dets_expected = v["stream_detections"]
    for t in range(len(v["stream_stepped"])):
        key = rows_at(v, t)
        step = online_key_logits(aggregation, linear_pred, key, bank)
        assert (step is not None) == bool(v["stream_stepped"][t]), t
        if step is not None:
            assert step.frames == unpad(v["stream_chosen"][t]), t
            expected = torch.from_numpy(v["stream_logits"][t])
            nan = torch.isnan(expected)
            assert torch.equal(torch.isnan(step.logits), nan), t
            refs = key.boxes.shape[0] * (1 + len(step.frames))
            blended = step.features if not bank.local else local_blend(step.features, key, LocalRows.cat(
                [rows for _, rows in bank.local]))
            budget, typical = logit_budget(linear_pred, blended[~nan.any(1)], refs, width)
            err = float((step.logits[~nan] - expected[~nan]).abs().max())
            assert err <= budget, (t, err, budget)
            worst = max(worst, err / budget)
        shown = np.flatnonzero(v["stream_detection_frame"] == t)
        if len(shown):
            if step is None:
                scores = torch.zeros(key.boxes.shape[0], 30)
                classes = torch.from_numpy(v["stream_class_pred"][t].astype(np.int64))
                scores[torch.arange(len(classes)), classes] = key.class_confidence
                det = base_detections(key.boxes, key.objectness, scores)
            else:
                finite = ~torch.isnan(step.logits).any(1)
                assert cut_margin(step.logits[finite], key.objectness[finite]) > typical, t
                det = refined_detections(key.boxes, key.objectness, step.logits)
            ref = dets_expected[shown]
            assert len(det) == len(ref), t
            np.testing.assert_array_equal(det.boxes.numpy(), ref[:, :4])
            np.testing.assert_array_equal(det.labels.numpy(), ref[:, 6].astype(np.int64) + 1)
            np.testing.assert_allclose(det.scores.numpy(), ref[:, 4] * ref[:, 5], rtol=4 * U if step is None else typical, atol=0)
        bank.push(key, None if step is None else step.features)
    print(f"largest logit error / budget: {worst:.2e}")
