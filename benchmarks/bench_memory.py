"""Peak memory of online (causal) detection over a long synthetic stream: it must stay flat.

Usage::

    python benchmarks/bench_memory.py [--config synthetic_mega] [--size 192] [--checkpoints 100 1000 10000]

One process builds the model (random weights, FrozenBN calibrated on a frame), then runs
``Detector.stream(frames, "online")`` (the path of ``megavod detect --mode online``) over frames rendered
on the fly by :mod:`megavod.data.synthetic_render` (a new scene every 100 frames, never stored), and
reads the process's peak resident set size (``VmHWM`` in ``/proc/self/status``) and current RSS
(``VmRSS``) once the model is ready and when the stream has delivered each checkpoint's number of
frames. The peak after 100 frames is the peak of a 100-frame stream; the last checkpoint's that of the
whole stream. The engine holds at most T_l window frames, T_g global frames and T_m frames per memory
level, so the two peaks should agree within a few percent; anything that grows with the stream (a
list of every frame, an unbounded cache) shows as growth between checkpoints.

Frames are S x round(5S/3) pixels (``--size``). Detections are consumed and dropped, as a caller
writing them to disk would.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megavod.api import Detector
from megavod.apps.bench_frames import (
    SCENE_FRAMES,
    bench_config,
    calibrate,
    frame_shape,
    synthetic_frames,
)
from megavod.data.synthetic_render import make_scene, render_frame
from megavod.methods import build_detector


def memory_status() -> dict[str, float]:
    """VmHWM (peak RSS) and VmRSS of this process in MiB (Linux ``/proc/self/status``)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) / 1024  # kB -> MiB
    return out


def frame_stream(num_frames: int, size: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Frames rendered on the fly, one scene of 100 frames at a time (memory does not grow with N)."""
    height, width = frame_shape(size)
    rng = np.random.default_rng(seed)
    done = 0
    while done < num_frames:
        n = min(SCENE_FRAMES, num_frames - done)
        scene = make_scene(rng, max(n, 2), width, height)
        for t in range(n):
            yield render_frame(scene, t)
        done += n


def run(config: str, size: int, checkpoints: list[int], log=print) -> list[dict[str, float]]:
    cfg = bench_config(config, size)
    if cfg.method not in ("mega", "single"):
        raise SystemExit(f"{config}: method '{cfg.method}' is not supported here")
    torch.manual_seed(cfg.seed)
    detector = Detector(build_detector(cfg), cfg, "cpu")
    calibrate(detector.model, detector.prepare(synthetic_frames(1, size)[0])[0])
    before = {"frames": 0, "seconds": 0.0, **memory_status()}
    log(f"{0:>7d} frames  {0.0:8.1f} s  peak RSS {before['VmHWM']:8.1f} MiB  RSS {before['VmRSS']:8.1f} MiB"
        "  (model built and calibrated)")
    rows = []
    targets = sorted(set(checkpoints))
    start = time.perf_counter()
    with torch.inference_mode():
        for result in detector.stream(frame_stream(targets[-1], size), "online"):  # one FrameResult per frame
            if result.frame + 1 in targets:
                row = {"frames": result.frame + 1, "seconds": time.perf_counter() - start, **memory_status()}
                rows.append(row)
                log(f"{row['frames']:>7d} frames  {row['seconds']:8.1f} s  peak RSS {row['VmHWM']:8.1f} MiB  "
                    f"RSS {row['VmRSS']:8.1f} MiB")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="synthetic_mega", help="preset or YAML path (default: synthetic_mega)")
    p.add_argument("--size", type=int, default=192, help="short side; frames are S x round(5S/3) (default: 192)")
    p.add_argument("--checkpoints", type=int, nargs="+", default=[100, 1000, 10000],
                   help="frame counts at which memory is read (default: 100 1000 10000)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if min(args.checkpoints) < 1:
        p.error("--checkpoints must be >= 1")
    h, w = frame_shape(args.size)
    print(f"{args.config}, online, synthetic stream of {h}x{w} frames, torch threads: {torch.get_num_threads()}")
    rows = run(args.config, args.size, args.checkpoints)
    if len(rows) < 2:
        return 0
    first, last = rows[0], rows[-1]
    print(f"peak RSS after {last['frames']} frames / after {first['frames']}: {last['VmHWM'] / first['VmHWM']:.3f} "
          f"({last['VmHWM'] - first['VmHWM']:+.1f} MiB); RSS {last['VmRSS'] - first['VmRSS']:+.1f} MiB; "
          f"{1000 * (last['seconds'] - first['seconds']) / max(1, last['frames'] - first['frames']):.1f} ms/frame")
    return 0


if __name__ == "__main__":
    sys.exit(main())
