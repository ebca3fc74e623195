"""ILSVRC XML annotations (megavod/data/vid_xml.py) and image-set lists (megavod/data/image_sets.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megavod.data.classes import VID_WNIDS, WNID_TO_LABEL
from megavod.data.image_sets import ImageSetEntry, read_image_set, train_15_frames, write_image_set
from megavod.data.vid_xml import read_annotation, write_annotation
from megavod.errors import MegavodError
from megavod.structures import FrameAnnotation

ZEBRA, LIZARD = "n02391049", "n01674464"


def _xml(objects: str, size: str = "<width>100</width><height>50</height>") -> str:
    return (
        "<annotation><folder>ILSVRC2015_val_00000000</folder><filename>000000</filename>"
        f"<size>{size}</size>{objects}</annotation>"
    )


def _obj(name: str = ZEBRA, box=(10, 5, 30, 20), extra: str = "<trackid>3</trackid>") -> str:
    x1, y1, x2, y2 = box
    return (
        f"<object>{extra}<name>{name}</name><bndbox><xmax>{x2}</xmax><xmin>{x1}</xmin>"
        f"<ymax>{y2}</ymax><ymin>{y1}</ymin></bndbox><occluded>1</occluded><generated>0</generated></object>"
    )


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "000000.xml"
    path.write_text(text)
    return path


def test_read_fields_and_clamping(tmp_path):
    path = _write(tmp_path, _xml(_obj() + _obj(LIZARD, (-4, -2, 120, 70), extra="")))
    ann = read_annotation(path, "val/ILSVRC2015_val_00000000", 7)
    assert (ann.video, ann.frame, ann.width, ann.height) == ("val/ILSVRC2015_val_00000000", 7, 100, 50)
    # docs/conventions.md#annotations-and-classes: x1 = max(x1, 0), y1 = max(y1, 0), x2 = min(x2, W-1),
    # y2 = min(y2, H-1), no -1 shift.
    assert ann.boxes.tolist() == [[10, 5, 30, 20], [0, 0, 99, 49]]
    assert ann.boxes.dtype == torch.float32
    assert ann.labels.tolist() == [30, 17]  # zebra, lizard
    assert ann.track_ids.tolist() == [3, -1]  # trackid missing -> -1
    assert ann.occluded.tolist() == [True, True] and ann.generated.tolist() == [False, False]


def test_other_imagenet_classes_are_skipped_unvalidated(tmp_path):
    # n00000001 is a WordNet-style id outside the 30 classes: skipped like the authors do, even with
    # a box that would otherwise be an error.
    path = _write(tmp_path, _xml(_obj("n00000001", (50, 5, 10, "abc")) + _obj()))
    ann = read_annotation(path, "v", 0)
    assert ann.labels.tolist() == [30]
    empty = read_annotation(_write(tmp_path, _xml("")), "v", 0)
    assert len(empty) == 0 and empty.boxes.shape == (0, 4)


def test_write_read_round_trip(tmp_path):
    ann = FrameAnnotation(
        video="train/a/b", frame=4, width=64, height=48,
        boxes=torch.tensor([[1, 2, 30, 40], [0, 0, 63, 46.5]]),
        labels=torch.tensor([1, 30]), track_ids=torch.tensor([0, 5]),
        occluded=torch.tensor([True, False]), generated=torch.tensor([False, True]),
    )
    path = tmp_path / "x.xml"
    write_annotation(path, ann, "a/b", "000004")
    text = path.read_text()
    assert "<folder>a/b</folder>" in text and "<filename>000004</filename>" in text
    assert f"<name>{VID_WNIDS[1]}</name>" in text and "<ymax>46.5</ymax>" in text
    back = read_annotation(path, "train/a/b", 4)
    for key in ("boxes", "labels", "track_ids", "occluded", "generated"):
        assert torch.equal(getattr(back, key), getattr(ann, key)), key
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temporary file

    det = FrameAnnotation("train/x", 0, 64, 48, torch.tensor([[1.0, 2, 3, 4]]), torch.tensor([7]),
                          torch.tensor([-1]))
    write_annotation(path, det, "x", "y", database="ILSVRC_2014")
    text = path.read_text()
    assert "trackid" not in text and "occluded" not in text and "ILSVRC_2014" in text
    assert read_annotation(path, "train/x", 0).track_ids.tolist() == [-1]


BAD_CASES = {
    "not_xml": ("<annotation><size>", "{p}: not valid XML (no element found: line 1, column 18)"),
    "root": ("<foo/>", "{p}: root element is <foo>, expected <annotation>"),
    "no_size": ("<annotation/>", "{p}: missing size"),
    "no_width": (_xml("", "<height>50</height>"), "{p}: missing size/width"),
    "bad_width": (_xml("", "<width>wide</width><height>50</height>"), "{p}: size/width is not a number: 'wide'"),
    "coord": (_xml(_obj(box=(10, 5, "3O", 20))), "{p}: object 1 bndbox/xmax is not a number: '3O'"),
    "inverted": (
        _xml(_obj() + _obj(box=(30, 5, 10, 20))),
        "{p}: object 2 bndbox is inverted (xmin 30, ymin 5, xmax 10, ymax 20)",
    ),
    "outside": (
        _xml(_obj(box=(100, 5, 130, 20))),
        "{p}: object 1 bndbox (100, 5, 130, 20) lies entirely outside the 100x50 image",
    ),
    "outside_neg": (
        _xml(_obj(box=(10, -30, 30, -1))),
        "{p}: object 1 bndbox (10, -30, 30, -1) lies entirely outside the 100x50 image",
    ),
    "wnid": (_xml(_obj("zebra")), "{p}: object 1 name 'zebra' is not a WordNet id (n + 8 digits)"),
    "no_name": (_xml("<object><bndbox/></object>"), "{p}: missing object 1 name"),
    "no_bndbox": (_xml(f"<object><name>{ZEBRA}</name></object>"), "{p}: missing object 1 bndbox"),
    "no_coord": (
        _xml(f"<object><name>{ZEBRA}</name><bndbox><xmin>1</xmin></bndbox></object>"),
        "{p}: missing object 1 bndbox/ymin",
    ),
    "trackid": (_xml(_obj(extra="<trackid>1.5</trackid>")), "{p}: object 1 trackid is not an integer: '1.5'"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_malformed_xml_gives_one_line_naming_file_and_field(tmp_path, case):
    text, expected = BAD_CASES[case]
    path = _write(tmp_path, text)
    with pytest.raises(MegavodError) as info:
        read_annotation(path, "v", 0)
    assert str(info.value) == expected.format(p=path)


def test_missing_file(tmp_path):
    with pytest.raises(MegavodError, match=r"nope\.xml: cannot read annotation"):
        read_annotation(tmp_path / "nope.xml", "v", 0)


def test_write_rejects_background_label(tmp_path):
    ann = FrameAnnotation("v", 0, 8, 8, torch.zeros(1, 4), torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="labels"):
        write_annotation(tmp_path / "x.xml", ann, "f", "0")
    assert WNID_TO_LABEL[ZEBRA] == 30


# ---------------------------------------------------------------------------------------------
# Image sets (docs/conventions.md#image-set-files)


def test_image_set_round_trip_both_formats(tmp_path):
    four = [ImageSetEntry("train/a/v0", f, 300, 1) for f in train_15_frames(300)]
    two = [ImageSetEntry("val/v1/000000", None, None, 1), ImageSetEntry("val/v1/000001", None, None, 2)]
    for name, entries in (("four.txt", four), ("two.txt", two)):
        write_image_set(tmp_path / name, entries)
        assert read_image_set(tmp_path / name) == entries
    assert (tmp_path / "four.txt").read_text().splitlines()[0] == "train/a/v0 1 10 300"
    assert (tmp_path / "two.txt").read_text() == "val/v1/000000 1\nval/v1/000001 2\n"
    assert four[1].image_id == "train/a/v0/000030" and two[0].image_id == "val/v1/000000"
    with pytest.raises(ValueError, match="mix"):
        write_image_set(tmp_path / "mixed.txt", four[:1] + two[:1])


@pytest.mark.parametrize(
    "text, message",
    [
        ("a 1 0 5\nb 1 0\n", "{p}:line 2: 3 columns, but the first line has 4"),
        ("a 1 2\n", "{p}:line 1: 3 columns, expected 2 (<relpath> <n>) or 4 (<video_dir> <n> <frame_no> <video_len>)"),
        ("a 1\nb x\n", "{p}:line 2: column 2 'x' is not an integer"),
        ("a 1 0 5\n\na 1 two 5\n", "{p}:line 3: frame number 'two' is not an integer"),
        ("a 1 0 5\na 1 0 5.0\n", "{p}:line 2: video length '5.0' is not an integer"),
        ("a 1 5 5\n", "{p}:line 1: frame 5 outside the video's 0..4"),
        ("\n\n", "{p}: empty image set"),
    ],
)
def test_image_set_errors(tmp_path, text, message):
    path = tmp_path / "set.txt"
    path.write_text(text)
    with pytest.raises(MegavodError) as info:
        read_image_set(path)
    assert str(info.value) == message.format(p=path)


def test_image_set_must_exist(tmp_path):
    root = tmp_path / "Data" / "VID"
    (root / "val" / "v").mkdir(parents=True)
    (root / "val" / "v" / "000000.JPEG").write_bytes(b"")
    path = tmp_path / "set.txt"
    path.write_text("val/v 1 0 2\nval/v 2 1 2\n")
    with pytest.raises(MegavodError) as info:
        read_image_set(path, must_exist_root=root)
    assert str(info.value) == f"{path}:line 2: missing image {root / 'val/v/000001.JPEG'}"
    (root / "val" / "v" / "000001.JPEG").write_bytes(b"")
    assert len(read_image_set(path, must_exist_root=root)) == 2


def test_train_15_frames():
    assert train_15_frames(300) == list(range(10, 300, 20))  # 10, 30, ..., 290 as in the authors' list
    assert train_15_frames(1) == [0] and train_15_frames(14) == list(range(14))
    assert train_15_frames(15) == list(range(15))
    for length in (16, 31, 100, 467):
        frames = train_15_frames(length)
        assert len(frames) == 15 and len(set(frames)) == 15
        assert frames == sorted(frames) and 0 <= frames[0] and frames[-1] < length
        assert frames[7] == length * 15 // 30  # the middle one is the video's middle frame
