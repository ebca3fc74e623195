"""COCO-VID JSON (megavod/data/coco_vid.py) and its conversion to and from the ImageNet VID layout
(megavod/data/convert_dataset.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from megavod.data.classes import VID_CLASSES, VID_WNIDS
from megavod.data.coco_vid import CocoVidVideo, read_coco_vid, write_coco_vid
from megavod.data.convert_dataset import coco_to_vid_layout, vid_layout_to_coco
from megavod.data.image_sets import read_image_set
from megavod.data.synthetic import generate_synthetic_dataset
from megavod.data.vid_xml import read_annotation
from megavod.errors import MegavodError
from megavod.structures import FrameAnnotation

ZEBRA = VID_CLASSES.index("zebra")
AIRPLANE = VID_CLASSES.index("airplane")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Synthetic VID layout (2 train + 1 val videos x 8 frames) -> COCO-VID -> VID layout."""
    root = tmp_path_factory.mktemp("coco_vid")
    syn = root / "syn"
    generate_synthetic_dataset(syn, 2, 1, frames=8, size=64, seed=0)
    stats = {
        "train_json": vid_layout_to_coco(syn, "VID_train_15frames", root / "train.json"),
        "val_json": vid_layout_to_coco(syn, "VID_val_videos.txt", root / "val.json"),
    }
    images = syn / "Data" / "VID"
    stats["train_layout"] = coco_to_vid_layout(root / "train.json", images, root / "out", "train")
    stats["val_layout"] = coco_to_vid_layout(root / "val.json", images, root / "out", "val")
    return root, syn, root / "out", stats


def _xmls(root: Path) -> list[Path]:
    return sorted((root / "Annotations" / "VID").rglob("*.xml"))


def test_round_trip_reproduces_the_layout(converted):
    _, syn, out, stats = converted
    originals = _xmls(syn)
    assert len(originals) == 24
    assert [p.relative_to(syn) for p in originals] == [p.relative_to(out) for p in _xmls(out)]
    for path in originals:
        rel = path.relative_to(syn / "Annotations" / "VID")
        video, frame = str(rel.parent), int(rel.stem)
        a = read_annotation(path, video, frame)
        b = read_annotation(out / "Annotations" / "VID" / rel, video, frame)
        assert (a.width, a.height) == (b.width, b.height)
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.track_ids, b.track_ids)
        assert torch.equal(a.occluded, b.occluded) and torch.equal(a.generated, b.generated)
        # Same folder/filename fields and object order: the files are byte for byte the originals.
        assert path.read_bytes() == (out / "Annotations" / "VID" / rel).read_bytes()
        image = Path("Data/VID") / rel.with_suffix(".JPEG")
        assert (syn / image).read_bytes() == (out / image).read_bytes()
    for name in ("VID_train_15frames.txt", "VID_val_videos.txt", "VID_val_frames.txt"):
        assert (syn / "ImageSets" / name).read_text() == (out / "ImageSets" / name).read_text()
    # The extra list of every train frame, in video then frame order.
    entries = read_image_set(out / "ImageSets" / "VID_train_videos.txt")
    assert [(e.path[-8:], e.frame, e.video_len, e.n) for e in entries[6:10]] == [
        ("00000000", 6, 8, 7), ("00000000", 7, 8, 8), ("00000001", 0, 8, 9), ("00000001", 1, 8, 10)]
    assert stats["train_json"].images == stats["train_layout"].images == 16
    assert stats["val_json"].annotations == stats["val_layout"].annotations == sum(
        len(read_annotation(p, "", 0)) for p in originals if "/val/" in str(p))


