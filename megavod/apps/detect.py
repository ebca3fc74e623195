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
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from megavod.api import Detector, FrameResult, RandomWeightsWarning, load_with_overrides, resolve_device
from megavod.data.classes import VID_CLASSES
from megavod.data.predictions import FramePrediction, VideoPredictions
from megavod.data.video import (
    RandomAccessFrames, VideoWriter, draw_detections, list_frame_files, open_source, write_video,
)
from megavod.errors import MegavodError, StreamError
from megavod.structures import Detections, RelationInputs

VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".m4v", ".flv", ".wmv"}


@dataclass
class DetectOptions:
    mode: str = "offline"  # "offline" | "online"
    postprocess: str = "none"  # "none" | "seqnms" | "blr"
    score_thresh: float = 0.5  # boxes drawn on the video; the JSON and CSV keep every detection
    device: str = "cpu"
    progress: bool = True
    batch_streams: int = 1  # inputs run at once through one model (Detector.stream_many)


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


class _InputJob:
    """One input's run: opened and checked, fed its detections one frame at a time (:meth:`add`), then
    written (:meth:`finish`): ``<name>.csv``, ``<name>.mp4`` and last ``<name>.json``.

    Causal runs draw each frame as its detections arrive (the frame read last is the one detected, so
    live streams need no buffer); offline runs decode the frames once for random access and draw them
    after the whole video (and its post-processing)."""

    def __init__(self, detector: Detector, spec: str, out_dir: Path, options: DetectOptions, position: int = 0) -> None:
        self.detector, self.spec, self.options = detector, spec, options
        self.name = output_name(spec)
        self.paths = _outputs(out_dir, self.name)
        self.source = open_source(spec)
        causal = detector.runs_causally(options.mode)
        if self.source.is_stream and not causal:
            self.source.close()
            raise MegavodError(f"{spec}: a live stream can only run causally: use --mode online")
        if options.postprocess != "none" and self.source.is_stream:
            self.source.close()
            raise MegavodError(f"{spec}: --postprocess {options.postprocess} needs the whole video, not a live stream")
        self.writer: VideoWriter | None = None
        if causal and options.postprocess == "none":
            self.frames: Any = _LastFrame(self.source)
            self.writer = VideoWriter(self.paths["mp4"], fps=self.source.fps)
        else:
            self.frames = RandomAccessFrames(self.source)
        self.finished = False  # its outputs are written
        self.records: list[FramePrediction] = []
        self.relations: list[RelationInputs] = []  # BLR only: per frame, its detections' relation inputs (CPU)
        # position: inputs run together (--batch-streams) each keep a progress line of their own
        self.bar = tqdm(total=self.source.num_frames, desc=self.name, unit="frame", disable=not options.progress,
                        leave=False, position=position)
        self.start = time.perf_counter()

    def _draw(self, frame: np.ndarray, d: Detections) -> np.ndarray:
        return draw_detections(frame, d.boxes, d.labels, d.scores, VID_CLASSES, score_thresh=self.options.score_thresh)

    def add(self, result: FrameResult) -> None:
        if result.relation is not None:
            self.relations.append(result.relation.to("cpu"))
        record = FramePrediction(result.frame, result.file, result.detections.to("cpu"))
        self.records.append(record)
        if self.writer is not None:
            self.writer.write(self._draw(self.frames.current, record.detections))
        self.bar.update(1)

    def finish(self) -> VideoPredictions:
        self.bar.close()
        if not self.records:
            raise MegavodError(f"{self.spec}: no frames decoded")
        if self.writer is not None:
            self.writer.close()
        else:
            self.records = self.detector.postprocess(self.records, self.options.postprocess, self.relations)
            self.relations.clear()  # frees the relation inputs before the video is written
            write_video(self.paths["mp4"], (self._draw(self.frames[r.frame], r.detections) for r in self.records),
                        fps=self.source.fps)
        elapsed = time.perf_counter() - self.start
        video = VideoPredictions(self.name, self.source.width, self.source.height, self.records)
        video.save_csv(self.paths["csv"])
        video.save_json(self.paths["json"])  # written last: its presence marks the input done
        self.finished = True
        print(f"{self.spec}: {len(self.records)} frames, {sum(len(r.detections) for r in self.records)} detections, "
              f"{1000 * elapsed / len(self.records):.1f} ms/frame -> {self.paths['json']}", file=sys.stderr)
        return video

    def close(self) -> None:
        """Release the input (and remove a video left unfinished)."""
        self.bar.close()
        if self.writer is not None:
            self.writer.abort()
        if isinstance(self.frames, RandomAccessFrames):
            self.frames.close()
        self.source.close()


