"""The streaming engine: the paper's Algorithm 1, offline and online.

The engine owns the stream state — the local window, the global pool, the Long Range Memory and the
per-frame feature store — as plain objects a test can inspect; the detector holds none. Every frame's
per-frame pass (backbone, RPN, RoI features) runs exactly once (:class:`FeatureStore`), whether the
frame is met as a key, local, global or memory frame.

Offline (the authors' code, spec §4.3, §13.1-13.4): the local window is frames k-tau..k+tau, clipped to
the video (so the first and last frames repeat at the edges, as in the code); the global pool follows the
code's queue over a seeded permutation S of the video: T_g frames S_{T_g-1}..S_0 at frame 0, then
S_{(k+T_g-1) mod L} enters and the oldest leaves. Online (spec §13.5): the local window is the T_l - 1
previous frames and the key; the global pool is a uniform sample of the frames seen so far (reservoir
sampling, seeded), so memory stays bounded on an endless stream; frame k is emitted before frame k+1
is read.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

import torch
from torch import Tensor

from megavod.config import Config
from megavod.inference.feature_store import FeatureStore
from megavod.inference.memory import LongRangeMemory
from megavod.models.mega_head import RoiRows
from megavod.structures import Detections, FrameFeatures


@dataclass(frozen=True)
class StreamSettings:
    """What the engine needs to know of a method: window, pool and memory sizes (paper symbols).

    T_l: local window frames (key included); T_g: global pool frames (0: no global stage);
    T_m: frames per memory level; memory_levels: N_l when the memory is on, else 0.
    """

    T_l: int
    T_g: int = 0
    T_m: int = 0
    memory_levels: int = 0
    feat_dim: int = 1024
    global_shuffle: bool = True
    seed: int = 0

    @property
    def tau(self) -> int:
        return (self.T_l - 1) // 2

    @classmethod
    def from_config(cls, cfg: Config) -> "StreamSettings":
        if cfg.method == "mega":
            m = cfg.mega
            uses_global = m.N_g + m.global_res_stages > 0
            return cls(T_l=m.T_l, T_g=m.T_g if uses_global else 0, T_m=m.T_m,
                       memory_levels=m.N_l if m.memory else 0, feat_dim=cfg.model.roi_head.representation_size,
                       global_shuffle=m.global_shuffle, seed=cfg.seed)
        if cfg.method == "rdn":
            # RDN: the same window logic without global pool or memory (spec §6.4): 37 frames, key at 18.
            return cls(T_l=cfg.rdn.max_offset - cfg.rdn.min_offset + 1, seed=cfg.seed,
                       feat_dim=cfg.model.roi_head.representation_size)
        raise ValueError(f"method {cfg.method!r} does not run on the relation streaming engine")

    def new_memory(self) -> LongRangeMemory | None:
        return LongRangeMemory(self.memory_levels, self.T_m, self.feat_dim) if self.memory_levels else None


class VideoDetector(Protocol):
    """What the engine needs from a MEGA-style detector (see :class:`megavod.models.mega.MEGADetector`)."""

    def frame_features(self, image: Tensor, index: int, original_size: tuple[int, int]) -> FrameFeatures: ...

    def detect_key(
        self,
        key: FrameFeatures,
        local_window: Sequence[FrameFeatures],
        global_pool: Sequence[FrameFeatures],
        memory: LongRangeMemory | None,
    ) -> tuple[Detections, list[RoiRows]]:
        """Detections of the key frame, and what each memory level receives from the oldest window frame."""
        ...


def global_order(num_frames: int, shuffle: bool, seed: int) -> list[int]:
    """The permutation S of the frames from which global frames are drawn (code: GLOBAL.SHUFFLE;
    megavod seeds it, spec §13.2)."""
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
    """The global pool at every key frame, as the code's deque (maxlen T_g) evolves (spec §4.3)."""
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


def _last_use(num_frames: int, tau: int, pools: Sequence[Sequence[int]]) -> list[int]:
    """For each frame, the last key frame whose local window or global pool contains it."""
    last = [min(f + tau, num_frames - 1) for f in range(num_frames)]
    for k, pool in enumerate(pools):
        for g in pool:
            last[g] = max(last[g], k)
    return last


def detect_offline(
    model: VideoDetector,
    load_frame: Callable[[int], tuple[Tensor, tuple[int, int]]],
    num_frames: int,
    settings: StreamSettings,
    store: FeatureStore[FrameFeatures] | None = None,
) -> Iterator[tuple[int, Detections]]:
    """Algorithm 1 (offline) over a video of ``num_frames`` frames.

    ``load_frame(t)`` returns frame t as the detector's input tensor and the frame's original
    (height, width); it is called once per frame.
    """
    s = settings
    if num_frames <= 0:
        return
    order = global_order(num_frames, s.global_shuffle, s.seed)  # shuffle 1..T into S
    pools = list(offline_global_pools(num_frames, s.T_g, order))
    last_use = _last_use(num_frames, s.tau, pools)
    release_after: dict[int, list[int]] = {}
    for frame, k in enumerate(last_use):
        release_after.setdefault(k, []).append(frame)

    def compute(t: int) -> FrameFeatures:
        image, original_size = load_frame(t)
        return model.frame_features(image, t, original_size)

    store = store if store is not None else FeatureStore(compute)
    memory = s.new_memory()  # M empty
    try:
        for k in range(num_frames):
            local_window = [store.get(t) for t in offline_local_window(k, s.tau, num_frames)]
            global_pool = [store.get(g) for g in pools[k]]
            # L^g = N_g(L, G); L^l = N_l(L^g, M); D_k = RCNN(key rows)
            detections, oldest = model.detect_key(store.get(k), local_window, global_pool, memory)
            if memory is not None:
                memory.push(oldest)  # Update(M, L^l_{k-tau})
            yield k, detections
            for frame in release_after.get(k, ()):
                store.release(frame)
    finally:
        store.close()


def detect_online(
    model: VideoDetector,
    frames: Iterable[tuple[Tensor, tuple[int, int]]],
    settings: StreamSettings,
) -> Iterator[tuple[int, Detections]]:
    """Algorithm 1 (online, causal): frame k's detections are yielded before frame k+1 is read.

    Memory use is bounded whatever the stream's length: the engine holds the T_l window frames, the
    T_g global frames and T_m frames per memory level.
    """
    s = settings
    pool = OnlineGlobalPool(s.T_g, s.seed)
    memory = s.new_memory()
    window: dict[int, FrameFeatures] = {}
    for k, (image, original_size) in enumerate(frames):
        window[k] = model.frame_features(image, k, original_size)
        pool.offer(k)
        local_window = [window[t] for t in online_local_window(k, s.T_l)]
        global_pool = [window[g] for g in pool.frames]
        detections, oldest = model.detect_key(window[k], local_window, global_pool, memory)
        if memory is not None:
            memory.push(oldest)
        yield k, detections
        # Keep only what a later window or the pool can still use.
        needed = set(pool.frames) | set(online_local_window(k + 1, s.T_l))
        for t in [t for t in window if t not in needed]:
            del window[t]


def detect_single_frames(
    model: torch.nn.Module,
    frames: Iterable[tuple[Tensor, tuple[int, int]]],
) -> Iterator[tuple[int, Detections]]:
    """The single-frame baseline: each frame alone (causal by nature)."""
    for k, (image, original_size) in enumerate(frames):
        yield k, model.detect_frame(image, original_size)
