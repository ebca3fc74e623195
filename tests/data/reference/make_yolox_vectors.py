"""Build ``yolox_network.npz``: YOLOX's forward and post-processing from the authors' own code
(YuHengsss/YOLOV, the YOLOX 0.3.0 it ships).

    python tests/data/reference/make_yolox_vectors.py CHECKOUT [OUT]

CHECKOUT is an extracted copy of their repository (28ff8b0; the YOLOX files are the same at fe777cb).
Their files are not changed; ``loguru`` and ``thop`` (imported by ``yolox.utils``, used only for logging
and profiling) are stood in for when they are not installed. Everything computed is theirs:
``yolo_pafpn.py::YOLOPAFPN`` (with ``darknet.py::CSPDarknet``), ``yolo_head.py::YOLOXHead.forward`` in eval
(``decode_outputs``), built as ``yolox/exp/yolox_base.py::Exp.get_model`` builds it (``init_yolo``:
BatchNorm eps 1e-3, momentum 0.03), and ``yolox/utils/boxes.py::postprocess``.

The network is small (depth 0.67: 2 bottlenecks per CSP block, 6 in dark3/dark4; width 0.0625: stem 4,
head 16 channels) so that its weights fit the file. Weights: seeded normal draws, rounded to float16
(exact in float32, which both sides use); each BatchNorm's running mean and variance are then set to
the statistics of its input on the stored images (one pass, a forward pre-hook per BatchNorm, in the
authors' module order), so activations stay O(1) and scores spread over (0, 1) instead of
saturating; the class and objectness biases are then lowered to -2 so that the threshold cuts.

Stored: ``images`` [2, 3, 64, 96] uint8 (BGR 0-255, as their preproc hands them over, before the float
cast), every tensor of the state dict under its key (``w/<key>``), ``outputs`` [2, A, 35] (their decoded
output in float32: cx, cy, w, h, objectness, 30 class scores) and ``outputs64`` (the same network and
images in float64: with these unnormalised 0-255 inputs float32 rounding alone moves boxes by ~0.05 px,
so the float64 run is what pins the computation down), ``conf_thresh``, ``nms_thresh`` and per image
``detections_<i>`` [N, 7] (x1, y1, x2, y2, objectness, class score, class) as ``postprocess`` returns them
on ``outputs64``.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

DEPTH, WIDTH = 0.67, 0.0625
SIZE = (64, 96)
NMS = 0.5


def import_authors(checkout: Path):
    sys.path.insert(0, str(checkout))
    for name, attrs in (("loguru", {"logger": types.SimpleNamespace(info=print, warning=print, error=print)}),
                        ("thop", {"profile": None})):
        try:
            __import__(name)
        except ImportError:
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            sys.modules[name] = module
    from yolox.models.yolo_head import YOLOXHead
    from yolox.models.yolo_pafpn import YOLOPAFPN
    from yolox.models.yolox import YOLOX
    from yolox.utils.boxes import postprocess
    return YOLOPAFPN, YOLOXHead, YOLOX, postprocess


def build(checkout: Path):
    YOLOPAFPN, YOLOXHead, YOLOX, postprocess = import_authors(checkout)
    in_channels = [256, 512, 1024]
    model = YOLOX(YOLOPAFPN(DEPTH, WIDTH, in_channels=in_channels), YOLOXHead(30, WIDTH, in_channels=in_channels))
    for m in model.modules():  # yolox_base.py::Exp.get_model, init_yolo
        if isinstance(m, nn.BatchNorm2d):
            m.eps, m.momentum = 1e-3, 0.03
    model.head.initialize_biases(1e-2)
    return model.eval(), postprocess


def seeded_weights(model: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith(("bn.weight", "running_var")):
                value = torch.rand(t.shape, generator=g) + 0.5
            elif t.ndim == 1:
                value = torch.randn(t.shape, generator=g) * 0.1
            else:
                value = torch.randn(t.shape, generator=g) / np.sqrt(t[0].numel())
            t.copy_(value.half().float())


def calibrate_batch_norms(model: nn.Module, images: torch.Tensor) -> None:
    def set_stats(module: nn.BatchNorm2d, inputs: tuple[torch.Tensor]) -> None:
        x = inputs[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)).half().float())
        module.running_var.copy_(x.var(dim=(0, 2, 3)).half().float())

    hooks = [m.register_forward_pre_hook(set_stats) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(images.clone())
    for h in hooks:
        h.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path)
    parser.add_argument("out", type=Path, nargs="?", default=Path(__file__).with_name("yolox_network.npz"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model, postprocess = build(args.checkout)
    g = torch.Generator().manual_seed(23)
    images = torch.randint(0, 256, (2, 3, *SIZE), generator=g, dtype=torch.uint8)
    seeded_weights(model, g)
    calibrate_batch_norms(model, images.float())
    with torch.no_grad():
        for conv in [*model.head.cls_preds, *model.head.obj_preds]:
            conv.bias.fill_(-2.0)
        outputs = model(images.float())
        outputs64 = model.double()(images.double())
    scores = outputs64[..., 4] * outputs64[..., 5:].max(dim=-1).values
    conf = float(np.float32(torch.quantile(scores.flatten(), 0.8).item()))  # about a fifth of the anchors
    detections = postprocess(outputs64.clone(), 30, conf, NMS)
    model.float()
    record = {"images": images.numpy(), "outputs": outputs.numpy(), "outputs64": outputs64.numpy(),
              "conf_thresh": np.float32(conf),
              "nms_thresh": np.float32(NMS), "depth": np.float32(DEPTH), "width": np.float32(WIDTH)}
    record.update({f"w/{k}": v.numpy().astype(np.float16 if v.is_floating_point() else v.numpy().dtype)
                   for k, v in model.state_dict().items()})
    for i, d in enumerate(detections):
        record[f"detections_{i}"] = (d if d is not None else torch.zeros(0, 7)).numpy()
    np.savez_compressed(args.out, **record)
    print(f"{args.out}: {outputs.shape[1]} anchors, conf {conf:.4g}, detections "
          f"{[0 if d is None else len(d) for d in detections]}")


if __name__ == "__main__":
    main()
