"""VID/DET training sets and reference-frame sampling, on a tiny synthetic set in the ILSVRC layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from megavod.config import load_config
from megavod.data.sampling import MEGASampler, OffsetSampler, draw_distinct
from megavod.registry import get_method

from megavod.data.synthetic import generate_synthetic_dataset
from megavod.data.transforms import FrameTransform, resized_size
from megavod.data.vid_dataset import VIDTrainDataset, build_train_dataset
from megavod.data.vid_xml import read_annotation
from megavod.errors import MegavodError
from megavod.train.distributed import SampleKey

SETS = ("DET_train_30classes", "VID_train_15frames")


def build_reference_sampler(cfg):
    """The training sampler of ``cfg.method`` (the method table's ``reference_sampler``)."""
    return get_method(cfg.method).reference_sampler(cfg)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ilsvrc")
    generate_synthetic_dataset(root, num_train_videos=2, num_val_videos=0, frames=(30, 40), size=64,
                               num_det_images=3)
    return root


@pytest.fixture
def root_copy(data_root, tmp_path) -> Path:
    """A private copy to corrupt."""
    return Path(shutil.copytree(data_root, tmp_path / "copy"))


def make_ds(root, sampler=None, flip_prob=0.5, sets=SETS) -> VIDTrainDataset:
    sampler = sampler if sampler is not None else MEGASampler(T_l=9, T_m=9)
    return VIDTrainDataset(root, sets, FrameTransform(96, 160, flip_prob=flip_prob), sampler)


def first_vid_line(root: Path) -> tuple[str, int, int, int]:
    """(video, frame, video_len, line number) of the first listed frame with an object."""
    lines = (root / "ImageSets" / "VID_train_15frames.txt").read_text().splitlines()
    for line_no, line in enumerate(lines, start=1):
        video, _, frame, length = line.split()
        if "<object>" in (root / "Annotations" / "VID" / video / f"{int(frame):06d}.xml").read_text():
            return video, int(frame), int(length), line_no
    raise AssertionError("no annotated frame")


def index_of(ds: VIDTrainDataset, video: str, frame: int) -> int:
    return next(i for i, r in enumerate(ds.records) if r.image_id == f"{video}/{frame:06d}")


def xml_text(width: int, height: int, objects: list[tuple[str, float, float, float, float]]) -> str:
    objs = "".join(
        f"<object><trackid>0</trackid><name>{n}</name><bndbox><xmax>{x2}</xmax><xmin>{x1}</xmin>"
        f"<ymax>{y2}</ymax><ymin>{y1}</ymin></bndbox><occluded>0</occluded><generated>0</generated></object>"
        for n, x1, y1, x2, y2 in objects
    )
    return f"<annotation><size><width>{width}</width><height>{height}</height></size>{objs}</annotation>"


# ----------------------------------------------------------------------------------------------
# Items


def test_items_shapes_targets_and_references(data_root):
    ds = make_ds(data_root)
    lines = [ln.split() for ln in (data_root / "ImageSets" / "VID_train_15frames.txt").read_text().splitlines()]
    empty = sum("<object>" not in (data_root / "Annotations" / "VID" / v / f"{int(f):06d}.xml").read_text()
                for v, _, f, _ in lines)
    assert ds.dropped == {"DET_train_30classes": 0, "VID_train_15frames": empty}
    assert len(ds) == 3 + len(lines) - empty
    for i in list(range(3)) + list(range(3, len(ds), 5)):  # the DET images and some video frames
        rec = ds.records[i]
        s = ds[SampleKey(i, 100 + i)]
        w, h = resized_size(rec.width, rec.height, 96, 160)
        assert s.image.shape == (3, h, w) and s.image.dtype == torch.float32
        assert s.orig_size == (rec.height, rec.width) and s.is_video == rec.is_video
        boxes, labels = s.target["boxes"], s.target["labels"]
        assert boxes.dtype == torch.float32 and boxes.shape == (len(rec.labels), 4) and labels.dtype == torch.int64
        assert ((labels >= 1) & (labels <= 30)).all()
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w - 1 + 1e-4).all() and (boxes[:, 3] <= h - 1 + 1e-4).all()
        assert {k: len(v) for k, v in s.refs.items()} == {"local": 2, "memory": 3, "global": 2}
        assert all(r.shape == s.image.shape for v in s.refs.values() for r in v)
        if rec.is_video:
            assert all(0 <= f < rec.video_len for v in s.ref_frames.values() for f in v)


