"""Many streams' key-frame steps: one call per stream or one batched call (Detector.stream_many).

    OMP_NUM_THREADS=1 python benchmarks/bench_batched_key.py [--config single_R_101 ...] [--size 300]
                                                             [--streams 2 4 8] [--repeats 3]

For the single-frame detector, whose key step (RPN and box head on the frame's C4) is most of its cost
after the backbone: B key frames of B streams through ``detect_key`` one after another, against one
``detect_keys`` call (:class:`megavod.models.contract.BatchedKeyStep`), the two alternating, median of
``repeats``; ms per key frame and the ratio batched / loop. Random weights, FrozenBN calibrated (as
``megavod bench``), synthetic frames of S x round(5S/3). benchmarks/README.md has the figures.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megavod.api import Detector
from megavod.apps.bench_frames import bench_config, calibrate, synthetic_frames
from megavod.methods import build_detector
from megavod.models.contract import KeyFrameInputs


def measure(config: str, size: int, streams: list[int], repeats: int) -> list[tuple[int, float, float]]:
    """(B, loop ms per key frame, batched ms per key frame) for each B in ``streams``."""
    cfg = bench_config(config, size)
    torch.manual_seed(cfg.seed)
    detector = Detector(build_detector(cfg), cfg, "cpu")
    model = detector.model
    frames = synthetic_frames(max(streams), size)
    calibrate(model, detector.prepare(frames[0])[0])
    rows = []
    with torch.inference_mode():
        keys = [KeyFrameInputs(key=model.frame_features(*_prepared(detector, f, t))) for t, f in enumerate(frames)]
        model.detect_keys(keys[:2], [None, None])  # warm-up
        for b in streams:
            loop, batched = [], []
            for _ in range(repeats):  # alternating, so that load lands on both
                start = time.perf_counter()
                for inputs in keys[:b]:
                    model.detect_key(inputs)
                loop.append(time.perf_counter() - start)
                start = time.perf_counter()
                model.detect_keys(keys[:b], [None] * b)
                batched.append(time.perf_counter() - start)
            rows.append((b, 1000 * statistics.median(loop) / b, 1000 * statistics.median(batched) / b))
    return rows


def _prepared(detector: Detector, frame, index: int):
    image, size = detector.prepare(frame)
    return image, index, size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", nargs="+", default=["single_R_101"])
    p.add_argument("--size", type=int, default=300)
    p.add_argument("--streams", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(f"key-frame steps of B streams, {args.size} px, torch threads {torch.get_num_threads()}, "
          f"median of {args.repeats}; ms per key frame")
    for config in args.config:
        for b, loop, batched in measure(config, args.size, args.streams, args.repeats):
            print(f"{config:<18s} B={b:<3d} loop {loop:8.1f}  batched {batched:8.1f}  batched/loop {batched / loop:.2f}")


if __name__ == "__main__":
    main()
