"""COCO-VID JSON annotations for custom datasets (the mmtracking / TAO video format).

One JSON file per split::

    {"categories":  [{"id", "name"}],
     "videos":      [{"id", "name"}],
     "images":      [{"id", "video_id", "frame_id", "file_name", "width", "height"}],
     "annotations": [{"id", "image_id", "category_id", "instance_id", "bbox": [x, y, w, h],
                      "area", "iscrowd", "occluded", "generated"}]}

Conventions, chosen so that files written by mmtracking's ``imagenet2coco_vid.py`` load unchanged
and give the same ground truth as the ILSVRC XMLs they came from:

* **Boxes**: that script writes ``bbox = [xmin, ymin, xmax - xmin, ymax - ymin]`` (no +1) and
  mmdet reads ``x2 = x + w``. megavod does the same: ``x2 = x + w``, ``y2 = y + h``, and the result is
  read as a box of megavod's +1 convention, exactly as the XML's ``xmax``/``ymax`` are
  (docs/conventions.md#legacy-plus-one-boxes). So an ILSVRC box goes XML -> JSON -> megavod with the same four
  numbers. Boxes are then clamped to the image like the XML loader (x1 = max(x1, 0), x2 = min(x2, W-1), ...).
  A consequence: ``w`` is one less than the box's pixel width; a box with ``w <= 0`` or ``h <= 0`` is an error
  (mmdet silently drops boxes with ``w`` or ``h`` below 1; ``skip_degenerate=True`` drops those <= 0).
* **Classes**: categories are matched by ``name`` to the 30 ImageNet VID classes (a WordNet id as
  name works too), so ``category_id`` values are free. With ``class_names`` the file's own classes
  are used instead (label = position in ``class_names`` + 1). A category that no annotation uses
  may have any name (TAO-like files list far more categories than they use).
* **Frames**: ``frame_id`` is the frame number (mmtracking counts from 0); a video's frames are
  ordered by it and need not be contiguous. ``FrameAnnotation.video`` is the video ``name``.
* **Track ids**: ``instance_id`` as given (mmtracking makes them unique over the whole file); a
  video may carry ``instance_id_offset`` (written by :func:`write_coco_vid`), then the track id is
  ``instance_id - instance_id_offset``, which restores ILSVRC's per-video ``trackid``. No
  ``instance_id``: track id -1 (untracked).
* ``iscrowd`` true: the annotation is skipped (megavod has no "ignore" ground truth).
  ``occluded``/``generated``: optional booleans (ILSVRC's fields). ``is_vid_train_frame`` (images,
  optional): mmtracking's mark of the frames its VID training uses as key frames.

Malformed input raises :class:`MegavodError` with one line naming the file and the entry, as a
JSON path (``annotations[12]`` is ``jq '.annotations[12]'``): missing keys, non-numeric fields, boxes
of zero or negative size, ids that do not exist or are duplicated, two images with the same frame of
a video.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from megavod.data.classes import VID_CLASSES, VID_WNIDS
from megavod.atomic import atomic_write_bytes
from megavod.errors import MegavodError, first_line
from megavod.structures import FrameAnnotation

_SECTIONS = ("categories", "videos", "images", "annotations")
_NAME_TO_VID_LABEL = {name: i for i, name in enumerate(VID_CLASSES) if i > 0}
_NAME_TO_VID_LABEL.update({wnid: i for i, wnid in enumerate(VID_WNIDS) if i > 0})


@dataclass
class CocoVidVideo:
    """One video: its frames' ground truth in frame order and their image files.

    ``files[i]`` is frame ``frames[i]``'s ``file_name`` as the JSON gives it (relative to the image
    root); ``image_ids`` the COCO image ids; ``train_frames`` the frame numbers marked
    ``is_vid_train_frame``. ``id`` is the COCO video id (0 for a video built in memory).
    """

    name: str
    frames: list[FrameAnnotation]
    files: list[str] = field(default_factory=list)
    image_ids: list[int] = field(default_factory=list)
    train_frames: list[int] = field(default_factory=list)
    id: int = 0

    def __len__(self) -> int:
        return len(self.frames)


@dataclass
class CocoVidDataset:
    """A COCO-VID file read by :func:`read_coco_vid`.

    ``classes[label]`` names each label (``classes[0]`` is ``"__background__"``); ``image_root`` is
    the folder ``file_name`` values are relative to. ``skipped`` counts the annotations left out:
    ``"crowd"`` (``iscrowd``) and ``"degenerate"`` (``skip_degenerate``).
    """

    path: Path
    image_root: Path
    classes: tuple[str, ...]
    videos: list[CocoVidVideo]
    skipped: dict[str, int] = field(default_factory=lambda: {"crowd": 0, "degenerate": 0})

    def image_path(self, video: CocoVidVideo, index: int) -> Path:
        """The image file of ``video.frames[index]``."""
        return self.image_root / video.files[index]

    def annotations(self) -> list[FrameAnnotation]:
        """Every frame of every video, video by video in frame order."""
        return [ann for video in self.videos for ann in video.frames]

    @property
    def num_frames(self) -> int:
        return sum(len(v) for v in self.videos)


# ------------------------------------------------------------------------------------------------
# Reading



def _show(value: Any) -> str:
    """A field's value as the file spells it, cut to fit on the error's line."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Reader:
    """Typed field access that fails with ``<file>: <entry>: <what is wrong>``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, message: str) -> MegavodError:
        return MegavodError(f"{self.path}: {where}: {message}")

    def entries(self, data: dict, section: str) -> list[dict]:
        if section not in data:
            raise MegavodError(f"{self.path}: missing '{section}'")
        items = data[section]
        if not isinstance(items, list):
            raise MegavodError(f"{self.path}: '{section}' must be a list, got {type(items).__name__}")
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise self.fail(f"{section}[{i}]", f"must be an object, got {_show(item)}")
        return items

    def get(self, entry: dict, key: str, where: str) -> Any:
        if key not in entry:
            raise self.fail(where, f"missing '{key}'")
        return entry[key]

    def integer(self, entry: dict, key: str, where: str) -> int:
        value = self.get(entry, key, where)
        # bool is an int to Python but never a count or an id in a COCO file.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(where, f"{key} is not an integer: {_show(value)}")
        if isinstance(value, float) and not value.is_integer():
            raise self.fail(where, f"{key} is not an integer: {_show(value)}")
        if not -(2**63) <= value < 2**63:  # ids and sizes go into int64 tensors
            raise self.fail(where, f"{key} is out of range: {_show(value)}")
        return int(value)

    def number(self, value: Any, key: str, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(where, f"{key} is not a number: {_show(value)}")
        return float(value)

    def string(self, entry: dict, key: str, where: str) -> str:
        value = self.get(entry, key, where)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(where, f"{key} must be a non-empty string, got {_show(value)}")
        return value

    def flag(self, entry: dict, key: str, where: str) -> bool:
        value = entry.get(key, False)
        if value is None:
            return False
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        raise self.fail(where, f"{key} must be true/false or 0/1, got {_show(value)}")

    def unique_ids(self, items: list[dict], section: str) -> dict[int, int]:
        """``id -> index`` of a section, refusing duplicates."""
        seen: dict[int, int] = {}
        for i, item in enumerate(items):
            where = f"{section}[{i}]"
            item_id = self.integer(item, "id", where)
            if item_id in seen:
                raise self.fail(where, f"duplicate id {item_id} (also {section}[{seen[item_id]}])")
            seen[item_id] = i
        return seen

    def unique_names(self, items: list[dict], section: str) -> list[str]:
        names: list[str] = []
        index: dict[str, int] = {}
        for i, item in enumerate(items):
            where = f"{section}[{i}]"
            name = self.string(item, "name", where)
            if name in index:
                raise self.fail(where, f"duplicate name {name!r} (also {section}[{index[name]}])")
            index[name] = i
            names.append(name)
        return names


def _class_table(class_names: Sequence[str] | None) -> tuple[tuple[str, ...], dict[str, int]]:
    if class_names is None:
        return VID_CLASSES, _NAME_TO_VID_LABEL
    names = list(class_names)
    if names and names[0] == VID_CLASSES[0]:
        names = names[1:]  # given with the background entry, as VID_CLASSES is
    if not names or len(set(names)) != len(names):
        raise ValueError("class_names must be non-empty foreground names without duplicates")
    return (VID_CLASSES[0], *names), {n: i + 1 for i, n in enumerate(names)}


@dataclass
class _Image:
    id: int
    video_id: int
    frame: int
    file_name: str
    width: int
    height: int
    train: bool
    objects: list[tuple] = field(default_factory=list)  # (box, category id, track, occluded, generated)


def _load_json(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MegavodError(f"{path}: cannot read COCO-VID file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise MegavodError(f"{path}: not a UTF-8 text file") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MegavodError(
            f"{path}: not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})"
        ) from None
    except (ValueError, RecursionError) as exc:  # a number of over 4300 digits, nesting too deep
        raise MegavodError(f"{path}: not valid JSON ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise MegavodError(f"{path}: the top level must be an object with {', '.join(_SECTIONS)}")
    return data


def _read_images(reader: _Reader, images: list[dict], video_ids: dict[int, int]) -> dict[int, _Image]:
    """``id -> _Image``, checking ids, video ids and that a video has each frame once."""
    result: dict[int, _Image] = {}
    frame_owner: dict[tuple[int, int], int] = {}  # (video id, frame) -> index in images
    reader.unique_ids(images, "images")
    for i, image in enumerate(images):
        where = f"images[{i}]"
        video_id = reader.integer(image, "video_id", where)
        if video_id not in video_ids:
            raise reader.fail(where, f"video_id {video_id} does not exist in videos")
        frame = reader.integer(image, "frame_id", where)
        if frame < 0:
            raise reader.fail(where, f"frame_id {frame} is negative")
        file_name = reader.string(image, "file_name", where)
        width, height = reader.integer(image, "width", where), reader.integer(image, "height", where)
        if width <= 0 or height <= 0:
            raise reader.fail(where, f"width x height {width}x{height} is not positive")
        if (video_id, frame) in frame_owner:
            raise reader.fail(
                where,
                f"duplicate frame_id {frame} in video {video_id} "
                f"(also images[{frame_owner[video_id, frame]}])",
            )
        frame_owner[video_id, frame] = i
        train = reader.flag(image, "is_vid_train_frame", where)
        image_id = reader.integer(image, "id", where)
        result[image_id] = _Image(image_id, video_id, frame, file_name, width, height, train)
    return result


def _read_annotations(
    reader: _Reader,
    annotations: list[dict],
    images: dict[int, _Image],
    category_ids: dict[int, int],
    offsets: dict[int, int],
    skip_degenerate: bool,
) -> dict[str, int]:
    """Validate each annotation and append it to its image's ``objects``; return the skip counts."""
    skipped = {"crowd": 0, "degenerate": 0}
    track_owner: dict[tuple[int, int], int] = {}  # (image id, instance id) -> index in annotations
    reader.unique_ids(annotations, "annotations")
    for i, ann in enumerate(annotations):
        where = f"annotations[{i}]"
        image_id = reader.integer(ann, "image_id", where)
        image = images.get(image_id)
        if image is None:
            raise reader.fail(where, f"image_id {image_id} does not exist in images")
        if "video_id" in ann:  # mmtracking repeats it here; it must agree with the image's
            own = reader.integer(ann, "video_id", where)
            if own != image.video_id:
                raise reader.fail(
                    where, f"video_id {own} but its image {image_id} is in video {image.video_id}"
                )
        category_id = reader.integer(ann, "category_id", where)
        if category_id not in category_ids:
            raise reader.fail(where, f"category_id {category_id} does not exist in categories")
        bbox = reader.get(ann, "bbox", where)
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox
        ):
            raise reader.fail(where, f"bbox must be 4 numbers [x, y, w, h], got {_show(bbox)}")
        if "area" in ann:
            reader.number(ann["area"], "area", where)
        track = -1
        if "instance_id" in ann:
            instance = reader.integer(ann, "instance_id", where)
            offset = offsets[image.video_id]
            if instance < 0:
                raise reader.fail(where, f"instance_id {instance} is negative")
            if instance < offset:
                raise reader.fail(
                    where, f"instance_id {instance} is below its video's instance_id_offset {offset}"
                )
            if (image_id, instance) in track_owner:
                raise reader.fail(
                    where,
                    f"instance_id {instance} appears twice in image {image_id} "
                    f"(also annotations[{track_owner[image_id, instance]}])",
                )
            track_owner[image_id, instance] = i
            track = instance - offset
        occluded, generated = reader.flag(ann, "occluded", where), reader.flag(ann, "generated", where)
        if reader.flag(ann, "iscrowd", where):
            skipped["crowd"] += 1
            continue
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            if skip_degenerate:
                skipped["degenerate"] += 1
                continue
            raise reader.fail(where, f"bbox {_show(bbox)} has zero or negative size (w {w:g}, h {h:g})")
        # x2 = x + w: mmtracking's w = xmax - xmin, so x2 is the XML's xmax (+1 convention).
        x2, y2, width, height = x + w, y + h, image.width, image.height
        if x2 < 0 or y2 < 0 or x > width - 1 or y > height - 1:
            raise reader.fail(
                where, f"bbox {_show(bbox)} lies entirely outside the {width}x{height} image {image_id}"
            )
        box = [max(x, 0.0), max(y, 0.0), min(x2, width - 1.0), min(y2, height - 1.0)]
        image.objects.append((box, category_id, track, occluded, generated))
    return skipped