def test_target_boxes_are_the_xml_boxes_resized(data_root):
    ds = make_ds(data_root, flip_prob=0.0)
    i = next(i for i, r in enumerate(ds.records) if r.is_video)
    rec = ds.records[i]
    ann = read_annotation(data_root / "Annotations" / "VID" / f"{rec.image_id}.xml", rec.video, rec.frame)
    s = ds[i]
    w, h = resized_size(rec.width, rec.height, 96, 160)
    scale = torch.tensor([w / rec.width, h / rec.height] * 2)
    assert torch.allclose(s.target["boxes"], ann.boxes * scale)
    assert torch.equal(s.target["labels"], ann.labels) and not s.flipped


def test_flip_is_shared_by_key_and_references_and_maps_boxes(data_root):
    plain, flipped = make_ds(data_root, flip_prob=0.0), make_ds(data_root, flip_prob=1.0)
    for i in (0, len(plain) - 1):  # a DET image and a video frame
        key = SampleKey(i, 42)
        a, b = plain[key], flipped[key]
        assert not a.flipped and b.flipped and a.ref_frames == b.ref_frames
        assert torch.equal(b.image, a.image.flip(-1))
        for role in a.refs:
            assert all(torch.equal(rb, ra.flip(-1)) for ra, rb in zip(a.refs[role], b.refs[role]))
        W = a.image.shape[-1]
        x1, y1, x2, y2 = a.target["boxes"].unbind(1)
        assert torch.allclose(b.target["boxes"], torch.stack([W - x2 - 1, y1, W - x1 - 1, y2], 1))


def test_items_are_a_function_of_the_key(data_root):
    ds = make_ds(data_root, OffsetSampler(-9, 9, 1))
    i = len(ds) - 1
    a, b = ds[SampleKey(i, 5)], ds[SampleKey(i, 5)]
    assert torch.equal(a.image, b.image) and a.ref_frames == b.ref_frames
    draws = [(s.flipped, str(s.ref_frames)) for s in (ds[SampleKey(i, seed)] for seed in range(8))]
    assert {f for f, _ in draws} == {True, False} and len({r for _, r in draws}) > 1
    assert torch.equal(ds[i].image, ds[SampleKey(i, i)].image)  # a plain index seeds with itself


def test_det_references_are_copies_of_the_image(data_root):
    for sampler, counts in ((MEGASampler(T_l=9, T_m=9), {"local": 2, "memory": 3, "global": 2}),
                            (OffsetSampler(-9, 0, 1), {"ref": 1}), (OffsetSampler(-18, 18, 2), {"ref": 2})):
        ds = make_ds(data_root, sampler, sets=("DET_train_30classes",))
        assert len(ds) == 3
        s = ds[SampleKey(1, 9)]
        assert not s.is_video and s.frame == 0 and s.video.startswith("train/ILSVRC2014_train_0000/")
        assert {k: len(v) for k, v in s.refs.items()} == counts
        assert all(r is s.image for v in s.refs.values() for r in v)
        assert s.ref_frames == {k: [0] * n for k, n in counts.items()}


def test_single_frame_items_have_no_references(data_root):
    cfg = load_config("synthetic_single", ["data.train_sets=[VID_train_15frames]"])
    ds = build_train_dataset(cfg, data_root)
    s, rec = ds[0], ds.records[0]
    w, h = resized_size(rec.width, rec.height, 192, 320)
    assert s.refs == {} and s.ref_frames == {} and s.image.shape == (3, h, w)