def test_json_follows_mmtracking_conventions(converted):
    root, syn, _, _ = converted
    data = json.loads((root / "train.json").read_text())
    assert data["categories"][ZEBRA - 1] == {"id": ZEBRA, "name": "zebra", "encode_name": VID_WNIDS[ZEBRA]}
    assert [v["id"] for v in data["videos"]] == [1, 2]
    assert [i["id"] for i in data["images"]] == list(range(1, 17))
    image = data["images"][9]
    assert image == {
        "id": 10, "video_id": 2, "frame_id": 1,
        "file_name": "train/ILSVRC2015_VID_train_0000/ILSVRC2015_train_00000001/000001.JPEG",
        "width": image["width"], "height": image["height"], "is_vid_train_frame": True,  # 8 < 15: all listed
    }
    video_of = {v["id"]: v for v in data["videos"]}
    image_of = {i["id"]: i for i in data["images"]}
    instances = {}
    for ann in data["annotations"]:
        img = image_of[ann["image_id"]]
        video = video_of[img["video_id"]]["name"]
        xml = read_annotation(syn / "Annotations" / "VID" / video / f"{img['frame_id']:06d}.xml", video, 0)
        track = ann["instance_id"] - video_of[img["video_id"]]["instance_id_offset"]
        index = xml.track_ids.tolist().index(track)
        x1, y1, x2, y2 = xml.boxes[index].tolist()
        # imagenet2coco_vid.py: bbox = [xmin, ymin, xmax - xmin, ymax - ymin], area = w * h (no +1).
        assert ann["bbox"] == [x1, y1, x2 - x1, y2 - y1]
        assert ann["area"] == (x2 - x1) * (y2 - y1)
        assert ann["category_id"] == int(xml.labels[index]) and ann["iscrowd"] == 0
        assert ann["occluded"] is bool(xml.occluded[index]) and ann["video_id"] == img["video_id"]
        instances.setdefault(ann["instance_id"], set()).add(video)
    assert all(len(videos) == 1 for videos in instances.values())  # unique over the file
    assert len(instances) >= 3
    val = json.loads((root / "val.json").read_text())
    assert not any(i["is_vid_train_frame"] for i in val["images"])  # mmtracking asserts this in test mode


