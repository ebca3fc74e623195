"""ImageNet VID and DET training sets (docs/conventions.md#training-samples,
docs/conventions.md#image-set-files, docs/conventions.md#annotations-and-classes), for every method.

The root folder is the ``ILSVRC2015`` layout::

    ROOT/Data/{VID,DET}/<image id>.JPEG
    ROOT/Annotations/{VID,DET}/<image id>.xml
    ROOT/ImageSets/<name>.txt

A list named ``DET...`` reads from ``Data/DET``/``Annotations/DET``, any other from the VID folders
(the authors' dataset catalog does the same). A 4-column line is a key frame of a video and brings
reference frames of that video (:mod:`megavod.data.sampling`); a 2-column line is a still image (DET)
whose references are **copies of the image itself**, in the same numbers (docs/conventions.md#training-samples).

As the authors' loader: the annotation of every key frame is read at build time and images whose XML
has no ``<object>`` at all are dropped; objects outside the 30 classes are skipped; boxes are clamped
to the image and those left empty (``x2 <= x1`` or ``y2 <= y1``, ``clip_to_image(remove_empty=True)``)
removed, so a kept image may still have 0 boxes (only other DET classes): the training engine skips
those iterations. Bad input stops the build with one line naming the file and the field: a malformed
XML, a box outside the image, a ``name`` that is not a WordNet id (``vid_xml``), a list line whose
image is missing or whose video is shorter than its ``video_len`` column, an image whose size is not
the XML's.

The root can instead be a COCO-VID ``.json`` file (:mod:`megavod.data.coco_vid`, custom datasets):
its key frames are the frames marked ``is_vid_train_frame`` when the file marks any (mmtracking's VID
training, the same frames as ``VID_train_15frames``), else every frame; those without a box are
dropped. A frame's number is its position in the video's ``frame_id`` order, the video length its
number of images, and each frame's image is its ``file_name`` under the image root (default: the
JSON's folder); ``data.train_sets`` does not apply. Errors name the file and the entry as for the
lists (malformed JSON as :func:`read_coco_vid`, a missing image file, an image of another size).

Each item is a :class:`TrainSample`: the key frame resized (short side 600, long side at most 1000)
and normalised, its target boxes mapped into the resized image, and the reference images, all
flipped together with the key (docs/conventions.md#input-pipeline) and resized to the same size. All
randomness of an item (short side, flip, reference frames) comes from the seed in its :class:`SampleKey`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from megavod.config import Config
from megavod.data.coco_vid import CocoVidDataset, read_coco_vid
from megavod.data.image_sets import IMAGE_EXT, read_image_set
from megavod.data.sampling import ReferenceSampler, SampleKey
from megavod.data.transforms import FrameTransform, TransformDraw, build_transform
from megavod.data.vid_xml import read_annotation
from megavod.errors import MegavodError
from megavod.registry import get_method

_HAS_OBJECT = re.compile(rb"<object[\s>/]")


@dataclass
class TrainSample:
    """One training item: a key frame, its ground truth and its reference images.

    ``image`` [3,H,W] is normalised BGR x 255 (``megavod.data.transforms``); ``target`` holds
    ``boxes`` float32 [N,4] in the pixels of ``image`` (+1 convention) and ``labels`` int64 [N]
    (1..30). ``refs`` maps each role of the method (MEGA: ``"local"``, ``"memory"``, ``"global"``;
    RDN/FGFA/DFF: ``"ref"``; single frame: none) to its images, all of ``image``'s size and flip;
    ``ref_frames`` gives their frame numbers (for a still image, its own frame 0; its references are
    the key tensor itself, shared, not copied: treat images as read-only). ``video`` is the
    video folder (or a still image's id) and ``frame`` the key's frame number. ``ref_targets`` holds,
    per role, each reference's ground truth like ``target`` (in its image's pixels), only for a sampler
    with ``with_targets`` (YOLOV, :class:`~megavod.data.sampling.VideoFramesSampler`); empty otherwise.
    """

    image: Tensor
    target: dict[str, Tensor]
    refs: dict[str, list[Tensor]]
    video: str
    frame: int
    ref_frames: dict[str, list[int]] = field(default_factory=dict)
    flipped: bool = False
    orig_size: tuple[int, int] = (0, 0)  # (H, W) of the file
    is_video: bool = True
    ref_targets: dict[str, list[dict[str, Tensor]]] = field(default_factory=dict)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the resized image."""
        return int(self.image.shape[-2]), int(self.image.shape[-1])

    @property
    def num_boxes(self) -> int:
        return int(self.target["boxes"].shape[0])

    def _map(self, fn) -> "TrainSample":
        # Copies of one image (a still image's references) stay one tensor after the move.
        done: dict[int, Tensor] = {}

        def once(t: Tensor) -> Tensor:
            if id(t) not in done:
                done[id(t)] = fn(t)
            return done[id(t)]

        return replace(
            self,
            image=once(self.image),
            target={k: fn(v) for k, v in self.target.items()},
            refs={role: [once(t) for t in images] for role, images in self.refs.items()},
            ref_targets={role: [{k: once(v) for k, v in t.items()} for t in targets]
                         for role, targets in self.ref_targets.items()},
        )

    def to(self, device: torch.device | str) -> "TrainSample":
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> "TrainSample":
        """Called by ``DataLoader(pin_memory=True)``."""
        return self._map(lambda t: t.pin_memory())


