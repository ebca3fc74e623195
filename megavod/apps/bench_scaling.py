"""``megavod bench --streams N ...`` and ``--batch B ...``: what batching buys (benchmarks/README.md).

* **Streams** (:func:`run_streams_bench`): N synthetic videos of F frames through one detector with
  :meth:`~megavod.api.Detector.stream_many` (per-frame passes of the N new frames batched, each stream its
  own state), for each N asked, the counts taking turns over ``repeats``. Reported: frames per second
  over all streams, ms per step (what each stream waits per frame), the speed-up of the frames per
  second over the smallest N, and the peak memory.
* **Batch** (:func:`run_batch_bench`): training iterations with B key frames per process
  (``solver.images_per_process``) on a small synthetic data set in the config's training layout, the
  B values taking turns: ms per iteration (forward, backward, optimizer step; data loading not
  counted), images per second, and the peak memory.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the run; on the CPU, the peak resident
set size above the run's start, sampled every 2 ms by a thread (:class:`PeakRSS`), which can miss a
peak shorter than that.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megavod.api import Detector
from megavod.apps.bench_frames import bench_config, calibrate, frame_shape, synthetic_frames
from megavod.config import load_config
from megavod.data.synthetic import generate_synthetic_dataset
from megavod.data.vid_dataset import build_train_dataset
from megavod.errors import MegavodError
from megavod.methods import build_detector

_PAGE = 4096


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRSS:
    """The peak resident set size above its start while it runs (``with PeakRSS() as peak: ...;
    peak.mib``), sampled by a thread; on CUDA devices, the peak of allocated GPU memory instead."""

    def __init__(self, device: str, interval_s: float = 0.002) -> None:
        self.device, self.interval_s = device, interval_s
        self.mib = 0.0
        self._stop = threading.Event()
        self._start = self._peak = 0
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, _rss_bytes())

    def __enter__(self) -> "PeakRSS":
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            self._start = self._peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, _rss_bytes())
        self.mib = (peak - self._start) / 2**20


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_detector(name: str, size: int, device: str, calibration_frame: np.ndarray) -> Detector:
    """``name`` at the bench frames' size, random weights, FrozenBN calibrated (as ``megavod bench``)."""
    cfg = bench_config(name, size)
    torch.manual_seed(cfg.seed)
    detector = Detector(build_detector(cfg), cfg, device)
    calibrate(detector.model, detector.prepare(calibration_frame)[0])
    return detector


@dataclass
class ScalingRow:
    """One measured setting: ``count`` streams (or images per iteration), ``work`` frames (or images)
    done in ``wall_s`` seconds over ``steps`` steps (or iterations), with ``peak_mib`` above the start."""

    count: int
    work: int
    steps: int
    wall_s: float
    peak_mib: float

    @property
    def per_second(self) -> float:
        return self.work / self.wall_s

    @property
    def ms_per_step(self) -> float:
        return 1000 * self.wall_s / self.steps


def _median_rows(runs: Sequence[ScalingRow]) -> ScalingRow:
    return ScalingRow(runs[0].count, runs[0].work, runs[0].steps, statistics.median(r.wall_s for r in runs),
                      max(r.peak_mib for r in runs))


def run_streams_bench(config: str, counts: Sequence[int], num_frames: int, size: int, device: str = "cpu",
                      mode: str = "offline", repeats: int = 1, batch_frames: bool = True,
                      log: Callable[[str], None] = lambda s: None) -> list[ScalingRow]:
    """N streams of ``num_frames`` frames through one detector in lockstep, for each N in ``counts``."""
    if num_frames < 1 or repeats < 1 or not counts or min(counts) < 1:
        raise MegavodError("--frames, --repeats and every --streams count must be >= 1")
    videos = [synthetic_frames(num_frames, size, seed=i) for i in range(max(counts))]
    log(f"building {config}")
    detector = bench_detector(config, size, device, videos[0][0])
    with torch.inference_mode():
        log("warm-up")
        for _ in detector.stream_many([v[:2] for v in videos[: max(counts)]], mode, batch_frames=batch_frames):
            pass
        runs: dict[int, list[ScalingRow]] = {n: [] for n in counts}
        for r in range(repeats):
            for n in counts:  # the counts take turns, so a change of load hits them alike
                with PeakRSS(device) as peak:
                    start = time.perf_counter()
                    done = sum(1 for _ in detector.stream_many(videos[:n], mode, batch_frames=batch_frames))
                    _sync(device)
                    wall = time.perf_counter() - start
                runs[n].append(ScalingRow(n, done, num_frames, wall, peak.mib))
                log(f"run {r + 1}/{repeats}, {n} stream(s): {done / wall:.2f} frames/s")
    return [_median_rows(runs[n]) for n in counts]


