"""Conversion both ways between the ImageNet VID layout (docs/conventions.md#image-set-files,
docs/conventions.md#annotations-and-classes) and COCO-VID JSON.

``vid_layout_to_coco`` does what mmtracking's ``imagenet2coco_vid.py`` does (same fields, ids
counted from 1, ``bbox = [xmin, ymin, xmax - xmin, ymax - ymin]``, ``file_name`` relative to
``Data/VID``), with per-video track ids recoverable through ``instance_id_offset`` (``coco_vid.py``).
``coco_to_vid_layout`` writes a custom COCO-VID dataset in the layout megavod's training and
evaluation read, so a custom dataset takes the same path as ImageNet VID.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from megavod.data.classes import VID_CLASSES
from megavod.data.coco_vid import CocoVidVideo, read_coco_vid, write_coco_vid
from megavod.data.image_sets import IMAGE_EXT, ImageSetEntry, read_image_set, train_15_frames, write_image_set
from megavod.data.vid_xml import read_annotation, write_annotation
from megavod.errors import MegavodError

SPLITS = ("train", "val")
JPEG_QUALITY = 95  # re-encoding non-JPEG frames: near-lossless, as the layout only holds .JPEG


@dataclass
class ConversionStats:
    """What a conversion wrote and what it left out.

    ``skipped_boxes``: boxes COCO-VID cannot hold (``xmax == xmin`` or ``ymax == ymin``, i.e. ``w``
    or ``h`` 0; training drops them too, ``clip_to_image(remove_empty=True)``).
    ``skipped_videos``: videos without any image (the layout has no empty video).
    ``reencoded``: frames that were not JPEG files and were re-encoded.
    """

    videos: int = 0
    images: int = 0
    annotations: int = 0
    skipped_boxes: int = 0
    skipped_videos: int = 0
    reencoded: int = 0


# ------------------------------------------------------------------------------------------------
# ImageNet VID layout -> COCO-VID


def _list_videos(list_path: Path, entries: list[ImageSetEntry]) -> list[tuple[str, list[int], list[int]]]:
    """(video, frames to convert, frames listed) per video, in the list's order."""
    order: list[str] = []
    listed: dict[str, list[int]] = {}
    lengths: dict[str, int] = {}
    for entry in entries:
        if entry.is_video:
            video, frame = entry.path, int(entry.frame)
            if lengths.setdefault(video, int(entry.video_len)) != entry.video_len:
                raise MegavodError(
                    f"{list_path}: video {video} is listed with video_len {lengths[video]} "
                    f"and {entry.video_len}"
                )
        else:
            video, _, name = entry.path.rpartition("/")
            if not video or not name.isdigit():
                raise MegavodError(
                    f"{list_path}: {entry.path!r} is not a video frame path <video>/<frame number>"
                )
            frame = int(name)
        if video not in listed:
            order.append(video)
            listed[video] = []
        listed[video].append(frame)
    result = []
    for video in order:
        frames = sorted(set(listed[video]))
        # A 4-column list names key frames of whole videos: every frame is converted (as mmtracking).
        every = list(range(lengths[video])) if video in lengths else frames
        result.append((video, every, frames))
    return result