def _frame_annotation(video: str, image: _Image, label_of: dict[int, int]) -> FrameAnnotation:
    objs = image.objects
    return FrameAnnotation(
        video=video,
        frame=image.frame,
        width=image.width,
        height=image.height,
        boxes=torch.tensor([o[0] for o in objs], dtype=torch.float32).reshape(-1, 4),
        labels=torch.tensor([label_of[o[1]] for o in objs], dtype=torch.int64),
        track_ids=torch.tensor([o[2] for o in objs], dtype=torch.int64),
        occluded=torch.tensor([o[3] for o in objs], dtype=torch.bool),
        generated=torch.tensor([o[4] for o in objs], dtype=torch.bool),
    )


def read_coco_vid(
    path: str | Path,
    image_root: str | Path | None = None,
    class_names: Sequence[str] | None = None,
    skip_degenerate: bool = False,
) -> CocoVidDataset:
    """Read and validate a COCO-VID file (conventions in the module docstring).

    ``image_root`` is the folder ``file_name`` values are relative to (default: the JSON's folder;
    for mmtracking's ImageNet VID files, ``Data/VID``). ``class_names`` are the dataset's foreground
    classes (with or without a leading ``"__background__"``); without it, category names must be
    ImageNet VID classes.
    """
    path = Path(path)
    classes, name_to_label = _class_table(class_names)
    data = _load_json(path)
    try:
        return _read_dataset(path, data, image_root, classes, name_to_label, class_names is not None, skip_degenerate)
    except (MegavodError, MemoryError):  # MemoryError: the machine's, not the file's
        raise
    except Exception as exc:  # noqa: BLE001 - content none of the checks foresaw is still the file's fault
        raise MegavodError(f"{path}: malformed COCO-VID file ({type(exc).__name__}: {first_line(exc)})") from None