def _training_data(root: Path, size: int) -> None:
    height, width = frame_shape(size)
    generate_synthetic_dataset(root, num_train_videos=3, num_val_videos=0, frames=16, size=width,
                               num_det_images=4)


def run_batch_bench(config: str, batches: Sequence[int], iterations: int, size: int, device: str = "cpu",
                    repeats: int = 1, log: Callable[[str], None] = lambda s: None) -> list[ScalingRow]:
    """Training iterations with B images per process, for each B in ``batches`` (random weights,
    FrozenBN calibrated, SGD with a small learning rate so that the weights stay finite)."""
    if iterations < 1 or repeats < 1 or not batches or min(batches) < 1:
        raise MegavodError("--iterations, --repeats and every --batch size must be >= 1")
    height, width = frame_shape(size)
    overrides = [f"input.min_size_train=[{height}]", f"input.max_size_train={width}", "data.num_workers=0"]
    cfg = load_config(config, overrides)
    with tempfile.TemporaryDirectory(prefix="megavod-bench-") as tmp:
        log(f"writing a small synthetic data set ({width} px wide frames)")
        _training_data(Path(tmp), size)
        dataset = build_train_dataset(cfg, tmp)
        torch.manual_seed(cfg.seed)
        model = build_detector(cfg).to(device)
        sample = dataset[0]
        calibrate(model.eval(), sample.image.to(device))
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)
        rng = np.random.default_rng(0)

        def iteration(b: int) -> float:
            batch = [dataset[int(i)].to(device) for i in rng.integers(0, len(dataset), b)]
            _sync(device)
            start = time.perf_counter()
            loss = sum(model(batch).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            _sync(device)
            return time.perf_counter() - start

        log("warm-up")
        iteration(min(batches))
        runs: dict[int, list[ScalingRow]] = {b: [] for b in batches}
        for r in range(repeats):
            for b in batches:  # the batch sizes take turns
                with PeakRSS(device) as peak:
                    wall = sum(iteration(b) for _ in range(iterations))
                runs[b].append(ScalingRow(b, b * iterations, iterations, wall, peak.mib))
                log(f"run {r + 1}/{repeats}, B = {b}: {1000 * wall / iterations:.0f} ms/iteration")
    return [_median_rows(runs[b]) for b in batches]


def format_scaling(rows: Sequence[ScalingRow], what: str, header: str) -> str:
    """The table: ``what`` is ``"streams"`` or ``"batch"``."""
    base = rows[0]
    unit, step = ("frames/s", "ms/step") if what == "streams" else ("images/s", "ms/iter")
    lines = [header, f"{what:>8s} {unit:>10s} {step:>10s} {'ms/' + ('frame' if what == 'streams' else 'image'):>10s} "
                     f"{'speed-up':>9s} {'peak MiB':>9s}"]
    for r in rows:
        lines.append(f"{r.count:>8d} {r.per_second:>10.3g} {r.ms_per_step:>10.1f} {1000 / r.per_second:>10.1f} "
                     f"{r.per_second / base.per_second:>9.2f} {r.peak_mib:>9.0f}")
    lines.append(f"speed-up: {unit} over the first row's ({base.count}); " + (
        "ms/step: what each stream waits per frame" if what == "streams" else
        "ms/iter: forward + backward + step, data loading not counted"))
    return "\n".join(lines)
