"""``megavod demo``: a synthetic clip, MEGA with the shipped weights, an annotated MP4 and a summary.

The clip is drawn by the synthetic benchmark's renderer (``megavod.data.synthetic_render``) with a seed
of its own, so it is a video the shipped model never saw in training. The weights in
``megavod/weights/`` are ``synthetic_mega`` trained on the synthetic benchmark by
``megavod reproduce synthetic`` (see ``megavod/weights/README.md``); the demo runs MEGA offline through
the same runner as ``megavod detect`` and writes, under ``--out``::

    demo.mp4    the clip with the detections scoring >= 0.5 drawn
    demo.json   every detection (the prediction file format, see README)
    demo.csv    one row per detection

then prints a one-screen summary: frames, detections, per-class counts beside the ground truth, and
ms/frame. Without the shipped weights file it says so and runs an untrained model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_iou

from megavod.errors import MegavodError
from megavod.apps.detect import DetectOptions, detect_one
from megavod.api import Detector
from megavod.checkpoints.loading import load_model_weights
from megavod.config import load_config
from megavod.data.classes import VID_CLASSES
from megavod.data.synthetic_render import gt_box, make_scene, render_frame
from megavod.methods import build_detector

WEIGHTS_DIR = Path(__file__).parents[1] / "weights"
WEIGHTS_NAME = "synthetic_mega"
PRESET = "synthetic_mega"
DEMO_SEED = 2020  # not a seed the benchmark's videos are drawn from
SCORE_THRESH = 0.5


@dataclass
class DemoSummary:
    frames: int
    width: int
    height: int
    detections: int  # scoring >= score_thresh (the ones drawn)
    per_class: dict[str, int]  # detections drawn, per class
    ground_truth: dict[str, int]  # annotated boxes per class
    correct: int  # ground-truth boxes found by a drawn detection of the right class (IoU >= 0.5)
    ms_per_frame: float  # detector time (decode, transform, network, aggregation, post-processing)
    seconds: float  # the whole demo, rendering and encoding included
    weights: str | None  # None: untrained model
    outputs: dict[str, Path] = field(default_factory=dict)


def shipped_weights() -> tuple[Path | None, Path]:
    """(weights file or None when missing, config YAML or the preset's name as a path)."""
    config = WEIGHTS_DIR / f"{WEIGHTS_NAME}.yaml"
    for suffix in (".safetensors", ".pth"):
        path = WEIGHTS_DIR / f"{WEIGHTS_NAME}{suffix}"
        if path.is_file():
            return path, config
    return None, config


def load_weights_file(model: torch.nn.Module, path: Path, cfg) -> None:
    """Fill ``model`` from any file ``megavod detect --weights`` accepts (the shipped ``.safetensors``)."""
    load_model_weights(model, path, cfg)


def build_demo_model(weights: Path | None = None, config: str | Path | None = None):
    """(config, model, weights path or None). Default: the shipped weights, else an untrained model."""
    if weights is None:
        weights, shipped_config = shipped_weights()
        config = config or (shipped_config if shipped_config.is_file() else PRESET)
    cfg = load_config(str(config or PRESET))
    torch.manual_seed(0)  # an untrained model is at least the same untrained model each time
    model = build_detector(cfg)
    if weights is not None:
        load_weights_file(model, Path(weights), cfg)
    return cfg, model, weights


def render_clip(folder: Path, frames: int, width: int, height: int, seed: int) -> list:
    """Write a synthetic clip as ``folder/%06d.JPEG``; return its ground truth per frame."""
    rng = np.random.default_rng([seed, 7, 0])
    scene = make_scene(rng, frames, width, height, motion="medium")
    folder.mkdir(parents=True, exist_ok=True)
    truth = []
    for t in range(frames):
        Image.fromarray(render_frame(scene, t)).save(folder / f"{t:06d}.JPEG", "JPEG", quality=90)
        boxes = [(gt_box(tr, t, width, height), tr.spec.label) for tr in scene.tracks]
        truth.append([(b, label) for b, label in boxes if b is not None])
    return truth


def _count_correct(records, truth, thresh: float) -> int:
    found = 0
    for record, gts in zip(records, truth):
        d = record.detections
        keep = d.scores >= thresh
        boxes, labels = d.boxes[keep].float(), d.labels[keep]
        for box, label in gts:
            same = labels == label
            if same.any():
                # +1 convention: inclusive pixel boxes; torchvision's IoU on (x2+1, y2+1) gives the same.
                g = torch.tensor([box], dtype=torch.float32) + torch.tensor([0, 0, 1, 1])
                found += int(box_iou(boxes[same] + torch.tensor([0, 0, 1, 1]), g).max() >= 0.5)
    return found


def run_demo(
    out: str | Path,
    frames: int = 60,
    width: int = 192,
    height: int = 144,
    seed: int = DEMO_SEED,
    weights: str | Path | None = None,
    config: str | Path | None = None,
    progress: bool = True,
) -> DemoSummary:
    """Render a clip, run MEGA offline on it, write ``out/demo.{mp4,json,csv}``; return the summary."""
    if frames < 1 or width < 32 or height < 32:
        raise MegavodError(f"demo: needs >= 1 frame of at least 32x32 pixels, got {frames} of {width}x{height}")
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg, model, used = build_demo_model(Path(weights) if weights else None, config)
    if used is None:
        print("megavod demo: warning: no shipped weights found in "
              f"{WEIGHTS_DIR}: running an UNTRAINED model, its detections are noise", file=sys.stderr)
    detector = _TimedDetector(model, cfg, "cpu")
    with tempfile.TemporaryDirectory(prefix="megavod-demo-") as tmp:
        truth = render_clip(Path(tmp) / "demo", frames, width, height, seed)
        options = DetectOptions(mode="offline", score_thresh=SCORE_THRESH, progress=progress)
        video = detect_one(detector, str(Path(tmp) / "demo"), out, options)
    drawn = [r.detections.labels[r.detections.scores >= SCORE_THRESH] for r in video.frames]
    per_class = Counter(VID_CLASSES[int(x)] for labels in drawn for x in labels)
    ground_truth = Counter(VID_CLASSES[label] for gts in truth for _, label in gts)
    return DemoSummary(
        frames=len(video.frames), width=width, height=height,
        detections=sum(per_class.values()), per_class=dict(per_class), ground_truth=dict(ground_truth),
        correct=_count_correct(video.frames, truth, SCORE_THRESH),
        ms_per_frame=1000.0 * detector.seconds / max(len(video.frames), 1),
        seconds=time.perf_counter() - started, weights=str(used) if used else None,
        outputs={ext: out / f"demo.{ext}" for ext in ("mp4", "json", "csv")},
    )


class _TimedDetector(Detector):
    """The detect runner's detector, also counting the time spent producing detections."""

    seconds = 0.0

    def stream(self, source, mode=None, *args, **kwargs):
        frames = super().stream(source, mode, *args, **kwargs)
        while True:
            t = time.perf_counter()
            try:
                item = next(frames)
            except StopIteration:
                return
            finally:
                self.seconds += time.perf_counter() - t
            yield item


def format_summary(s: DemoSummary, method: str = "MEGA") -> str:
    total_gt = sum(s.ground_truth.values())
    names = sorted(set(s.per_class) | set(s.ground_truth), key=lambda n: (-s.ground_truth.get(n, 0), n))
    lines = [
        f"megavod demo: {method}, " + (f"shipped weights {s.weights}" if s.weights else "UNTRAINED model (no shipped weights)"),
        f"  clip        {s.frames} frames, {s.width}x{s.height}, synthetic (seed {DEMO_SEED}), offline",
        f"  detections  {s.detections} scoring >= {SCORE_THRESH} ({s.detections / max(s.frames, 1):.1f} per frame); "
        f"{s.correct} of {total_gt} ground-truth boxes found with the right class",
        "  per class   detected / ground truth boxes",
    ]
    lines += [f"    {n:<12}{s.per_class.get(n, 0):>5} / {s.ground_truth.get(n, 0)}" for n in names]
    lines += [
        f"  speed       {s.ms_per_frame:.1f} ms/frame ({torch.get_num_threads()} CPU threads); {s.seconds:.1f} s in all",
        "  wrote       " + ", ".join(str(p) for p in s.outputs.values()),
    ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """``megavod demo [--out DIR]``."""
    summary = run_demo(args.out)
    print(format_summary(summary))
    return 0