def vid_layout_to_coco(
    data_dir: str | Path,
    image_set: str,
    out_json: str | Path,
    mark_train_frames: bool | None = None,
) -> ConversionStats:
    """Convert ``data_dir/ImageSets/<image_set>.txt`` and its XMLs to a COCO-VID file.

    A 4-column list (``VID_train_15frames``, ``VID_val_videos``) converts every frame
    0..video_len-1 of each listed video; a 2-column list (``VID_val_frames``) only the listed frames.
    The listed frames are marked ``is_vid_train_frame`` when ``mark_train_frames`` is true (default:
    when the list's name contains ``train``, so a val file passes mmtracking's test-mode check).
    Images are not opened (sizes come from the XMLs); ``file_name`` is relative to ``Data/VID``.
    """
    data_dir = Path(data_dir)
    image_set = image_set[:-4] if image_set.endswith(".txt") else image_set
    list_path = data_dir / "ImageSets" / f"{image_set}.txt"
    if image_set.startswith("DET"):
        raise MegavodError(f"{list_path}: DET image sets hold still images, not videos; give a VID list")
    if not list_path.is_file():
        raise MegavodError(f"{list_path}: image set '{image_set}' not found")
    if mark_train_frames is None:
        mark_train_frames = "train" in image_set.lower()
    anno_dir = data_dir / "Annotations" / "VID"
    stats = ConversionStats()
    videos = []
    for video, frames, listed in _list_videos(list_path, read_image_set(list_path)):
        anns = []
        for frame in frames:
            ann = read_annotation(anno_dir / video / f"{frame:06d}.xml", video, frame)
            keep = (ann.boxes[:, 2] > ann.boxes[:, 0]) & (ann.boxes[:, 3] > ann.boxes[:, 1])
            stats.skipped_boxes += int((~keep).sum())
            if not bool(keep.all()):
                ann = replace(
                    ann, boxes=ann.boxes[keep], labels=ann.labels[keep], track_ids=ann.track_ids[keep],
                    occluded=ann.occluded[keep], generated=ann.generated[keep],
                )
            anns.append(ann)
            stats.annotations += len(ann)
        files = [f"{video}/{frame:06d}{IMAGE_EXT}" for frame in frames]
        videos.append(CocoVidVideo(video, anns, files, train_frames=listed if mark_train_frames else []))
        stats.images += len(frames)
    stats.videos = len(videos)
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    write_coco_vid(out_json, videos, VID_CLASSES)
    return stats


# ------------------------------------------------------------------------------------------------
# COCO-VID -> ImageNet VID layout


