"""Stream schedules: which frames each method's key-frame step receives, offline and online.

A schedule turns "frame k is the key frame" into a :class:`KeyPlan`: the frame indices of its local
window (with the key's place in it) and of its global pool, and says how much Long Range Memory the
stream keeps. The streaming engine (:mod:`megavod.inference.engine`) fetches those frames' per-frame
passes and hands them to the detector's key-frame step (:mod:`megavod.models.contract`). A method's
schedule comes from the method table (:func:`build_schedule`, :mod:`megavod.registry`), whose row
builds it from the method's config section.

* :class:`RelationSchedule` (MEGA, the base model, RDN): the paper's Algorithm 1. Offline (the authors'
  code): local window k-tau..k+tau clipped to the video, so the first and last frames repeat at the
  edges as their code pads; global pool from the code's queue over a seeded permutation S of the video
  (docs/departures.md). Online (not in the authors' code): the T_l - 1 previous frames and the key;
  the global pool is a uniform sample (reservoir, seeded) of the frames seen so far, the key included.
* :class:`FlowWindowSchedule` (FGFA): frames k + min_offset .. k + max_offset clipped to the video
  (the authors' -9..9: 19 frames, key at 9); online, the T - 1 previous frames and the key, last.
* :class:`KeyFrameSchedule` (DFF): frame k receives the last key frame (k - k mod interval); causal.
* :class:`SingleFrameSchedule`: frame k alone; causal.
* :class:`ChunkSchedule` (YOLOV): the authors' test protocol. Offline, the video's frames in a seeded
  permutation cut into chunks of ``gframe`` (the last chunk takes the rest); frame k receives its
  chunk. Online, frame k receives the ``gframe - 1`` previous frames and itself.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from megavod.registry import get_method


@dataclass(frozen=True)
class KeyPlan:
    """What key frame ``key``'s step receives, as frame indices (repeats allowed)."""

    key: int
    local: tuple[int, ...] = ()
    key_index: int = 0
    global_pool: tuple[int, ...] = ()


class OnlinePlanner(Protocol):
    """The online side of a schedule, one per stream (it may hold state, e.g. the global pool)."""

    def plan(self, k: int) -> KeyPlan:
        """The plan of frame k; called once per frame, in order, after frame k is read."""
        ...

    def keep_after(self, k: int) -> set[int]:
        """Frames (<= k) that a later key frame may still receive; the stream drops the others."""
        ...


class Schedule(Protocol):
    """A method's stream schedule."""

    #: Frame k's step needs no later frame, so offline equals online (single frame, DFF).
    causal: bool
    #: Long Range Memory levels kept by the stream (0: none) and frames per level; a schedule with
    #: memory also says the width of its rows, ``feat_dim``.
    memory_levels: int
    T_m: int
    #: The first key frame from which every key-frame step costs the same (its inputs stop growing:
    #: MEGA's from T_m on, when the memory is full), for steady-state timings (``megavod bench``);
    #: None where the schedule does not say, and such a method is timed as whole videos only.
    steady_from: int | None
    #: Frame k's step receives frame k alone: the single-frame baseline others are compared with.
    single_frame: bool

    def plan_offline(self, num_frames: int) -> list[KeyPlan]:
        """The plan of every frame of a video of ``num_frames`` frames."""
        ...

    def online_planner(self) -> OnlinePlanner:
        """A fresh planner for one live stream."""
        ...


def build_schedule(cfg) -> Schedule:
    """The schedule of ``cfg.method`` (from the method table)."""
    return get_method(cfg.method).schedule(cfg)


def last_use(plans: Sequence[KeyPlan]) -> dict[int, int]:
    """For each frame any plan uses, the last key frame that uses it."""
    last: dict[int, int] = {}
    for k, plan in enumerate(plans):
        for t in (plan.key, *plan.local, *plan.global_pool):
            last[t] = k
    return last


# -- single frame and DFF: causal by nature ------------------------------------------------------------


class _CausalPlanner:
    def __init__(self, schedule: "SingleFrameSchedule | KeyFrameSchedule") -> None:
        self.schedule = schedule

    def plan(self, k: int) -> KeyPlan:
        return self.schedule.plan(k)

    def keep_after(self, k: int) -> set[int]:
        return set(self.schedule.plan(k + 1).local)


class _CausalSchedule:
    causal = True
    memory_levels = 0
    T_m = 0
    steady_from = None
    single_frame = False

    def plan(self, k: int) -> KeyPlan:
        raise NotImplementedError

    def plan_offline(self, num_frames: int) -> list[KeyPlan]:
        return [self.plan(k) for k in range(num_frames)]

    def online_planner(self) -> OnlinePlanner:
        return _CausalPlanner(self)


