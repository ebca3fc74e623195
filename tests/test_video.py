"""Video I/O: frame folders, video files, streams, bad input, random access, writing and drawing."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from megavod.data import video_writer
from megavod.data.video import (
    PALETTE,
    FrameFolderSource,
    RandomAccessFrames,
    VideoSource,
    draw_detections,
    list_frame_files,
    open_source,
    write_annotated_video,
    write_video,
)
from megavod.errors import MegavodError
from megavod.structures import Detections

H, W, N = 48, 64, 10
COLOURS = [
    (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255),
    (0, 255, 255), (255, 255, 255), (0, 0, 0), (128, 128, 128), (255, 128, 0), (0, 128, 255), (128, 0, 64),
]


def patterned_frames(n: int = N, h: int = H, w: int = W) -> list[np.ndarray]:
    """Frame i: solid COLOURS[i] with a mid-grey block in the top-left corner (catches flips)."""
    frames = []
    for i in range(n):
        frame = np.empty((h, w, 3), np.uint8)
        frame[:] = COLOURS[i % len(COLOURS)]
        frame[: h // 3, : w // 3] = (90, 60, 30)
        frames.append(frame)
    return frames


def noise_frames(n: int = N, seed: int = 0) -> list[np.ndarray]:
    """Incompressible frames, so that every frame owns a sizeable share of the file's bytes."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(n)]


def nearest(frame: np.ndarray, templates: list[np.ndarray]) -> int:
    """Index of the template closest to a (lossily decoded) frame."""
    errors = [np.abs(frame.astype(np.int16) - t.astype(np.int16)).mean() for t in templates]
    return int(np.argmin(errors))


def assert_one_line(err: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


# ---------------------------------------------------------------------------------------------- folders


def test_list_frame_files_sorts_digit_stems_numerically(tmp_path: Path) -> None:
    for name in ["10.JPEG", "2.jpg", "000001.png", "notes.txt", ".hidden.jpg"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.jpg").mkdir()
    assert [p.name for p in list_frame_files(tmp_path)] == ["000001.png", "2.jpg", "10.JPEG"]

    (tmp_path / "b.bmp").write_bytes(b"x")
    (tmp_path / "a10.jpeg").write_bytes(b"x")
    names = [p.name for p in list_frame_files(tmp_path)]
    assert names == ["000001.png", "10.JPEG", "2.jpg", "a10.jpeg", "b.bmp"]  # not all digits: by name


def test_list_frame_files_rejects_two_files_for_one_frame(tmp_path: Path) -> None:
    (tmp_path / "000003.jpg").write_bytes(b"x")
    (tmp_path / "3.png").write_bytes(b"x")
    with pytest.raises(MegavodError) as err:
        list_frame_files(tmp_path)
    assert_one_line(err, "same frame number")


def test_png_folder_round_trip_is_exact(tmp_path: Path) -> None:
    frames = noise_frames(5)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / f"{i}.png")
    with open_source(tmp_path) as source:
        assert isinstance(source, FrameFolderSource)
        assert (source.num_frames, source.width, source.height, source.fps) == (5, W, H, 25.0)
        assert source.name == tmp_path.name
        read = list(source)
    assert len(read) == 5
    for got, want in zip(read, frames):
        assert got.dtype == np.uint8 and got.shape == (H, W, 3)
        np.testing.assert_array_equal(got, want)


def test_vid_style_jpeg_folder_keeps_frame_order(tmp_path: Path) -> None:
    frames = patterned_frames(12)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / f"{i:06d}.JPEG", quality=95)
    read = list(open_source(str(tmp_path)))
    assert [nearest(f, frames) for f in read] == list(range(12))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_folder_with_a_corrupt_jpeg_names_it(tmp_path: Path, damage: str) -> None:
    frames = patterned_frames(4)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / f"{i:06d}.JPEG")
    bad = tmp_path / "000002.JPEG"
    bad.write_bytes(b"not a jpeg at all" if damage == "garbage" else bad.read_bytes()[:200])
    source = open_source(tmp_path)
    it = iter(source)
    assert nearest(next(it), frames) == 0 and nearest(next(it), frames) == 1
    with pytest.raises(MegavodError) as err:
        next(it)
    assert_one_line(err, "000002.JPEG", "cannot read image")


