"""Detections on flat frames (docs/conventions.md#ties): how many of PyTorch's detections ONNX Runtime and
``stream_many`` reproduce one to one, and what the tie rule costs in the RPN's pre-NMS top-k.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/ties_flat_frames.py [--frames 30] [--timing]``

The clip is :func:`megavod.data.synthetic_render.flat_clip` (grey background, black letterbox bars, two
flat rectangles) at 160x120, run by the shipped ``synthetic_mega`` weights, offline and online. A
detection counts as equal when the other run has, at the same position of the same frame, the same label,
a box within 1e-2 px and a score within 1e-4. ``--timing`` also times ``box_coder.top_k`` against
``torch.topk`` for 6000 of the 38 x 63 x 15 anchors of a 600 x 1000 frame (median of 50, one thread).
Run it on an older checkout to see what the tie rule changed (PYTHONPATH=that checkout).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

import megavod
from megavod.data.synthetic_render import flat_clip
from megavod.export.exporter import export_onnx
from one_implementation import median_ms  # benchmarks/: the script's own folder is on sys.path

WEIGHTS = Path(megavod.__file__).parent / "weights" / "synthetic_mega.safetensors"


def arrays(results) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return [(np.asarray(r.boxes), np.asarray(r.scores), np.asarray(r.labels)) for r in results]


def equal_count(a, b) -> int:
    equal = 0
    for (boxes_a, scores_a, labels_a), (boxes_b, scores_b, labels_b) in zip(a, b, strict=True):
        if len(scores_a) == len(scores_b):
            equal += int(((np.abs(boxes_a - boxes_b).max(1) <= 1e-2) & (np.abs(scores_a - scores_b) <= 1e-4)
                          & (labels_a == labels_b)).sum())
    return equal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--timing", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    clip = flat_clip(args.frames)
    detector = megavod.load(weights=WEIGHTS, device="cpu")
    with tempfile.TemporaryDirectory() as folder:
        export_onnx(detector.model, detector.cfg, Path(folder) / "export")
        on_ort = megavod.load(weights=Path(folder) / "export", backend="onnxruntime", device="cpu")
        for mode in ("offline", "online"):
            alone = arrays(detector.stream(clip, mode=mode))
            total = sum(len(s) for _, s, _ in alone)
            ort = equal_count(alone, arrays(on_ort.stream(clip, mode=mode)))
            many = equal_count(alone, arrays(r for i, r in detector.stream_many([clip, clip[:10]], mode=mode)
                                             if i == 0))
            print(f"{mode}: ONNX Runtime = PyTorch {ort} of {total}; stream_many = alone {many} of {total}")
    if args.timing:
        from megavod.models.box_coder import top_k

        scores = torch.randn(1, 38 * 63 * 15).sigmoid()
        torch_ms = median_ms(lambda: scores.topk(6000, dim=1), 50, warmup=1)
        ours_ms = median_ms(lambda: top_k(scores, 6000), 50, warmup=1)
        print(f"pre-NMS top 6000 of {scores.shape[1]}: torch.topk {torch_ms:.2f} ms, box_coder.top_k {ours_ms:.2f} ms")


if __name__ == "__main__":
    main()
