"""ms/frame of the PyTorch backend vs ONNX Runtime (the graphs of ``megavod export``), same frames, one run.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/onnx_speed.py [--config synthetic_mega mega_R_101] [--size 300]
        [--frames 20] [--threads 1]

Per config: the model is built with random weights and its FrozenBN calibrated on the first frame
(``megavod.apps.bench.calibrate``; no checkpoint needed), exported to a temporary folder
(:func:`megavod.export.exporter.export_onnx`), and both backends run the same synthetic frames
(``megavod.apps.bench.synthetic_frames``, S x round(5S/3), input resizing set to S so frames are not
resized) as one offline video through ``Detector.stream`` (what ``megavod detect`` runs). One untimed
warm-up video of 2 frames per backend first. ``--threads``: torch's intra-op threads and ONNX Runtime's
``intra_op_num_threads``. Prints one row per config and backend, and the number of detections of each.
"""

from __future__ import annotations

import argparse
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


def timed(detector: Detector, frames) -> tuple[float, list]:
    list(detector.stream(frames[:2], "offline"))  # warm-up
    start = time.perf_counter()
    results = list(detector.stream(frames, "offline"))
    return 1000 * (time.perf_counter() - start) / len(frames), results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", nargs="+", default=["synthetic_mega", "mega_R_101"])
    parser.add_argument("--size", type=int, default=300)
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    frames = synthetic_frames(args.frames, args.size)
    print(f"{args.frames} frames of {frames[0].shape[0]}x{frames[0].shape[1]}, {args.threads} thread(s), "
          f"torch {torch.__version__}")
    print(f"{'config':<16} {'backend':<12} {'ms/frame':>9} {'ratio':>6}  export")
    for name in args.config:
        cfg = bench_config(name, args.size)
        torch.manual_seed(0)
        model = build_detector(cfg).eval()
        torch_detector = Detector(model, cfg, "cpu")
        calibrate(model, torch_detector.prepare(frames[0])[0])
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            manifest = export_onnx(model, cfg, Path(folder) / "export")
            export_s = time.perf_counter() - start
            sizes = " + ".join(f"{g['bytes'] / 2**20:.0f}" for g in manifest["graphs"].values())
            onnx_model, _ = load_onnx_detector(Path(folder) / "export", "cpu", threads=args.threads)
            onnx_detector = Detector(onnx_model, cfg, "cpu")
            ms_torch, ref = timed(torch_detector, frames)
            ms_onnx, got = timed(onnx_detector, frames)
        # Equality within tolerances is tests/test_export_onnx.py's job; here: detections per backend.
        counts = f"{sum(len(r) for r in ref)} / {sum(len(r) for r in got)} detections"
        print(f"{name:<16} {'torch':<12} {ms_torch:9.1f} {1.0:6.2f}")
        print(f"{name:<16} {'onnxruntime':<12} {ms_onnx:9.1f} {ms_onnx / ms_torch:6.2f}  {export_s:.0f} s, "
              f"{sizes} MiB (frame + key); {counts} (torch / onnxruntime)")


if __name__ == "__main__":
    main()
