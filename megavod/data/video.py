"""Reading videos: files, frame folders and live streams, sequentially or by random access.

``open_source`` returns a :class:`FrameSource` that yields RGB ``uint8`` frames ``[H, W, 3]`` in order.
Decoding uses PyAV (FFmpeg) rather than OpenCV because OpenCV hides broken input (a missing or corrupt file
reads as "no frames" with no reason), and torchvision no longer decodes video.

Online inference iterates a source: frames are decoded packet by packet, so a stream hands over frame k
before frame k+1 is read. Offline inference (MEGA's global pool samples the whole video) wraps it in
:class:`RandomAccessFrames`, which decodes each frame once, keeps the most recent ones in an LRU cache and
spills the others to a private temp directory instead of holding a long video in RAM.

Every problem with the user's input is a one-line :class:`~megavod.errors.MegavodError` naming the file;
a truncated or damaged video decodes what it can and logs one warning with the number of frames decoded.
Writing and drawing live in :mod:`megavod.data.video_writer` and are re-exported here.
"""

from __future__ import annotations

import logging
import operator
import shutil
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
from PIL import Image

from megavod.data.video_writer import (  # noqa: F401  (re-exported: one import site for video I/O)
    PALETTE,
    VideoWriter,
    draw_detections,
    write_annotated_video,
    write_video,
)
from megavod.errors import MegavodError

__all__ = [
    "IMAGE_SUFFIXES",
    "FrameSource",
    "VideoSource",
    "FrameFolderSource",
    "RandomAccessFrames",
    "open_source",
    "list_frame_files",
    "write_video",
    "VideoWriter",
    "draw_detections",
    "write_annotated_video",
    "PALETTE",
]

logger = logging.getLogger(__name__)

DEFAULT_FPS = 25.0
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


def _reason(err: BaseException) -> str:
    """FFmpeg's own words for an error, without the errno and file name PyAV wraps around them."""
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return " ".join(str(text).split())


# What PyAV raises for bad data, caught while opening, probing and decoding (and nothing broader, so a
# programming error still shows its traceback). Every failure inside FFmpeg is an av.error.FFmpegError
# whose subclasses also subclass the builtins (https://pyav.basswood-io.com/docs/stable/api/error.html):
# av.error.InvalidDataError is a ValueError, av.error.EOFError an EOFError, and av.error.MemoryError
# ("Cannot allocate memory") a MemoryError -- which a damaged MP4 index gives when a flipped byte makes
# the stts entry count or the stsd sample entry size huge (tests/test_fuzz_readers.py): the file's fault.
_AV_ERRORS = (av.error.FFmpegError,)
# VideoFrame.to_ndarray adds PyAV's own ValueError for a pixel format or colour setting it cannot
# convert (av/video/frame.py, to_ndarray; av/video/reformatter.py).
_CONVERT_ERRORS = (av.error.FFmpegError, ValueError)


def _is_stream(spec: str) -> bool:
    # A capture device or pipe under /dev is a stream; a regular file there (/dev/shm/clip.mp4) is not.
    return "://" in spec or (spec.startswith("/dev/") and not Path(spec).is_file())


