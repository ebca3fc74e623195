"""The authors' image-set list files (``ImageSets/*.txt``, docs/conventions.md#image-set-files).

Two line formats; the column count of the **first** line decides the format of the whole file, as in
``VIDDataset.__init__``:

* 2 columns ``<relpath> <n>`` (``DET_train_30classes.txt``, ``VID_val_frames.txt``): ``relpath`` is
  the image path relative to ``Data/DET`` or ``Data/VID`` without extension; ``n`` is unused by the
  authors (a running index in their val lists).
* 4 columns ``<video_dir> <n> <frame_no> <video_len>`` (``VID_train_15frames.txt``,
  ``VID_val_videos.txt``): the image is ``<video_dir>/%06d`` % frame_no; ``n`` is unused (always 1 in
  the train list, a running index in the val list).

Lines are split on whitespace and blank lines are skipped (the authors split on single spaces and
would crash on either; we are lenient there and strict on everything else).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from megavod.atomic import atomic_write_bytes
from megavod.errors import MegavodError

IMAGE_EXT = ".JPEG"


@dataclass(frozen=True)
class ImageSetEntry:
    """One line of an image-set file.

    ``frame`` and ``video_len`` are ``None`` for 2-column lines; ``n`` is the unused second column,
    kept so that a file reads and writes back unchanged.
    """

    path: str
    frame: int | None
    video_len: int | None
    n: int = 1

    @property
    def is_video(self) -> bool:
        return self.frame is not None

    @property
    def image_id(self) -> str:
        """The image path relative to the image folder, without extension (``train/.../000010``)."""
        return self.path if self.frame is None else f"{self.path}/{self.frame:06d}"

    def to_line(self) -> str:
        if self.frame is None:
            return f"{self.path} {self.n}"
        return f"{self.path} {self.n} {self.frame} {self.video_len}"


def _int(path: Path, line_no: int, text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise MegavodError(f"{path}:line {line_no}: {what} {text!r} is not an integer") from None


def read_image_set(path: str | Path, must_exist_root: str | Path | None = None) -> list[ImageSetEntry]:
    """Read an image-set file (docs/conventions.md#image-set-files).

    ``must_exist_root``, if given, is the image folder (``Data/VID`` or ``Data/DET``): every line's
    image ``<root>/<image_id>.JPEG`` must exist, else the error names the line and the missing file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MegavodError(f"{path}: cannot read image set ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise MegavodError(f"{path}: not a UTF-8 text file") from None
    root = None if must_exist_root is None else Path(must_exist_root)
    columns = None
    entries: list[ImageSetEntry] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if columns is None:
            if len(fields) not in (2, 4):
                raise MegavodError(
                    f"{path}:line {line_no}: {len(fields)} columns, expected 2 (<relpath> <n>) "
                    f"or 4 (<video_dir> <n> <frame_no> <video_len>)"
                )
            columns = len(fields)
        elif len(fields) != columns:
            raise MegavodError(
                f"{path}:line {line_no}: {len(fields)} columns, but the first line has {columns}"
            )
        n = _int(path, line_no, fields[1], "column 2")
        if columns == 2:
            entry = ImageSetEntry(fields[0], None, None, n)
        else:
            frame = _int(path, line_no, fields[2], "frame number")
            video_len = _int(path, line_no, fields[3], "video length")
            if video_len < 1 or not 0 <= frame < video_len:
                raise MegavodError(
                    f"{path}:line {line_no}: frame {frame} outside the video's 0..{video_len - 1}"
                )
            entry = ImageSetEntry(fields[0], frame, video_len, n)
        if root is not None:
            image = root / (entry.image_id + IMAGE_EXT)
            try:
                found = image.is_file()
            except (OSError, ValueError) as exc:  # a name the file system refuses, e.g. too long
                raise MegavodError(f"{path}:line {line_no}: not a usable image path ({getattr(exc, 'strerror', None) or exc})") from None
            if not found:
                raise MegavodError(f"{path}:line {line_no}: missing image {image}")
        entries.append(entry)
    if not entries:
        raise MegavodError(f"{path}: empty image set")
    return entries


def write_image_set(path: str | Path, entries: Iterable[ImageSetEntry]) -> None:
    """Write ``entries`` in the authors' format (atomic). All must be 2-column or all 4-column."""
    entries = list(entries)
    if not entries:
        raise ValueError("write_image_set: entries is empty")
    kinds = {e.is_video for e in entries}
    if len(kinds) != 1:
        raise ValueError("write_image_set: entries mix 2-column (frame None) and 4-column lines")
    for e in entries:
        if any(c.isspace() for c in e.path) or not e.path:
            raise ValueError(f"write_image_set: path {e.path!r} is empty or contains whitespace")
    atomic_write_bytes(path, "".join(e.to_line() + "\n" for e in entries).encode("utf-8"))


def train_15_frames(video_len: int) -> list[int]:
    """The 15 frames per video of ``VID_train_15frames.txt``: floor(L·(2i+1)/30), i = 0..14.

    L = 300 gives 10, 30, ..., 290. Videos shorter than 15 frames list every frame.
    """
    if video_len < 1:
        raise ValueError(f"video_len must be >= 1, got {video_len}")
    if video_len < 15:
        return list(range(video_len))
    return [video_len * (2 * i + 1) // 30 for i in range(15)]