def _read_dataset(
    path: Path,
    data: dict,
    image_root: str | Path | None,
    classes: tuple[str, ...],
    name_to_label: dict[str, int],
    custom_classes: bool,
    skip_degenerate: bool,
) -> CocoVidDataset:
    """The body of :func:`read_coco_vid`: validate ``data`` (the file's JSON) section by section."""
    reader = _Reader(path)
    categories, videos, images, annotations = (reader.entries(data, s) for s in _SECTIONS)

    category_ids = reader.unique_ids(categories, "categories")
    category_names = reader.unique_names(categories, "categories")
    video_ids = reader.unique_ids(videos, "videos")
    video_names = reader.unique_names(videos, "videos")
    offsets = {
        video_id: reader.integer(videos[i], "instance_id_offset", f"videos[{i}]")
        if "instance_id_offset" in videos[i] else 0
        for video_id, i in video_ids.items()
    }
    image_by_id = _read_images(reader, images, video_ids)
    skipped = _read_annotations(reader, annotations, image_by_id, category_ids, offsets, skip_degenerate)

    # Only the categories annotations use must be known (a TAO-like file lists far more).
    used = sorted({o[1] for image in image_by_id.values() for o in image.objects}, key=category_ids.get)
    label_of = {c: name_to_label.get(category_names[category_ids[c]]) for c in used}
    unknown = ", ".join(repr(category_names[category_ids[c]]) for c in used if label_of[c] is None)
    if unknown and not custom_classes:
        raise MegavodError(
            f"{path}: categories not among the 30 ImageNet VID classes: {unknown} "
            f"(give class_names for a custom dataset)"
        )
    if unknown:
        raise MegavodError(f"{path}: categories not in class_names: {unknown}")

    by_video: dict[int, list[_Image]] = {video_id: [] for video_id in video_ids}
    for image in image_by_id.values():
        by_video[image.video_id].append(image)
    result = []
    for video_id, i in video_ids.items():
        name = video_names[i]
        video = CocoVidVideo(name=name, frames=[], id=video_id)
        for image in sorted(by_video[video_id], key=lambda im: im.frame):
            video.frames.append(_frame_annotation(name, image, label_of))
            video.files.append(image.file_name)
            video.image_ids.append(image.id)
            if image.train:
                video.train_frames.append(image.frame)
        result.append(video)
    root = path.parent if image_root is None else Path(image_root)
    return CocoVidDataset(path=path, image_root=root, classes=classes, videos=result, skipped=skipped)