def _layout_name(coco_json: Path, video: CocoVidVideo, split: str) -> str:
    """The video's folder under ``Data/VID``: its name, under ``<split>/`` unless it already is."""
    name = video.name if video.name.startswith(f"{split}/") else f"{split}/{video.name}"
    parts = name.split("/")
    if (
        any(c.isspace() for c in name)
        or "\\" in name
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise MegavodError(
            f"{coco_json}: video {video.name!r} (id {video.id}): the name cannot be a folder of the VID "
            f"layout (it needs '/'-separated parts without whitespace, '.' or '..')"
        )
    return name


def _place_image(coco_json: Path, src: Path, dst: Path, video: CocoVidVideo, index: int, link: bool) -> bool:
    """Put frame ``index``'s image at ``dst`` as a JPEG; True when it had to be re-encoded."""
    ann, image_id = video.frames[index], video.image_ids[index]
    where = f"{coco_json}: image id {image_id} ({video.files[index]!r})"
    try:
        with Image.open(src) as im:
            size, fmt = im.size, im.format
            if size != (ann.width, ann.height):
                raise MegavodError(
                    f"{where}: the file {src} is {size[0]}x{size[1]} but width x height say "
                    f"{ann.width}x{ann.height}"
                )
            if fmt != "JPEG":
                im.convert("RGB").save(dst, "JPEG", quality=JPEG_QUALITY)
                return True
    except FileNotFoundError:
        raise MegavodError(f"{where}: image file not found: {src}") from None
    except (MegavodError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - PIL reports damaged images through many types (SyntaxError, ...)
        raise MegavodError(f"{where}: cannot read image {src} ({exc})") from None
    if link:
        try:
            os.link(src, dst)
            return False
        except OSError:
            pass  # another file system, or links not allowed: copy instead
    shutil.copyfile(src, dst)
    return False


def coco_to_vid_layout(
    coco_json: str | Path,
    image_root: str | Path,
    out_dir: str | Path,
    split: str = "train",
    link: bool = True,
    skip_degenerate: bool = False,
) -> ConversionStats:
    """Write a COCO-VID dataset in the ImageNet VID layout under ``out_dir``
    (docs/conventions.md#image-set-files, docs/conventions.md#annotations-and-classes).

    Writes ``Data/VID/<split>/<video>/%06d.JPEG`` (hard links to JPEG files when ``link`` and
    possible, else copies; other formats re-encoded), ``Annotations/VID/<split>/<video>/%06d.xml``
    and the lists ``ImageSets/VID_<split>_videos.txt`` (4 columns, every frame), for train
    ``VID_train_15frames.txt`` (``train_15_frames``), for val ``VID_val_frames.txt`` (2 columns).
    A video named ``<split>/...`` keeps its name. Frames are renumbered 0..n-1 in ``frame_id`` order
    (the layout's frames are contiguous; identical when the file counts from 0 without gaps).
    Categories must be ImageNet VID classes (XMLs name objects by WordNet id). The train and val
    splits can go into the same ``out_dir``; existing videos or lists are never overwritten.
    ``skip_degenerate`` is :func:`read_coco_vid`'s (drop ``w`` or ``h`` <= 0 boxes instead of failing).
    """
    coco_json, image_root, out_dir = Path(coco_json), Path(image_root), Path(out_dir)
    if split not in SPLITS:
        raise MegavodError(f"coco_to_vid_layout: split must be 'train' or 'val', got {split!r}")
    dataset = read_coco_vid(coco_json, image_root, skip_degenerate=skip_degenerate)
    stats = ConversionStats()
    data_root, anno_root = out_dir / "Data" / "VID", out_dir / "Annotations" / "VID"
    list_dir = out_dir / "ImageSets"
    lists = {f"VID_{split}_videos.txt": []}
    lists["VID_train_15frames.txt" if split == "train" else "VID_val_frames.txt"] = []

    # Check everything before writing anything, so a refused conversion leaves out_dir as it was.
    plan, seen = [], {}
    for video in dataset.videos:
        if not video.frames:
            stats.skipped_videos += 1
            continue
        name = _layout_name(coco_json, video, split)
        if name in seen:
            raise MegavodError(
                f"{coco_json}: videos {seen[name]!r} and {video.name!r} both become {data_root / name}"
            )
        seen[name] = video.name
        for target in (data_root / name, anno_root / name):
            if target.exists():
                raise MegavodError(f"{target}: already exists; convert into an empty folder or remove it")
        plan.append((name, video))
    for list_name in lists:
        if (list_dir / list_name).exists():
            raise MegavodError(
                f"{list_dir / list_name}: already exists; convert into an empty folder or remove it"
            )
    if not plan:
        raise MegavodError(f"{coco_json}: no video has any image")

    for name, video in plan:
        folder = name.split("/", 1)[1]  # the XML folder field is the path below the split, as ILSVRC's
        (data_root / name).mkdir(parents=True)
        (anno_root / name).mkdir(parents=True)
        length = len(video.frames)
        for index, ann in enumerate(video.frames):
            dst = data_root / name / f"{index:06d}{IMAGE_EXT}"
            src = dataset.image_path(video, index)
            stats.reencoded += _place_image(coco_json, src, dst, video, index, link)
            xml = anno_root / name / f"{index:06d}.xml"
            write_annotation(xml, replace(ann, video=name, frame=index), folder, f"{index:06d}")
            stats.annotations += len(ann)
        running = len(lists[f"VID_{split}_videos.txt"])
        # Column 2 is a running index in the authors' val list and 1 in their train list
        # (docs/conventions.md#image-set-files).
        lists[f"VID_{split}_videos.txt"] += [
            ImageSetEntry(name, t, length, running + t + 1) for t in range(length)
        ]
        if split == "train":
            lists["VID_train_15frames.txt"] += [
                ImageSetEntry(name, f, length, 1) for f in train_15_frames(length)
            ]
        else:
            lists["VID_val_frames.txt"] += [
                ImageSetEntry(f"{name}/{t:06d}", None, None, running + t + 1) for t in range(length)
            ]
        stats.videos += 1
        stats.images += length
    list_dir.mkdir(parents=True, exist_ok=True)
    for list_name, entries in lists.items():
        write_image_set(list_dir / list_name, entries)
    return stats