def test_folder_whose_first_frame_is_corrupt_fails_at_open(tmp_path: Path) -> None:
    (tmp_path / "000000.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(MegavodError) as err:
        open_source(tmp_path)
    assert_one_line(err, "000000.jpg")


def test_folder_without_images_fails(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(MegavodError) as err:
        open_source(tmp_path)
    assert_one_line(err, str(tmp_path), "no image files")


def test_folder_frame_of_another_size_fails(tmp_path: Path) -> None:
    Image.fromarray(noise_frames(1)[0]).save(tmp_path / "0.png")
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "1.png")
    with pytest.raises(MegavodError) as err:
        list(open_source(tmp_path))
    assert_one_line(err, "1.png", "10x10", f"{W}x{H}")


# ------------------------------------------------------------------------------------------ video files


@pytest.mark.parametrize("encoder", ["libx264", "mpeg4"])
def test_mp4_round_trip_keeps_count_size_and_order(tmp_path: Path, monkeypatch, encoder: str) -> None:
    if encoder not in av.codecs_available:
        pytest.skip(f"this PyAV build has no {encoder}")
    monkeypatch.setattr(video_writer, "_encoder", lambda: encoder)  # mpeg4 is the fallback encoder
    frames = patterned_frames()
    path = tmp_path / "clip.mp4"
    assert write_video(path, iter(frames), fps=25.0) == N
    assert sorted(os.listdir(tmp_path)) == ["clip.mp4"]  # the temp file was renamed, nothing left over
    with open_source(path) as source:
        assert isinstance(source, VideoSource) and not source.is_stream
        assert (source.name, source.num_frames, source.width, source.height) == ("clip", N, W, H)
        assert source.fps == pytest.approx(25.0)
        first = list(source)
        again = list(source)  # a file can be read twice; each pass starts at frame 0
    assert [nearest(f, frames) for f in first] == list(range(N))
    assert all(f.dtype == np.uint8 and f.shape == (H, W, 3) for f in first)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    # Lossy, but close: the solid colours come back within a few levels.
    assert np.abs(first[3].astype(int) - frames[3].astype(int))[H // 2:, W // 2:].mean() < 6
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == {"libx264": "h264"}.get(encoder, encoder)


def test_write_video_pads_odd_sizes_and_keeps_ntsc_rate(tmp_path: Path) -> None:
    frames = [f[:47, :63] for f in patterned_frames(3)]
    path = tmp_path / "odd.mp4"
    assert write_video(path, frames, fps=30000 / 1001) == 3
    source = open_source(path)
    assert (source.width, source.height) == (64, 48)
    assert source.fps == pytest.approx(29.97, abs=0.01)
    read = list(source)
    assert [nearest(f[:47, :63], frames) for f in read] == [0, 1, 2]


def test_write_video_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    path.write_bytes(b"previous result")

    def interrupted():
        yield from patterned_frames(3)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_video(path, interrupted())
    assert path.read_bytes() == b"previous result"
    assert sorted(os.listdir(tmp_path)) == ["out.mp4"]


def test_write_video_rejects_bad_frames(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        write_video(tmp_path / "a.mp4", [])
    with pytest.raises(ValueError, match="frame 1"):
        write_video(tmp_path / "b.mp4", [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 10, 3), np.uint8)])
    assert os.listdir(tmp_path) == []


def _zero_frame_avi(path: Path) -> None:
    # AVI writes its stream header with no frames; MP4 would drop the empty track altogether.
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        container.start_encoding()


def _zero_frame_mp4(path: Path) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        container.start_encoding()


def _audio_only_wav(path: Path) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())


@pytest.mark.parametrize(
    "make, name, needles",
    [
        (None, "missing.mp4", ["no such file"]),
        (lambda p: p.write_text("this is a text file\n" * 20), "notes.mp4", ["not a video file"]),
        (lambda p: p.write_bytes(b""), "empty.mp4", ["empty file"]),
        (_zero_frame_avi, "nothing.avi", ["video has no frames"]),
        (_zero_frame_mp4, "nothing.mp4", ["no video stream", "no frames"]),
        (_audio_only_wav, "speech.wav", ["no video stream", "only audio"]),
    ],
)
def test_bad_video_is_one_clear_line(tmp_path: Path, make, name: str, needles: list[str]) -> None:
    path = tmp_path / name
    if make is not None:
        make(path)
    with pytest.raises(MegavodError) as err:
        open_source(path)
    assert_one_line(err, str(path), *needles)