# ------------------------------------------------------------------------------------------------
# Writing


def _num(value: float) -> int | float:
    # Integral pixels stay integers, as in mmtracking's files.
    value = float(value)
    return int(value) if value.is_integer() else value


def _video_records(
    video: CocoVidVideo, video_id: int, first_image_id: int, first_ann_id: int, offset: int, classes: tuple
) -> tuple[list[dict], list[dict]]:
    """The ``images`` and ``annotations`` entries of one video."""
    images, annotations, train = [], [], set(video.train_frames)
    for f, ann in enumerate(video.frames):
        image_id = first_image_id + len(images)
        images.append({
            "id": image_id, "video_id": video_id, "frame_id": int(ann.frame),
            "file_name": video.files[f] if video.files else f"{video.name}/{ann.frame:06d}.JPEG",
            "width": int(ann.width), "height": int(ann.height), "is_vid_train_frame": ann.frame in train,
        })
        where = f"video {video.name!r} frame {ann.frame}"
        for i, (box, label) in enumerate(zip(ann.boxes.tolist(), ann.labels.tolist())):
            if not 1 <= label < len(classes):
                raise ValueError(f"{where}: label {label} outside 1..{len(classes) - 1}")
            x1, y1, x2, y2 = box
            w, h = x2 - x1, y2 - y1  # mmtracking's w = xmax - xmin (module docstring)
            if w <= 0 or h <= 0:
                raise ValueError(
                    f"{where}: box {box} has x2 <= x1 or y2 <= y1, which w = x2 - x1 cannot hold"
                )
            record = {"id": first_ann_id + len(annotations), "video_id": video_id, "image_id": image_id,
                      "category_id": label}
            track = int(ann.track_ids[i])
            if track >= 0:
                record["instance_id"] = offset + track
            record.update({
                "bbox": [_num(x1), _num(y1), _num(w), _num(h)], "area": _num(w * h), "iscrowd": 0,
                "occluded": bool(ann.occluded[i]), "generated": bool(ann.generated[i]),
            })
            annotations.append(record)
    return images, annotations


