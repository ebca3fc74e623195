"""Which frames a training sample brings along as references, per method (docs/conventions.md#training-samples).

Every sampler turns a key frame ``f`` of a video of ``L`` frames into frame numbers, grouped by the
role they play in the model (``"local"``, ``"memory"``, ``"global"`` for MEGA, ``"ref"`` for the
other video methods). All frame numbers are clipped to ``[0, L-1]``, as in the authors' datasets, so
near the ends of a video a reference may repeat a frame or be the key itself.

Randomness comes from the ``numpy.random.Generator`` the caller passes in, never from a global
stream: the training engine derives one generator per sample from (seed, iteration, rank), which is
what makes a resumed run draw exactly the frames the uninterrupted one would.

A still image (a DET line, or any 2-column list line) has no neighbours: its references are copies of
the image itself in the same numbers (:meth:`ReferenceSampler.counts`); the dataset does that.

A sampler whose method computes losses on its reference frames too (YOLOV: every frame of the batch is
a query with its own ground truth) says so with a true class attribute ``with_targets``; the dataset
then loads each reference's boxes and labels with it (``TrainSample.ref_targets``). Without the
attribute a sampler's references carry no ground truth, as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, Sequence

import numpy as np



@dataclass(frozen=True)
class SampleKey:
    """What the sampler hands the dataset: which item, and the seed of that item's own randomness.

    ``seed`` drives everything random in loading the item (flip, input size, reference frames), so an
    item loads the same in any worker, any process and before or after a resume.
    """

    index: int
    seed: int


class ReferenceSampler(Protocol):
    def counts(self) -> dict[str, int]:
        """How many reference images each role gets (also the number of copies for a still image)."""

    def sample(self, frame: int, video_len: int, rng: np.random.Generator) -> dict[str, list[int]]:
        """Frame numbers of the references of key frame ``frame`` (each in ``[0, video_len-1]``)."""


def draw_distinct(rng: np.random.Generator, population: Sequence[int], n: int) -> list[int]:
    """``n`` items of ``population`` without replacement, in draw order (``np.random.choice``).

    When the population is smaller than ``n`` (a window of one frame, a video shorter than the global
    draw) the draw falls back to replacement so that the model always gets ``n`` images; the authors'
    code would raise there.
    """
    if n <= 0:
        return []
    if not population:
        raise ValueError("draw_distinct: empty population")
    picks = rng.choice(len(population), size=n, replace=n > len(population))
    return [int(population[i]) for i in picks]


def _clip(frames: list[int], video_len: int) -> list[int]:
    return [min(max(f, 0), video_len - 1) for f in frames]


@dataclass(frozen=True)
class OffsetSampler:
    """``num_refs`` distinct offsets from ``[min_offset, max_offset]`` around the key (RDN, FGFA, DFF).

    RDN ±18 (2 refs), FGFA ±9 (2 refs), DFF [-9, 0] (1 ref, which then acts as the key frame).
    """

    min_offset: int
    max_offset: int
    num_refs: int
    role: str = "ref"

    def __post_init__(self) -> None:
        if self.min_offset > self.max_offset:
            raise ValueError(f"min_offset {self.min_offset} > max_offset {self.max_offset}")
        if self.num_refs < 0:
            raise ValueError(f"num_refs must be >= 0, got {self.num_refs}")

    def counts(self) -> dict[str, int]:
        return {self.role: self.num_refs}

    def sample(self, frame: int, video_len: int, rng: np.random.Generator) -> dict[str, list[int]]:
        offsets = draw_distinct(rng, range(self.min_offset, self.max_offset + 1), self.num_refs)
        return {self.role: _clip([frame + o for o in offsets], video_len)}


@dataclass(frozen=True)
class MEGASampler:
    """MEGA's three kinds of reference frame (docs/conventions.md#training-samples, ``vid_mega.py::_get_train``).

    * local: ``num_local`` distinct offsets from the window around the key, ``-tau..tau`` with
      ``tau = (T_l - 1) / 2`` offline (0 may be drawn), ``-(T_l - 1)..0`` online.
    * memory: the ``T_m`` frames that left the window just before it, drawn as the authors do: a
      centre ``c = max(f + a - 1 - (T_m - 1) // 2, 0)`` (``a`` the window's first offset) and
      ``num_memory`` distinct offsets from ``-(T_m // 2)..(T_m - 1) // 2``. With T_l = T_m = 25 this is
      the code's ``max(f - 25, 0) ± 12``, frames f-37..f-13; early in a video the centre sticks at
      frame 0, exactly as in the code.
    * global: ``num_global`` distinct frames of the whole video (offline) or of frames ``0..f``
      (online: the global pool holds only frames already seen, docs/departures.md#online-mode).

    A role that the model does not use (``memory=False``, no global stage) gets no frames.
    """

    T_l: int = 25
    T_m: int = 25
    num_local: int = 2
    num_memory: int = 3
    num_global: int = 2
    memory: bool = True
    global_stage: bool = True
    online: bool = False

    def __post_init__(self) -> None:
        if self.T_l < 1 or (not self.online and self.T_l % 2 != 1):
            raise ValueError(f"T_l must be an odd number >= 1 offline (>= 1 online), got {self.T_l}")
        if self.memory and self.T_m < 1:
            raise ValueError(f"T_m must be >= 1 when memory is on, got {self.T_m}")
        for name in ("num_local", "num_memory", "num_global"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def window(self) -> tuple[int, int]:
        """First and last offset of the local window relative to the key."""
        if self.online:
            return -(self.T_l - 1), 0
        tau = (self.T_l - 1) // 2
        return -tau, tau

    def counts(self) -> dict[str, int]:
        return {
            "local": self.num_local,
            "memory": self.num_memory if self.memory else 0,
            "global": self.num_global if self.global_stage else 0,
        }

    def sample(self, frame: int, video_len: int, rng: np.random.Generator) -> dict[str, list[int]]:
        first, last = self.window
        n = self.counts()
        local = draw_distinct(rng, range(first, last + 1), n["local"])
        refs = {"local": _clip([frame + o for o in local], video_len), "memory": [], "global": []}
        if n["memory"]:
            centre = max(frame + first - 1 - (self.T_m - 1) // 2, 0)
            offsets = draw_distinct(rng, range(-(self.T_m // 2), (self.T_m - 1) // 2 + 1), n["memory"])
            refs["memory"] = _clip([centre + o for o in offsets], video_len)
        if n["global"]:
            pool_end = min(frame, video_len - 1) if self.online else video_len - 1
            refs["global"] = draw_distinct(rng, range(pool_end + 1), n["global"])
        return refs


@dataclass(frozen=True)
class VideoFramesSampler:
    """YOLOV's training batch: the key and ``num_frames`` other distinct frames of its video, drawn
    uniformly, each with its ground truth (``with_targets``).

    The authors (``yolox/data/datasets/vid.py``: ``VIDDataset.photo_to_sequence`` in ``random`` mode,
    ``VIDBatchSampler``) shuffle each video's frames and cut them into batches of ``gframe`` (16)
    distinct frames; every frame of a batch is aggregated over the batch and gets its losses. Here a
    batch is a key frame of the image set with ``num_frames`` (15) others of its video: the same law of
    16 distinct frames of one video, with the key frames' weights of the image set. A video shorter than
    the batch repeats frames (:func:`draw_distinct`); the authors' loader skips such videos.
    """

    num_frames: int = 15
    role: str = "frames"
    with_targets: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.num_frames < 0:
            raise ValueError(f"num_frames must be >= 0, got {self.num_frames}")

    def counts(self) -> dict[str, int]:
        return {self.role: self.num_frames}

    def sample(self, frame: int, video_len: int, rng: np.random.Generator) -> dict[str, list[int]]:
        others = [f for f in range(video_len) if f != frame] or [frame]
        return {self.role: draw_distinct(rng, others, self.num_frames)}
