"""The pieces issue 22 made one implementation of, timed alone: the geometry term eager and in ONNX Runtime,
and the box postprocess (benchmarks/README.md#one-implementation-the-exported-graphs-trace-the-models-modules).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/one_implementation.py [--repeats 9]
    # the tree before (commit 91ec006, checked out in OLD): the same script, that tree's package first
    OMP_NUM_THREADS=1 PYTHONPATH=OLD python benchmarks/one_implementation.py

* geometry term, eager: ``RelationModule.geometry_bias`` at MEGA R-101's local stage 0 (675 query rows x
  3750 references, 16 heads, embedding 64), median ms (each timing after 3 untimed calls).
* geometry term, ONNX Runtime: the same call traced into a graph (``torch.onnx.export``, opset 17, dynamic
  rows) and run by ONNX Runtime on one thread; on a tree that still has ``megavod/export/ops.py`` (before
  issue 22) its ``geometry_bias``, the export's own version then. Median ms.
* box postprocess: ``BoxPostProcessor`` on 20 images' predictor outputs of 300 proposals x 31 classes
  (proposals around 12 objects, so NMS has work), median ms per image.

Random weights and boxes (the cost does not depend on their values); the package is the first ``megavod``
on the path, so ``PYTHONPATH`` picks the tree.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.append(str(Path(__file__).resolve().parent.parent))  # after PYTHONPATH: that tree wins

from megavod.models.box_coder import BoxCoder  # noqa: E402
from megavod.models.relation import RelationModule  # noqa: E402
from megavod.models.roi_heads import BoxPostProcessor  # noqa: E402


def random_boxes(n: int, g: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * 500
    return torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 200 + 5], 1)


def postprocess_inputs(seed: int, n: int = 300, k: int = 31, size: tuple[int, int] = (600, 1000)):
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(12, 2, generator=g) * torch.tensor([size[1], size[0]])
    wh = 30 + torch.rand(12, 2, generator=g) * 250
    obj = torch.randint(0, 12, (n,), generator=g)
    c = centres[obj] + torch.randn(n, 2, generator=g) * wh[obj] * 0.15
    s = wh[obj] * (0.7 + 0.6 * torch.rand(n, 2, generator=g))
    boxes = torch.cat([c - s / 2, c + s / 2], 1).clamp(min=0)
    boxes[:, 2:] = torch.minimum(boxes[:, 2:], torch.tensor([size[1] - 1.0, size[0] - 1.0]))
    logits = torch.randn(n, k, generator=g) * 1.5
    logits[:, 0] += 4 + 2 * torch.randn(n, generator=g)
    strong = torch.rand(n, generator=g) < 0.4
    logits[strong, (1 + torch.randint(0, k - 1, (12,), generator=g))[obj[strong]]] += 7
    return logits, torch.randn(n, 4 * k, generator=g) * 0.5, boxes, size


class _Geometry(nn.Module):
    def __init__(self, module: RelationModule) -> None:
        super().__init__()
        self.module = module
        try:  # before issue 22 the export had its own version
            from megavod.export import ops
            self.compute = lambda a, b: ops.geometry_bias(self.module, a, b)
            self.source = "megavod.export.ops.geometry_bias"
        except ImportError:
            self.compute = self.module.geometry_bias
            self.source = "RelationModule.geometry_bias"

    def forward(self, x_boxes, ref_boxes):
        return self.compute(x_boxes, ref_boxes)


def median_ms(run, repeats: int, warmup: int = 3) -> float:
    # Warm-up calls first: the first calls of a process pay for the allocator settling on these sizes.
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    import megavod
    import onnxruntime  # optional dependency (megavod[onnx])

    torch.set_num_threads(1)
    print(f"megavod from {Path(megavod.__file__).parent}")
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    module = RelationModule(1024, 16, 64, location_based=True, content_bias=True).eval()
    queries, refs = random_boxes(675, g), random_boxes(3750, g)
    with torch.no_grad():
        eager = median_ms(lambda: module.geometry_bias(queries, refs), args.repeats)
    print(f"geometry term, eager (675 x 3750, 16 heads): {eager:.0f} ms")

    graph, buffer = _Geometry(module).eval(), io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(graph, (queries[:50], refs[:80]), buffer, dynamo=False, opset_version=17,
                          input_names=["x", "r"], dynamic_axes={"x": {0: "n"}, "r": {0: "m"}})
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    feeds = {"x": queries.numpy(), "r": refs.numpy()}
    ort = median_ms(lambda: session.run(None, feeds), args.repeats)
    print(f"geometry term, ONNX Runtime ({graph.source}, traced): {ort:.0f} ms")

    post = BoxPostProcessor(BoxCoder((10.0, 10.0, 5.0, 5.0)))
    cases = [postprocess_inputs(100 + i) for i in range(20)]

    def run_post() -> None:
        for logits, regression, boxes, size in cases:
            post(logits, regression, [boxes], [size])

    per_image = median_ms(run_post, args.repeats) / len(cases)
    print(f"box postprocess (300 proposals x 31 classes): {per_image:.2f} ms per image")


if __name__ == "__main__":
    main()
