"""Training and evaluation read a COCO-VID file as they read the ImageNet VID layout it came from."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from megavod.apps.cli import main as cli_main
from megavod.config import load_config
from megavod.data.convert_dataset import vid_layout_to_coco
from megavod.data.coco_vid import read_coco_vid
from megavod.data.image_sets import read_image_set
from megavod.data.predictions import FramePrediction, VideoPredictions, write_predictions
from megavod.data.sampling import MEGASampler, SampleKey
from megavod.data.synthetic import generate_synthetic_dataset
from megavod.data.transforms import FrameTransform
from megavod.data.vid_dataset import VIDTrainDataset, build_train_dataset
from megavod.data.vid_xml import read_annotation
from megavod.errors import MegavodError
from megavod.evaluation.vid_eval import evaluate_dataset
from megavod.structures import Detections

TRAIN_SET, VAL_SET = "VID_train_15frames", "VID_val_videos"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """2 train + 1 val videos x 8 frames, with ``Data/VID/{train,val}.json`` beside their images."""
    root = tmp_path_factory.mktemp("vid")
    generate_synthetic_dataset(root, num_train_videos=2, num_val_videos=1, frames=8, size=64)
    for image_set, name in ((TRAIN_SET, "train"), (VAL_SET, "val")):
        stats = vid_layout_to_coco(root, image_set, root / "Data" / "VID" / f"{name}.json")
        assert stats.skipped_boxes == 0  # else the two ground truths would differ by construction
    return root


def make_ds(root: Path, image_sets=(TRAIN_SET,), image_root=None) -> VIDTrainDataset:
    sampler = MEGASampler(T_l=5, T_m=5, num_local=2, num_memory=2, num_global=2)
    return VIDTrainDataset(root, image_sets, FrameTransform(48, 100, flip_prob=0.5), sampler, image_root)


def assert_same_sample(a, b) -> None:
    assert (a.video, a.frame, a.flipped, a.orig_size, a.is_video) == (b.video, b.frame, b.flipped, b.orig_size, b.is_video)
    assert torch.equal(a.image, b.image)
    assert torch.equal(a.target["boxes"], b.target["boxes"])
    assert torch.equal(a.target["labels"], b.target["labels"])
    assert a.ref_frames == b.ref_frames
    assert a.refs.keys() == b.refs.keys()
    for role in a.refs:
        assert all(torch.equal(x, y) for x, y in zip(a.refs[role], b.refs[role], strict=True))


# ----------------------------------------------------------------------------------------------
# Training


def test_training_samples_match_the_vid_layout(data):
    folder, coco = make_ds(data), make_ds(data / "Data" / "VID" / "train.json")
    # Same key frames: the list's lines whose XML has an object, in list order.
    lines = read_image_set(data / "ImageSets" / f"{TRAIN_SET}.txt")
    kept = [(e.path, e.frame) for e in lines
            if len(read_annotation(data / "Annotations" / "VID" / e.path / f"{e.frame:06d}.xml", e.path, e.frame))]
    assert 0 < len(kept) <= 16
    assert [(r.video, r.frame) for r in coco.records] == [(r.video, r.frame) for r in folder.records] == kept
    assert [r.video_len for r in coco.records] == [r.video_len for r in folder.records] == [8] * len(kept)
    assert coco.dropped == {"train.json": 16 - len(kept)}
    assert folder.dropped == {TRAIN_SET: 16 - len(kept)}
    flips = set()
    for i in range(len(folder)):
        a, b = folder[SampleKey(i, 7 + i)], coco[SampleKey(i, 7 + i)]
        assert_same_sample(a, b)
        assert a.num_boxes > 0 and len(sum(a.ref_frames.values(), [])) == 6
        flips.add(a.flipped)
    assert flips == {True, False}  # both branches of the transform were compared


def test_build_train_dataset_takes_the_json(data):
    cfg = load_config("synthetic_mega")
    ds = build_train_dataset(cfg, data / "Data" / "VID" / "train.json")  # data.train_sets do not apply
    ref = VIDTrainDataset(data, [TRAIN_SET], ds.transform, ds.ref_sampler)
    assert len(ds) == len(ref)
    assert_same_sample(ds[SampleKey(1, 3)], ref[SampleKey(1, 3)])


def test_marked_key_frames_positions_and_image_root(data, tmp_path):
    """Only ``is_vid_train_frame`` frames are keys; frame numbers are positions, not ``frame_id``."""
    content = json.loads((data / "Data" / "VID" / "train.json").read_text())
    for image in content["images"]:
        image["is_vid_train_frame"] = image["frame_id"] in (2, 6)
        image["frame_id"] = 100 + 10 * image["frame_id"]  # gaps and an offset: positions stay 0..7
    path = tmp_path / "annotations" / "train.json"  # mmtracking's layout: images elsewhere
    path.parent.mkdir()
    path.write_text(json.dumps(content))
    with pytest.raises(MegavodError, match=r"train\.json: image id \d+ .*image file not found"):
        make_ds(path)
    coco = make_ds(path, image_root=data / "Data" / "VID")
    folder = make_ds(data)
    keys = [(r.video, r.frame) for r in folder.records if r.frame in (2, 6)]
    assert [(r.video, r.frame) for r in coco.records] == keys and keys
    assert all(r.video_len == 8 for r in coco.records)
    for j, (video, frame) in enumerate(keys):
        i = next(i for i, r in enumerate(folder.records) if (r.video, r.frame) == (video, frame))
        assert_same_sample(coco[SampleKey(j, 50 + j)], folder[SampleKey(i, 50 + j)])


def test_no_mark_means_every_frame_and_size_mismatch_is_named(data, tmp_path):
    content = json.loads((data / "Data" / "VID" / "train.json").read_text())
    for image in content["images"]:
        image.pop("is_vid_train_frame")
    first = next(im for im in content["images"] if any(a["image_id"] == im["id"] for a in content["annotations"]))
    first["width"] += 2
    path = tmp_path / "train_unmarked.json"
    path.write_text(json.dumps(content))
    ds = make_ds(path, image_root=data / "Data" / "VID")
    # Every frame with a box is a key: here the same frames as the 15-frame list (8-frame videos).
    assert [(r.video, r.frame) for r in ds.records] == [(r.video, r.frame) for r in make_ds(data).records]
    i = next(i for i, r in enumerate(ds.records) if r.image_id == first["file_name"])
    message = rf"train_unmarked\.json: '{first['file_name']}': width x height is {first['width']}x\d+ but .* is \d+x\d+"
    with pytest.raises(MegavodError, match=message):
        ds[i]


# ----------------------------------------------------------------------------------------------
# Evaluation


def val_predictions(data: Path, perturb: bool, basename: bool = False) -> list[VideoPredictions]:
    """The val ground truth as predictions (score 1), or a perturbed copy (moved, dropped, scored)."""
    rng = np.random.default_rng(0)
    videos = []
    for e in read_image_set(data / "ImageSets" / f"{VAL_SET}.txt"):
        ann = read_annotation(data / "Annotations" / "VID" / e.path / f"{e.frame:06d}.xml", e.path, e.frame)
        boxes, labels = ann.boxes.clone(), ann.labels.clone()
        scores = torch.ones(len(ann))
        if perturb and len(ann):
            boxes += torch.from_numpy(rng.integers(-6, 7, size=(len(ann), 2))).float().repeat(1, 2)
            scores = torch.from_numpy(rng.random(len(ann))).float()
            labels[: len(ann) // 2] = labels[: len(ann) // 2] % 30 + 1  # some wrong classes
        name = Path(e.path).name if basename else e.path
        if not videos or videos[-1].video != name:
            videos.append(VideoPredictions(name, ann.width, ann.height, []))
        videos[-1].frames.append(FramePrediction(e.frame, None, Detections(boxes, scores, labels)))
    return videos


@pytest.mark.parametrize("perturb", [False, True])
def test_evaluation_matches_the_vid_layout(data, tmp_path, perturb):
    pred = tmp_path / "pred.json"
    write_predictions(pred, val_predictions(data, perturb))
    folder = evaluate_dataset(data, pred, log=None)
    lines: list[str] = []
    coco = evaluate_dataset(data / "Data" / "VID" / "val.json", pred, log=lines.append)
    assert lines[0].startswith("read 8 annotated frames from ") and "val.json" in lines[0]
    assert (coco.num_frames, coco.num_gt, coco.num_det) == (folder.num_frames, folder.num_gt, folder.num_det)
    assert coco.num_frames == 8 and coco.num_gt > 0
    if not perturb:
        assert coco.map == folder.map == 1.0
    else:
        assert 0.0 < coco.map < 1.0 and coco.map == folder.map
    assert coco.ranges.keys() == folder.ranges.keys()  # motion buckets: track ids survive the JSON
    for name in folder.ranges:
        np.testing.assert_array_equal(coco.ranges[name].ap, folder.ranges[name].ap)
        np.testing.assert_array_equal(coco.ranges[name].num_pos, folder.ranges[name].num_pos)


def test_evaluation_names_videos_as_the_json(data, tmp_path):
    pred = tmp_path / "pred.json"
    val = data / "Data" / "VID" / "val.json"
    write_predictions(pred, val_predictions(data, False, basename=True))  # as `megavod detect clip.mp4`
    assert evaluate_dataset(val, pred, log=None).map == 1.0
    videos = val_predictions(data, False)
    videos[0] = replace(videos[0], video="val/elsewhere")
    write_predictions(pred, videos)
    with pytest.raises(MegavodError, match=r"video 'val/elsewhere' is not in the ground truth \(.*val\.json\)"):
        evaluate_dataset(val, pred, log=None)
    with pytest.raises(MegavodError, match=r"val\.json: a COCO-VID file is evaluated whole"):
        evaluate_dataset(val, pred, image_set="VID_val_frames", log=None)


# ----------------------------------------------------------------------------------------------
# Command line


@pytest.mark.parametrize("command", ["eval", "train"])
def test_cli_malformed_json_gives_the_readers_line(data, tmp_path, capsys, command):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"categories": [], "videos": [{"id": 1, "name": "v"}], "images": [
        {"id": 1, "video_id": 2, "frame_id": 0, "file_name": "a.jpg", "width": 8, "height": 8}],
        "annotations": []}))
    with pytest.raises(MegavodError) as err:
        read_coco_vid(bad)
    assert str(err.value) == f"{bad}: images[0]: video_id 2 does not exist in videos"
    pred = tmp_path / "pred.json"
    write_predictions(pred, val_predictions(data, False))
    if command == "eval":
        argv = ["eval", "--data", str(bad), "--pred", str(pred)]
    else:
        argv = ["train", "--config", "synthetic_single", "--data", str(bad), "--out", str(tmp_path / "run")]
    code = cli_main(argv)
    out = capsys.readouterr()
    assert code != 0
    assert out.err.splitlines() == [f"megavod {command}: error: {err.value}"]