@dataclass(frozen=True)
class SingleFrameSchedule(_CausalSchedule):
    """Frame k alone."""

    single_frame = True

    def plan(self, k: int) -> KeyPlan:
        return KeyPlan(k)


@dataclass(frozen=True)
class KeyFrameSchedule(_CausalSchedule):
    """DFF: frames whose number is a multiple of ``interval`` are key frames; frame k receives the last
    one (its own pass when it is one). The stream holds one key frame."""

    interval: int = 10

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")

    def plan(self, k: int) -> KeyPlan:
        return KeyPlan(k, (k - k % self.interval,))


# -- FGFA: a window of frames around the key -----------------------------------------------------------


@dataclass(frozen=True)
class FlowWindowSchedule:
    """FGFA's test window: offsets ``min_offset..max_offset`` around the key (code: -9..9, T = 19)."""

    min_offset: int = -9
    max_offset: int = 9
    causal = False
    memory_levels = 0
    T_m = 0
    steady_from = None
    single_frame = False

    def __post_init__(self) -> None:
        if not self.min_offset <= 0 <= self.max_offset:
            raise ValueError(f"need min_offset <= 0 <= max_offset, got {self.min_offset}, {self.max_offset}")

    @property
    def T(self) -> int:
        return self.max_offset - self.min_offset + 1

    def offline(self, k: int, num_frames: int) -> tuple[list[int], int]:
        """Frames of key frame k's window clipped to the video, and the key's index in it."""
        frames = [min(max(k + o, 0), num_frames - 1) for o in range(self.min_offset, self.max_offset + 1)]
        return frames, -self.min_offset

    def online(self, k: int) -> tuple[list[int], int]:
        """The T - 1 previous frames (frame 0 repeated at the start) and the key, last."""
        return [max(k - self.T + 1 + i, 0) for i in range(self.T)], self.T - 1

    def plan_offline(self, num_frames: int) -> list[KeyPlan]:
        plans = []
        for k in range(num_frames):
            frames, key_index = self.offline(k, num_frames)
            plans.append(KeyPlan(k, tuple(frames), key_index))
        return plans

    def online_planner(self) -> OnlinePlanner:
        return _FlowWindowPlanner(self)


class _FlowWindowPlanner:
    def __init__(self, schedule: FlowWindowSchedule) -> None:
        self.schedule = schedule

    def plan(self, k: int) -> KeyPlan:
        frames, key_index = self.schedule.online(k)
        return KeyPlan(k, tuple(frames), key_index)

    def keep_after(self, k: int) -> set[int]:
        return set(self.schedule.online(k + 1)[0])


# -- MEGA and RDN: local window, global pool, Long Range Memory (paper §3, Algorithm 1) -----------------


def global_order(num_frames: int, shuffle: bool, seed: int) -> list[int]:
    """The permutation S of the frames from which global frames are drawn (code: GLOBAL.SHUFFLE;
    megavod seeds it, docs/departures.md)."""
    order = list(range(num_frames))
    if shuffle:
        random.Random(seed).shuffle(order)
    return order


def offline_local_window(k: int, tau: int, num_frames: int) -> list[int]:
    """Frames k-tau..k+tau clipped to the video: the code pads with copies of the first/last frame."""
    return [min(max(k + o, 0), num_frames - 1) for o in range(-tau, tau + 1)]


def online_local_window(k: int, T_l: int) -> list[int]:
    """The T_l - 1 previous frames and the key (padded with frame 0 at the start)."""
    return [max(k - T_l + 1 + i, 0) for i in range(T_l)]


def offline_global_pools(num_frames: int, T_g: int, order: Sequence[int]) -> Iterator[list[int]]:
    """The global pool at every key frame, as the authors' deque (maxlen T_g) evolves: T_g frames
    S_{T_g-1}..S_0 at frame 0, then S_{(k+T_g-1) mod L} enters and the oldest leaves."""
    if T_g == 0:
        for _ in range(num_frames):
            yield []
        return
    pool: deque[int] = deque((order[(T_g - 1 - i) % num_frames] for i in range(T_g)), maxlen=T_g)
    for k in range(num_frames):
        if k > 0:
            pool.append(order[(k + T_g - 1) % num_frames])
        yield list(pool)


class OnlineGlobalPool:
    """A uniform sample of at most T_g frames among those seen so far (reservoir sampling, seeded)."""

    def __init__(self, T_g: int, seed: int) -> None:
        self.T_g = T_g
        self.frames: list[int] = []
        self._seen = 0
        self._rng = random.Random(seed)

    def offer(self, frame: int) -> None:
        """Show the pool a new frame: it enters with probability T_g / frames seen, replacing a
        uniformly chosen member, so the pool stays a uniform sample of the past."""
        self._seen += 1
        if len(self.frames) < self.T_g:
            self.frames.append(frame)
            return
        slot = self._rng.randrange(self._seen)
        if slot < self.T_g:
            self.frames[slot] = frame


