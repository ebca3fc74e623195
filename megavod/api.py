"""megavod's public Python API (README "Python API"; exported by ``import megavod``).

    import megavod
    detector = megavod.load("mega_R_101", weights="MEGA_R_101.pth")      # or megavod.load(weights=...)
    for result in detector.stream("clip.mp4"):                            # one FrameResult per frame
        print(result.frame, result.boxes, result.scores, result.class_names)
    detector.detect("frames/").save_json("clip.json")                     # VideoPredictions
    megavod.evaluate("ILSVRC2015/", "clip.json")

Every command of the CLI is a client of this module: ``megavod detect`` is :meth:`Detector.stream` plus
file writing, ``megavod eval`` is :func:`evaluate`, ``megavod train`` is :func:`train`.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from megavod.config import Config, load_config
from megavod.data.classes import VID_CLASSES
from megavod.data.predictions import FramePrediction, VideoPredictions
from megavod.data.transforms import build_transform
from megavod.data.video import RandomAccessFrames, open_source
from megavod.errors import ConfigError, MegavodError, StreamError
from megavod.evaluation.vid_eval import VIDEvalResult, evaluate_dataset
from megavod.export.exporter import export_onnx
from megavod.export.runtime import MANIFEST, load_onnx_detector
from megavod.inference.engine import FrameLoader, detect_many_offline, detect_many_online, detect_offline, detect_online
from megavod.inference.schedules import build_schedule
from megavod.methods import build_detector, load_detector
from megavod import postprocess as video_postprocess
from megavod.postprocess.blr import RelationWeights
from megavod.registry import get_method
from megavod.structures import Detections, RelationInputs
from megavod.train.engine import run_training

Mode = Literal["offline", "online"]
Backend = Literal["torch", "onnxruntime"]
#: A frame: RGB ``uint8`` numpy array [H, W, 3], a torch tensor ([H, W, 3] uint8, or [3, H, W] uint8 or
#: float in [0, 1] as torchvision's images), or a PIL image.
Frame = Union[np.ndarray, Tensor, Image.Image]
#: What :meth:`Detector.stream` reads: a video file, frame folder or stream URL, or frames.
Source = Union[str, os.PathLike, Iterable[Frame]]

__all__ = ["Detector", "FrameResult", "Frame", "Source", "load", "load_with_overrides", "load_onnxruntime",
           "evaluate", "train", "resolve_device", "RandomWeightsWarning"]


class RandomWeightsWarning(UserWarning):
    """:func:`load` without weights: the detector is randomly initialised, its detections are noise."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; otherwise the device named (checked)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MegavodError(f"device '{device}': no CUDA device is available")
    return device


def as_rgb_array(frame: Frame) -> np.ndarray:
    """Any accepted frame as an RGB ``uint8`` array [H, W, 3]."""
    if isinstance(frame, Image.Image):
        return np.asarray(frame.convert("RGB"))
    if isinstance(frame, Tensor):
        t = frame.detach().cpu()
        if t.ndim == 3 and t.shape[0] == 3 and t.shape[-1] != 3:
            t = t.permute(1, 2, 0)
        if t.is_floating_point():
            t = (t.clamp(0, 1) * 255).round().to(torch.uint8)
        frame = t.numpy()
    if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[-1] != 3:
        shape = getattr(frame, "shape", None)
        raise MegavodError(f"a frame must be an RGB image [H, W, 3] (numpy, torch or PIL), got "
                           f"{type(frame).__name__}{'' if shape is None else f' of shape {tuple(shape)}'}")
    if frame.dtype != np.uint8:
        raise MegavodError(f"a frame array must be uint8 RGB, got {frame.dtype}")
    return np.ascontiguousarray(frame)


