"""Read and write ILSVRC VID/DET XML annotations (docs/conventions.md#annotations-and-classes).

One XML per image::

    <annotation>
      <folder>ILSVRC2015_VID_train_0000/ILSVRC2015_train_00000000</folder>
      <filename>000000</filename>
      <source><database>ILSVRC_2015</database></source>
      <size><width>1280</width><height>720</height></size>
      <object>
        <trackid>0</trackid>            (VID only)
        <name>n01674464</name>          (WordNet id)
        <bndbox><xmax>1050</xmax><xmin>271</xmin><ymax>671</ymax><ymin>196</ymin></bndbox>
        <occluded>0</occluded>          (VID only)
        <generated>0</generated>        (VID only)
      </object>
    </annotation>

Reading follows the authors' loader: boxes are floats clamped to the image (x1 = max(x1, 0),
y1 = max(y1, 0), x2 = min(x2, W-1), y2 = min(y2, H-1), no -1 shift), and objects whose WordNet id is
not one of the 30 VID classes are skipped (DET XMLs carry 200 classes). Unlike the authors' loader,
which would crash or silently keep garbage, malformed input raises :class:`MegavodError` with one line
naming the file and the field. The decisions where the authors' code is silent:

* ``name`` matching ``n`` + 8 digits but outside the 30 classes: skipped, and not validated further
  (the authors never look at it). Any other ``name`` is an error: it is not a WordNet id at all.
* ``xmax < xmin`` or ``ymax < ymin``: error (a zero-width box, ``xmax == xmin``, is a legal 1-pixel
  box under the +1 convention and is kept).
* A box entirely outside the image (nothing left after clamping): error.
* ``trackid`` absent (DET): -1. ``occluded`` / ``generated`` absent: 0.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from megavod.atomic import atomic_write_bytes
from megavod.data.classes import WNID_TO_LABEL, VID_WNIDS
from megavod.errors import MegavodError, first_line
from megavod.structures import FrameAnnotation

_WNID = re.compile(r"n\d{8}")
_BOX_FIELDS = ("xmin", "ymin", "xmax", "ymax")


def _text(elem: ET.Element, tag: str) -> str | None:
    child = elem.find(tag)
    if child is None or child.text is None or not child.text.strip():
        return None
    return child.text.strip()


def _number(path: Path, elem: ET.Element, tag: str, where: str, default: float | None = None) -> float:
    text = _text(elem, tag)
    if text is None:
        if default is not None:
            return default
        raise MegavodError(f"{path}: missing {where}{tag}")
    try:
        value = float(text)
    except ValueError:
        raise MegavodError(f"{path}: {where}{tag} is not a number: {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise MegavodError(f"{path}: {where}{tag} is not a finite number: {text!r}")
    return value


def _integer(path: Path, elem: ET.Element, tag: str, where: str, default: int | None = None) -> int:
    value = _number(path, elem, tag, where, None if default is None else float(default))
    if not value.is_integer():
        raise MegavodError(f"{path}: {where}{tag} is not an integer: {_text(elem, tag)!r}")
    if not -(2.0**63) <= value < 2.0**63:  # sizes and track ids go into int64 tensors
        raise MegavodError(f"{path}: {where}{tag} is out of range: {_text(elem, tag)!r}")
    return int(value)


def read_annotation(xml_path: str | Path, video: str, frame: int) -> FrameAnnotation:
    """Parse one ILSVRC XML into a :class:`FrameAnnotation` (docs/conventions.md#annotations-and-classes).

    ``video`` and ``frame`` are stored as given (the XML's ``folder``/``filename`` are not trusted for
    identity, as in the authors' loader, which keys everything by the image-set line).
    """
    path = Path(xml_path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MegavodError(f"{path}: cannot read annotation ({exc.strerror or exc})") from None
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise MegavodError(f"{path}: not valid XML ({exc})") from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. RecursionError, an encoding the parser cannot handle
        raise MegavodError(f"{path}: not valid XML ({type(exc).__name__}: {first_line(exc)})") from None
    try:
        return _read_root(path, root, video, frame)
    except (MegavodError, MemoryError):  # MemoryError: the machine's, not the file's
        raise
    except Exception as exc:  # noqa: BLE001 - content none of the checks foresaw is still the file's fault
        raise MegavodError(f"{path}: malformed annotation ({type(exc).__name__}: {first_line(exc)})") from None



def _read_root(path: Path, root: ET.Element, video: str, frame: int) -> FrameAnnotation:
    """The body of :func:`read_annotation`: the parsed XML's fields."""
    if root.tag != "annotation":
        raise MegavodError(f"{path}: root element is <{root.tag}>, expected <annotation>")
    size = root.find("size")
    if size is None:
        raise MegavodError(f"{path}: missing size")
    width = _integer(path, size, "width", "size/")
    height = _integer(path, size, "height", "size/")
    if width <= 0 or height <= 0:
        raise MegavodError(f"{path}: size {width}x{height} is not positive")

    boxes, labels, track_ids, occluded, generated = [], [], [], [], []
    for index, obj in enumerate(root.findall("object"), start=1):
        where = f"object {index} "
        name = _text(obj, "name")
        if name is None:
            raise MegavodError(f"{path}: missing {where}name")
        if not _WNID.fullmatch(name):
            raise MegavodError(f"{path}: {where}name {name!r} is not a WordNet id (n + 8 digits)")
        label = WNID_TO_LABEL.get(name)
        if label is None:
            continue  # one of the other DET classes: the authors skip it
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise MegavodError(f"{path}: missing {where}bndbox")
        x1, y1, x2, y2 = (_number(path, bndbox, tag, where + "bndbox/") for tag in _BOX_FIELDS)
        if x2 < x1 or y2 < y1:
            raise MegavodError(
                f"{path}: {where}bndbox is inverted (xmin {x1:g}, ymin {y1:g}, xmax {x2:g}, ymax {y2:g})"
            )
        if x2 < 0 or y2 < 0 or x1 > width - 1 or y1 > height - 1:
            raise MegavodError(
                f"{path}: {where}bndbox ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies entirely outside "
                f"the {width}x{height} image"
            )
        boxes.append([max(x1, 0.0), max(y1, 0.0), min(x2, width - 1.0), min(y2, height - 1.0)])
        labels.append(label)
        track_ids.append(_integer(path, obj, "trackid", where, default=-1))
        occluded.append(_integer(path, obj, "occluded", where, default=0) != 0)
        generated.append(_integer(path, obj, "generated", where, default=0) != 0)

    return FrameAnnotation(
        video=video,
        frame=int(frame),
        width=width,
        height=height,
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        labels=torch.tensor(labels, dtype=torch.int64),
        track_ids=torch.tensor(track_ids, dtype=torch.int64),
        occluded=torch.tensor(occluded, dtype=torch.bool),
        generated=torch.tensor(generated, dtype=torch.bool),
    )


def _fmt(value: float) -> str:
    # Real ILSVRC files hold integer pixels; keep that look and only fall back to a float when needed.
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _sub(parent: ET.Element, tag: str, text: str | None = None) -> ET.Element:
    elem = ET.SubElement(parent, tag)
    if text is not None:
        elem.text = text
    return elem


def annotation_to_xml(
    ann: FrameAnnotation, folder: str, filename: str, database: str | None = "ILSVRC_2015"
) -> bytes:
    """Serialise ``ann`` as ILSVRC XML bytes (see :func:`write_annotation`)."""
    root = ET.Element("annotation")
    _sub(root, "folder", folder)
    _sub(root, "filename", filename)
    if database is not None:
        _sub(_sub(root, "source"), "database", database)
    size = _sub(root, "size")
    _sub(size, "width", str(int(ann.width)))
    _sub(size, "height", str(int(ann.height)))
    boxes = ann.boxes.tolist()
    for i, label in enumerate(ann.labels.tolist()):
        if not 1 <= label < len(VID_WNIDS):
            raise ValueError(f"ann.labels[{i}] = {label} is not a VID class (1..{len(VID_WNIDS) - 1})")
        obj = _sub(root, "object")
        track_id = int(ann.track_ids[i])
        # VID objects carry trackid/occluded/generated; DET objects (trackid -1) carry neither.
        if track_id >= 0:
            _sub(obj, "trackid", str(track_id))
        _sub(obj, "name", VID_WNIDS[label])
        bndbox = _sub(obj, "bndbox")
        x1, y1, x2, y2 = boxes[i]
        # ILSVRC files list xmax, xmin, ymax, ymin in this order.
        for tag, value in (("xmax", x2), ("xmin", x1), ("ymax", y2), ("ymin", y1)):
            _sub(bndbox, tag, _fmt(value))
        if track_id >= 0:
            _sub(obj, "occluded", str(int(bool(ann.occluded[i]))))
            _sub(obj, "generated", str(int(bool(ann.generated[i]))))
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="utf-8") + b"\n"


def write_annotation(
    xml_path: str | Path,
    ann: FrameAnnotation,
    folder: str,
    filename: str,
    database: str | None = "ILSVRC_2015",
) -> None:
    """Write ``ann`` as an ILSVRC XML file (atomic: temporary file + rename).

    ``folder`` and ``filename`` are the XML fields (ILSVRC uses the video directory and the frame
    number without extension, e.g. ``000000``). Boxes are written as they are (integers when
    integral), labels as WordNet ids. Objects with ``track_id >= 0`` are written VID-style, with
    ``trackid``, ``occluded`` and ``generated``; objects with track id -1 DET-style, without them.
    """
    atomic_write_bytes(xml_path, annotation_to_xml(ann, folder, filename, database))