def test_truncated_mp4_decodes_what_is_there_and_warns_once(tmp_path: Path, caplog) -> None:
    frames = noise_frames()
    full = tmp_path / "full.mp4"
    write_video(full, frames)
    data = full.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.7)])  # faststart: the index is intact, the tail is gone

    with caplog.at_level(logging.WARNING, logger="megavod.data.video"):
        source = open_source(cut)
        assert source.num_frames == N  # what the header claims
        read = list(source)
        k = len(read)
        assert 0 < k < N
        assert [nearest(f, frames) for f in read] == list(range(k))
        assert source.num_frames == k  # corrected by the full pass
        list(source)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "cut.mp4" in warnings[0] and f"decoded {k} of {N} frames" in warnings[0]


@pytest.mark.skipif(not hasattr(av.VideoFrame, "rotation"), reason="PyAV without display-matrix support")
def test_display_rotation_is_applied(tmp_path: Path) -> None:
    # A phone's portrait clip: stored landscape, with a display matrix saying "turn 90° counterclockwise".
    frame = np.zeros((H, W, 3), np.uint8)
    frame[:8, :8] = 255  # marker in the stored top-left corner
    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.set_display_rotation(90)
        container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    source = open_source(path)
    assert (source.width, source.height) == (H, W)
    (shown,) = list(source)
    assert shown.shape == (W, H, 3)
    assert shown[-4, 4].min() > 200 and shown[4, 4].max() < 50  # the marker is now bottom-left


# -------------------------------------------------------------------------------------------- streams


def test_url_is_opened_as_a_stream(tmp_path: Path) -> None:
    frames = patterned_frames(4)
    write_video(tmp_path / "s.mp4", frames)
    url = (tmp_path / "s.mp4").as_uri()
    with open_source(url) as source:
        assert source.is_stream and source.num_frames is None and source.name == url
        assert [nearest(f, frames) for f in source] == [0, 1, 2, 3]


def test_stream_missing_is_one_clear_line(tmp_path: Path) -> None:
    url = (tmp_path / "gone.mkv").as_uri()
    with pytest.raises(MegavodError) as err:
        open_source(url)
    assert_one_line(err, url, "cannot open stream")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe")
def test_stream_delivers_frame_k_before_frame_k_plus_1_arrives(tmp_path: Path) -> None:
    # Matroska frames are length-prefixed, so the demuxer can hand one over without the next one's bytes.
    video = tmp_path / "live.mkv"
    frames = noise_frames(6)
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)  # no B-frames: no reordering delay
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    data = video.read_bytes()
    with av.open(str(video)) as probe:
        starts = [p.pos for p in probe.demux(video=0) if p.size]
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    k = 3
    frame_k_seen = threading.Event()
    result: dict[str, bool] = {}

    def feed() -> None:
        try:
            with open(fifo, "wb") as pipe:
                pipe.write(data[: starts[k + 1]])  # everything up to, not including, frame k+1
                pipe.flush()
                result["in_time"] = frame_k_seen.wait(10)
                pipe.write(data[starts[k + 1]:])
        except BrokenPipeError:
            pass

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    # A small probe so opening does not itself wait for seconds of video, as a live source would want.
    source = open_source(fifo.as_uri(), options={"probesize": "32"})
    decoded = []
    for frame in source:
        if len(decoded) == k:
            frame_k_seen.set()
        decoded.append(frame)
    writer.join(10)
    source.close()
    assert result.get("in_time") is True
    assert [nearest(f, frames) for f in decoded] == list(range(6))


# -------------------------------------------------------------------------------------- random access


class CountingSource:
    """A source wrapper that counts decoded frames, to check that random access decodes each once."""

    def __init__(self, source: VideoSource) -> None:
        self.inner = source
        self.name, self.fps, self.num_frames = source.name, source.fps, source.num_frames
        self.yielded = 0

    def __iter__(self):
        for frame in self.inner:
            self.yielded += 1
            yield frame


def test_random_access_decodes_once_and_spills_to_disk(tmp_path: Path) -> None:
    frames = noise_frames()
    write_video(tmp_path / "v.mp4", frames)
    reference = list(open_source(tmp_path / "v.mp4"))
    spill_parent = tmp_path / "spill"
    source = CountingSource(open_source(tmp_path / "v.mp4"))
    ra = RandomAccessFrames(source, max_cached=3, spill_dir=spill_parent)
    for k in [5, 0, 9, 2, 2, 7, 4, -1, 1, 5, 6, 3, 8]:
        np.testing.assert_array_equal(ra[k], reference[k])
        assert len(ra.cached_indices) <= 3
    assert len(ra) == N
    assert source.yielded == N and ra.frames_decoded == N  # decoded exactly once despite re-visits
    spill = ra.spill_path
    assert spill is not None and spill.parent == spill_parent
    assert 0 < len(list(spill.iterdir())) <= N
    got = ra[0]
    got[:] = 0  # callers get copies: the cache must not change
    np.testing.assert_array_equal(ra[0], reference[0])
    with pytest.raises(IndexError):
        ra[N]
    with pytest.raises(IndexError):
        ra[-N - 1]
    ra.close()
    assert not spill.exists() and spill_parent.exists()