@dataclass
class FrameResult:
    """Detections of one frame, in pixels of the frame as read (legacy +1 boxes, x1 y1 x2 y2).

    ``labels`` index ``classes`` (0 is background); ``class_names`` names each detection.
    ``relation``: BLR's relation-module inputs, when :meth:`Detector.stream` was asked for them.
    """

    frame: int
    boxes: Tensor
    scores: Tensor
    labels: Tensor
    classes: Sequence[str] = field(default=VID_CLASSES, repr=False)
    file: str | None = None
    relation: RelationInputs | None = field(default=None, repr=False)

    @property
    def class_names(self) -> list[str]:
        return [self.classes[i] for i in self.labels.tolist()]

    @property
    def detections(self) -> Detections:
        return Detections(self.boxes, self.scores, self.labels)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def numpy(self) -> dict[str, np.ndarray]:
        """``{"boxes": [N, 4] float32, "scores": [N] float32, "labels": [N] int64}``."""
        return {"boxes": self.boxes.cpu().numpy(), "scores": self.scores.cpu().numpy(),
                "labels": self.labels.cpu().numpy()}


def _is_one_frame(source: object) -> bool:
    # Frames are 3-D (HxWx3 or CxHxW); a 4-D array or tensor is a stack of frames, i.e. a video.
    return isinstance(source, Image.Image) or (isinstance(source, (np.ndarray, Tensor)) and source.ndim == 3)


class _Frames:
    """A source opened for one run: sequential frames, or random access for offline mode."""

    def __init__(self, source: Source, random_access: bool) -> None:
        self.files: list[str] | None = None
        self.size: tuple[int, int] | None = None  # (height, width) when known before reading
        self._close: list[Any] = []
        if isinstance(source, (str, os.PathLike)):
            opened = open_source(source)
            self._close.append(opened)
            self.size = (opened.height, opened.width)
            self.files = [p.name for p in opened.files] if hasattr(opened, "files") else None
            if random_access:
                if opened.is_stream:
                    opened.close()
                    raise MegavodError(f"{source}: a live stream can only run causally: use mode='online'")
                frames = RandomAccessFrames(opened)
                self._close.insert(0, frames)
                self.frames: Any = frames
            else:
                self.frames = opened
        else:
            if _is_one_frame(source):
                source = [source]  # one frame is a one-frame video
            elif not (isinstance(source, Iterable) or (hasattr(source, "__len__") and hasattr(source, "__getitem__"))):
                raise MegavodError(f"cannot read frames from a {type(source).__name__}: pass a video file, frame "
                                   "folder or stream URL, a frame (numpy, torch or PIL) or a sequence of frames")
            opened = getattr(source, "source", source)  # a FrameSource, or RandomAccessFrames over one
            files = getattr(opened, "files", None)
            self.files = [Path(p).name for p in files] if files is not None else None
            # Offline mode looks at the whole video: a generator is read into a list first.
            is_sequence = isinstance(source, Sequence) or (
                hasattr(source, "__len__") and hasattr(source, "__getitem__"))
            self.frames = source if (is_sequence or not random_access) else list(source)

    def __len__(self) -> int:
        return len(self.frames)

    def _seen(self, frame: Frame) -> np.ndarray:
        array = as_rgb_array(frame)
        if self.size is None:
            self.size = (array.shape[0], array.shape[1])
        return array

    def __getitem__(self, k: int) -> np.ndarray:
        return self._seen(self.frames[k])

    def __iter__(self) -> Iterator[np.ndarray]:
        for frame in self.frames:
            yield self._seen(frame)

    def close(self) -> None:
        for item in self._close:
            item.close()