def detect_one(detector: Detector, spec: str, out_dir: Path, options: DetectOptions) -> VideoPredictions:
    """Detect on one input and write its three outputs (the JSON last: its presence marks the input done)."""
    job = _InputJob(detector, spec, out_dir, options)
    try:
        for result in detector.stream(job.frames, options.mode, relation_inputs=options.postprocess == "blr"):
            job.add(result)
        return job.finish()
    finally:
        job.close()


def detect_together(detector: Detector, specs: Sequence[str], out_dir: Path, options: DetectOptions,
                    finished: set[str] | None = None) -> None:
    """Detect on several inputs in lockstep through one model (:meth:`Detector.stream_many`) and write
    each input's outputs when it ends (its spec then goes into ``finished``). A bad input raises
    :class:`StreamError` naming its position."""
    finished = set() if finished is None else finished
    jobs: list[_InputJob] = []
    try:
        for i, spec in enumerate(specs):
            try:
                jobs.append(_InputJob(detector, spec, out_dir, options, position=i))
            except MegavodError as error:
                raise StreamError(i, error) from None
        remaining = [len(job.frames) if isinstance(job.frames, RandomAccessFrames) else None for job in jobs]
        for i, result in detector.stream_many([job.frames for job in jobs], options.mode,
                                              relation_inputs=options.postprocess == "blr"):
            jobs[i].add(result)
            if remaining[i] is not None and len(jobs[i].records) == remaining[i]:
                _finish(jobs[i], i)  # written as soon as the video ends, not when the group does
                finished.add(jobs[i].spec)
        for i, job in enumerate(jobs):
            if not job.finished:
                _finish(job, i)
                finished.add(job.spec)
    finally:
        for job in jobs:
            job.close()


def _finish(job: _InputJob, i: int) -> None:
    try:
        job.finish()
    except StreamError:
        raise
    except MegavodError as error:
        raise StreamError(i, error) from None


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
    todo = []
    for i, spec in enumerate(inputs):
        name = output_name(spec)
        if i % world_size != rank:
            continue
        if all(p.exists() for p in _outputs(out_dir, name).values()):
            print(f"{spec}: already done, skipped", file=sys.stderr)
            continue
        for stale in out_dir.glob(f".{name}.*"):  # temporary files of a run that was killed
            stale.unlink(missing_ok=True)
        todo.append(spec)
    failed = 0
    if options.batch_streams == 1:
        for spec in todo:
            try:
                detect_one(detector, spec, out_dir, options)
            except MegavodError as e:
                failed += 1
                print(f"megavod detect: error: {e}", file=sys.stderr)
        return failed
    for start in range(0, len(todo), options.batch_streams):
        group = todo[start : start + options.batch_streams]
        finished: set[str] = set()
        while group:
            try:
                detect_together(detector, group, out_dir, options, finished)
                break
            except StreamError as e:
                # The bad input fails alone: the others of its group start again without it (their
                # finished outputs are kept; their partial ones were removed).
                failed += 1
                print(f"megavod detect: error: {e}", file=sys.stderr)
                bad = group[e.stream]
                group = [s for s in group if s != bad and s not in finished]
    return failed


def main(args) -> int:
    """``megavod detect INPUT... [--config] [--weights] [--mode] [--postprocess] [--out] [--device]``."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(args.device)
    if device.type == "cuda" and world > 1:
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    backend = getattr(args, "backend", "torch")
    # load() decides between weights and none, torch and ONNX Runtime (which picks its own device).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RandomWeightsWarning)
        detector = load_with_overrides(args.config, args.weights, args.device if backend == "onnxruntime" else device,
                                       args.overrides, trust_pickle=args.trust_pickle, backend=backend)
    for warning in caught:
        if issubclass(warning.category, RandomWeightsWarning):  # said in the CLI's words: the flag
            print("megavod detect: warning: no --weights given: the model is randomly initialised", file=sys.stderr)
        else:  # any other warning goes on as if not caught
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    inputs = expand_inputs(args.inputs)
    options = DetectOptions(mode=args.mode or detector.default_mode, postprocess=args.postprocess,
                            score_thresh=args.score_thresh, device=str(detector.device),
                            batch_streams=args.batch_streams)
    failed = run_detect(detector, inputs, args.out, options, rank, world)
    if failed:
        print(f"megavod detect: {failed} of {len(inputs)} inputs failed", file=sys.stderr)
        return 1
    return 0
