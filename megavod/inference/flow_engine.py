"""Streaming inference for the flow methods: FGFA (window of warped frames) and DFF (key-frame propagation).

Like the relation engine (:mod:`megavod.inference.engine`), the stream state is plain objects owned
here, and every frame's backbone runs once:

* **FGFA offline** (spec §6.2): the window of frame k is frames k + min_offset .. k + max_offset
  (-9..9: 19 frames, key at index 9), clipped to the video, so the first and last frames repeat at the
  edges as in the authors' code. Each frame's C4 and embedding are computed once, through a
  :class:`~megavod.inference.feature_store.FeatureStore`, and released after the last window that uses
  them. FlowNet runs for every (key, window frame) pair of every key frame, as the authors'.
* **FGFA online** (not in the authors' code): the window is the T - 1 previous frames and the key
  (T = max_offset - min_offset + 1, padded with frame 0 at the start), the key last; frame k's
  detections are emitted before frame k+1 is read.
* **DFF** (spec §6.3), causal by design, the same offline and online: frames whose number is a multiple
  of ``key_interval`` are key frames; the backbone runs on them only, and every frame (key frames
  included) is detected from the last key frame's C4 warped by flow(frame, key) x scale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from torch import Tensor

from megavod.config import Config
from megavod.inference.feature_store import FeatureStore
from megavod.models.fgfa import FGFADetector, FlowFrame
from megavod.models.dff import DFFDetector
from megavod.structures import Detections


@dataclass(frozen=True)
class FGFAWindow:
    """FGFA's test window: offsets ``min_offset..max_offset`` around the key (code: -9..9, T = 19)."""

    min_offset: int = -9
    max_offset: int = 9

    def __post_init__(self) -> None:
        if not self.min_offset <= 0 <= self.max_offset:
            raise ValueError(f"need min_offset <= 0 <= max_offset, got {self.min_offset}, {self.max_offset}")

    @property
    def T(self) -> int:
        return self.max_offset - self.min_offset + 1

    @classmethod
    def from_config(cls, cfg: Config) -> "FGFAWindow":
        return cls(cfg.fgfa.min_offset, cfg.fgfa.max_offset)

    def offline(self, k: int, num_frames: int) -> tuple[list[int], int]:
        """Frames of key frame k's window clipped to the video, and the key's index in it."""
        frames = [min(max(k + o, 0), num_frames - 1) for o in range(self.min_offset, self.max_offset + 1)]
        return frames, -self.min_offset

    def online(self, k: int) -> tuple[list[int], int]:
        """The T - 1 previous frames (frame 0 repeated at the start) and the key, last."""
        return [max(k - self.T + 1 + i, 0) for i in range(self.T)], self.T - 1


def detect_fgfa_offline(
    model: FGFADetector,
    load_frame: Callable[[int], tuple[Tensor, tuple[int, int]]],
    num_frames: int,
    window: FGFAWindow,
    store: FeatureStore[FlowFrame] | None = None,
) -> Iterator[tuple[int, Detections]]:
    """FGFA over a video of ``num_frames`` frames; ``load_frame(t)`` -> (input tensor, original (H, W)),
    called once per frame."""
    if num_frames <= 0:
        return

    def compute(t: int) -> FlowFrame:
        image, original_size = load_frame(t)
        return model.frame_features(image, t, original_size)

    store = store if store is not None else FeatureStore(compute)
    try:
        for k in range(num_frames):
            frames, key_index = window.offline(k, num_frames)
            yield k, model.detect_key([store.get(t) for t in frames], key_index)
            # Frame t's last window is key t + max_offset... except the last frame, used to the end.
            done = k + window.min_offset
            if 0 <= done < num_frames - 1:
                store.release(done)
    finally:
        store.close()


def detect_fgfa_online(
    model: FGFADetector,
    frames: Iterable[tuple[Tensor, tuple[int, int]]],
    window: FGFAWindow,
) -> Iterator[tuple[int, Detections]]:
    """Causal FGFA: frame k aggregates frames k-T+1..k; detections are yielded before frame k+1 is read.
    Holds at most T frames' features."""
    held: dict[int, FlowFrame] = {}
    for k, (image, original_size) in enumerate(frames):
        held[k] = model.frame_features(image, k, original_size)
        indices, key_index = window.online(k)
        yield k, model.detect_key([held[t] for t in indices], key_index)
        keep = set(window.online(k + 1)[0])
        for t in [t for t in held if t not in keep]:
            del held[t]


def detect_dff(
    model: DFFDetector,
    frames: Iterable[tuple[Tensor, tuple[int, int]]],
) -> Iterator[tuple[int, Detections]]:
    """DFF (causal): frame k's detections are yielded before frame k+1 is read; the backbone runs on key
    frames only (k mod ``model.key_interval`` = 0). Holds one key frame."""
    key: FlowFrame | None = None
    for k, (image, original_size) in enumerate(frames):
        if model.is_key_frame(k) or key is None:
            key = model.frame_features(image, k, original_size)
        yield k, model.detect_frame(image, original_size, key)