@dataclass(frozen=True)
class FrameRecord:
    """A kept key frame of an image set, with its ground truth in the file's pixels."""

    image_set: Path  # the list file, for messages
    subset: str  # "VID" or "DET"
    image_id: str  # relative to Data/<subset>, without extension
    video: str  # video folder, or the image id of a still image
    frame: int
    video_len: int | None  # None for a still image
    width: int
    height: int
    boxes: np.ndarray  # float32 [N,4]
    labels: np.ndarray  # int64 [N]
    files: tuple[Path, ...] | None = None  # COCO-VID: the image of each frame of the video, else None
    # COCO-VID: the kept (boxes, labels) of each frame of the video (references' ground truth), else None
    frame_targets: tuple[tuple[np.ndarray, np.ndarray], ...] | None = None

    @property
    def is_video(self) -> bool:
        return self.video_len is not None


def kept_boxes(boxes: Tensor, labels: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """An annotation's boxes (float32 [N, 4]) and labels (int64 [N]) without the empty ones
    (``x2 <= x1`` or ``y2 <= y1``: ``clip_to_image(remove_empty=True)``)."""
    boxes = boxes.numpy().astype(np.float32).reshape(-1, 4)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep], labels.numpy().astype(np.int64)[keep]


def subset_of(image_set: str) -> str:
    """``DET`` for lists named ``DET...``, else ``VID`` (the authors' catalog)."""
    return "DET" if image_set.startswith("DET") else "VID"


def read_records(root: Path, image_set: str) -> tuple[list[FrameRecord], int]:
    """Kept records of ``ROOT/ImageSets/<image_set>.txt`` and how many lines were dropped (no object)."""
    subset = subset_of(image_set)
    list_path = root / "ImageSets" / f"{image_set}.txt"
    if not list_path.is_file():
        raise MegavodError(f"{list_path}: image set '{image_set}' not found (data.train_sets names it)")
    data_dir, anno_dir = root / "Data" / subset, root / "Annotations" / subset
    entries = read_image_set(list_path, must_exist_root=data_dir)  # names any line whose image is missing
    records, dropped, checked_videos = [], 0, set()
    for entry in entries:
        if entry.is_video and entry.path not in checked_videos:
            # References can be any frame of 0..video_len-1: the last one must exist.
            last = data_dir / entry.path / f"{entry.video_len - 1:06d}{IMAGE_EXT}"
            if not last.is_file():
                raise MegavodError(
                    f"{list_path}: video {entry.path} has video_len {entry.video_len} (column 4) but its "
                    f"frame {entry.video_len - 1} is missing: {last}"
                )
            checked_videos.add(entry.path)
        xml_path = anno_dir / f"{entry.image_id}.xml"
        video = entry.path
        ann = read_annotation(xml_path, video, entry.frame or 0)
        if not ann.boxes.shape[0] and not _HAS_OBJECT.search(xml_path.read_bytes()):
            dropped += 1  # no <object> at all: the authors drop it at build time
            continue
        boxes, labels = kept_boxes(ann.boxes, ann.labels)
        records.append(
            FrameRecord(
                image_set=list_path,
                subset=subset,
                image_id=entry.image_id,
                video=video,
                frame=entry.frame or 0,
                video_len=entry.video_len,
                width=ann.width,
                height=ann.height,
                boxes=boxes,
                labels=labels,
            )
        )
    return records, dropped