def test_images_without_object_are_dropped_other_classes_kept_empty(root_copy):
    video, frame, _, _ = first_vid_line(root_copy)
    before = make_ds(root_copy).dropped["VID_train_15frames"]
    xml = root_copy / "Annotations" / "VID" / video / f"{frame:06d}.xml"
    ann = read_annotation(xml, video, frame)
    xml.write_text(xml_text(ann.width, ann.height, []))
    ds = make_ds(root_copy)
    assert ds.dropped["VID_train_15frames"] == before + 1
    assert all(r.image_id != f"{video}/{frame:06d}" for r in ds.records)
    # Only a non-VID class (person) or a degenerate box: kept, with no box (the engine skips it).
    xml.write_text(xml_text(ann.width, ann.height, [("n00007846", 1, 1, 9, 9), ("n02391049", 5, 2, 5, 9)]))
    ds = make_ds(root_copy)
    assert ds.dropped["VID_train_15frames"] == before
    assert ds.records[index_of(ds, video, frame)].boxes.shape == (0, 4)


# ----------------------------------------------------------------------------------------------
# Bad input: one line naming the file and the field


def _corrupt_xml(root, text):
    video, frame, _, _ = first_vid_line(root)
    path = root / "Annotations" / "VID" / video / f"{frame:06d}.xml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "case, field",
    [
        ("malformed", "not valid XML"),
        ("outside", "bndbox"),
        ("not_wnid", "name 'person'"),
        ("size", "size/width"),
    ],
)
def test_bad_annotation_names_file_and_field(root_copy, case, field):
    video, frame, _, _ = first_vid_line(root_copy)
    ann = read_annotation(root_copy / "Annotations" / "VID" / video / f"{frame:06d}.xml", video, frame)
    w, h = ann.width, ann.height
    text = {
        "malformed": "<annotation><size><width>3</width></annotation",
        "outside": xml_text(w, h, [("n02391049", w + 5, 1, w + 20, 9)]),
        "not_wnid": xml_text(w, h, [("person", 1, 1, 9, 9)]),
        "size": xml_text(w + 2, h, [("n02391049", 1, 1, 9, 9)]),
    }[case]
    path = _corrupt_xml(root_copy, text)
    with pytest.raises(MegavodError) as info:
        ds = make_ds(root_copy)
        ds[index_of(ds, video, frame)]  # the image size is checked against the XML's when the image is read
    msg = str(info.value)
    assert str(path) in msg and field in msg and "\n" not in msg


def test_list_line_naming_a_missing_frame(root_copy):
    video, frame, _, line_no = first_vid_line(root_copy)
    listed = root_copy / "Data" / "VID" / video / f"{frame:06d}.JPEG"
    listed.unlink()
    with pytest.raises(MegavodError, match=rf"VID_train_15frames.txt:line {line_no}: missing image .*{frame:06d}.JPEG"):
        make_ds(root_copy)


def test_list_video_len_longer_than_the_video(root_copy):
    lst = root_copy / "ImageSets" / "VID_train_15frames.txt"
    video, frame, length, _ = first_vid_line(root_copy)
    lines = [ln.rsplit(" ", 1)[0] + f" {length + 5}" if ln.startswith(video + " ") else ln
             for ln in lst.read_text().splitlines()]
    lst.write_text("\n".join(lines) + "\n")
    expected = rf"VID_train_15frames.txt: video {video} has video_len {length + 5} \(column 4\)"
    with pytest.raises(MegavodError, match=expected):
        make_ds(root_copy)


def test_missing_reference_frame_names_the_frame(root_copy):
    video, frame, _, _ = first_vid_line(root_copy)
    missing = root_copy / "Data" / "VID" / video / f"{frame + 1:06d}.JPEG"
    missing.unlink()
    ds = make_ds(root_copy, OffsetSampler(1, 1, 1), sets=("VID_train_15frames",))
    with pytest.raises(MegavodError, match=f"{missing}: frame not found .*VID_train_15frames.txt"):
        ds[index_of(ds, video, frame)]


def test_missing_image_set_is_named(root_copy):
    with pytest.raises(MegavodError, match="ImageSets/DET_train_oops.txt: image set 'DET_train_oops' not found"):
        make_ds(root_copy, sets=("DET_train_oops",))


# ----------------------------------------------------------------------------------------------
# Sampling (docs/conventions.md#training-samples)


def _many(sampler, frame, length, n=300):
    rng = np.random.default_rng(0)
    return [sampler.sample(frame, length, rng) for _ in range(n)]


