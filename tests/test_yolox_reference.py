"""YOLOX against the authors' own network and post-processing (tests/data/reference/yolox_network.npz)."""
from pathlib import Path

import numpy as np
import torch

from megavod.models.yolox import build_yolox, cxcywh_to_xyxy, yolox_detections

REFERENCE = Path(__file__).resolve().parent / "data" / "reference"
EPS_RATIO = torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps  # 2**-29


def _error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def test_network_and_postprocess_equal_the_authors(one_thread):
    """tests/data/reference/yolox_network.npz (make_yolox_vectors.py): their YOLOPAFPN + YOLOXHead on two
    images in float32 and float64, and their ``postprocess``; megavod's network with their weights.

    Error budget. The computation is ill-conditioned in float32 (0-255 inputs, BatchNorm statistics of
    these very images: float32 rounding alone moves boxes by ~0.05 px), so the budget is measured on it,
    not assumed: E32 = |megavod float32 - megavod float64|, the rounding of this computation in float32
    on this machine. In float64 the same computation rounds 2**-29 times less: megavod and the authors
    in float64 must agree within 8 E32 2**-29 (two implementations, each within 4 E32 2**-29 of exact:
    room for other summation orders). In float32, each side is within its own rounding of exact, so
    they agree within E32 + |theirs float32 - theirs float64| (with a factor 2 for kernels of another
    order)."""
    with np.load(REFERENCE / "yolox_network.npz") as data:
        ref = {k: data[k] for k in data.files}
    model = build_yolox(float(ref["depth"]), float(ref["width"])).eval()
    model.load_state_dict({k[2:]: torch.from_numpy(v.astype(np.float32) if v.dtype == np.float16 else v)
                           for k, v in ref.items() if k.startswith("w/")}, strict=True)
    images = torch.from_numpy(ref["images"])
    with torch.no_grad():
        p32 = model(images.float())
        p64 = model.double()(images.double())
    theirs32, theirs64 = (torch.from_numpy(ref[k]) for k in ("outputs", "outputs64"))
    split = lambda o: (cxcywh_to_xyxy(o[..., :4]), o[..., 4], o[..., 5:])  # noqa: E731
    for name, mine32, mine64, t32, t64 in zip(("boxes", "objectness", "class_scores"),
                                               (p32.boxes, p32.objectness, p32.class_scores),
                                               (p64.boxes, p64.objectness, p64.class_scores),
                                               split(theirs32), split(theirs64)):
        e32 = max(_error(mine32, mine64), 1e-7)
        assert _error(mine64, t64) <= 8 * e32 * EPS_RATIO, name
        assert _error(mine32, t32) <= 2 * (e32 + _error(t32, t64)), name

    conf, nms = float(ref["conf_thresh"]), float(ref["nms_thresh"])
    for i in range(images.shape[0]):
        want = torch.from_numpy(ref[f"detections_{i}"])
        # On the authors' own output, the post-processing is exactly theirs.
        boxes, obj, cls = split(theirs64[i])
        det = yolox_detections(boxes, obj, cls, conf, nms)
        assert len(det) == len(want) > 0
        assert torch.equal(det.boxes, want[:, :4]) and torch.equal(det.labels, want[:, 6].long() + 1)
        assert torch.equal(det.scores, want[:, 4] * want[:, 5])
        # On megavod's float64 output: the same detections (to the float64 budget above).
        mine = yolox_detections(p64.boxes[i], p64.objectness[i], p64.class_scores[i], conf, nms)
        assert torch.equal(mine.labels, want[:, 6].long() + 1)
        torch.testing.assert_close(mine.boxes, want[:, :4], rtol=0, atol=1e-6)
        torch.testing.assert_close(mine.scores, want[:, 4] * want[:, 5], rtol=0, atol=1e-9)
