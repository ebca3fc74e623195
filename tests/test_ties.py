"""Ties (docs/conventions.md#ties): every selection on the inference path takes equal values in increasing
index order, in PyTorch and in ONNX Runtime alike, so flat frames (letterbox bars, uniform backgrounds,
flat shapes) give one-to-one the same detections from both runtimes and from ``stream_many``."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from torch import nn

import megavod
from megavod.data.synthetic_render import flat_clip
from megavod.export.exporter import export_onnx
from megavod.models.box_coder import BoxCoder, batched_nms, box_iou, nms, top_k
from megavod.models.roi_heads import BoxPostProcessor

WEIGHTS = Path(megavod.__file__).parent / "weights" / "synthetic_mega.safetensors"


def _order_by_value_then_index(values: torch.Tensor) -> torch.Tensor:
    """The rule written out: sort by (-value, index) with Python's sort."""
    return torch.tensor(sorted(range(len(values)), key=lambda i: (-float(values[i]), i)), dtype=torch.int64)


# -- top_k ---------------------------------------------------------------------------------------------


def test_top_k_takes_equal_values_in_index_order():
    values = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 1.0, 2.0])
    got_values, got = top_k(values, 5)
    assert got.tolist() == [1, 2, 4, 3, 6]
    assert got_values.tolist() == [3.0, 3.0, 3.0, 2.0, 2.0]
    assert top_k(values, 100)[1].tolist() == [1, 2, 4, 3, 6, 0, 5]  # k above n: all of them
    assert top_k(values, 0)[1].numel() == 0


def test_top_k_equals_the_rule_on_tie_heavy_rows():
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 6, (4, 500), generator=g).float() / 7  # about 80 copies of each value
    for k in (1, 37, 83, 499, 500, 800):
        got = top_k(rows, k)[1]
        assert got.shape == (4, min(k, 500))
        for row, idx in zip(rows, got):
            assert torch.equal(idx, _order_by_value_then_index(row)[:k])


class _TopK(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, values):
        return top_k(values, self.k)


class _NMS(nn.Module):
    def forward(self, boxes, scores):
        return nms(boxes, scores, 0.5)


class _Detections(nn.Module):
    def __init__(self, post: BoxPostProcessor):
        super().__init__()
        self.post = post

    def forward(self, class_logits, box_regression, boxes, image_size):
        return self.post.image_detections(class_logits, box_regression, boxes, image_size)


def _onnx(module: nn.Module, args: tuple, names: list[str], dynamic: dict) -> onnxruntime.InferenceSession:
    buffer = io.BytesIO()
    torch.onnx.export(module, args, buffer, opset_version=17, dynamo=False, input_names=names,
                      dynamic_axes=dynamic)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript-based exporter, as megavod export
def test_top_k_in_onnx_runtime_equals_pytorch():
    g = torch.Generator().manual_seed(1)
    session = _onnx(_TopK(300), (torch.zeros(1000),), ["values"], {"values": {0: "n"}})
    for n in (1000, 5000, 120):  # the last shorter than k: min(k, n) is computed in the graph
        values = torch.randint(0, 4, (n,), generator=g).float()
        got_values, got = session.run(None, {"values": values.numpy()})
        expected_values, expected = top_k(values, 300)
        assert np.array_equal(got, expected.numpy()) and np.array_equal(got_values, expected_values.numpy())


# -- NMS -------------------------------------------------------------------------------------------------


def test_nms_keeps_the_lower_index_of_equal_scores():
    # b overlaps a and c (IoU 91/119 > 0.5 with +1 areas), a and c are apart: with equal scores the rule
    # takes a first, which suppresses b, then c. Taking b first would keep b alone.
    a, b, c = [0.0, 0.0, 9.0, 9.0], [0.0, 2.0, 9.0, 11.0], [0.0, 4.0, 9.0, 13.0]
    boxes = torch.tensor([b, a, c])
    scores = torch.tensor([0.5, 0.5, 0.5])
    assert nms(boxes, scores, 0.5).tolist() == [0]  # b is index 0 here: it goes first, suppresses a and c
    assert nms(boxes[[1, 0, 2]], scores, 0.5).tolist() == [0, 2]  # a first: b suppressed, c kept
    # Classes apart, each by the same rule, classes ascending.
    labels = torch.tensor([2, 1, 1])
    assert batched_nms(boxes, scores, labels, 0.5).tolist() == [1, 2, 0]


