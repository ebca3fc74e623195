"""``megavod bench``: time detectors on the same synthetic frames, through the engine users run.

Every config is built once with random weights; the backbone, RPN and res5 weights of the first config
are copied into the others (:func:`share_weights`: same proposals, so the row counts match) and the
FrozenBN statistics are calibrated on one frame (a random deep ResNet with identity FrozenBN explodes,
:func:`calibrate_frozen_bn`). All configs then run over the same N synthetic frames of S x round(5S/3)
pixels (600 x 1000 at S = 600, the authors' largest test input; rendered by
:mod:`megavod.data.synthetic_render`, a new scene every 100 frames), each as one offline video:
every method through the streaming engine with its own schedule, via :meth:`Detector.stream`, frame
preprocessing included. Before timing, each model runs one warm-up
video of ``warmup`` frames (not counted). The timed videos are interleaved frame by frame (each config's
next frame in turn, :func:`run_interleaved`), so a change in the machine's load lands on every config
alike; with ``repeats`` > 1 each column is the median over the runs.

Columns (ms per frame):

* ``video``: wall time of the video / N, what a user sees on an N-frame video.
* ``steady``: the same at steady state: (wall - time in ``detect_key``) / N plus the mean
  ``detect_key`` time of the key frames at steady state. Each frame's per-frame pass runs exactly once
  (the engine's :class:`FeatureStore`), so the first part does not depend on N; the key cost grows
  while MEGA's memory fills: key frame k reads min(k, T_m) memory frames per level, so the steady keys
  are k >= T_m (the base model, without memory, is steady from k = 0). Needs N > T_m.
* ``pass`` / ``key``: the per-frame pass (``frame_features``) and the steady key frame (``detect_key``).

Ratios are steady (or, where a config has no steady key frame, video) ms/frame over the first
single-frame config's.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from megavod.api import Detector, resolve_device
from megavod.apps.bench_frames import bench_config, calibrate, frame_shape, synthetic_frames
from megavod.apps.bench_scaling import format_scaling, run_batch_bench, run_streams_bench
from megavod.config import Config
from megavod.errors import MegavodError
from megavod.inference.schedules import Schedule
from megavod.methods import build_detector

DEFAULT_CONFIGS = ("single_R_101", "base_R_101", "mega_R_101")


@dataclass
class VideoTiming:
    """One timed video: wall seconds, and the seconds of every ``frame_features`` / ``detect_key`` call."""

    frames: int
    wall_s: float
    pass_s: list[float] = field(default_factory=list)
    key_s: list[float] = field(default_factory=list)


@dataclass
class BenchResult:
    name: str
    method: str
    # The schedule of a method with a steady state (MEGA's, the base model's, RDN's: window T_l, pool T_g,
    # memory T_m); None: whole-video figures only
    settings: Schedule | None
    videos: list[VideoTiming]
    single_frame: bool = False  # the reference of the ratios

    @property
    def steady_from(self) -> int | None:
        """First key frame at steady state (None: single frame, no key pass)."""
        return self.settings.steady_from if self.settings is not None else None

    def _median(self, per_video: Callable[[VideoTiming], float | None]) -> float | None:
        values = [v for v in map(per_video, self.videos) if v is not None]
        return 1000 * statistics.median(values) if values else None

    @property
    def video_ms(self) -> float:
        return self._median(lambda v: v.wall_s / v.frames)

    @property
    def pass_ms(self) -> float | None:
        return self._median(lambda v: sum(v.pass_s) / len(v.pass_s) if v.pass_s else None)

    @property
    def key_ms(self) -> float | None:
        def steady_key(v: VideoTiming) -> float | None:
            keys = v.key_s[self.steady_from:] if self.steady_from is not None else []
            return sum(keys) / len(keys) if keys else None

        return self._median(steady_key)

    @property
    def steady_ms(self) -> float | None:
        if self.settings is None:
            return self.video_ms

        def steady(v: VideoTiming) -> float | None:
            keys = v.key_s[self.steady_from:]
            if not keys:
                return None
            return (v.wall_s - sum(v.key_s)) / v.frames + sum(keys) / len(keys)

        return self._median(steady)

    @property
    def ms(self) -> float:
        """The figure ratios use: steady ms/frame where there is one, else video ms/frame."""
        steady = self.steady_ms
        return steady if steady is not None else self.video_ms


def _timed(fn: Callable, record: Callable[[float], None], sync: Callable[[], None]) -> Callable:
    def wrapper(*args, **kwargs):
        sync()
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        sync()
        record(time.perf_counter() - start)
        return out

    return wrapper


def share_weights(src: torch.nn.Module, dst: torch.nn.Module) -> int:
    """Copy every parameter/buffer of ``src`` that ``dst`` has under the same name and shape (backbone,
    RPN, res5: the names are the authors' in every detector), so that both find the same proposals.
    Returns the number of tensors copied."""
    dst_state = dst.state_dict()
    shared = {k: v for k, v in src.state_dict().items() if k in dst_state and dst_state[k].shape == v.shape}
    dst.load_state_dict(shared, strict=False)
    return len(shared)


class BenchModel:
    """A built, calibrated detector whose ``frame_features`` / ``detect_key`` calls are timed.

    With ``share_from``, the backbone, RPN and res5 weights are that model's (same proposals)."""

    def __init__(self, name: str, cfg: Config, device: str, calibration_frame: np.ndarray,
                 share_from: torch.nn.Module | None = None) -> None:
        self.name, self.cfg, self.device = name, cfg, device
        torch.manual_seed(cfg.seed)
        self.detector = Detector(build_detector(cfg), cfg, device)
        model = self.detector.model
        if share_from is not None:
            share_weights(share_from, model)
        calibrate(model, self.detector.prepare(calibration_frame)[0])
        # Per-frame pass / key-frame timings for the methods whose schedule has a steady state (window,
        # pool, memory); the others get the whole-video figure only.
        schedule = self.detector.schedule
        self.settings = schedule if schedule.steady_from is not None else None
        self.single_frame = schedule.single_frame
        self._current: VideoTiming | None = None
        if self.settings is not None:
            sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
            model.frame_features = _timed(model.frame_features, lambda s: self._current.pass_s.append(s), sync)
            model.detect_key = _timed(model.detect_key, lambda s: self._current.key_s.append(s), sync)

    def start(self, frames: Sequence[np.ndarray]) -> tuple[VideoTiming, Iterator[Any]]:
        """A timing record and the offline detection of ``frames``, not yet started."""
        self._current = timing = VideoTiming(len(frames), 0.0)
        return timing, iter(self.detector.stream(frames, "offline"))

    def run(self, frames: Sequence[np.ndarray]) -> VideoTiming:
        """Detect on ``frames`` as one offline video; the detections are consumed and dropped."""
        self._current = timing = VideoTiming(len(frames), 0.0)
        start = time.perf_counter()
        count = sum(1 for _ in self.detector.stream(frames, "offline"))
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        timing.wall_s = time.perf_counter() - start
        if count != len(frames):
            raise RuntimeError(f"{self.name}: {count} detections for {len(frames)} frames")
        self._current = None
        return timing


def run_interleaved(models: Sequence[BenchModel], frames: Sequence[np.ndarray], device: str) -> list[VideoTiming]:
    """Every model detects ``frames`` as one offline video, the models taking turns frame by frame
    (model 1's frame k, model 2's frame k, ..., then frame k + 1), so that a change in the machine's
    load lands on every config alike and the ratios measure the configs, not the load. A model's wall
    time is the sum of its own turns."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    started = [m.start(frames) for m in models]
    counts = [0] * len(models)
    active = list(range(len(models)))
    while active:
        for i in list(active):
            timing, stream = started[i]
            models[i]._current = timing  # the timed frame_features / detect_key record into this video
            begin = time.perf_counter()
            result = next(stream, None)
            sync()
            timing.wall_s += time.perf_counter() - begin
            if result is None:
                active.remove(i)
            else:
                counts[i] += 1
    for m, count in zip(models, counts):
        m._current = None
        if count != len(frames):
            raise RuntimeError(f"{m.name}: {count} detections for {len(frames)} frames")
    return [timing for timing, _ in started]


def run_bench(
    configs: Sequence[str],
    num_frames: int,
    size: int,
    device: str = "cpu",
    repeats: int = 1,
    warmup: int = 2,
    log: Callable[[str], None] = lambda s: None,
) -> list[BenchResult]:
    """Time each config over the same ``num_frames`` frames (see the module docstring)."""
    if num_frames < 1:
        raise MegavodError(f"--frames must be >= 1, got {num_frames}")
    if repeats < 1:
        raise MegavodError(f"--repeats must be >= 1, got {repeats}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MegavodError("--device cuda: no CUDA device is available")
    cfgs = [bench_config(name, size) for name in configs]  # config errors before any work
    frames = synthetic_frames(num_frames + warmup, size)
    timed, warm = frames[:num_frames], frames[num_frames:]
    models = []
    for name, cfg in zip(configs, cfgs):
        log(f"building {name}")
        models.append(BenchModel(name, cfg, device, timed[0], models[0].detector.model if models else None))
    with torch.inference_mode():
        for m in models:
            if warm:
                log(f"warm-up {m.name} ({len(warm)} frames)")
                m.run(warm)
        videos: list[list[VideoTiming]] = [[] for _ in models]
        for r in range(repeats):
            for m, runs, timing in zip(models, videos, run_interleaved(models, timed, device)):
                runs.append(timing)
                log(f"run {r + 1}/{repeats} {m.name}: {1000 * timing.wall_s / num_frames:.0f} ms/frame")
    return [BenchResult(m.name, m.cfg.method, m.settings, runs, m.single_frame) for m, runs in zip(models, videos)]


def _fmt(ms: float | None) -> str:
    return f"{ms:.1f}" if ms is not None else "-"


def format_report(results: Sequence[BenchResult], num_frames: int, size: int, device: str,
                  repeats: int, warmup: int) -> str:
    """The table, the ratios and the notes ``megavod bench`` prints."""
    h, w = frame_shape(size)
    threads = f", torch threads: {torch.get_num_threads()}" if device == "cpu" else ""
    lines = [
        (f"megavod bench: {num_frames} synthetic frames of {h}x{w} (5:3), {device}{threads}, random weights "
         f"(FrozenBN calibrated), warm-up {warmup} frames, median of {repeats} run(s); ms per frame"),
        f"{'config':<28s} {'T_l':>4s} {'T_g':>4s} {'T_m':>4s} {'video':>9s} {'steady':>9s} {'pass':>9s} {'key':>9s}",
    ]
    for r in results:
        s = r.settings
        win = [str(s.T_l), str(s.T_g), str(s.T_m if s.memory_levels else 0)] if s else ["-"] * 3
        lines.append(f"{r.name:<28s} {win[0]:>4s} {win[1]:>4s} {win[2]:>4s} {_fmt(r.video_ms):>9s} "
                     f"{_fmt(r.steady_ms):>9s} {_fmt(r.pass_ms):>9s} {_fmt(r.key_ms):>9s}")
    reference = next((r for r in results if r.single_frame), results[0])
    if len(results) > 1:
        others = [r for r in results if r is not reference]
        ratios = ", ".join(f"{r.name}/{reference.name} {r.ms / reference.ms:.2f}" for r in others)
        lines.append(f"ratios (steady ms/frame; configs interleaved frame by frame, quote these): {ratios}")
    notes = []
    for r in results:
        s = r.settings
        if s is None:
            continue
        if r.steady_ms is None:
            notes.append(f"{r.name}: no key frame at steady state: MEGA's memory fills after T_m = {s.T_m} key "
                         f"frames, use --frames > {s.T_m} (e.g. {s.T_m + 15}); its ratio uses video ms/frame")
        short = [f"the local window (T_l = {s.T_l})"] if num_frames < s.T_l else []
        short += [f"the global pool (T_g = {s.T_g})"] if num_frames < s.T_g else []
        if short:
            notes.append(f"{r.name}: the video is shorter than {' and '.join(short)}: frames repeat in them "
                         f"(same row counts, so the key cost is that of a longer video)")
    if device == "cpu" and any(r.settings is not None for r in results):
        notes.append("the per-key cost (relation modules) does not depend on the input size, the per-frame pass "
                     "does: at a reduced --size MEGA/single is higher than at 600")
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def main(args) -> int:
    configs = list(args.config) if args.config else list(DEFAULT_CONFIGS)
    repeats = int(getattr(args, "repeats", 1) or 1)
    warmup = int(getattr(args, "warmup", 2))
    device = str(resolve_device(getattr(args, "device", "auto")))
    if getattr(args, "streams", None) or getattr(args, "batch", None):
        return _scaling_main(args, configs if args.config else ["mega_R_101"], device, repeats)
    results = run_bench(configs, args.frames, args.size, device, repeats, warmup,
                        log=lambda s: print(f"megavod bench: {s}", file=sys.stderr, flush=True))
    print(format_report(results, args.frames, args.size, device, repeats, warmup))
    return 0


def _scaling_main(args, configs: Sequence[str], device: str, repeats: int) -> int:
    """``--streams`` / ``--batch``: one table per config (megavod/apps/bench_scaling.py)."""
    def log(s: str) -> None:
        print(f"megavod bench: {s}", file=sys.stderr, flush=True)

    threads = f", torch threads {torch.get_num_threads()}" if device == "cpu" else ""
    h, w = frame_shape(args.size)
    for config in configs:
        if args.streams:
            rows = run_streams_bench(config, args.streams, args.frames, args.size, device, args.mode,
                                                   repeats, log=log)
            print(format_scaling(rows, "streams", (
                f"{config}: N streams of {args.frames} synthetic frames of {h}x{w}, {args.mode}, one model "
                f"(Detector.stream_many), {device}{threads}, median of {repeats} run(s)")))
        if args.batch:
            rows = run_batch_bench(config, args.batch, args.iterations, args.size, device, repeats,
                                                 log=log)
            print(format_scaling(rows, "batch", (
                f"{config}: training, B images per iteration ({h}x{w} frames), {args.iterations} iteration(s) "
                f"per B, {device}{threads}, median of {repeats} run(s)")))
    return 0
