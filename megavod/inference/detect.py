"""``megavod detect``: run a detector over video files, frame folders and streams.

Per input it writes ``<name>.json`` (the prediction file, see README), ``<name>.csv`` (one row per box)
and ``<name>.mp4`` (annotated), each atomically (temporary file, then rename). An input whose three
files exist is skipped, so an interrupted run resumes without losing or duplicating work. A bad input
among many is reported in one line and the others go on; the exit code says whether any failed. Under
``torchrun`` the inputs are sharded over the ranks.
"""

from __future__ import annotations

import csv
import glob
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from megavod.atomic import atomic_path
from megavod.config import Config
from megavod.data.classes import VID_CLASSES
from megavod.data.predictions import FramePrediction, VideoPredictions, write_predictions
from megavod.data.transforms import build_transform
from megavod.data.video import RandomAccessFrames, draw_detections, list_frame_files, open_source, write_video
from megavod.errors import MegavodError
from megavod.inference.engine import StreamSettings, detect_offline, detect_online, detect_single_frames
from megavod.structures import Detections, RelationInputs

if TYPE_CHECKING:
    from megavod.postprocess.blr import RelationWeights

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


def write_csv(path: Path, video: VideoPredictions) -> None:
    """One row per detection: video, frame, file, x1, y1, x2, y2, score, label, class (atomic)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "frame", "file", "x1", "y1", "x2", "y2", "score", "label", "class"])
        for fp in video.frames:
            d = fp.detections
            for box, score, label in zip(d.boxes.tolist(), d.scores.tolist(), d.labels.tolist()):
                writer.writerow([video.video, fp.frame, fp.file or "", *(f"{v:.2f}" for v in box),
                                 f"{score:.6f}", label, VID_CLASSES[label]])


class Detector:
    """A built model plus what it needs to turn frames into detections."""

    def __init__(self, model: torch.nn.Module, cfg: Config, device: str = "cpu") -> None:
        self.model = model.to(device).eval()
        self.cfg = cfg
        self.device = device
        self.transform = build_transform(cfg.input, train=False)

    def prepare(self, frame: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """RGB uint8 frame -> (the model's input tensor, original (height, width))."""
        image, _ = self.transform(Image.fromarray(frame))
        return image.to(self.device), (frame.shape[0], frame.shape[1])

    def has_relation_module(self) -> bool:
        """Whether the model has a location-based relation module whose weights BLR can use."""
        module = getattr(self.model, "blr_relation_module", None)
        return module is not None and module() is not None

    def stream(self, source, mode: str, relation_inputs: bool = False) -> Iterator[tuple[int, Detections]]:
        """Detections per frame (original pixels), in frame order; with ``relation_inputs`` (MEGA, RDN)
        each carries its relation-module input (:attr:`Detections.relation`) for BLR."""
        if not relation_inputs or not self.has_relation_module():
            yield from self._stream(source, mode)
            return
        self.model.record_relation_inputs = True
        try:
            yield from self._stream(source, mode)
        finally:
            self.model.record_relation_inputs = False

    def relation_weights(self, inputs: Sequence[RelationInputs], frames: Sequence[int]) -> RelationWeights | None:
        """BLR's relation weights (spec §13.12) of adjacent frames t, t+1 as a function of t, computed
        when BLR asks for them (one [n_t, n_{t+1}] at a time); ``inputs[t]`` is frame t's
        :class:`~megavod.structures.RelationInputs`. None (w = 0) without relation inputs."""
        if not inputs:
            return None
        if len(inputs) != len(frames):
            raise ValueError(f"relation inputs for {len(inputs)} frames, but {len(frames)} frames")
        inputs, frames = tuple(inputs), tuple(frames)
        return lambda t: self.model.blr_relation_weights(inputs[t], inputs[t + 1], frames[t], frames[t + 1])

    @torch.inference_mode()
    def _stream(self, source, mode: str) -> Iterator[tuple[int, Detections]]:
        method = self.cfg.method
        if method == "single":
            frames = (self.prepare(f) for f in source)
            yield from detect_single_frames(self.model, frames)
        elif method in ("mega", "rdn") and mode == "online":
            settings = StreamSettings.from_config(self.cfg)
            yield from detect_online(self.model, (self.prepare(f) for f in source), settings)
        elif method in ("mega", "rdn"):
            settings = StreamSettings.from_config(self.cfg)
            yield from detect_offline(self.model, lambda t: self.prepare(source[t]), len(source), settings)
        elif method == "dff":  # causal by design: the same in both modes
            from megavod.inference.flow_engine import detect_dff

            yield from detect_dff(self.model, (self.prepare(f) for f in source))
        elif method == "fgfa":
            from megavod.inference.flow_engine import FGFAWindow, detect_fgfa_offline, detect_fgfa_online

            window = FGFAWindow.from_config(self.cfg)
            if mode == "online":
                yield from detect_fgfa_online(self.model, (self.prepare(f) for f in source), window)
            else:
                yield from detect_fgfa_offline(self.model, lambda t: self.prepare(source[t]), len(source), window)
        else:
            raise MegavodError(f"method '{method}' cannot run in the streaming engine yet (see issue #7)")


class _LastFrame:
    """Iterates a frame source and remembers the frame it yielded last."""

    def __init__(self, frames) -> None:
        self.frames = frames
        self.current: np.ndarray | None = None

    def __iter__(self) -> Iterator[np.ndarray]:
        for frame in self.frames:
            self.current = frame
            yield frame


def detect_one(detector: Detector, spec: str, out_dir: Path, options: DetectOptions) -> VideoPredictions:
    """Detect on one input and write its three outputs."""
    name = output_name(spec)
    paths = _outputs(out_dir, name)
    source = open_source(spec)
    causal = options.mode == "online" or detector.cfg.method in ("single", "dff")  # DFF is causal by design
    if source.is_stream and not causal:
        raise MegavodError(f"{spec}: a live stream can only run causally: use --mode online")
    if options.postprocess != "none" and source.is_stream:
        raise MegavodError(f"{spec}: --postprocess {options.postprocess} needs the whole video, not a live stream")
    frames = source if causal and options.postprocess == "none" else RandomAccessFrames(source)
    records: list[FramePrediction] = []
    files = [p.name for p in source.files] if hasattr(source, "files") else None
    bar = tqdm(total=source.num_frames, desc=name, unit="frame", disable=not options.progress, leave=False)
    start = time.perf_counter()
    size = [source.height, source.width]

    relations: list[RelationInputs] = []  # BLR only: per frame, its detections' relation-module inputs (CPU)

    def collect(frames) -> Iterator[tuple[int, Detections]]:
        for k, dets in detector.stream(frames, options.mode, relation_inputs=options.postprocess == "blr"):
            if dets.relation is not None:
                relations.append(dets.relation.to("cpu"))
                dets = Detections(dets.boxes, dets.scores, dets.labels)
            records.append(FramePrediction(k, files[k] if files else None, dets.to("cpu")))
            bar.update(1)
            yield k, dets

    def draw(frame: np.ndarray, d: Detections) -> np.ndarray:
        return draw_detections(frame, d.boxes, d.labels, d.scores, VID_CLASSES, score_thresh=options.score_thresh)

    try:
        if frames is source:
            # One causal pass: frame k's detections come out before frame k+1 is read, so the frame
            # last read is the one to draw on.
            tap = _LastFrame(source)
            write_video(paths["mp4"], (draw(tap.current, d) for _, d in collect(tap)), fps=source.fps)
        else:
            for _ in collect(frames):
                pass
            if options.postprocess != "none":
                from megavod.postprocess import apply_postprocess

                # BLR: the detector's relation weights between adjacent frames' detections (None for a
                # detector without a relation module: w = 0, spec §13.12).
                weights = None
                if options.postprocess == "blr":
                    weights = detector.relation_weights(relations, [r.frame for r in records])
                records = apply_postprocess(records, options.postprocess, weights)
                del weights  # frees the relation inputs before the video is written
                relations.clear()
            write_video(paths["mp4"], (draw(frames[r.frame], r.detections) for r in records), fps=source.fps)
    finally:
        bar.close()
        if frames is not source and hasattr(frames, "close"):
            frames.close()
        source.close()
    if not records:
        raise MegavodError(f"{spec}: no frames decoded")
    elapsed = time.perf_counter() - start
    video = VideoPredictions(name, size[1], size[0], records)
    write_csv(paths["csv"], video)
    write_predictions(paths["json"], [video])  # written last: its presence marks the input done
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
    from megavod.checkpoints.loading import load_detector
    from megavod.models import build_detector

    if args.weights is not None:
        model, cfg = load_detector(args.weights, args.config, args.overrides, trust_pickle=args.trust_pickle)
    else:
        cfg = args.cfg
        model = build_detector(cfg)
        print("megavod detect: warning: no --weights given: the model is randomly initialised", file=sys.stderr)
    mode = args.mode or ("online" if cfg.mega.online else "offline")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise MegavodError("--device cuda: no CUDA device is available")
    inputs = expand_inputs(args.inputs)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = args.device
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    options = DetectOptions(mode=mode, postprocess=args.postprocess, score_thresh=args.score_thresh, device=device)
    failed = run_detect(Detector(model, cfg, device), inputs, args.out, options, rank, world)
    if failed:
        print(f"megavod detect: {failed} of {len(inputs)} inputs failed", file=sys.stderr)
        return 1
    return 0
