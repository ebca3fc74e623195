"""The streaming engine: the paper's Algorithm 1, offline and online, for every method.

For each key frame k the engine asks the method's schedule (:mod:`megavod.inference.schedules`) which
frames the step receives, fetches their per-frame passes, reads the Long Range Memory, runs the
detector's key-frame step (:mod:`megavod.models.contract`) and pushes what leaves the local window into
memory:

    L, G   <- per-frame passes of the local window and the global pool of frame k
    D_k    <- key step(key, L, G, M)      (MEGA: L^g = N_g(L, G); L^l = N_l(L^g, M); RCNN(key rows))
    M      <- Update(M, L^l_{k-tau})

Everything that belongs to one stream is a :class:`StreamState` the engine creates per video or live
stream: the frames it holds (window and pool), the online schedule's state (the global pool), the Long
Range Memory (:mod:`megavod.inference.memory`), the detector's per-stream cache and whether BLR's
relation inputs are recorded. The detector holds weights only, so streams can share one model and be
advanced in any interleaving. Every frame's per-frame pass runs exactly once, whatever role the frame
plays; offline, the frame is released after the last key frame that uses it (:class:`FeatureStore`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from megavod.inference.feature_store import FeatureStore
from megavod.inference.memory import LongRangeMemory
from megavod.inference.schedules import KeyPlan, OnlinePlanner, Schedule, last_use
from megavod.models.contract import KeyFrameInputs, VideoDetector
from megavod.structures import Detections

#: frame index -> (the detector's input tensor [3, H, W], the frame's original (height, width))
FrameLoader = Callable[[int], tuple[Tensor, tuple[int, int]]]


@dataclass
class StreamState:
    """One stream's state (see the module docstring); a test can inspect every part of it."""

    memory: LongRangeMemory | None
    cache: Any
    relation_inputs: bool = False
    planner: OnlinePlanner | None = None  # online only
    held: dict[int, Any] = field(default_factory=dict)  # online: the passes later frames may use

    @classmethod
    def start(cls, model: VideoDetector, schedule: Schedule, relation_inputs: bool = False,
              online: bool = False) -> "StreamState":
        memory = None
        if schedule.memory_levels:
            memory = LongRangeMemory(schedule.memory_levels, schedule.T_m, schedule.feat_dim)
        return cls(memory, model.new_stream_cache(), relation_inputs,
                   schedule.online_planner() if online else None)

    def detect_key(self, model: VideoDetector, plan: KeyPlan, frame: Callable[[int], Any]) -> Detections:
        """Algorithm 1's body for one key frame: gather, aggregate and detect, update the memory."""
        local = [frame(t) for t in plan.local]
        global_pool = [frame(g) for g in plan.global_pool]
        inputs = KeyFrameInputs(
            key=frame(plan.key),
            local=local,
            key_index=plan.key_index,
            global_pool=global_pool,
            memory=self.memory.levels() if self.memory is not None else None,
            relation_inputs=self.relation_inputs,
        )
        out = model.detect_key(inputs, self.cache)
        if self.memory is not None:
            self.memory.push(out.memory_push)  # Update(M, L^l_{k-tau})
        return out.detections


def detect_offline(
    model: VideoDetector,
    load_frame: FrameLoader | None,
    num_frames: int,
    schedule: Schedule,
    store: FeatureStore | None = None,
    *,
    relation_inputs: bool = False,
) -> Iterator[tuple[int, Detections]]:
    """Algorithm 1 (offline) over a video of ``num_frames`` frames: (k, detections of frame k) in order.

    ``load_frame(t)`` is called once per frame, when a key frame first needs frame t; ``store``
    replaces the default :class:`FeatureStore` (a test's, or one that spills to disk differently).
    """
    if num_frames <= 0:
        return
    plans = schedule.plan_offline(num_frames)
    release_after: dict[int, list[int]] = {}
    for frame, k in last_use(plans).items():
        release_after.setdefault(k, []).append(frame)

    def frame_pass(t: int) -> Any:
        image, original_size = load_frame(t)
        return model.frame_features(image, t, original_size)

    store = store if store is not None else FeatureStore(frame_pass)
    stream = StreamState.start(model, schedule, relation_inputs)
    try:
        for k, plan in enumerate(plans):
            yield k, stream.detect_key(model, plan, store.get)
            for frame in sorted(release_after.get(k, ())):
                store.release(frame)
    finally:
        store.close()


def detect_online(
    model: VideoDetector,
    frames: Iterable[tuple[Tensor, tuple[int, int]]],
    schedule: Schedule,
    *,
    relation_inputs: bool = False,
) -> Iterator[tuple[int, Detections]]:
    """Algorithm 1 (online, causal): frame k's detections are yielded before frame k+1 is read.

    Memory use is bounded whatever the stream's length: the stream holds the frames a later key frame
    may receive (MEGA: T_l window frames and T_g global frames) and T_m frames per memory level.
    """
    stream = StreamState.start(model, schedule, relation_inputs, online=True)
    for k, (image, original_size) in enumerate(frames):
        stream.held[k] = model.frame_features(image, k, original_size)
        yield k, stream.detect_key(model, stream.planner.plan(k), stream.held.__getitem__)
        keep = stream.planner.keep_after(k)
        for t in [t for t in stream.held if t not in keep]:
            del stream.held[t]