class Detector:
    """A detector ready to run on videos: the model (weights only), its config and its device.

    Build one with :func:`load`. One detector can serve any number of streams, one after another or
    interleaved (each stream keeps its own window, pool, memory and caches).
    """

    def __init__(self, model: nn.Module, cfg: Config, device: str | torch.device = "auto") -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        if self.device.type == "cuda" and getattr(model, "half_on_cuda", False):
            self.model.half()  # the authors' evaluation precision (YOLOX/YOLOV: Predictor's model.half())
        self.cfg = cfg
        self.classes: Sequence[str] = VID_CLASSES
        self.schedule = build_schedule(cfg)
        self.transform = build_transform(cfg.input, train=False)

    def __repr__(self) -> str:
        return f"Detector(method={self.cfg.method!r}, config={self.cfg.name!r}, device='{self.device}')"

    @property
    def default_mode(self) -> Mode:
        """The mode :meth:`stream` runs in when none is asked for: the method table's ``default_mode``
        (offline; MEGA's follows ``mega.online``)."""
        return get_method(self.cfg.method).default_mode(self.cfg)

    def prepare(self, frame: Frame) -> tuple[Tensor, tuple[int, int]]:
        """An RGB frame -> (the model's input tensor on the device, the frame's (height, width))."""
        array = as_rgb_array(frame)
        image, _ = self.transform(Image.fromarray(array))
        return image.to(self.device), (array.shape[0], array.shape[1])

    def has_relation_module(self) -> bool:
        """Whether the model has a location-based relation module whose weights BLR can use."""
        module = getattr(self.model, "blr_relation_module", None)
        return module is not None and module() is not None

    def runs_causally(self, mode: Mode | None = None) -> bool:
        """Whether frame k's detections come out before frame k+1 is read in ``mode``."""
        return (mode or self.default_mode) == "online" or self.schedule.causal

    def stream(self, source: Source, mode: Mode | None = None, *, relation_inputs: bool = False) -> Iterator[FrameResult]:
        """Detections per frame, in frame order.

        ``source``: a video file, frame folder or stream URL, or frames (a list, array stack or any
        iterable of numpy / torch / PIL images; one frame is a one-frame video). ``mode``: ``"offline"``
        looks at the whole video (the authors' setting; an iterator is read into a list first),
        ``"online"`` is causal: frame k is yielded before frame k+1 is read, so it runs on live streams
        with bounded memory (default: :attr:`default_mode`, MEGA's ``mega.online``). Methods whose schedule is causal
        (single frame, DFF) always run online. ``relation_inputs`` (MEGA, RDN): attach BLR's
        relation-module inputs to each result.
        """
        frames = self._open(source, mode)
        try:
            yield from self._run(frames, mode, relation_inputs)
        finally:
            frames.close()

    def detect_image(self, frame: Frame, *, relation_inputs: bool = False) -> FrameResult:
        """One image's detections: the :class:`FrameResult` of ``frame`` run as a one-frame video offline
        (``stream([frame], mode="offline")``; the relation methods then relate its boxes to themselves,
        as the authors' test does for a video's first frame). ``frame``: numpy [H, W, 3] uint8, a torch
        tensor as :meth:`stream` takes, or a PIL image."""
        if not _is_one_frame(frame):
            shape = getattr(frame, "shape", None)
            raise MegavodError(f"detect_image takes one frame (numpy, torch or PIL image), got {type(frame).__name__}"
                               f"{'' if shape is None else f' of shape {tuple(shape)}'}; for a video use stream()")
        (result,) = self.stream([frame], mode="offline", relation_inputs=relation_inputs)
        return result

    def stream_many(self, sources: Sequence[Source], mode: Mode | None = None, *, relation_inputs: bool = False,
                    batch_frames: bool = True) -> Iterator[tuple[int, FrameResult]]:
        """Several videos or live streams through this one detector in lockstep: ``(i, result)`` for
        stream ``sources[i]``, one frame of every unfinished stream per step.

        At each step the per-frame passes of the streams' new frames run as one batched call per frame
        size, then the streams' key-frame steps (batched where the detector has a batched key step;
        ``batch_frames=False``: one call per frame for both); every
        stream keeps its own window, pool, memory and caches, so its detections are those
        :meth:`stream` gives for it alone (up to the float rounding of batched convolutions). Streams
        may differ in length (a finished stream leaves the batch) and size (frames of one size are
        batched together). Online, a stream's frame k is yielded before its frame k+1 is read. A
        ``MegavodError`` while reading stream i comes out as :class:`~megavod.errors.StreamError` with
        ``.stream == i``.
        """
        opened: list[_Frames] = []
        try:
            for i, source in enumerate(sources):
                try:
                    opened.append(self._open(source, mode))
                except StreamError:
                    raise
                except MegavodError as error:
                    raise StreamError(i, error) from None
            yield from self._run_many(opened, mode, relation_inputs, batch_frames)
        finally:
            for frames in opened:
                frames.close()

    def _open(self, source: Source, mode: Mode | None) -> _Frames:
        if mode not in (None, "offline", "online"):
            raise MegavodError(f"mode must be 'offline' or 'online', got {mode!r}")
        return _Frames(source, random_access=not self.runs_causally(mode))

    @torch.inference_mode()
    def _run(self, frames: _Frames, mode: Mode | None, relation_inputs: bool) -> Iterator[FrameResult]:
        relation_inputs = relation_inputs and self.has_relation_module()
        if self.runs_causally(mode):
            out = detect_online(self.model, (self.prepare(f) for f in frames), self.schedule,
                                relation_inputs=relation_inputs)
        else:
            out = detect_offline(self.model, lambda t: self.prepare(frames[t]), len(frames), self.schedule,
                                 relation_inputs=relation_inputs)
        for k, dets in out:
            yield FrameResult(k, dets.boxes, dets.scores, dets.labels, self.classes,
                              frames.files[k] if frames.files else None, dets.relation)

    @torch.inference_mode()
    def _run_many(self, streams: Sequence[_Frames], mode: Mode | None, relation_inputs: bool,
                  batch_frames: bool) -> Iterator[tuple[int, FrameResult]]:
        relation_inputs = relation_inputs and self.has_relation_module()
        if self.runs_causally(mode):
            out = detect_many_online(self.model, [self._prepared(i, frames) for i, frames in enumerate(streams)],
                                     self.schedule, relation_inputs=relation_inputs, batch_frames=batch_frames)
        else:
            videos = [(self._loader(i, frames), len(frames)) for i, frames in enumerate(streams)]
            out = detect_many_offline(self.model, videos, self.schedule, relation_inputs=relation_inputs,
                                      batch_frames=batch_frames)
        for i, k, dets in out:
            files = streams[i].files
            yield i, FrameResult(k, dets.boxes, dets.scores, dets.labels, self.classes,
                                 files[k] if files else None, dets.relation)

    def _prepared(self, stream: int, frames: _Frames) -> Iterator[tuple[Tensor, tuple[int, int]]]:
        """Stream ``stream``'s frames prepared for the model; its errors say which stream failed."""
        try:
            for frame in frames:
                yield self.prepare(frame)
        except MegavodError as error:
            raise StreamError(stream, error) from None

    def _loader(self, stream: int, frames: _Frames) -> FrameLoader:
        def load_frame(t: int) -> tuple[Tensor, tuple[int, int]]:
            try:
                return self.prepare(frames[t])
            except MegavodError as error:
                raise StreamError(stream, error) from None
        return load_frame

    def detect(self, source: Source, mode: Mode | None = None, *, postprocess: str = "none",
               name: str | None = None) -> VideoPredictions:
        """Every frame's detections as :class:`VideoPredictions` (``.save_json``, ``.save_csv``,
        ``.to_coco``), optionally post-processed (``"seqnms"``, ``"blr"``) over the whole video."""
        if postprocess not in ("none", "seqnms", "blr"):
            raise MegavodError(f"postprocess must be 'none', 'seqnms' or 'blr', got {postprocess!r}")
        mode = "offline" if postprocess != "none" else mode  # post-processing needs the whole video
        frames = self._open(source, mode)
        records: list[FramePrediction] = []
        relations: list[RelationInputs] = []
        try:
            for result in self._run(frames, mode, relation_inputs=postprocess == "blr"):
                if result.relation is not None:
                    relations.append(result.relation.to("cpu"))
                records.append(FramePrediction(result.frame, result.file, result.detections.to("cpu")))
        finally:
            frames.close()
        records = self.postprocess(records, postprocess, relations)
        height, width = frames.size or (0, 0)
        video = name or (Path(str(source)).stem if isinstance(source, (str, os.PathLike)) else "frames")
        return VideoPredictions(video, width, height, records)

    def postprocess(self, records: list[FramePrediction], method: str,
                    relations: Sequence[RelationInputs] = ()) -> list[FramePrediction]:
        """Seq-NMS or BLR over a whole video's records (``"none"``: unchanged). BLR uses the
        detector's relation weights between adjacent frames when ``relations`` are given (w = 0
        otherwise, docs/departures.md#blr-as-megavod-reads-the-paper)."""
        if method == "none":
            return records
        weights = self.relation_weights(relations, [r.frame for r in records]) if method == "blr" else None
        return video_postprocess.apply_postprocess(records, method, weights)

    def relation_weights(self, inputs: Sequence[RelationInputs], frames: Sequence[int]) -> RelationWeights | None:
        """BLR's relation weights of adjacent frames t, t+1 as a function of t, computed when BLR asks
        for them (one [n_t, n_{t+1}] at a time); ``inputs[t]`` is frame t's :class:`RelationInputs`.
        None (w = 0) without relation inputs."""
        if not inputs:
            return None
        if len(inputs) != len(frames):
            raise ValueError(f"relation inputs for {len(inputs)} frames, but {len(frames)} frames")
        inputs, frames = tuple(inputs), tuple(frames)
        return lambda t: self.model.blr_relation_weights(inputs[t], inputs[t + 1], frames[t], frames[t + 1])