def test_random_access_len_counts_decodable_frames_of_a_truncated_video(tmp_path: Path) -> None:
    write_video(tmp_path / "v.mp4", noise_frames())
    data = (tmp_path / "v.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: int(len(data) * 0.7)])
    with RandomAccessFrames(tmp_path / "cut.mp4", max_cached=0, spill_format="png") as ra:
        k = len(ra)
        assert 0 < k < N
        reference = list(open_source(tmp_path / "cut.mp4"))
        assert len(reference) == k
        for i in reversed(range(k)):  # everything read back from lossless PNG spill files
            np.testing.assert_array_equal(ra[i], reference[i])
        spill = ra.spill_path
    assert spill is not None and not spill.exists()


def test_random_access_reads_folder_frames_on_demand(tmp_path: Path) -> None:
    frames = noise_frames(6)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / f"{i:06d}.png")
    with RandomAccessFrames(tmp_path, max_cached=2) as ra:
        assert len(ra) == 6
        for k in [4, 1, 5, 4, 0, -2]:
            np.testing.assert_array_equal(ra[k], frames[k])
        assert ra.spill_path is None and len(ra.cached_indices) == 2
        with pytest.raises(IndexError):
            ra[6]


# ----------------------------------------------------------------------------------- drawing, writing


def test_draw_detections_boxes_labels_and_stable_colours() -> None:
    frame = np.zeros((60, 80, 3), np.uint8)
    names = ["__background__", "cat", "dog"]
    boxes = [[10, 20, 40, 50], [50, 5, 70, 30], [0, 0, 5, 5]]
    out = draw_detections(frame, np.array(boxes), [1, 2, 1], [0.9, 0.8, 0.1], names, score_thresh=0.5)
    assert frame.max() == 0  # the input is left alone
    assert tuple(out[35, 10]) == PALETTE[1]  # left edge of box 0: colour of label 1
    assert tuple(out[50, 25]) == PALETTE[1]  # bottom edge, inclusive x2/y2 convention
    assert tuple(out[35, 11]) == (0, 0, 0)  # inside the box is untouched
    assert tuple(out[20, 50]) == PALETTE[2]
    assert out[3, 3].max() == 0  # score 0.1 < 0.5: not drawn
    assert (out[:20, 10:40] == PALETTE[1]).all(axis=2).sum() > 20  # label background above box 0
    # With track ids the colour follows the track, whatever the class.
    tracked = draw_detections(frame, boxes[:2], torch.tensor([1, 2]), torch.tensor([0.9, 0.8]), names,
                              track_ids=[7, 7])
    assert tuple(tracked[35, 10]) == PALETTE[7] and tuple(tracked[20, 50]) == PALETTE[7]
    with pytest.raises(ValueError):
        draw_detections(frame, boxes, [1], [0.9], names)


def test_write_annotated_video_draws_every_frame(tmp_path: Path) -> None:
    frames = [np.zeros((96, 128, 3), np.uint8) for _ in range(4)]
    box = torch.tensor([[30.0, 40.0, 100.0, 90.0]])
    dets = [Detections(box, torch.tensor([0.9]), torch.tensor([3])) for _ in range(3)] + [None]
    path = tmp_path / "annotated.mp4"
    assert write_annotated_video(path, frames, dets, ["bg", "a", "b", "c"], fps=10, score_thresh=0.5) == 4
    source = open_source(path)
    assert source.fps == pytest.approx(10)
    read = list(source)
    assert len(read) == 4
    label_area = np.median(read[0][28:39, 32:60].reshape(-1, 3), axis=0)  # label background, not its text
    assert np.abs(label_area - np.array(PALETTE[3])).max() < 40
    assert read[3].max() < 20  # no detections: stays black
    with pytest.raises(ValueError):
        write_annotated_video(tmp_path / "bad.mp4", frames, dets[:2], ["bg"])
    assert not (tmp_path / "bad.mp4").exists()