def coco_vid_records(dataset: CocoVidDataset) -> tuple[list[FrameRecord], int]:
    """Kept records of a COCO-VID file (module docstring) and how many key frames were dropped (no box)."""
    marked = any(video.train_frames for video in dataset.videos)
    records, dropped = [], 0
    for video in dataset.videos:
        # One tuple per video, shared by its records: references index it by frame position.
        files = tuple(dataset.image_path(video, i) for i in range(len(video)))
        targets = tuple(kept_boxes(ann.boxes, ann.labels) for ann in video.frames)
        train = set(video.train_frames)
        for index, ann in enumerate(video.frames):
            if marked and ann.frame not in train:
                continue
            if not len(ann):
                dropped += 1  # no object: the authors drop it at build time
                continue
            # As the list path checks each listed image and each video's last frame.
            for i in {index, len(video) - 1}:
                if not files[i].is_file():
                    raise MegavodError(
                        f"{dataset.path}: image id {video.image_ids[i]} ({video.files[i]!r}): image file "
                        f"not found: {files[i]}"
                    )
            boxes, labels = targets[index]
            records.append(
                FrameRecord(
                    image_set=dataset.path,
                    subset="VID",
                    image_id=video.files[index],
                    video=video.name,
                    frame=index,
                    video_len=len(video),
                    width=ann.width,
                    height=ann.height,
                    boxes=boxes,
                    labels=labels,
                    files=files,
                    frame_targets=targets,
                )
            )
    return records, dropped