def _override_list(overrides: Mapping[str, Any]) -> list[str]:
    """``{"mega.T_g": 20}`` or ``{"mega__T_g": 20}`` -> ``["mega.T_g=20"]`` (YAML scalars/lists)."""
    out = []
    for key, value in overrides.items():
        if isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, (list, tuple)):
            text = "[" + ",".join(str(v) for v in value) + "]"
        elif value is None:
            text = "null"
        else:
            text = str(value)
        out.append(f"{key.replace('__', '.')}={text}")
    return out


def load_onnxruntime(weights: str | os.PathLike | None, config: str | None = None,
                     overrides: Sequence[str] = (), device: str | torch.device = "auto", *,
                     trust_pickle: bool = False, threads: int | None = None) -> Detector:
    """A :class:`Detector` whose per-frame pass and key-frame step run on ONNX Runtime (the same streaming
    engine; README "Export and deploy"). ``weights``: an export folder (``megavod export``; its manifest
    gives the config, ``overrides`` follow :func:`megavod.export.runtime.export_config`: the graphs' inputs
    and the schedule are honoured, a constant of the graphs is refused in one line) or a weight file,
    exported first, with the overrides (so every one is honoured), into a temporary folder that lives as
    long as the detector."""
    if weights is None:
        raise MegavodError("backend 'onnxruntime' needs weights: an export folder (megavod export) or a weight file")
    path, device = Path(weights), str(device).split(":")[0]
    if path.is_dir() or path.name == MANIFEST:
        if config is not None:
            raise MegavodError(f"{path}: an export records its config; give no config with it")
        model, cfg = load_onnx_detector(path, device, threads, overrides)
    else:
        torch_model, cfg = load_detector(path, config, list(overrides), trust_pickle=trust_pickle)
        folder = tempfile.TemporaryDirectory(prefix="megavod-onnx-")
        export_onnx(torch_model, cfg, Path(folder.name) / "export", source=str(path))
        model, cfg = load_onnx_detector(Path(folder.name) / "export", device, threads)
        model.export_folder = folder  # removed with the detector
    return Detector(model, cfg, "cpu")  # the engine's tensors stay on the CPU; ONNX Runtime picks its device