def test_mega_sampling_ranges_mid_video():
    draws = _many(MEGASampler(), 500, 1000)
    local = [d["local"] for d in draws]
    memory = [d["memory"] for d in draws]
    glob = [d["global"] for d in draws]
    assert all(len(x) == 2 and len(set(x)) == 2 for x in local)  # distinct offsets
    assert set(sum(local, [])) == set(range(488, 513))  # -12..12, the key included
    assert all(len(x) == 3 and len(set(x)) == 3 for x in memory)
    assert set(sum(memory, [])) == set(range(463, 488))  # centre f - 25, +-12: f-37..f-13
    assert all(len(x) == 2 and len(set(x)) == 2 for x in glob)
    assert min(sum(glob, [])) >= 0 and max(sum(glob, [])) <= 999 and len(set(sum(glob, []))) > 400


def test_mega_sampling_near_the_start_and_end_clips():
    early = _many(MEGASampler(), 10, 300)
    assert set(sum((d["memory"] for d in early), [])) == set(range(0, 13))  # centre max(10-25,0)=0, +-12 clipped
    assert set(sum((d["local"] for d in early), [])) == set(range(0, 23))
    late = _many(MEGASampler(), 295, 300)
    assert set(sum((d["local"] for d in late), [])) == set(range(283, 300))
    short = MEGASampler().sample(0, 1, np.random.default_rng(0))  # one-frame video: every ref is frame 0
    assert short == {"local": [0, 0], "memory": [0, 0, 0], "global": [0, 0]}


def test_mega_sampling_generalises_T_l_T_m_and_online():
    # Memory = the T_m frames just before the window: f-tau-T_m .. f-tau-1.
    for T_l, T_m in ((25, 24), (9, 9), (13, 5)):
        tau = (T_l - 1) // 2
        got = set(sum((d["memory"] for d in _many(MEGASampler(T_l=T_l, T_m=T_m), 500, 1000)), []))
        assert got == set(range(500 - tau - T_m, 500 - tau)), (T_l, T_m)
    online = _many(MEGASampler(online=True), 500, 1000)
    assert set(sum((d["local"] for d in online), [])) == set(range(476, 501))  # k-24..k, no look-ahead
    assert set(sum((d["memory"] for d in online), [])) == set(range(451, 476))
    assert max(sum((d["global"] for d in online), [])) <= 500  # frames already seen
    off = MEGASampler(memory=False, global_stage=False)
    assert off.counts() == {"local": 2, "memory": 0, "global": 0}
    assert off.sample(5, 50, np.random.default_rng(0))["memory"] == []


@pytest.mark.parametrize(
    "preset, lo, hi, n",
    [("rdn_R_101", -18, 18, 2), ("rdn_base_R_101", -18, 18, 2), ("fgfa_R_101", -9, 9, 2), ("dff_R_101", -9, 0, 1)],
)
def test_offset_samplers_from_presets(preset, lo, hi, n):
    sampler = build_reference_sampler(load_config(preset))
    assert sampler.counts() == {"ref": n}
    draws = [d["ref"] for d in _many(sampler, 100, 1000)]
    assert all(len(x) == n and len(set(x)) == n for x in draws)
    assert set(sum(draws, [])) == set(range(100 + lo, 100 + hi + 1))
    assert set(sum((d["ref"] for d in _many(sampler, 2, 5)), [])) <= set(range(0, 5))


def test_builder_for_mega_and_single():
    mega = build_reference_sampler(load_config("mega_R_101"))
    assert mega == MEGASampler(T_l=25, T_m=25, num_local=2, num_memory=3, num_global=2)
    base = build_reference_sampler(load_config("base_R_101"))
    assert base.counts()["memory"] == 0
    assert build_reference_sampler(load_config("single_R_101")) is None


def test_draw_distinct_falls_back_to_replacement_only_when_needed():
    rng = np.random.default_rng(0)
    assert sorted(draw_distinct(rng, range(3), 3)) == [0, 1, 2]
    assert draw_distinct(rng, [7], 2) == [7, 7]
    assert draw_distinct(rng, range(5), 0) == []