class FrameSource:
    """Frames of one video in order, each an RGB ``uint8`` array ``[H, W, 3]``.

    Attributes: ``name`` (file stem, folder name, or the stream address), ``fps`` (25 when unknown),
    ``num_frames`` (``None`` when unknown: streams, containers without a frame count), ``width``,
    ``height`` (of the first frame) and ``is_stream``. Use as a context manager or call :meth:`close`.
    """

    name: str
    fps: float
    num_frames: int | None
    width: int
    height: int
    is_stream: bool = False

    def __iter__(self) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the file or connection; safe to call twice."""

    def __enter__(self) -> "FrameSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, {self.width}x{self.height}, fps={self.fps:g}, "
            f"num_frames={self.num_frames})"
        )


def list_frame_files(folder: str | Path) -> list[Path]:
    """Image files of ``folder`` in frame order.

    Stems that are all digits (ImageNet VID's ``%06d.JPEG``) sort numerically, so ``2.jpg`` comes before
    ``10.jpg``; otherwise names sort lexicographically. Hidden files, sub-folders and non-image files are
    ignored; suffixes match case-insensitively (``.JPEG``, ``.jpg``, ``.png``, ...).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MegavodError(f"{folder}: not a folder")
    files = [
        p for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    ]
    if files and all(p.stem.isdigit() for p in files):
        files.sort(key=lambda p: (int(p.stem), p.name))
        for a, b in zip(files, files[1:]):
            if int(a.stem) == int(b.stem):
                raise MegavodError(f"{folder}: {a.name} and {b.name} have the same frame number")
        return files
    return sorted(files, key=lambda p: p.name)


def _read_image(path: Path) -> np.ndarray:
    # No EXIF transpose: ILSVRC boxes refer to the stored pixel layout, as in the authors' PIL loader.
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except MemoryError:  # a machine out of memory is no damaged file (MemoryError is an Exception too)
        raise
    except Exception as err:  # noqa: BLE001 - PIL reports damaged images through many types (SyntaxError, struct.error, ...)
        raise MegavodError(f"{path}: cannot read image ({_reason(err)})") from None


class FrameFolderSource(FrameSource):
    """A folder of frame images (ImageNet VID ``%06d.JPEG`` or any image names), read on demand."""

    def __init__(self, folder: str | Path, fps: float = DEFAULT_FPS) -> None:
        self.folder = Path(folder)
        self.files = list_frame_files(self.folder)
        if not self.files:
            suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
            raise MegavodError(f"{self.folder}: no image files in folder (looked for {suffixes})")
        self.name = self.folder.resolve().name or str(self.folder)
        self.fps = float(fps)
        self.num_frames = len(self.files)
        first = _read_image(self.files[0])
        self.height, self.width = first.shape[:2]

    def read_frame(self, index: int) -> np.ndarray:
        """Frame ``index`` (``IndexError`` out of range); every frame must share the first one's size."""
        frame = _read_image(self.files[index])
        if frame.shape[:2] != (self.height, self.width):
            raise MegavodError(
                f"{self.files[index]}: frame is {frame.shape[1]}x{frame.shape[0]} but the first frame of "
                f"{self.folder} is {self.width}x{self.height}"
            )
        return frame

    def __iter__(self) -> Iterator[np.ndarray]:
        for index in range(len(self.files)):
            yield self.read_frame(index)


class _Decoder:
    """One sequential pass over a PyAV container, one packet at a time.

    A packet the decoder rejects is skipped (the decoder recovers at the next key frame); a read error
    from the demuxer ends the pass. Either way the pass reports once, at its end, how many frames it got.
    """

    def __init__(self, owner: "VideoSource", container: av.container.InputContainer) -> None:
        self.owner = owner
        self.container = container
        self.stream = container.streams.video[0]
        self.packets = container.demux(self.stream)
        self.pending: list[av.VideoFrame] = []
        self.decoded = 0
        self.bad_packets = 0
        self.error: BaseException | None = None
        self.finished = False
        self.reported = False

    def __iter__(self) -> "_Decoder":
        return self

    def __next__(self) -> np.ndarray:
        while not self.pending:
            if self.finished:
                if not self.reported:
                    self.reported = True
                    self.owner._pass_ended(self)
                raise StopIteration
            self._read_packet()
        frame = self.pending.pop(0)
        try:
            rgb = _to_rgb(frame)
        except _CONVERT_ERRORS as err:  # a decoded frame in a layout that cannot become RGB
            raise MegavodError(f"{self.owner.spec}: frame {self.decoded} cannot be converted to RGB ({_reason(err)})") from None
        self.decoded += 1
        return rgb

    def close(self) -> None:
        self.container.close()

    def _read_packet(self) -> None:
        try:
            packet = next(self.packets)
        except StopIteration:
            self._finish()
            return
        except _AV_ERRORS as err:  # the demuxer cannot go on (damaged index or data, a dropped stream)
            self.error = self.error or err
            self._finish(flush=True)
            return
        try:
            self.pending.extend(packet.decode())
        except _AV_ERRORS as err:  # a packet the decoder rejects is skipped
            self.bad_packets += 1
            self.error = self.error or err

    def _finish(self, flush: bool = False) -> None:
        self.finished = True
        # codec_context is None when no decoder knows the stream's codec (a damaged codec id).
        if flush and self.stream.codec_context is not None:
            # The demuxer died before its own flush packet: drain the decoder's delayed frames.
            try:
                self.pending.extend(self.stream.codec_context.decode(None))
            except _AV_ERRORS:  # the pass already ends with an error to report
                pass


def _to_rgb(frame: av.VideoFrame) -> np.ndarray:
    rgb = frame.to_ndarray(format="rgb24")
    # Phones store portrait video as landscape plus a display matrix; FFmpeg's player rotates it, so do we.
    # (getattr: older PyAV within the supported range has no VideoFrame.rotation.)
    rotation = getattr(frame, "rotation", 0) or 0
    # PyAV documents an angle in [-180, 180]. A degenerate display matrix (e.g. zeroed by damage) has
    # none: FFmpeg's av_display_rotation_get returns NaN, which reaches us as INT_MIN. ffplay does not
    # rotate then (fftools get_rotation: a NaN angle matches none of its cases); neither do we.
    quarter_turns = round(rotation / 90) % 4 if -180 <= rotation <= 180 else 0
    if quarter_turns:
        rgb = np.ascontiguousarray(np.rot90(rgb, k=quarter_turns))
    return rgb


class VideoSource(FrameSource):
    """A video file or an FFmpeg stream (URL, capture device) decoded with PyAV.

    The first frame is decoded at open time, so a file without decodable frames fails here with one clear
    line rather than later in the middle of a run. Files can be iterated again (each pass reopens the
    file); a stream is one pass, and iterating it again continues where the last loop stopped.
    """

    def __init__(
        self,
        spec: str | Path,
        *,
        is_stream: bool | None = None,
        options: dict[str, str] | None = None,
        timeout: float | None = 10.0,
    ) -> None:
        self.spec = str(spec)
        self.is_stream = _is_stream(self.spec) if is_stream is None else is_stream
        self.name = self.spec if self.is_stream else Path(self.spec).stem
        self._options = dict(options or {})
        self._timeout = timeout
        self._warned = False
        self._first: np.ndarray | None = None
        self._decoders: list[_Decoder] = []  # every open container, so close() reaches them all

        decoder = self._decoder = self._open()
        stream = decoder.stream
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        self.fps = float(rate) if rate and 0 < float(rate) <= 1000 else DEFAULT_FPS
        self.num_frames = None if self.is_stream or not stream.frames else int(stream.frames)
        try:
            self._first = next(decoder)
        except MegavodError:
            self.close()
            raise
        except StopIteration:
            self.close()
            if decoder.error is not None:
                reason = _reason(decoder.error)
                raise MegavodError(f"{self.spec}: no frame could be decoded ({reason})") from None
            raise MegavodError(f"{self.spec}: video has no frames") from None
        self.height, self.width = self._first.shape[:2]

    def _open(self) -> _Decoder:
        kwargs: dict = {"options": self._options} if self._options else {}
        if self.is_stream:
            kwargs["timeout"] = self._timeout
            if self.spec.startswith("/dev/video") and "v4l2" in av.formats_available:
                kwargs["format"] = "v4l2"
        else:
            path = Path(self.spec)
            if not path.exists():
                raise MegavodError(f"{self.spec}: no such file or directory")
            if path.is_file() and path.stat().st_size == 0:
                raise MegavodError(f"{self.spec}: empty file (0 bytes), not a video")
        try:
            # metadata_errors: a title or encoder tag that is not UTF-8 must not stop the frames from decoding.
            container = av.open(self.spec, "r", metadata_errors="replace", **kwargs)
        except _AV_ERRORS as err:  # opening also probes: reads the header/index and the first packets
            raise MegavodError(self._open_failure(err)) from None
        if not container.streams.video:
            others = sorted({s.type for s in container.streams})
            container.close()
            if not others:  # e.g. an MP4 whose writer stopped before the first frame
                what = "not a video file, or a video with no frames"
            else:
                what = f"not a video file; it has only {', '.join(others)}"
            raise MegavodError(f"{self.spec}: no video stream ({what})")
        if not self.is_stream:
            # Frame threads add latency, which only matters for live streams.
            container.streams.video[0].thread_type = "AUTO"
        decoder = _Decoder(self, container)
        self._decoders.append(decoder)
        return decoder

    def _open_failure(self, err: BaseException) -> str:
        reason = _reason(err)
        if self.is_stream:
            hint = ""
            if self.spec.startswith("/dev/video") and "v4l2" not in av.formats_available:
                hint = "; this PyAV build has no v4l2 capture support"
            return f"{self.spec}: cannot open stream ({reason}{hint})"
        if isinstance(err, (av.error.InvalidDataError, av.error.EOFError)):
            return f"{self.spec}: not a video file, or damaged before its header/index ({reason})"
        return f"{self.spec}: cannot open video ({reason})"

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._first is not None:
            # First pass: hand over the frame probed at open time, then go on with the same decoder.
            decoder, first, self._first = self._decoder, self._first, None
            yield first
        elif self.is_stream:
            decoder = self._decoder
            if decoder is None:
                raise RuntimeError(f"{self.spec}: stream is closed")
        else:
            decoder = self._open()  # each pass of a file has its own container: passes can overlap
        try:
            yield from decoder
        finally:
            if not self.is_stream:
                self._release(decoder)

    def _pass_ended(self, decoder: _Decoder) -> None:
        """Called once by a decoder at the end of its pass: warn about short videos, fix ``num_frames``."""
        if decoder.decoded == 0:
            return  # the caller raises "no frames" instead
        declared = self.num_frames
        short = declared is not None and decoder.decoded < declared
        if (short or decoder.error is not None) and not self._warned:
            self._warned = True
            reason = f" ({_reason(decoder.error)})" if decoder.error is not None else ""
            if self.is_stream:
                logger.warning("%s: stream ended with an error after %d frames%s", self.spec,
                               decoder.decoded, reason)
            else:
                of = f" of {declared}" if declared is not None else ""
                skipped = f", {decoder.bad_packets} unreadable packets skipped" if decoder.bad_packets else ""
                logger.warning("%s: truncated or damaged video: decoded %d%s frames%s%s", self.spec,
                               decoder.decoded, of, skipped, reason)
        if not self.is_stream:
            self.num_frames = decoder.decoded  # exact after a full pass, even if the header said otherwise

    def _release(self, decoder: _Decoder) -> None:
        decoder.close()
        if decoder in self._decoders:
            self._decoders.remove(decoder)
        if decoder is self._decoder:
            self._decoder = None

    def close(self) -> None:
        self._first = None
        for decoder in list(self._decoders):
            self._release(decoder)


def open_source(
    spec: str | Path,
    *,
    fps: float | None = None,
    options: dict[str, str] | None = None,
) -> FrameSource:
    """Open a video file, a folder of frames, or a stream (anything with ``://`` or under ``/dev/``).

    ``fps`` overrides the frame rate (a folder has none; 25 is assumed). ``options`` are FFmpeg options
    for files and streams (e.g. ``{"rtsp_transport": "tcp"}``). Raises :class:`MegavodError` with one line
    naming the input when it cannot be read.
    """
    text = str(spec)
    if not _is_stream(text):
        path = Path(text).expanduser()
        if path.is_dir():
            return FrameFolderSource(path, fps=DEFAULT_FPS if fps is None else fps)
        text = str(path)
    source = VideoSource(text, options=options)
    if fps is not None:
        source.fps = float(fps)
    return source


class RandomAccessFrames:
    """``frames[k]`` over a source for offline mode, without holding the whole video in RAM.

    Video sources are decoded once, sequentially, as far as the highest index asked for; the
    ``max_cached`` most recently used frames stay in memory and a frame evicted from that LRU is written
    to a private temp directory (inside ``spill_dir`` when given) so that asking for it again reads the
    file instead of decoding again. ``spill_format`` is ``"npy"`` (fast, raw size) or ``"png"`` (lossless,
    a few times smaller, slower). Frame folders are read on demand and only use the LRU. ``len()`` is exact:
    for a video it decodes to the end once (MEGA's global pool needs the whole video anyway), which also
    corrects a header that over-counts a truncated file. Returned frames are copies. The spill directory
    is deleted on :meth:`close`, on garbage collection and at interpreter exit. Not thread-safe.
    """

    def __init__(
        self,
        source: FrameSource | str | Path,
        max_cached: int = 64,
        spill_dir: Path | str | None = None,
        spill_format: str = "npy",
    ) -> None:
        if max_cached < 0:
            raise ValueError(f"max_cached must be >= 0, got {max_cached}")
        if spill_format not in ("npy", "png"):
            raise ValueError(f"spill_format must be 'npy' or 'png', got {spill_format!r}")
        self._owns_source = isinstance(source, (str, Path))
        self.source: FrameSource = open_source(source) if self._owns_source else source
        self.max_cached = int(max_cached)
        self.spill_format = spill_format
        self._spill_parent = Path(spill_dir) if spill_dir is not None else None
        self._spill_path: Path | None = None
        self._finalizer: weakref.finalize | None = None
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._spilled: set[int] = set()
        self._on_demand = callable(getattr(self.source, "read_frame", None))
        self._frames: Iterator[np.ndarray] | None = None
        self._decoded = 0
        self._exhausted = False

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def fps(self) -> float:
        return self.source.fps

    @property
    def frames_decoded(self) -> int:
        """How many frames have been decoded from a video source so far (each frame at most once)."""
        return self._decoded

    @property
    def cached_indices(self) -> list[int]:
        """Indices held in memory, least recently used first."""
        return list(self._cache)

    @property
    def spill_path(self) -> Path | None:
        """The private directory of spilled frames (``None`` until the first spill or after close)."""
        return self._spill_path

    def __len__(self) -> int:
        if self._on_demand:
            return int(self.source.num_frames)
        while not self._exhausted:
            self._decode_next()
        return self._decoded

    def __getitem__(self, index: int) -> np.ndarray:
        k = operator.index(index)
        if k < 0:
            k += len(self)
            if k < 0:
                raise IndexError(f"frame index {index} out of range for {len(self)} frames")
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k].copy()
        if self._on_demand:
            if k >= self.source.num_frames:
                raise IndexError(f"frame index {index} out of range for {self.source.num_frames} frames")
            frame = self.source.read_frame(k)
        elif k < self._decoded:
            frame = self._load_spilled(k)
        else:
            while self._decoded <= k:
                if self._exhausted:
                    raise IndexError(f"frame index {index} out of range for {self._decoded} frames")
                self._decode_next()
            return self._cache[k].copy() if k in self._cache else self._load_spilled(k)
        self._remember(k, frame)
        return frame.copy()

    def _decode_next(self) -> None:
        if self._frames is None:
            self._frames = iter(self.source)
        try:
            frame = next(self._frames)
        except StopIteration:
            self._exhausted = True
            return
        self._remember(self._decoded, frame)
        self._decoded += 1

    def _remember(self, k: int, frame: np.ndarray) -> None:
        self._cache[k] = frame
        self._cache.move_to_end(k)
        while len(self._cache) > self.max_cached:
            old, old_frame = self._cache.popitem(last=False)
            if not self._on_demand and old not in self._spilled:
                self._spill(old, old_frame)

    def _spill_file(self, k: int) -> Path:
        assert self._spill_path is not None
        return self._spill_path / f"{k:06d}.{self.spill_format}"

    def _spill(self, k: int, frame: np.ndarray) -> None:
        if self._spill_path is None:
            self._make_spill_dir(frame)
        try:
            if self.spill_format == "npy":
                np.save(self._spill_file(k), frame, allow_pickle=False)
            else:
                Image.fromarray(frame).save(self._spill_file(k), compress_level=1)
        except OSError as err:
            raise MegavodError(
                f"{self.source.name}: cannot spill decoded frames to {self._spill_path} ({_reason(err)}); "
                "pass spill_dir on a disk with more space"
            ) from None
        self._spilled.add(k)

    def _make_spill_dir(self, frame: np.ndarray) -> None:
        if self._spill_parent is not None:
            self._spill_parent.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix="megavod-frames-", dir=self._spill_parent))
        self._spill_path = path
        self._finalizer = weakref.finalize(self, shutil.rmtree, path, ignore_errors=True)
        # Fail up front, not hours in, when the frame count says the spill cannot fit.
        total = self.source.num_frames
        if total is not None and self.spill_format == "npy":
            need = max(total - self.max_cached, 0) * frame.nbytes
            free = shutil.disk_usage(path).free
            if need > free:
                raise MegavodError(
                    f"{self.source.name}: random access needs about {need / 1e9:.1f} GB of spill space in "
                    f"{path.parent} but only {free / 1e9:.1f} GB is free; pass spill_dir on a larger disk "
                    "or spill_format='png'"
                )

    def _load_spilled(self, k: int) -> np.ndarray:
        path = self._spill_file(k)
        frame = np.load(path) if self.spill_format == "npy" else np.asarray(Image.open(path).convert("RGB"))
        self._remember(k, frame)
        return frame.copy()

    def close(self) -> None:
        """Delete spilled frames, drop the cache, and close the source if this object opened it."""
        if self._finalizer is not None:
            self._finalizer()
        self._spill_path = None
        self._cache.clear()
        self._spilled.clear()
        if self._frames is not None and hasattr(self._frames, "close"):
            self._frames.close()
        self._frames = None
        if self._owns_source:
            self.source.close()

    def __enter__(self) -> "RandomAccessFrames":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