def load(config: str | os.PathLike | None = None, weights: str | os.PathLike | None = None,
         device: str | torch.device = "auto", *, trust_pickle: bool = False, backend: Backend = "torch",
         **overrides: Any) -> Detector:
    """A :class:`Detector`.

    ``config``: a preset name (``"mega_R_101"``) or a YAML path; ``weights``: the authors' ``.pth`` or
    megavod's ``.safetensors`` / training checkpoint. With ``weights`` and no ``config``, the config
    is the one the file records or the preset its keys show (the authors' files load as they are);
    without ``weights`` the model is randomly initialised (``config`` default: ``mega_R_101``).
    ``overrides``: config values by dotted key, as keyword arguments with ``__`` for the dots
    (``mega__T_g=20``) or as ``**{"mega.T_g": 20}``. ``device``: ``"auto"`` (CUDA when present),
    ``"cpu"``, ``"cuda"``, ``"cuda:1"``... ``backend``: ``"torch"`` or ``"onnxruntime"`` (the graphs of
    ``megavod export``; ``weights`` is then an export folder or a weight file, see :func:`load_onnxruntime`).
    """
    return load_with_overrides(config, weights, device, _override_list(overrides), trust_pickle=trust_pickle,
                               backend=backend)


def load_with_overrides(config: str | os.PathLike | None = None, weights: str | os.PathLike | None = None,
                        device: str | torch.device = "auto", overrides: Sequence[str] = (), *,
                        trust_pickle: bool = False, backend: Backend = "torch") -> Detector:
    """:func:`load` with the overrides as ``KEY=VALUE`` strings, as ``megavod detect`` takes them.

    Without ``weights`` (torch backend) it warns with :class:`RandomWeightsWarning`."""
    override_list = list(overrides)
    config = None if config is None else str(config)
    if backend == "onnxruntime":
        return load_onnxruntime(weights, config, override_list, device, trust_pickle=trust_pickle)
    if backend != "torch":
        raise MegavodError(f"backend must be 'torch' or 'onnxruntime', got {backend!r}")
    if weights is not None:
        model, cfg = load_detector(Path(weights), config, override_list, trust_pickle=trust_pickle)
    else:
        cfg = load_config(config or "mega_R_101", override_list)
        model = build_detector(cfg)
        # stacklevel 3: the warning points at the caller of load() (load -> here -> warn).
        warnings.warn("no weights given: the model is randomly initialised (pass weights=...)",
                      RandomWeightsWarning, stacklevel=3)
    return Detector(model, cfg, device)


