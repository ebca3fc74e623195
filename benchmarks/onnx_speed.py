"""ms/frame of the PyTorch backend vs ONNX Runtime (the graphs of ``megavod export``), same frames, one run.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/onnx_speed.py [--config synthetic_mega mega_R_101] [--size 300]
        [--frames 20] [--threads 1]

Per config: the model is built with random weights and its FrozenBN calibrated on the first frame
(``megavod.apps.bench.calibrate``; no checkpoint needed), exported to a temporary folder
(:func:`megavod.export.exporter.export_onnx`), and both backends run the same synthetic frames
(``megavod.apps.bench.synthetic_frames``, S x round(5S/3), input resizing set to S so frames are not
resized) as one offline video through ``Detector.stream`` (what ``megavod detect`` runs), the backends
taking turns frame by frame (a change in the machine's load lands on all alike). One untimed warm-up
video of 2 frames per backend first. ``--threads``: torch's intra-op threads and ONNX Runtime's
``intra_op_num_threads``. Prints one row per config and backend: ms/frame of the video, the mean
per-frame pass (``frame_features``) and key step (``detect_key``) in ms, and the number of detections.
MEGA's graphs are measured in three variants (``export_onnx(..., reference_cache=..., geometry_cache=...)``):
``onnx-cached`` keeps the global and memory rows' keys/values and the local stages' geometry blocks per
stream (the default export), ``onnx-keep-kv`` keeps the keys/values and computes the geometry terms
inside the key graph, ``onnx-recompute`` computes both inside the key graph at every key frame. (Other
methods keep nothing: their variants are the same graphs.)
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


#: (label, keep keys/values, keep geometry blocks), see the module docstring.
VARIANTS = (("onnx-recompute", False, False), ("onnx-keep-kv", True, False), ("onnx-cached", True, True))


def _clocked(method, spent: list[float]):
    def call(*args, **kwargs):
        start = time.perf_counter()
        out = method(*args, **kwargs)
        spent.append(time.perf_counter() - start)
        return out

    return call


def timed_together(detectors: list[Detector], frames) -> list[tuple[tuple[float, float, float], list]]:
    """Per detector: (ms/frame, ms per frame pass, ms per key step) of one offline video of ``frames``, and
    its results. The detectors take turns frame by frame (as ``megavod bench``'s run_interleaved), so a
    change in the machine's load lands on every backend alike. One untimed 2-frame video each first."""
    for detector in detectors:
        list(detector.stream(frames[:2], "offline"))  # warm-up
    records = []
    for detector in detectors:
        model, passes, keys = detector.model, [], []
        model.frame_features = _clocked(model.frame_features, passes)  # instance attributes: this run only
        model.detect_key = _clocked(model.detect_key, keys)
        records.append((iter(detector.stream(frames, "offline")), passes, keys, [], [0.0]))
    for _ in frames:
        for stream, _, _, results, wall in records:
            start = time.perf_counter()
            results.append(next(stream))
            wall[0] += time.perf_counter() - start
    out = []
    for detector, (stream, passes, keys, results, wall) in zip(detectors, records):
        if next(stream, None) is not None:
            raise RuntimeError("a backend gave more results than frames")
        del detector.model.frame_features, detector.model.detect_key
        out.append(((1000 * wall[0] / len(frames), 1000 * sum(passes) / max(1, len(passes)),
                     1000 * sum(keys) / max(1, len(keys))), results))
    return out


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
    print(f"{'config':<16} {'backend':<15} {'ms/frame':>9} {'pass':>7} {'key':>7} {'ratio':>6}  detections")
    for name in args.config:
        cfg = bench_config(name, args.size)
        torch.manual_seed(0)
        model = build_detector(cfg).eval()
        torch_detector = Detector(model, cfg, "cpu")
        calibrate(model, torch_detector.prepare(frames[0])[0])
        labels, detectors = ["torch"], [torch_detector]
        with tempfile.TemporaryDirectory() as folder:
            for label, keep_kv, keep_geometry in VARIANTS:
                out = Path(folder) / label
                start = time.perf_counter()
                manifest = export_onnx(model, cfg, out, reference_cache=keep_kv, geometry_cache=keep_geometry)
                export_s = time.perf_counter() - start
                sizes = " + ".join(f"{g['bytes'] / 2**20:.0f}" for g in manifest["graphs"].values())
                print(f"# {name} {label}: export {export_s:.0f} s, {sizes} MiB ({', '.join(manifest['graphs'])})")
                labels.append(label)
                detectors.append(Detector(load_onnx_detector(out, "cpu", threads=args.threads)[0], cfg, "cpu"))
            rows = [(label, *timing) for label, timing in zip(labels, timed_together(detectors, frames))]
        # Equality within tolerances is tests/test_export_onnx.py's job; here: detections per backend.
        base = rows[0][1][0]
        for label, (ms, ms_pass, ms_key), results in rows:
            print(f"{name:<16} {label:<15} {ms:9.1f} {ms_pass:7.1f} {ms_key:7.1f} {ms / base:6.2f}  "
                  f"{sum(len(r) for r in results)}")


if __name__ == "__main__":
    main()