def coco_vid_dict(videos: Sequence[CocoVidVideo], classes: Sequence[str] = VID_CLASSES) -> dict:
    """The COCO-VID content of ``videos`` (see :func:`write_coco_vid`)."""
    classes = tuple(classes)
    if len(classes) < 2 or classes[0] != VID_CLASSES[0]:
        raise ValueError(f"classes must start with {VID_CLASSES[0]!r} and name at least one class")
    categories = []
    for label in range(1, len(classes)):
        category = {"id": label, "name": classes[label]}
        if classes == VID_CLASSES:
            category["encode_name"] = VID_WNIDS[label]  # mmtracking keeps the WordNet id here
        categories.append(category)
    out_videos, images, annotations = [], [], []
    next_instance, names = 1, set()
    for v, video in enumerate(videos):
        if video.name in names:
            raise ValueError(f"videos[{v}]: duplicate video name {video.name!r}")
        names.add(video.name)
        frames = [ann.frame for ann in video.frames]
        if len(set(frames)) != len(frames):
            raise ValueError(f"video {video.name!r}: duplicate frame numbers")
        if video.files and len(video.files) != len(video.frames):
            raise ValueError(f"video {video.name!r}: {len(video.files)} files for {len(video.frames)} frames")
        # Instance ids unique over the file (as mmtracking's); the offset keeps the per-video track ids.
        offset = next_instance
        next_instance += max((int(t) for ann in video.frames for t in ann.track_ids.tolist()), default=-1) + 1
        out_videos.append({
            "id": v + 1, "name": video.name, "vid_train_frames": sorted(set(video.train_frames)),
            "instance_id_offset": offset,
        })
        new_images, new_annotations = _video_records(
            video, v + 1, len(images) + 1, len(annotations) + 1, offset, classes
        )
        images += new_images
        annotations += new_annotations
    return {"categories": categories, "videos": out_videos, "images": images, "annotations": annotations}


def write_coco_vid(
    path: str | Path, videos: Sequence[CocoVidVideo], classes: Sequence[str] = VID_CLASSES
) -> None:
    """Write ``videos`` as a COCO-VID file (atomic: temporary file + rename).

    ``classes[label]`` names each label (``classes[0]`` the background). Ids count from 1 in file
    order as mmtracking's; ``instance_id = instance_id_offset + track id`` is unique over the file
    (track id -1: no ``instance_id``); a frame without ``files`` gets ``<video name>/%06d.JPEG``;
    ``is_vid_train_frame`` marks ``train_frames``. A box with ``x2 <= x1`` or ``y2 <= y1`` is a
    ``ValueError`` (``w`` would be 0).
    """
    data = coco_vid_dict(videos, classes)
    atomic_write_bytes(path, (json.dumps(data, separators=(",", ":")) + "\n").encode("utf-8"))