def evaluate(data: str | os.PathLike, predictions: str | os.PathLike, *, out: str | os.PathLike | None = None,
             protocol: Literal["authors", "ilsvrc"] = "authors", split: str | None = None,
             verbose: bool = False) -> VIDEvalResult:
    """The ImageNet VID protocol on a prediction file: per-class AP, mAP and mAP by motion speed.

    ``data``: ground truth, an ImageNet VID root or a COCO-VID ``.json``; ``out``: a folder for
    ``eval.json``, ``result.txt`` and PR curves (nothing written when None); ``split``: the image set
    ``ImageSets/<split>.txt`` (default: ``VID_val_videos`` if present, else every annotated val frame);
    ``verbose``: print progress and the table."""
    if protocol not in ("authors", "ilsvrc"):
        raise ConfigError(f"protocol must be 'authors' or 'ilsvrc', got {protocol!r}")
    return evaluate_dataset(Path(data), Path(predictions), protocol, None if out is None else Path(out),
                            image_set=split, log=print if verbose else None)


def train(config: str | os.PathLike | Config, data: str | os.PathLike, out: str | os.PathLike = "runs/train", *,
          resume: bool = False, **overrides: Any) -> Path:
    """Train ``config`` (a preset, a YAML path or a :class:`Config`) on ``data`` (an ImageNet VID root or
    a COCO-VID ``.json``); returns the final checkpoint. Under ``torchrun`` every process calls this.
    ``overrides`` as for :func:`load`."""
    cfg = config if isinstance(config, Config) else load_config(str(config), _override_list(overrides))
    if isinstance(config, Config) and overrides:
        raise ConfigError("pass overrides with a preset name or path, not with a Config object")
    return run_training(cfg, Path(data), Path(out), resume)
