"""``megavod detect``: run a detector over video files, frame folders and streams.

Per input it writes ``<name>.json`` (the prediction file, see README), ``<name>.csv`` (one row per box)
and ``<name>.mp4`` (annotated), each atomically (temporary file, then rename). An input whose three
files exist is skipped, so an interrupted run resumes without losing or duplicating work. A bad input
among many is reported in one line and the others go on; the exit code says whether any failed. Under
``torchrun`` the inputs are sharded over the ranks.
"""

from __future__ import annotations

import glob
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from megavod.api import Detector, FrameResult, load_onnxruntime, resolve_device
from megavod.data.classes import VID_CLASSES
from megavod.data.predictions import FramePrediction, VideoPredictions
from megavod.data.video import RandomAccessFrames, draw_detections, list_frame_files, open_source, write_video
from megavod.errors import MegavodError
from megavod.methods import build_detector, load_detector
from megavod.structures import Detections, RelationInputs

VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".m4v", ".flv", ".wmv"}


@dataclass
class DetectOptions:
    mode: str = "offline"  # "offline" | "online"
    postprocess: str = "none"  # "none" | "seqnms" | "blr"
    score_thresh: float = 0.5  # boxes drawn on the video; the JSON and CSV keep every detection
    device: str = "cpu"
    progress: bool = True


def expand_inputs(tokens: Sequence[str]) -> list[str]:
    """Globs, folders of videos, frame folders, files and stream URLs -> a list of inputs."""
    inputs: list[str] = []
    for token in tokens:
        if "://" in token:
            inputs.append(token)
        elif any(c in token for c in "*?["):
            matches = sorted(glob.glob(token))
            if not matches:
                raise MegavodError(f"{token}: no file matches this pattern")
            inputs.extend(matches)
        elif Path(token).is_dir() and not list_frame_files(Path(token)):
            videos = sorted(p for p in Path(token).iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS)
            if not videos:
                raise MegavodError(f"{token}: folder holds neither frames nor videos")
            inputs.extend(str(v) for v in videos)
        else:
            inputs.append(token)
    return inputs


def output_name(source: str) -> str:
    """A file-name-safe name for an input's outputs."""
    path = Path(source.rstrip("/"))
    name = path.stem if "://" not in source else re.sub(r"[^A-Za-z0-9_.-]+", "_", source.split("://", 1)[1])
    return name or "stream"


def _outputs(out_dir: Path, name: str) -> dict[str, Path]:
    return {ext: out_dir / f"{name}.{ext}" for ext in ("json", "csv", "mp4")}


class _LastFrame:
    """Iterates a frame source and remembers the frame it yielded last."""

    def __init__(self, frames) -> None:
        self.frames = frames
        self.files = getattr(frames, "files", None)  # a frame folder's file names, for the results
        self.current: np.ndarray | None = None

    def __iter__(self) -> Iterator[np.ndarray]:
        for frame in self.frames:
            self.current = frame
            yield frame


