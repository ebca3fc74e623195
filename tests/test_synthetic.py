"""The synthetic VID benchmark (megavod/data/synthetic.py, synthetic_render.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from megavod.apps.synth import main
from megavod.data.classes import VID_WNIDS
from megavod.data.image_sets import read_image_set, train_15_frames
from megavod.data.synthetic import (
    _bucket_shares,
    _frame_annotation,
    _motion_ious,
    generate_synthetic_dataset,
)
from megavod.data.synthetic_render import (
    CLASS_SPECS,
    HIDE_MODES,
    gt_box,
    hidden_schedule,
    make_background,
    make_scene,
    make_track,
    occluder_params,
    render_frame,
    draw_track,
)
from megavod.data.vid_xml import read_annotation
from megavod.errors import MegavodError

TINY = dict(num_train_videos=2, num_val_videos=2, frames=12, size=64, num_det_images=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("synth") / "set"
    return out, generate_synthetic_dataset(out, seed=0, **TINY)


def _files(root: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.suffix in suffixes}


def test_layout(tiny):
    out, stats = tiny
    for video in ("train/ILSVRC2015_VID_train_0000/ILSVRC2015_train_00000001", "val/ILSVRC2015_val_00000001"):
        for t in range(12):
            assert (out / "Data/VID" / video / f"{t:06d}.JPEG").is_file()
            assert (out / "Annotations/VID" / video / f"{t:06d}.xml").is_file()
        assert not (out / "Data/VID" / video / "000012.JPEG").exists()
    det = "train/ILSVRC2014_train_0000/ILSVRC2014_train_00000002"
    assert (out / "Data/DET" / f"{det}.JPEG").is_file() and (out / "Annotations/DET" / f"{det}.xml").is_file()
    names = sorted(p.name for p in (out / "ImageSets").iterdir())
    assert names == ["DET_train_30classes.txt", "VID_train_15frames.txt", "VID_val_frames.txt", "VID_val_videos.txt"]
    for i in range(2):  # one MP4 per val video, every frame in it, same size as the JPEGs
        with av.open(str(out / f"Data/VID/snippets/val/ILSVRC2015_val_{i:08d}.mp4")) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        with Image.open(out / f"Data/VID/val/ILSVRC2015_val_{i:08d}/000000.JPEG") as im:
            assert im.format == "JPEG" and im.size[0] == 64 and im.size[1] in (36, 48)  # 9:16 or 3:4
            assert len(frames) == 12 and frames[0].shape == (im.size[1], 64, 3)
    summary = json.loads((out / "dataset.json").read_text())
    assert summary["format"] == "megavod.synthetic" and len(summary["videos"]) == 4
    assert summary["stats"]["boxes"] == stats.boxes
    assert (stats.videos, stats.train_videos, stats.val_videos, stats.frames, stats.det_images) == (4, 2, 2, 48, 3)


def test_xml_fields(tiny):
    out, stats = tiny
    video = "val/ILSVRC2015_val_00000000"
    root = ET.parse(out / "Annotations/VID" / video / "000003.xml").getroot()
    assert root.findtext("folder") == "ILSVRC2015_val_00000000" and root.findtext("filename") == "000003"
    assert root.findtext("source/database") == "ILSVRC_2015"
    with Image.open(out / "Data/VID" / video / "000003.JPEG") as im:
        assert (root.findtext("size/width"), root.findtext("size/height")) == tuple(map(str, im.size))
    synth_wnids = {VID_WNIDS[s.label] for s in CLASS_SPECS}
    total = hidden = 0
    for xml in (out / "Annotations/VID").rglob("*.xml"):
        for obj in ET.parse(xml).getroot().iterfind("object"):
            assert [c.tag for c in obj] == ["trackid", "name", "bndbox", "occluded", "generated"]
            assert [c.tag for c in obj.find("bndbox")] == ["xmax", "xmin", "ymax", "ymin"]
            assert obj.findtext("name") in synth_wnids and obj.findtext("generated") == "0"
            hidden += obj.findtext("occluded") == "1"
            total += 1
    assert total == stats.boxes and sum(stats.class_counts.values()) == total
    assert hidden == round(stats.hidden_share * total)
    ann = read_annotation(out / "Annotations/VID" / video / "000003.xml", video, 3)
    assert ann.width == 64 and len(ann) == len(root.findall("object"))
    assert bool((ann.boxes[:, 2] - ann.boxes[:, 0] + 1 >= 4).all())
    det = ET.parse(out / "Annotations/DET/train/ILSVRC2014_train_0000/ILSVRC2014_train_00000000.xml").getroot()
    assert det.findtext("folder") == "ILSVRC2014_train_0000" and det.find("object/trackid") is None


def test_list_files(tiny):
    out, _ = tiny
    sets = out / "ImageSets"
    patterns = {
        "VID_train_15frames.txt": r"train/ILSVRC2015_VID_train_0000/ILSVRC2015_train_\d{8} 1 \d+ 12",
        "VID_val_videos.txt": r"val/ILSVRC2015_val_\d{8} \d+ \d+ 12",
        "VID_val_frames.txt": r"val/ILSVRC2015_val_\d{8}/\d{6} \d+",
        "DET_train_30classes.txt": r"train/ILSVRC2014_train_0000/ILSVRC2014_train_\d{8} 1",
    }
    for name, pattern in patterns.items():
        lines = (sets / name).read_text().splitlines()
        assert lines and all(re.fullmatch(pattern, line) for line in lines), name
    train = read_image_set(sets / "VID_train_15frames.txt", must_exist_root=out / "Data/VID")
    assert [e.frame for e in train] == train_15_frames(12) * 2 == list(range(12)) * 2
    videos = read_image_set(sets / "VID_val_videos.txt", must_exist_root=out / "Data/VID")
    frames = read_image_set(sets / "VID_val_frames.txt", must_exist_root=out / "Data/VID")
    assert len(videos) == len(frames) == 24
    assert [e.image_id for e in videos] == [e.image_id for e in frames]
    assert [e.n for e in videos] == list(range(1, 25))  # running index, one line per frame in order
    assert videos[13].image_id == "val/ILSVRC2015_val_00000001/000001"
    det = read_image_set(sets / "DET_train_30classes.txt", must_exist_root=out / "Data/DET")
    assert len(det) == 3 and det[0].frame is None


def test_determinism_by_seed(tiny, tmp_path):
    out, _ = tiny
    again = tmp_path / "again"
    generate_synthetic_dataset(again, seed=0, **TINY)
    text = (".xml", ".txt", ".json")
    first, second = _files(out, text), _files(again, text)
    assert first.keys() == second.keys()
    assert all(first[k].read_bytes() == second[k].read_bytes() for k in first)
    images, images2 = _files(out, (".JPEG",)), _files(again, (".JPEG",))
    assert images.keys() == images2.keys() and len(images) == 51
    for key in images:
        assert np.array_equal(np.asarray(Image.open(images[key])), np.asarray(Image.open(images2[key])))

    other = tmp_path / "other"
    generate_synthetic_dataset(other, seed=1, **TINY)
    third = _files(other, (".xml",))
    assert sum(first[k].read_bytes() != third[k].read_bytes() for k in third) > len(third) // 2
    a = np.asarray(Image.open(images["Data/VID/val/ILSVRC2015_val_00000000/000000.JPEG"]))
    b = np.asarray(Image.open(other / "Data/VID/val/ILSVRC2015_val_00000000/000000.JPEG"))
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_regenerate_and_refuse_foreign_folder(tiny, tmp_path):
    out, _ = tiny
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(MegavodError, match="not empty and holds no megavod synthetic dataset"):
        generate_synthetic_dataset(foreign, seed=0, **TINY)
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(MegavodError, match="frames must be >= 1"):
        generate_synthetic_dataset(tmp_path / "bad", seed=0, **{**TINY, "frames": 0})
    with pytest.raises(MegavodError, match="seed must be >= 0"):
        generate_synthetic_dataset(tmp_path / "bad", seed=-1, **TINY)
    # An interrupted run left its marker: running again just works.
    broken = tmp_path / "broken"
    (broken / "Data/VID/val/x").mkdir(parents=True)
    (broken / "dataset.json").write_text('{"format": "megavod.synthetic", "complete": false}')
    generate_synthetic_dataset(broken, seed=0, **TINY)
    assert not (broken / "Data/VID/val/x").exists()
    assert json.loads((broken / "dataset.json").read_text())["complete"] is True
    # Over an earlier synthetic set it regenerates (smaller set: nothing of the old one is left).
    redo = tmp_path / "redo"
    generate_synthetic_dataset(redo, seed=0, **TINY)
    generate_synthetic_dataset(redo, seed=0, **{**TINY, "num_val_videos": 1, "num_det_images": 0})
    assert not (redo / "Data/VID/val/ILSVRC2015_val_00000001").exists() and not (redo / "Data/DET").exists()


def test_motion_buckets_and_hidden_share(tmp_path):
    stats = generate_synthetic_dataset(tmp_path / "s", 4, 2, frames=30, size=96, seed=0)
    shares = stats.motion_shares
    assert min(shares["fast"], shares["medium"], shares["slow"]) >= 0.05, shares
    assert abs(shares["fast"] + shares["medium"] + shares["slow"] + shares["no_neighbour"] - 1) < 1e-9
    assert 0.4 <= stats.hidden_share <= 0.6
    # On a benchmark-like population (scenes only, nothing rendered) the buckets approach the shares
    # of ImageNet VID val (fast 27%, medium 35%, slow 37%), and every motion profile occurs.
    values, profiles = [], set()
    for i in range(60):
        rng = np.random.default_rng([0, 0, i])
        scene = make_scene(rng, 60, 192, 144)
        profiles.add(scene.motion)
        values.append(_motion_ious([_frame_annotation(scene, "v", t, False)[0] for t in range(60)]))
    shares = _bucket_shares(np.concatenate(values))
    assert profiles == {"static", "slow", "medium", "fast"}
    assert all(0.2 <= shares[k] <= 0.5 for k in ("fast", "medium", "slow")), shares


def test_hidden_schedule_spans():
    rng = np.random.default_rng(0)
    for length in (3, 5, 12, 30, 90, 120):
        for _ in range(20):
            hidden, starts = hidden_schedule(rng, length)
            share = hidden.mean()
            assert 0.4 - 1 / length <= share <= 0.6 + 1 / length and 0 < hidden.sum() < length
            runs = np.flatnonzero(np.diff(np.concatenate([[0], hidden.astype(int), [0]])) == 1)
            assert 1 <= len(runs) <= 3  # contiguous spans
            assert set(starts[hidden].tolist()) == set(runs.tolist()) and (starts[~hidden] == -1).all()


def test_hidden_cue_makes_pair_indistinguishable():
    """In a hidden frame the two classes of a pair render identically; in a visible frame they differ."""
    rng = np.random.default_rng(3)
    background = make_background(rng, 96, 72)
    for a, b in zip(CLASS_SPECS[0::2], CLASS_SPECS[1::2]):
        assert (a.shape, a.aspect) == (b.shape, b.aspect) and a.cue != b.cue
        track = make_track(np.random.default_rng(1), a, "medium", 4, 96, 72, 0, 3)
        track.cx[:], track.cy[:], track.w[:], track.h[:] = 48, 36, 40, 30
        track.hidden[:] = [False, True, True, True]
        track.mode[1:] = [HIDE_MODES.index(m) for m in ("blur", "occluder", "low_contrast")]
        track.span_start[:] = [-1, 1, 2, 3]
        track.occluder = {s: occluder_params(np.random.default_rng(s)) for s in (1, 2, 3)}
        twin = dataclasses.replace(track, spec=b)
        for t in range(4):
            frames = []
            for tr in (track, twin):
                frame = background.copy()
                draw_track(frame, tr, t)
                frames.append(frame)
            same = np.array_equal(frames[0], frames[1])
            assert same == bool(track.hidden[t]), (a.name, b.name, t)
        track.mode[1] = HIDE_MODES.index("backlit")
        pair = []
        for tr in (track, twin):
            frame = background.copy()
            draw_track(frame, tr, 1)
            pair.append(frame)
        assert np.array_equal(*pair)


def test_gt_box_is_clipped_and_thin_slivers_dropped():
    track = make_track(np.random.default_rng(0), CLASS_SPECS[0], "static", 3, 100, 50, 0, 2)
    track.w[:], track.h[:] = 20, 10
    track.cx[:] = [50, 2, -9]
    track.cy[:] = 25
    assert gt_box(track, 0, 100, 50) == (40, 20, 59, 29)  # width 20 under the +1 convention
    assert gt_box(track, 1, 100, 50) == (0, 20, 11, 29)
    assert gt_box(track, 2, 100, 50) is None  # 1 visible column: not annotated
    track.present[0] = False
    assert gt_box(track, 0, 100, 50) is None


def test_render_frame_shape_and_range():
    scene = make_scene(np.random.default_rng(0), 5, 80, 60)
    frame = render_frame(scene, 4)
    assert frame.shape == (60, 80, 3) and frame.dtype == np.uint8 and frame.std() > 5


def test_cli_main(tmp_path, capsys):
    args = argparse.Namespace(out=tmp_path / "cli", videos=2, frames=6, size=64, seed=3)
    assert main(args) == 0
    assert "1 train + 1 val videos" in capsys.readouterr().out
    assert len(read_image_set(tmp_path / "cli/ImageSets/DET_train_30classes.txt")) == 15
    ann = read_annotation(tmp_path / "cli/Annotations/VID/val/ILSVRC2015_val_00000000/000000.xml", "v", 0)
    assert ann.track_ids.dtype == torch.int64
