"""``megavod synth``: a synthetic benchmark in the exact ImageNet VID layout
(docs/conventions.md#image-set-files, docs/conventions.md#annotations-and-classes).

What it writes under ``OUT``::

    Data/VID/train/ILSVRC2015_VID_train_0000/ILSVRC2015_train_%08d/%06d.JPEG
    Data/VID/val/ILSVRC2015_val_%08d/%06d.JPEG
    Data/VID/snippets/val/ILSVRC2015_val_%08d.mp4          (one MP4 per val video, 25 fps)
    Data/DET/train/ILSVRC2014_train_0000/ILSVRC2014_train_%08d.JPEG
    Annotations/VID/...%06d.xml, Annotations/DET/...xml     (ILSVRC fields, see vid_xml.py)
    ImageSets/VID_train_15frames.txt   4 columns, 15 frames per train video (train_15_frames)
    ImageSets/VID_val_videos.txt       4 columns, one line per val frame, column 2 a running index
    ImageSets/VID_val_frames.txt       2 columns, one line per val frame
    ImageSets/DET_train_30classes.txt  2 columns (only when DET images are requested)
    dataset.json                       classes, arguments, per-video tracks and the statistics

Why temporal context measurably matters here is explained in ``synthetic_render.py``: 4 pairs of
classes that differ only in a cue hidden in 40-60% of each object's frames. The VID XML's
``occluded`` field is 1 exactly where the object's cue is hidden (not for ordinary overlap between
objects), so evaluations can split hidden from visible boxes; ``generated`` is always 0. DET objects
are written DET-style (no trackid/occluded); a quarter of them have their cue hidden.

Motion profiles (static / slow / medium / fast) are stratified per block of 20 videos of a split, so
even a 20-video val set fills the fast, medium and slow buckets (docs/conventions.md#evaluation-protocol) in
about the shares of ImageNet VID val. ``OUT`` must be empty or hold an earlier synthetic set (complete or
interrupted), which is replaced; any other non-empty folder is refused.

Deterministic by seed: every video (and DET image) draws from its own generator seeded with
``(seed, split, index)``, so the same seed gives the same bytes of annotations and the same images,
and adding videos does not change the earlier ones. ``dataset.json`` holds no timing for the same
reason.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from megavod.data.classes import VID_WNIDS
from megavod.data.motion import motion_ious_for_video
from megavod.data.video import write_video
from megavod.data.image_sets import ImageSetEntry, train_15_frames, write_image_set
from megavod.data.synthetic_render import (
    CLASS_SPECS,
    HIDE_MODES,
    MOTION_PROFILES,
    Scene,
    gt_box,
    make_scene,
    occluder_params,
    render_frame,
)
from megavod.atomic import atomic_write_bytes
from megavod.data.vid_xml import write_annotation
from megavod.errors import MegavodError
from megavod.structures import FrameAnnotation

FORMAT = "megavod.synthetic"
VERSION = 1
FPS = 25.0
JPEG_QUALITY = 90
DET_HIDDEN_PROB = 0.25
_SPLIT_CODE = {"train": 0, "val": 1, "det": 2}
# Motion-IoU buckets as an exclusive partition of the inclusive ranges of
# docs/conventions.md#evaluation-protocol (a value of exactly 0.7 counts as fast, exactly 0.9 as slow).
FAST_MAX, SLOW_MIN = 0.7, 0.9


@dataclass
class SyntheticStats:
    """What a generated set contains. Shares are over annotated video boxes."""

    videos: int = 0
    train_videos: int = 0
    val_videos: int = 0
    det_images: int = 0
    frames: int = 0
    objects: int = 0  # tracks that have at least one annotated box
    boxes: int = 0  # video boxes (DET boxes are in det_boxes)
    det_boxes: int = 0
    hidden_share: float = 0.0
    motion_shares: dict[str, float] = field(default_factory=dict)  # fast/medium/slow/no_neighbour
    val_motion_shares: dict[str, float] = field(default_factory=dict)
    motion_profiles: dict[str, int] = field(default_factory=dict)  # videos per motion profile
    class_counts: dict[str, int] = field(default_factory=dict)  # video boxes per class
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _motion_ious(anns: list[FrameAnnotation]) -> np.ndarray:
    """Per-box motion IoU of one video (docs/departures.md#motion-iou-from-track-ids), -1 where the track has
    no neighbour."""
    values = motion_ious_for_video(anns)
    return torch.cat(values).numpy() if values else np.zeros(0)


def _bucket_shares(values: np.ndarray) -> dict[str, float]:
    n = max(values.size, 1)
    none = values < 0
    return {
        "fast": float(((values >= 0) & (values <= FAST_MAX)).sum() / n),
        "medium": float(((values > FAST_MAX) & (values < SLOW_MIN)).sum() / n),
        "slow": float((values >= SLOW_MIN).sum() / n),
        "no_neighbour": float(none.sum() / n),
    }


def _write_mp4(path: Path, frames: list[np.ndarray], fps: float) -> None:
    write_video(path, frames, fps)


def _as_range(value: int | tuple[int, int], name: str, minimum: int) -> tuple[int, int]:
    try:
        lo, hi = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    except (TypeError, ValueError):
        raise MegavodError(f"synth: {name} must be an integer or a (min, max) pair, got {value!r}") from None
    if not minimum <= lo <= hi:
        raise MegavodError(f"synth: {name} must be >= {minimum} (and min <= max), got {value}")
    return int(lo), int(hi)


def _motion_profile(seed: int, split: str, index: int, block: int = 20) -> str:
    """The motion profile of a video, stratified per block of ``block`` videos of a split.

    Independent draws would leave a 20-video val set with, say, 2 fast videos; each block holds the
    profiles in the proportions of ``MOTION_PROFILES`` (largest remainder), shuffled by the seed, so
    every bucket is populated in every split while adding videos leaves the earlier ones unchanged.
    """
    names = list(MOTION_PROFILES)
    quota = np.array([MOTION_PROFILES[n]["p"] for n in names]) * block / sum(
        MOTION_PROFILES[n]["p"] for n in names
    )
    counts = np.floor(quota).astype(int)
    for i in np.argsort(-(quota - counts), kind="stable")[: block - counts.sum()]:
        counts[i] += 1
    labels = np.repeat(np.arange(len(names)), counts)
    order = np.random.default_rng([seed, _SPLIT_CODE[split], 1_000_000 + index // block]).permutation(labels)
    return names[int(order[index % block])]


def _frame_size(rng: np.random.Generator, size: tuple[int, int]) -> tuple[int, int]:
    # Width from the size range, height at 3:4 or 9:16 as in real VID videos; both even for H.264.
    width = 2 * (int(rng.integers(size[0], size[1] + 1)) // 2)
    aspect = (0.75, 0.5625)[int(rng.integers(2))]
    return width, max(2 * round(width * aspect / 2), 16)


def _frame_annotation(scene: Scene, video: str, t: int, still: bool) -> tuple[FrameAnnotation, list[int]]:
    boxes, labels, tids, hidden, indices = [], [], [], [], []
    for tid, track in enumerate(scene.tracks):
        box = gt_box(track, t, scene.width, scene.height)
        if box is None:
            continue
        indices.append(tid)
        boxes.append(box)
        labels.append(track.spec.label)
        tids.append(-1 if still else tid)
        hidden.append(bool(track.hidden[t]))
    ann = FrameAnnotation(
        video=video,
        frame=t,
        width=scene.width,
        height=scene.height,
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        labels=torch.tensor(labels, dtype=torch.int64),
        track_ids=torch.tensor(tids, dtype=torch.int64),
        occluded=torch.tensor(hidden, dtype=torch.bool),
        generated=torch.zeros(len(boxes), dtype=torch.bool),
    )
    return ann, indices


def _save_jpeg(path: Path, frame: np.ndarray) -> None:
    Image.fromarray(frame).save(path, "JPEG", quality=JPEG_QUALITY)


def _prepare_out(out: Path) -> None:
    """Create ``out``; regenerate over an earlier synthetic set, refuse any other non-empty folder."""
    if out.exists() and not out.is_dir():
        raise MegavodError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        marker = out / "dataset.json"
        try:
            is_ours = json.loads(marker.read_text()).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            is_ours = False
        if not is_ours:
            raise MegavodError(f"{out}: folder is not empty and holds no megavod synthetic dataset")
        for name in ("Data", "Annotations", "ImageSets", "dataset.json"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _video_name(split: str, index: int) -> tuple[str, str]:
    """(video id relative to Data/VID, XML folder field)."""
    if split == "train":
        folder = f"ILSVRC2015_VID_train_{index // 1000:04d}/ILSVRC2015_train_{index:08d}"
    else:
        folder = f"ILSVRC2015_val_{index:08d}"
    return f"{split}/{folder}", folder


def generate_synthetic_dataset(
    out: str | Path,
    num_train_videos: int = 80,
    num_val_videos: int = 20,
    frames: int | tuple[int, int] = (60, 120),
    size: int | tuple[int, int] = (160, 256),
    seed: int = 0,
    num_det_images: int = 0,
    progress: bool = False,
) -> SyntheticStats:
    """Write the synthetic benchmark to ``out`` (layout in the module docstring) and return its stats.

    ``frames`` and ``size`` are a value or an inclusive ``(min, max)`` range drawn per video; ``size``
    is the frame width (rounded down to even), the height is 3/4 or 9/16 of it.
    """
    started = time.perf_counter()
    out = Path(out)
    if num_train_videos < 0 or num_val_videos < 0 or num_det_images < 0:
        raise MegavodError("synth: the numbers of videos and DET images must be >= 0")
    if num_train_videos + num_val_videos == 0:
        raise MegavodError("synth: at least one video is needed")
    if seed < 0:
        raise MegavodError(f"synth: seed must be >= 0, got {seed}")
    frame_range = _as_range(frames, "frames", 1)
    size_range = _as_range(size, "size", 32)
    _prepare_out(out)
    # Mark the folder as ours at once, so that an interrupted run can simply be run again.
    atomic_write_bytes(out / "dataset.json", json.dumps({"format": FORMAT, "complete": False}).encode())

    stats = SyntheticStats(train_videos=num_train_videos, val_videos=num_val_videos)
    stats.videos = num_train_videos + num_val_videos
    class_counts = {spec.name: 0 for spec in CLASS_SPECS}
    all_motion, val_motion, hidden_flags = [], [], []
    lists: dict[str, list[ImageSetEntry]] = {"train15": [], "val_videos": [], "val_frames": []}
    videos_meta = []
    jobs = [("train", i) for i in range(num_train_videos)] + [("val", i) for i in range(num_val_videos)]
    bar = _progress(len(jobs) + num_det_images, progress)

    for split, index in jobs:
        rng = np.random.default_rng([seed, _SPLIT_CODE[split], index])
        num_frames = int(rng.integers(frame_range[0], frame_range[1] + 1))
        width, height = _frame_size(rng, size_range)
        scene = make_scene(rng, num_frames, width, height, motion=_motion_profile(seed, split, index))
        video, folder = _video_name(split, index)
        data_dir = out / "Data" / "VID" / video
        anno_dir = out / "Annotations" / "VID" / video
        data_dir.mkdir(parents=True)
        anno_dir.mkdir(parents=True)
        anns, images, annotated = [], [], set()
        for t in range(num_frames):
            image = render_frame(scene, t)
            _save_jpeg(data_dir / f"{t:06d}.JPEG", image)
            ann, present = _frame_annotation(scene, video, t, still=False)
            write_annotation(anno_dir / f"{t:06d}.xml", ann, folder, f"{t:06d}")
            anns.append(ann)
            annotated.update(present)
            hidden_flags.append(ann.occluded.numpy())
            for i in present:
                class_counts[scene.tracks[i].spec.name] += 1
            if split == "val":
                images.append(image)
        motion = _motion_ious(anns)
        all_motion.append(motion)
        stats.frames += num_frames
        stats.boxes += sum(len(a) for a in anns)
        stats.objects += len(annotated)
        stats.motion_profiles[scene.motion] = stats.motion_profiles.get(scene.motion, 0) + 1
        if split == "train":
            lists["train15"] += [ImageSetEntry(video, f, num_frames, 1) for f in train_15_frames(num_frames)]
        else:
            val_motion.append(motion)
            base = len(lists["val_videos"])
            lists["val_videos"] += [
                ImageSetEntry(video, t, num_frames, base + t + 1) for t in range(num_frames)
            ]
            lists["val_frames"] += [
                ImageSetEntry(f"{video}/{t:06d}", None, None, base + t + 1) for t in range(num_frames)
            ]
            snippet = out / "Data" / "VID" / "snippets" / "val" / f"{folder}.mp4"
            snippet.parent.mkdir(parents=True, exist_ok=True)
            _write_mp4(snippet, images, FPS)
        videos_meta.append(_video_meta(scene, video, annotated))
        bar.update(1)

    det_entries = _write_det(out, seed, num_det_images, size_range, stats, bar)
    bar.close()

    image_sets = out / "ImageSets"
    image_sets.mkdir(parents=True, exist_ok=True)
    if lists["train15"]:
        write_image_set(image_sets / "VID_train_15frames.txt", lists["train15"])
    if lists["val_videos"]:
        write_image_set(image_sets / "VID_val_videos.txt", lists["val_videos"])
        write_image_set(image_sets / "VID_val_frames.txt", lists["val_frames"])
    if det_entries:
        write_image_set(image_sets / "DET_train_30classes.txt", det_entries)

    flags = np.concatenate(hidden_flags) if hidden_flags else np.zeros(0, bool)
    stats.hidden_share = float(flags.mean()) if flags.size else 0.0
    stats.motion_shares = _bucket_shares(np.concatenate(all_motion) if all_motion else np.zeros(0))
    stats.val_motion_shares = _bucket_shares(np.concatenate(val_motion) if val_motion else np.zeros(0))
    stats.class_counts = class_counts
    summary = {
        "format": FORMAT,
        "version": VERSION,
        "complete": True,
        "arguments": {
            "num_train_videos": num_train_videos, "num_val_videos": num_val_videos,
            "frames": list(frame_range), "size": list(size_range), "seed": seed,
            "num_det_images": num_det_images,
        },
        "classes": [
            {"name": s.name, "label": s.label, "wnid": VID_WNIDS[s.label], "shape": s.shape, "cue": s.cue}
            for s in CLASS_SPECS
        ],
        "hide_modes": list(HIDE_MODES),
        "occluded_means": "the object's class cue is hidden in this frame",
        "stats": {k: v for k, v in stats.to_dict().items() if k != "seconds"},
        "videos": videos_meta,
    }
    atomic_write_bytes(out / "dataset.json", (json.dumps(summary, indent=1) + "\n").encode("utf-8"))
    stats.seconds = time.perf_counter() - started
    return stats


def _video_meta(scene: Scene, video: str, annotated: set[int]) -> dict:
    tracks = []
    for tid, track in enumerate(scene.tracks):
        frames = np.flatnonzero(track.present)
        tracks.append({
            "track_id": tid, "class": track.spec.name, "first": int(frames[0]), "last": int(frames[-1]),
            "hidden_frames": int(track.hidden.sum()), "annotated": tid in annotated,
        })
    return {"video": video, "frames": scene.num_frames, "width": scene.width, "height": scene.height,
            "motion": scene.motion, "tracks": tracks}


def _write_det(
    out: Path, seed: int, count: int, size_range: tuple[int, int], stats: SyntheticStats, bar
) -> list[ImageSetEntry]:
    """Still images in the DET layout; objects get their cue hidden with probability 1/4."""
    entries = []
    for index in range(count):
        rng = np.random.default_rng([seed, _SPLIT_CODE["det"], index])
        width, height = _frame_size(rng, size_range)
        scene = make_scene(rng, 1, width, height, motion="static")
        for track in scene.tracks:
            if rng.random() < DET_HIDDEN_PROB:
                track.hidden[0] = True
                track.span_start[0] = 0
                track.mode[0] = int(rng.integers(len(HIDE_MODES)))
                track.occluder[0] = occluder_params(rng)
        shard = f"ILSVRC2014_train_{index // 1000:04d}"
        name = f"ILSVRC2014_train_{index:08d}"
        image_id = f"train/{shard}/{name}"
        (out / "Data" / "DET" / "train" / shard).mkdir(parents=True, exist_ok=True)
        (out / "Annotations" / "DET" / "train" / shard).mkdir(parents=True, exist_ok=True)
        _save_jpeg(out / "Data" / "DET" / f"{image_id}.JPEG", render_frame(scene, 0))
        ann, _ = _frame_annotation(scene, image_id, 0, still=True)
        write_annotation(out / "Annotations" / "DET" / f"{image_id}.xml", ann, shard, name, "ILSVRC_2014")
        entries.append(ImageSetEntry(image_id, None, None, 1))
        stats.det_images += 1
        stats.det_boxes += len(ann)
        bar.update(1)
    return entries


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    return tqdm(total=total, unit="item", desc="synth")

