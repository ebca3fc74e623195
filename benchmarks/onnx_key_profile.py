"""Where MEGA's key step goes on ONNX Runtime, and what assembling the kept geometry term costs.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/onnx_key_profile.py [--config mega_R_101] [--size 300] [--frames 20]
    OMP_NUM_THREADS=1 python benchmarks/onnx_key_profile.py --assembly [--repeats 9]

Default: the config (random weights, FrozenBN calibrated, as ``benchmarks/onnx_speed.py``) is exported twice,
with the geometry blocks kept (the default export) and recomputed in key.onnx (``geometry_cache=False``;
keys/values kept in both), and each runs one offline video of synthetic frames; printed per key step, in
ms: key.onnx, the ``geometry_{i}`` graphs (new pairs), the assembly of the kept term around them
(``GeometryBiasCache.assemble`` less its graph calls), project.onnx and the rest of ``key_feeds``.

``--assembly``: ``GeometryBiasCache.assemble`` alone on mega_R_101's local stage 0 shapes (25 window frames
of 75 rows, 15 distilled each, 25 memory frames, 16 heads; random boxes, a block function returning zeros
so only the assembly is timed), sliding one frame per step, median over ``--repeats`` steady-state steps,
three layouts: the whole term with the key's 300 rows as an uncached group (675 x 3750, what a key graph
taking the whole term needs), the window's rows only (375 x 3750, what key.onnx takes), and the window's
rows written into one buffer reused from step to step (what the runtime does).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megavod.api import Detector  # noqa: E402
from megavod.apps.bench_frames import bench_config, calibrate, synthetic_frames  # noqa: E402
from megavod.export.exporter import export_onnx  # noqa: E402
from megavod.export.runtime import load_onnx_detector  # noqa: E402
from megavod.methods import build_detector  # noqa: E402
from megavod.models.geometry_cache import GeometryBiasCache  # noqa: E402

HEADS, KEY_ROWS, FRAME_ROWS, DISTILLED, WINDOW, MEMORY = 16, 300, 75, 15, 25, 25


def _clocked(fn, spent: collections.defaultdict, label: str):
    def call(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        spent[label] += time.perf_counter() - start
        return out

    return call


def profile(config: str, size: int, num_frames: int) -> None:
    frames = synthetic_frames(num_frames + 2, size)
    cfg = bench_config(config, size)
    torch.manual_seed(0)
    model = build_detector(cfg).eval()
    calibrate(model, Detector(model, cfg, "cpu").prepare(frames[0])[0])
    with tempfile.TemporaryDirectory() as folder:
        for label, keep_geometry in (("geometry kept (default)", True), ("geometry in key.onnx", False)):
            out = Path(folder) / str(keep_geometry)
            export_onnx(model, cfg, out, geometry_cache=keep_geometry)
            detector, _ = load_onnx_detector(out, "cpu", threads=1)
            spent: collections.defaultdict = collections.defaultdict(float)
            list(Detector(detector, cfg, "cpu").stream(frames[:2], "offline"))  # warm-up
            detector.run_key = _clocked(detector.run_key, spent, "key.onnx")
            for name in list(detector.run_extra):
                part = "project.onnx" if name == "project" else "geometry graphs" if name.startswith("geometry") else name
                detector.run_extra[name] = _clocked(detector.run_extra[name], spent, part)
            graphs = detector.graphs
            graphs.key_feeds = _clocked(graphs.key_feeds, spent, "key_feeds")
            original_assemble = GeometryBiasCache.assemble
            GeometryBiasCache.assemble = _clocked(original_assemble, spent, "assemble")
            try:
                list(Detector(detector, cfg, "cpu").stream(frames[2:], "offline"))
            finally:
                GeometryBiasCache.assemble = original_assemble
            ms = {k: 1000 * v / num_frames for k, v in spent.items()}
            assembly = ms.pop("assemble", 0.0) - ms.get("geometry graphs", 0.0)
            rest = ms.pop("key_feeds") - ms.get("project.onnx", 0.0) - ms.get("geometry graphs", 0.0) - assembly
            parts = {**ms, "assembly (less graph calls)": assembly, "rest of key_feeds": rest}
            print(f"{config} {label}: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
                  + f"; key step {sum(parts.values()):.1f} ms")


def assembly(repeats: int) -> None:
    g = torch.Generator().manual_seed(0)

    def boxes(n: int) -> torch.Tensor:
        xy = torch.rand(n, 2, generator=g) * 400
        return torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 100 + 8], 1)

    frames: dict[int, torch.Tensor] = {}

    def frame(f: int) -> torch.Tensor:
        if f not in frames:
            frames[f] = boxes(FRAME_ROWS)
        return frames[f]

    def zeros(qi: torch.Tensor, ri: torch.Tensor) -> torch.Tensor:
        return torch.zeros(HEADS, len(qi), len(ri))

    refs_n = (WINDOW + MEMORY) * FRAME_ROWS
    layouts = {"whole term, key rows uncached, fresh tensor": (True, False),
               "window rows only, fresh tensor": (False, False),
               "window rows only, reused buffer": (False, True)}
    for label, (with_key, reuse) in layouts.items():
        cache, times = GeometryBiasCache(), []
        buffer = torch.empty(HEADS, WINDOW * DISTILLED + (KEY_ROWS if with_key else 0), refs_n) if reuse else None
        for step in range(2 + repeats):
            window = range(step + MEMORY, step + MEMORY + WINDOW)
            queries = [frame(f)[:DISTILLED] for f in window]
            counts = [DISTILLED] * WINDOW
            if with_key:
                queries, counts = [boxes(KEY_ROWS), *queries], [KEY_ROWS, *counts]
            refs = torch.cat([frame(f) for f in (*window, *range(step, step + MEMORY))])
            x = torch.cat(queries)
            cache.next_frame()
            start = time.perf_counter()
            cache.assemble("bench", HEADS, zeros, x, counts, refs, [FRAME_ROWS] * (WINDOW + MEMORY),
                           uncached_queries=1 if with_key else 0, out=buffer)
            if step >= 2:  # the first steps fill the cache
                times.append(time.perf_counter() - start)
        print(f"{label}: {1000 * statistics.median(times):.1f} ms (median of {repeats} steps)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="mega_R_101")
    p.add_argument("--size", type=int, default=300)
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--assembly", action="store_true")
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.assembly:
        assembly(args.repeats)
    else:
        profile(args.config, args.size, args.frames)


if __name__ == "__main__":
    main()