def detect_one(detector: Detector, spec: str, out_dir: Path, options: DetectOptions) -> VideoPredictions:
    """Detect on one input and write its three outputs (the JSON last: its presence marks the input done)."""
    name = output_name(spec)
    paths = _outputs(out_dir, name)
    causal = detector.runs_causally(options.mode)
    source = open_source(spec)
    if source.is_stream and not causal:
        source.close()
        raise MegavodError(f"{spec}: a live stream can only run causally: use --mode online")
    if options.postprocess != "none" and source.is_stream:
        source.close()
        raise MegavodError(f"{spec}: --postprocess {options.postprocess} needs the whole video, not a live stream")
    # Offline (and for post-processing) the frames are decoded once and read by index.
    frames = source if causal and options.postprocess == "none" else RandomAccessFrames(source)
    records: list[FramePrediction] = []
    relations: list[RelationInputs] = []  # BLR only: per frame, its detections' relation-module inputs (CPU)
    bar = tqdm(total=source.num_frames, desc=name, unit="frame", disable=not options.progress, leave=False)
    start = time.perf_counter()
    size = (source.height, source.width)

    def collect(frames) -> Iterator[FrameResult]:
        for result in detector.stream(frames, options.mode, relation_inputs=options.postprocess == "blr"):
            if result.relation is not None:
                relations.append(result.relation.to("cpu"))
            records.append(FramePrediction(result.frame, result.file, result.detections.to("cpu")))
            bar.update(1)
            yield result

    def draw(frame: np.ndarray, d: Detections) -> np.ndarray:
        return draw_detections(frame, d.boxes, d.labels, d.scores, VID_CLASSES, score_thresh=options.score_thresh)

    try:
        if frames is source:
            # One causal pass: frame k's detections come out before frame k+1 is read, so the frame
            # last read is the one to draw on.
            tap = _LastFrame(source)
            write_video(paths["mp4"], (draw(tap.current, r.detections) for r in collect(tap)), fps=source.fps)
        else:
            for _ in collect(frames):
                pass
            records = detector.postprocess(records, options.postprocess, relations)
            relations.clear()  # frees the relation inputs before the video is written
            write_video(paths["mp4"], (draw(frames[r.frame], r.detections) for r in records), fps=source.fps)
    finally:
        bar.close()
        if frames is not source:
            frames.close()
        source.close()
    if not records:
        raise MegavodError(f"{spec}: no frames decoded")
    elapsed = time.perf_counter() - start
    video = VideoPredictions(name, size[1], size[0], records)
    video.save_csv(paths["csv"])
    video.save_json(paths["json"])  # written last: its presence marks the input done
    print(f"{spec}: {len(records)} frames, {sum(len(r.detections) for r in records)} detections, "
          f"{1000 * elapsed / len(records):.1f} ms/frame -> {paths['json']}", file=sys.stderr)
    return video


def run_detect(
    detector: Detector, inputs: Sequence[str], out_dir: Path, options: DetectOptions,
    rank: int = 0, world_size: int = 1,
) -> int:
    """Detect on every input (this rank's share); returns the number of inputs that failed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names: dict[str, str] = {}
    for spec in inputs:
        name = output_name(spec)
        if name in names:
            raise MegavodError(f"{spec} and {names[name]} would write the same outputs ({name}.*)")
        names[name] = spec
    failed = 0
    for i, spec in enumerate(inputs):
        name = output_name(spec)
        if i % world_size != rank:
            continue
        if all(p.exists() for p in _outputs(out_dir, name).values()):
            print(f"{spec}: already done, skipped", file=sys.stderr)
            continue
        for stale in out_dir.glob(f".{name}.*"):  # temporary files of a run that was killed
            stale.unlink(missing_ok=True)
        try:
            detect_one(detector, spec, out_dir, options)
        except MegavodError as e:
            failed += 1
            print(f"megavod detect: error: {e}", file=sys.stderr)
    return failed


def main(args) -> int:
    """``megavod detect INPUT... [--config] [--weights] [--mode] [--postprocess] [--out] [--device]``."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(args.device)
    if device.type == "cuda" and world > 1:
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    if getattr(args, "backend", "torch") == "onnxruntime":
        detector = load_onnxruntime(args.weights, args.config, args.overrides, args.device,
                                    trust_pickle=args.trust_pickle)
        device = torch.device("cpu")
    elif args.weights is not None:
        model, cfg = load_detector(args.weights, args.config, args.overrides, trust_pickle=args.trust_pickle)
    else:
        cfg = args.cfg
        model = build_detector(cfg)
        print("megavod detect: warning: no --weights given: the model is randomly initialised", file=sys.stderr)
    if getattr(args, "backend", "torch") != "onnxruntime":
        detector = Detector(model, cfg, device)
    inputs = expand_inputs(args.inputs)
    options = DetectOptions(mode=args.mode or detector.default_mode, postprocess=args.postprocess,
                            score_thresh=args.score_thresh, device=str(device))
    failed = run_detect(detector, inputs, args.out, options, rank, world)
    if failed:
        print(f"megavod detect: {failed} of {len(inputs)} inputs failed", file=sys.stderr)
        return 1
    return 0