def _tied_boxes(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    xy = torch.randint(0, 60, (n, 2), generator=g).float()
    wh = torch.randint(8, 30, (n, 2), generator=g).float()
    scores = torch.randint(1, 4, (n,), generator=g).float() / 4  # three values: long runs of equal scores
    return torch.cat([xy, xy + wh], 1), scores


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_nms_in_onnx_runtime_equals_pytorch_on_ties():
    g = torch.Generator().manual_seed(2)
    session = _onnx(_NMS(), _tied_boxes(50, g), ["boxes", "scores"], {"boxes": {0: "n"}, "scores": {0: "n"}})
    for n in (50, 400, 3):
        boxes, scores = _tied_boxes(n, g)
        expected = nms(boxes, scores, 0.5)
        # The order the rule gives, checked once against a direct greedy loop over it.
        order, greedy = _order_by_value_then_index(scores), []
        iou = box_iou(boxes, boxes)
        for i in order.tolist():
            if all(iou[i, j] <= 0.5 for j in greedy):
                greedy.append(i)
        assert expected.tolist() == greedy
        assert session.run(None, {"boxes": boxes.numpy(), "scores": scores.numpy()})[0].tolist() == greedy


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_box_postprocess_graph_equals_the_module_on_tied_scores():
    # Proposals of a flat area have the same logits row, so a class's score ties exactly, in either
    # runtime (a row's softmax is computed the same way wherever it sits). Logits rows that only permute
    # each other's values are not such ties: their softmaxes may round apart differently in each runtime.
    g = torch.Generator().manual_seed(3)
    post = BoxPostProcessor(BoxCoder((10.0, 10.0, 5.0, 5.0)), score_thresh=0.05, nms_thresh=0.5,
                            detections_per_img=20)
    n, classes = 60, 4
    logits = torch.randn(3, classes, generator=g)[torch.randint(0, 3, (n,), generator=g)]
    regression = torch.randint(-1, 2, (n, 4 * classes), generator=g).float() / 10
    boxes, _ = _tied_boxes(n, g)
    size = (80, 100)
    expected, rows = post(logits, regression, [boxes], [size], return_indices=True)
    args = (logits, regression, boxes, torch.tensor(size))
    in_torch = _Detections(post)(*args)
    session = _onnx(_Detections(post), args, ["logits", "regression", "boxes", "size"],
                    {"logits": {0: "n"}, "regression": {0: "n"}, "boxes": {0: "n"}})
    in_ort = session.run(None, {"logits": logits.numpy(), "regression": regression.numpy(), "boxes": boxes.numpy(),
                                "size": np.array(size)})
    assert len(expected[0]) > 10
    for got in (in_torch, [torch.from_numpy(v) for v in in_ort]):
        # The same detections in the same order: proposal rows and labels exactly; values to the
        # rounding of ONNX Runtime's own softmax/exp kernels (a few float32 ulps of numbers below 100).
        assert torch.equal(got[3], rows[0]) and torch.equal(got[2], expected[0].labels)
        assert torch.allclose(got[0], expected[0].boxes, rtol=0, atol=1e-4)
        assert torch.allclose(got[1], expected[0].scores, rtol=0, atol=1e-6)


# -- flat frames end to end ------------------------------------------------------------------------------


def _arrays(results) -> list[tuple[np.ndarray, ...]]:
    return [(np.asarray(r.boxes), np.asarray(r.scores), np.asarray(r.labels)) for r in results]


def _one_to_one(a, b) -> int:
    """Detections equal at the same position (label, box within 1e-2 px, score within 1e-4): ties broken
    the same way leave the detections in the same order, so no matching is needed."""
    equal = 0
    for (boxes_a, scores_a, labels_a), (boxes_b, scores_b, labels_b) in zip(a, b, strict=True):
        if len(scores_a) == len(scores_b):
            equal += int(((np.abs(boxes_a - boxes_b).max(1) <= 1e-2) & (np.abs(scores_a - scores_b) <= 1e-4)
                          & (labels_a == labels_b)).sum())
    return equal


@pytest.fixture(scope="module")
def flat_detectors(tmp_path_factory):
    detector = megavod.load(weights=WEIGHTS, device="cpu")
    out = tmp_path_factory.mktemp("ties") / "export"
    export_onnx(detector.model, detector.cfg, out)
    return detector, megavod.load(weights=out, backend="onnxruntime", device="cpu")


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_flat_frames_give_the_same_detections_in_both_runtimes_and_many_streams(flat_detectors, mode):
    detector, on_ort = flat_detectors
    clip = flat_clip(12)
    alone = _arrays(detector.stream(clip, mode=mode))
    total = sum(len(s) for _, s, _ in alone)
    assert total >= 12 * 50  # the shipped weights give ~100 detections a frame here
    assert _one_to_one(alone, _arrays(on_ort.stream(clip, mode=mode))) == total
    many = _arrays(r for i, r in detector.stream_many([clip, clip[:5]], mode=mode) if i == 0)
    assert _one_to_one(alone, many) == total