@dataclass(frozen=True)
class RelationSchedule:
    """MEGA's (and RDN's) schedule, in the paper's symbols.

    T_l: local window frames (key included); T_g: global pool frames (0: no global stage);
    T_m: frames per memory level; memory_levels: N_l when the memory is on, else 0 (the base model);
    feat_dim: C, the width of memory rows; global_shuffle / seed: the permutation S.
    """

    T_l: int
    T_g: int = 0
    T_m: int = 0
    memory_levels: int = 0
    feat_dim: int = 1024
    global_shuffle: bool = True
    seed: int = 0
    causal = False
    single_frame = False

    @property
    def tau(self) -> int:
        return (self.T_l - 1) // 2

    @property
    def steady_from(self) -> int:
        """Key frames from k = T_m on read full memory levels (without memory, every key frame)."""
        return self.T_m if self.memory_levels else 0

    def plan_offline(self, num_frames: int) -> list[KeyPlan]:
        order = global_order(num_frames, self.global_shuffle, self.seed)  # shuffle 1..T into S
        pools = offline_global_pools(num_frames, self.T_g, order)
        return [KeyPlan(k, tuple(offline_local_window(k, self.tau, num_frames)), self.tau, tuple(pool))
                for k, pool in zip(range(num_frames), pools)]

    def online_planner(self) -> OnlinePlanner:
        return _RelationPlanner(self)


@dataclass
class _RelationPlanner:
    schedule: RelationSchedule
    pool: OnlineGlobalPool = field(init=False)

    def __post_init__(self) -> None:
        self.pool = OnlineGlobalPool(self.schedule.T_g, self.schedule.seed)

    def plan(self, k: int) -> KeyPlan:
        self.pool.offer(k)
        T_l = self.schedule.T_l
        return KeyPlan(k, tuple(online_local_window(k, T_l)), T_l - 1, tuple(self.pool.frames))

    def keep_after(self, k: int) -> set[int]:
        return set(self.pool.frames) | set(online_local_window(k + 1, self.schedule.T_l))


# -- YOLOV: chunks of a seeded permutation (tools/vid_demo.py::imageflow_demo) ---------------------------


def permutation_chunks(num_frames: int, gframe: int, seed: int) -> list[list[int]]:
    """The authors' chunks: ``random.seed(seed); random.shuffle(frames)`` (one ``random.Random(seed)``
    draws the same permutation), then ``num_frames // gframe`` chunks of ``gframe`` and a last one with
    the rest when there is a rest. A video shorter than ``gframe`` is one chunk (their loop leaves its
    index unbound there and fails, docs/yolov.md#the-test-protocol-chunks)."""
    order = list(range(num_frames))
    random.Random(seed).shuffle(order)
    chunks = [order[i:i + gframe] for i in range(0, num_frames - num_frames % gframe, gframe)]
    if num_frames % gframe:
        chunks.append(order[num_frames - num_frames % gframe:])
    return chunks


@dataclass(frozen=True)
class ChunkSchedule:
    """YOLOV's schedule: frame k's key step receives the frames of its chunk (``local``, in the
    permutation's order, the key at ``key_index``), offline; online, the ``gframe - 1`` previous frames
    and the key, last (fewer at the start of a stream)."""

    gframe: int = 32
    seed: int = 41
    causal = False
    memory_levels = 0
    T_m = 0
    steady_from = None
    single_frame = False

    def __post_init__(self) -> None:
        if self.gframe < 1:
            raise ValueError(f"gframe must be >= 1, got {self.gframe}")

    def plan_offline(self, num_frames: int) -> list[KeyPlan]:
        plans: list[KeyPlan | None] = [None] * num_frames
        for chunk in permutation_chunks(num_frames, self.gframe, self.seed):
            for position, k in enumerate(chunk):
                plans[k] = KeyPlan(k, tuple(chunk), position)
        return plans

    def online_planner(self) -> OnlinePlanner:
        return _ChunkPlanner(self.gframe)


@dataclass(frozen=True)
class _ChunkPlanner:
    gframe: int

    def window(self, k: int) -> tuple[int, ...]:
        return tuple(range(max(0, k - self.gframe + 1), k + 1))

    def plan(self, k: int) -> KeyPlan:
        window = self.window(k)
        return KeyPlan(k, window, len(window) - 1)

    def keep_after(self, k: int) -> set[int]:
        return set(self.window(k + 1)) - {k + 1}