class VIDTrainDataset(Dataset):
    """The concatenation of image sets (e.g. ``DET_train_30classes`` + ``VID_train_15frames``).

    ``ref_sampler`` is the method's (``None``: no references, the single-frame detector).
    Index with a :class:`SampleKey` (index + seed of the item's randomness) or a plain index (then the
    index is the seed). A ``root`` ending in ``.json`` is a COCO-VID file (``image_sets`` ignored,
    ``image_root`` as :func:`read_coco_vid`'s).
    """

    def __init__(
        self,
        root: str | Path,
        image_sets: Sequence[str],
        transform: FrameTransform,
        ref_sampler: ReferenceSampler | None = None,
        image_root: str | Path | None = None,
    ) -> None:
        self.root = Path(root)
        self.transform = transform
        self.ref_sampler = ref_sampler
        self.records: list[FrameRecord] = []
        self.dropped: dict[str, int] = {}
        if self.root.suffix.lower() == ".json":
            dataset = read_coco_vid(self.root, image_root)
            self.records, self.dropped[self.root.name] = coco_vid_records(dataset)
            if not self.records:
                raise MegavodError(f"{self.root}: no key frame has a box")
            return
        if not self.root.is_dir():
            raise MegavodError(f"{self.root}: data folder not found")
        if not image_sets:
            raise ValueError("VIDTrainDataset: no image sets")
        for name in image_sets:
            records, dropped = read_records(self.root, name)
            self.records += records
            self.dropped[name] = dropped
        if not self.records:
            raise MegavodError(
                f"{self.root}: no annotated image in {', '.join(image_sets)} (every XML lacks <object>)"
            )

    def __len__(self) -> int:
        return len(self.records)

    def image_path(self, record: FrameRecord, frame: int | None = None) -> Path:
        if record.files is not None:
            return record.files[record.frame if frame is None else frame]
        image_id = record.image_id if frame is None else f"{record.video}/{frame:06d}"
        return self.root / "Data" / record.subset / f"{image_id}{IMAGE_EXT}"

    def _load(self, path: Path, record: FrameRecord) -> Image.Image:
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except FileNotFoundError:
            raise MegavodError(
                f"{path}: frame not found (a reference of {record.image_id}, listed in {record.image_set})"
            ) from None
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - PIL reports damaged images through many types (SyntaxError, ...)
            raise MegavodError(f"{path}: cannot read image ({exc})") from None
        if image.size != (record.width, record.height):
            if record.files is not None:
                where = f"{record.image_set}: {record.image_id!r}: width x height"
            else:
                xml = self.root / "Annotations" / record.subset / f"{record.image_id}.xml"
                where = f"{xml}: size/width x size/height"
            raise MegavodError(
                f"{where} is {record.width}x{record.height} but {path} is {image.size[0]}x{image.size[1]}"
            )
        return image

    def __getitem__(self, key: SampleKey | int) -> TrainSample:
        if not isinstance(key, SampleKey):
            key = SampleKey(int(key), int(key))
        record = self.records[key.index]
        draw = self.transform.draw(random.Random(key.seed))
        image, boxes = self.transform(
            self._load(self.image_path(record), record), torch.from_numpy(record.boxes.copy()), draw
        )
        target = {"boxes": boxes.float(), "labels": torch.from_numpy(record.labels.copy())}
        refs, ref_frames, ref_targets = self._references(record, image, target, draw, np.random.default_rng(key.seed))
        return TrainSample(
            image=image,
            target=target,
            refs=refs,
            video=record.video,
            frame=record.frame,
            ref_frames=ref_frames,
            flipped=draw.flip,
            orig_size=(record.height, record.width),
            is_video=record.is_video,
            ref_targets=ref_targets,
        )

    def _references(
        self, record: FrameRecord, key_image: Tensor, key_target: dict[str, Tensor], draw: TransformDraw,
        rng: np.random.Generator,
    ) -> tuple[dict[str, list[Tensor]], dict[str, list[int]], dict[str, list[dict[str, Tensor]]]]:
        """The references' images and frame numbers per role, and their ground truth when the sampler
        asks for it (``with_targets``; else no targets)."""
        if self.ref_sampler is None:
            return {}, {}, {}
        with_targets = bool(getattr(self.ref_sampler, "with_targets", False))
        if not record.is_video:
            counts = self.ref_sampler.counts()
            return (
                {role: [key_image] * n for role, n in counts.items()},
                {role: [record.frame] * n for role, n in counts.items()},
                {role: [key_target] * n for role, n in counts.items()} if with_targets else {},
            )
        frames = self.ref_sampler.sample(record.frame, record.video_len, rng)
        loaded: dict[int, tuple[Tensor, dict[str, Tensor] | None]] = {record.frame: (key_image, key_target)}
        for numbers in frames.values():
            for f in numbers:
                if f in loaded:
                    continue
                image = self._load(self.image_path(record, f), record)
                if not with_targets:
                    loaded[f] = (self.transform(image, None, draw)[0], None)
                    continue
                boxes, labels = self._frame_target(record, f)
                tensor, mapped = self.transform(image, torch.from_numpy(boxes), draw)
                loaded[f] = (tensor, {"boxes": mapped.float(), "labels": torch.from_numpy(labels)})
        refs = {role: [loaded[f][0] for f in numbers] for role, numbers in frames.items()}
        targets = {role: [loaded[f][1] for f in numbers] for role, numbers in frames.items()} if with_targets else {}
        return refs, frames, targets

    def _frame_target(self, record: FrameRecord, frame: int) -> tuple[np.ndarray, np.ndarray]:
        """The kept boxes (file pixels) and labels of frame ``frame`` of ``record``'s video."""
        if record.frame_targets is not None:
            boxes, labels = record.frame_targets[frame]
            return boxes.copy(), labels.copy()
        xml_path = self.root / "Annotations" / record.subset / record.video / f"{frame:06d}.xml"
        ann = read_annotation(xml_path, record.video, frame)
        if (ann.width, ann.height) != (record.width, record.height):
            raise MegavodError(
                f"{xml_path}: size {ann.width}x{ann.height} differs from the video's {record.width}x{record.height}"
            )
        return kept_boxes(ann.boxes, ann.labels)


def build_train_dataset(cfg: Config, root: str | Path, image_root: str | Path | None = None) -> VIDTrainDataset:
    """``cfg.data.train_sets`` under ``root`` (or the COCO-VID file ``root``) with the method's
    references (its sampler from the method table) and the train transform."""
    return VIDTrainDataset(
        root,
        cfg.data.train_sets,
        build_transform(cfg.input, train=True),
        get_method(cfg.method).reference_sampler(cfg),
        image_root,
    )