def test_read_an_mmtracking_style_file(tmp_path):
    # Global instance ids without offset, images out of order, arbitrary category ids, a WordNet id
    # as a name, an unused non-VID category, a crowd box, a box reaching past the image.
    data = {
        "categories": [
            {"id": 7, "name": "zebra"}, {"id": 3, "name": VID_WNIDS[AIRPLANE]}, {"id": 9, "name": "person"}
        ],
        "videos": [{"id": 5, "name": "val/clip"}],
        "images": [
            {"id": 11, "video_id": 5, "frame_id": 2, "file_name": "clip/2.jpg", "width": 100, "height": 50},
            {"id": 10, "video_id": 5, "frame_id": 0, "file_name": "clip/0.jpg", "width": 100, "height": 50,
             "is_vid_train_frame": True},
        ],
        "annotations": [
            {"id": 1, "image_id": 11, "category_id": 7, "instance_id": 1057, "bbox": [10, 5, 20, 15],
             "area": 300, "iscrowd": False, "occluded": True, "generated": False},
            {"id": 2, "image_id": 11, "category_id": 3, "instance_id": 1058, "bbox": [90.5, 40, 10, 10]},
            {"id": 3, "image_id": 10, "category_id": 7, "instance_id": 1057, "bbox": [1, 1, 2, 2],
             "iscrowd": 1},
            {"id": 4, "image_id": 10, "category_id": 7, "bbox": [-5, 0, 10, 49]},
        ],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    ds = read_coco_vid(path, image_root=tmp_path / "imgs")
    assert ds.classes == VID_CLASSES and ds.skipped == {"crowd": 1, "degenerate": 0}
    (video,) = ds.videos
    assert (video.name, video.id, video.image_ids, video.train_frames) == ("val/clip", 5, [10, 11], [0])
    first, second = video.frames
    assert (first.video, first.frame, second.frame, first.width, first.height) == ("val/clip", 0, 2, 100, 50)
    # x2 = x + w, then clamped as the XML loader: x1 = max(x1, 0), x2 = min(x2, W-1).
    assert first.boxes.tolist() == [[0, 0, 5, 49]] and first.track_ids.tolist() == [-1]
    assert second.boxes.tolist() == [[10, 5, 30, 20], [90.5, 40, 99, 49]]
    assert second.labels.tolist() == [ZEBRA, AIRPLANE] and second.track_ids.tolist() == [1057, 1058]
    assert second.occluded.tolist() == [True, False] and second.generated.tolist() == [False, False]
    assert ds.image_path(video, 1) == tmp_path / "imgs" / "clip" / "2.jpg"
    # Default image root: the JSON's folder.
    assert read_coco_vid(path).image_path(video, 0) == tmp_path / "clip" / "0.jpg"


def test_class_names_for_custom_datasets(tmp_path):
    data = _base()
    data["categories"] = [
        {"id": 1, "name": "drone"}, {"id": 2, "name": "bird_of_prey"}, {"id": 3, "name": "kite"}
    ]
    data["annotations"][2]["category_id"] = 3
    path = _dump(tmp_path, data)
    with pytest.raises(MegavodError) as err:
        read_coco_vid(path)
    assert str(err.value) == (
        f"{path}: categories not among the 30 ImageNet VID classes: 'drone', 'kite' "
        f"(give class_names for a custom dataset)"
    )
    for names in (["kite", "drone"], ["__background__", "kite", "drone"]):
        ds = read_coco_vid(path, class_names=names)
        assert ds.classes == ("__background__", "kite", "drone")
        assert [f.labels.tolist() for v in ds.videos for f in v.frames] == [[2], [2], [1]]
    with pytest.raises(MegavodError) as err:
        read_coco_vid(path, class_names=["drone"])
    assert str(err.value) == f"{path}: categories not in class_names: 'kite'"


def test_write_then_read_in_memory(tmp_path):
    def frame(f, boxes, labels, tracks, occluded=()):
        return FrameAnnotation(
            "cam/a", f, 80, 60, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            torch.tensor(labels, dtype=torch.int64), torch.tensor(tracks, dtype=torch.int64),
            torch.tensor(occluded or [False] * len(labels), dtype=torch.bool),
        )

    a = CocoVidVideo("cam/a", [frame(0, [[1.5, 2, 10, 20.25]], [2], [4], [True]), frame(3, [], [], []),
                               frame(4, [[0, 0, 79, 59], [5, 5, 6, 6]], [1, 2], [4, -1])], train_frames=[3])
    b = CocoVidVideo("cam/b", [FrameAnnotation("cam/b", 0, 8, 8, torch.tensor([[1.0, 1, 3, 3]]),
                                               torch.tensor([2]), torch.tensor([0]))], files=["b0.png"])
    path = tmp_path / "sub" / "w.json"
    path.parent.mkdir()
    write_coco_vid(path, [a, b], ("__background__", "cat", "dog"))
    assert [p.name for p in path.parent.iterdir()] == ["w.json"]  # no temporary file left
    data = json.loads(path.read_text())
    assert data["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    assert [v["instance_id_offset"] for v in data["videos"]] == [1, 6]  # video a uses tracks 0..4
    assert [x.get("instance_id") for x in data["annotations"]] == [5, 5, None, 6]
    assert data["annotations"][0]["bbox"] == [1.5, 2, 8.5, 18.25]
    ds = read_coco_vid(path, class_names=["cat", "dog"])
    for written, read in zip([a, b], ds.videos):
        assert read.name == written.name and read.train_frames == written.train_frames
        for x, y in zip(written.frames, read.frames):
            assert (x.video, x.frame, x.width, x.height) == (y.video, y.frame, y.width, y.height)
            for key in ("boxes", "labels", "track_ids", "occluded", "generated"):
                assert torch.equal(getattr(x, key), getattr(y, key)), key
    assert ds.videos[0].files == ["cam/a/000000.JPEG", "cam/a/000003.JPEG", "cam/a/000004.JPEG"]
    assert ds.videos[1].files == ["b0.png"]
    with pytest.raises(ValueError, match="x2 <= x1"):
        write_coco_vid(path, [CocoVidVideo("c", [frame(0, [[5, 5, 5, 9]], [1], [0])])])


def _base() -> dict:
    image = {"file_name": "x.jpg", "width": 100, "height": 50}
    return {
        "categories": [{"id": 1, "name": "airplane"}, {"id": 2, "name": "zebra"}],
        "videos": [{"id": 1, "name": "v1"}, {"id": 2, "name": "v2"}],
        "images": [
            {"id": 1, "video_id": 1, "frame_id": 0, **image},
            {"id": 2, "video_id": 1, "frame_id": 1, **image},
            {"id": 3, "video_id": 2, "frame_id": 0, **image},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "instance_id": 1, "bbox": [10, 5, 20, 15], "area": 300,
             "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 1, "instance_id": 1, "bbox": [11, 5, 20, 15]},
            {"id": 3, "image_id": 3, "category_id": 2, "instance_id": 2, "bbox": [0, 0, 5, 5]},
        ],
    }


def _dump(tmp_path: Path, data) -> Path:
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


def _set(section, index, key, value):
    def edit(d):
        d[section][index][key] = value
    return edit


def _delete(section, index, key):
    def edit(d):
        del d[section][index][key]
    return edit


def _append(section, entry):
    def edit(d):
        d[section].append(entry)
    return edit


def _case(name, edit, message):
    return pytest.param(edit, message, id=name)


MALFORMED = [
    _case("missing bbox", _delete("annotations", 1, "bbox"), "annotations[1]: missing 'bbox'"),
    _case("missing video_id", _delete("images", 0, "video_id"), "images[0]: missing 'video_id'"),
    _case("missing category name", _delete("categories", 1, "name"), "categories[1]: missing 'name'"),
    _case("missing section", lambda d: d.pop("videos"), "missing 'videos'"),
    _case("section not a list", lambda d: d.update(images={}), "'images' must be a list, got dict"),
    _case("entry not an object", lambda d: d["annotations"].__setitem__(1, 5),
          "annotations[1]: must be an object, got 5"),
    _case("negative width", _set("annotations", 0, "bbox", [10, 5, -3, 4]),
          "annotations[0]: bbox [10, 5, -3, 4] has zero or negative size (w -3, h 4)"),
    _case("zero height", _set("annotations", 2, "bbox", [1, 2, 3, 0]),
          "annotations[2]: bbox [1, 2, 3, 0] has zero or negative size (w 3, h 0)"),
    _case("bbox of 3", _set("annotations", 0, "bbox", [1, 2, 3]),
          "annotations[0]: bbox must be 4 numbers [x, y, w, h], got [1, 2, 3]"),
    _case("bbox string", _set("annotations", 0, "bbox", ["1", 2, 3, 4]),
          'annotations[0]: bbox must be 4 numbers [x, y, w, h], got ["1", 2, 3, 4]'),
    _case("box outside", _set("annotations", 0, "bbox", [120, 5, 10, 10]),
          "annotations[0]: bbox [120, 5, 10, 10] lies entirely outside the 100x50 image 1"),
    _case("unknown image", _set("annotations", 2, "image_id", 9),
          "annotations[2]: image_id 9 does not exist in images"),
    _case("unknown video", _set("images", 2, "video_id", 5),
          "images[2]: video_id 5 does not exist in videos"),
    _case("unknown category", _set("annotations", 1, "category_id", 4),
          "annotations[1]: category_id 4 does not exist in categories"),
    _case("duplicate image id", _set("images", 2, "id", 1), "images[2]: duplicate id 1 (also images[0])"),
    _case("duplicate annotation id", _set("annotations", 2, "id", 2),
          "annotations[2]: duplicate id 2 (also annotations[1])"),
    _case("duplicate video id", _set("videos", 1, "id", 1), "videos[1]: duplicate id 1 (also videos[0])"),
    _case("duplicate category id", _set("categories", 1, "id", 1),
          "categories[1]: duplicate id 1 (also categories[0])"),
    _case("duplicate video name", _set("videos", 1, "name", "v1"),
          "videos[1]: duplicate name 'v1' (also videos[0])"),
    _case("duplicate frame", _set("images", 1, "frame_id", 0),
          "images[1]: duplicate frame_id 0 in video 1 (also images[0])"),
    _case("width not a number", _set("images", 0, "width", "100"),
          'images[0]: width is not an integer: "100"'),
    _case("fractional frame", _set("images", 1, "frame_id", 1.5),
          "images[1]: frame_id is not an integer: 1.5"),
    _case("boolean id", _set("images", 0, "id", True), "images[0]: id is not an integer: true"),
    _case("area not a number", _set("annotations", 0, "area", "big"),
          'annotations[0]: area is not a number: "big"'),
    _case("empty file name", _set("images", 0, "file_name", ""),
          'images[0]: file_name must be a non-empty string, got ""'),
    _case("zero size image", _set("images", 0, "width", 0), "images[0]: width x height 0x50 is not positive"),
    _case("negative frame", _set("images", 0, "frame_id", -1), "images[0]: frame_id -1 is negative"),
    _case("bad flag", _set("annotations", 0, "occluded", "yes"),
          'annotations[0]: occluded must be true/false or 0/1, got "yes"'),
    _case("negative instance", _set("annotations", 0, "instance_id", -2),
          "annotations[0]: instance_id -2 is negative"),
    _case("instance twice in a frame",
          _append("annotations",
                  {"id": 4, "image_id": 1, "category_id": 2, "instance_id": 1, "bbox": [0, 0, 5, 5]}),
          "annotations[3]: instance_id 1 appears twice in image 1 (also annotations[0])"),
    _case("video_id disagrees with the image", _set("annotations", 2, "video_id", 1),
          "annotations[2]: video_id 1 but its image 3 is in video 2"),
    _case("instance below offset", _set("videos", 1, "instance_id_offset", 5),
          "annotations[2]: instance_id 2 is below its video's instance_id_offset 5"),
]


@pytest.mark.parametrize("edit, message", MALFORMED)
def test_malformed_input_is_one_line_naming_file_and_entry(tmp_path, edit, message):
    data = _base()
    edit(data)
    path = _dump(tmp_path, data)
    with pytest.raises(MegavodError) as err:
        read_coco_vid(path)
    assert str(err.value) == f"{path}: {message}"


def test_malformed_file_level(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"videos": [}')
    with pytest.raises(MegavodError, match=r"bad.json: not valid JSON \(line 1 column 13: "):
        read_coco_vid(path)
    path.write_text("[]")
    with pytest.raises(MegavodError, match="the top level must be an object"):
        read_coco_vid(path)
    with pytest.raises(MegavodError, match="missing.json: cannot read COCO-VID file"):
        read_coco_vid(tmp_path / "missing.json")


def test_degenerate_boxes_can_be_skipped_as_mmdet_does(tmp_path):
    data = _base()
    data["annotations"][1]["bbox"] = [11, 5, 0, 15]
    ds = read_coco_vid(_dump(tmp_path, data), skip_degenerate=True)
    assert ds.skipped["degenerate"] == 1 and [len(f) for f in ds.annotations()] == [1, 0, 1]


def _custom_coco(tmp_path: Path) -> Path:
    """PNG frames with frame ids 1, 3, 5 of a video named without a split, and a video without images."""
    (tmp_path / "imgs").mkdir()
    images, annotations = [], []
    for k, frame_id in enumerate((5, 1, 3)):
        Image.new("RGB", (40, 30), (10 * k, 100, 200)).save(tmp_path / "imgs" / f"f{frame_id}.png")
        images.append({"id": k + 1, "video_id": 1, "frame_id": frame_id, "file_name": f"f{frame_id}.png",
                       "width": 40, "height": 30})
        annotations.append({"id": k + 1, "image_id": k + 1, "category_id": 1, "instance_id": 9,
                            "bbox": [frame_id, 2, 10, 12]})
    data = {"categories": [{"id": 1, "name": "bird"}], "images": images, "annotations": annotations,
            "videos": [{"id": 1, "name": "cam1/clip"}, {"id": 2, "name": "e"}]}
    return _dump(tmp_path, data)


def test_custom_png_video_to_layout(tmp_path):
    path = _custom_coco(tmp_path)
    out = tmp_path / "out"
    stats = coco_to_vid_layout(path, tmp_path / "imgs", out, split="val")
    assert (stats.videos, stats.images, stats.annotations) == (1, 3, 3)
    assert (stats.reencoded, stats.skipped_videos) == (3, 1)
    video = "val/cam1/clip"
    for new, old in enumerate((1, 3, 5)):  # renumbered 0..n-1 in frame_id order
        with Image.open(out / "Data" / "VID" / video / f"{new:06d}.JPEG") as im:
            assert (im.format, im.size) == ("JPEG", (40, 30))
        ann = read_annotation(out / "Annotations" / "VID" / video / f"{new:06d}.xml", video, new)
        assert ann.boxes.tolist() == [[old, 2, old + 10, 14]] and ann.track_ids.tolist() == [9]
        assert ann.labels.tolist() == [VID_CLASSES.index("bird")]
    assert (out / "ImageSets" / "VID_val_videos.txt").read_text() == "".join(
        f"{video} {t + 1} {t} 3\n" for t in range(3))
    assert (out / "ImageSets" / "VID_val_frames.txt").read_text() == "".join(
        f"{video}/{t:06d} {t + 1}\n" for t in range(3))
    # Converting again into the same folder is refused, naming what is in the way.
    with pytest.raises(MegavodError, match=r"Data/VID/val/cam1/clip: already exists"):
        coco_to_vid_layout(path, tmp_path / "imgs", out, split="val")


def test_layout_conversion_refuses_bad_images_and_names(tmp_path):
    path = _custom_coco(tmp_path)
    Image.new("RGB", (41, 30)).save(tmp_path / "imgs" / "f3.png")
    with pytest.raises(MegavodError) as err:
        coco_to_vid_layout(path, tmp_path / "imgs", tmp_path / "out1", split="train")
    assert str(err.value) == (
        f"{path}: image id 3 ('f3.png'): the file {tmp_path / 'imgs' / 'f3.png'} is 41x30 but width x height "
        f"say 40x30"
    )
    (tmp_path / "imgs" / "f3.png").unlink()
    with pytest.raises(MegavodError, match=r"image id 3 \('f3.png'\): image file not found"):
        coco_to_vid_layout(path, tmp_path / "imgs", tmp_path / "out2", split="train")
    data = json.loads(path.read_text())
    data["videos"][0]["name"] = "my clip"
    bad = _dump(tmp_path, data)
    with pytest.raises(MegavodError, match=r"video 'my clip' \(id 1\): the name cannot be a folder"):
        coco_to_vid_layout(bad, tmp_path / "imgs", tmp_path / "out3", split="train")
    assert not (tmp_path / "out3").exists()  # checked before anything is written
    with pytest.raises(MegavodError, match="split must be 'train' or 'val'"):
        coco_to_vid_layout(path, tmp_path / "imgs", tmp_path / "out4", split="test")


def test_layout_to_coco_frame_lists_and_zero_width_boxes(converted, tmp_path):
    _, syn, _, _ = converted
    # VID_val_frames (2 columns) converts only the listed frames; no mark of training frames.
    lines = (syn / "ImageSets" / "VID_val_frames.txt").read_text().splitlines()
    data_dir = tmp_path / "d"
    (data_dir / "ImageSets").mkdir(parents=True)
    (data_dir / "Annotations").symlink_to(syn / "Annotations")
    (data_dir / "ImageSets" / "few.txt").write_text("\n".join(lines[5:1:-2]) + "\n")
    stats = vid_layout_to_coco(data_dir, "few", tmp_path / "few.json")
    ds = read_coco_vid(tmp_path / "few.json")
    assert [f.frame for f in ds.videos[0].frames] == [3, 5] and ds.videos[0].train_frames == []
    assert stats.images == 2
    # A box with xmax == xmin is a 1-pixel box to the XML but w = 0 to COCO-VID: left out, counted.
    own = tmp_path / "own" / "Annotations" / "VID" / "val" / "v"
    own.mkdir(parents=True)
    (own / "000000.xml").write_text(
        "<annotation><size><width>20</width><height>10</height></size>"
        f"<object><trackid>0</trackid><name>{VID_WNIDS[1]}</name><bndbox><xmin>4</xmin><ymin>1</ymin>"
        "<xmax>4</xmax><ymax>5</ymax></bndbox></object></annotation>")
    (tmp_path / "own" / "ImageSets").mkdir()
    (tmp_path / "own" / "ImageSets" / "VID_val_videos.txt").write_text("val/v 1 0 1\n")
    stats = vid_layout_to_coco(tmp_path / "own", "VID_val_videos", tmp_path / "new" / "own.json")
    assert (stats.images, stats.annotations, stats.skipped_boxes) == (1, 0, 1)
    with pytest.raises(MegavodError, match="DET image sets hold still images"):
        vid_layout_to_coco(syn, "DET_train_30classes", tmp_path / "det.json")
    still = "train/ILSVRC2014_train_0000/ILSVRC2014_train_00000000"
    (data_dir / "ImageSets" / "stills.txt").write_text(f"{still} 1\n")
    with pytest.raises(MegavodError, match="is not a video frame path <video>/<frame number>"):
        vid_layout_to_coco(data_dir, "stills", tmp_path / "s.json")
