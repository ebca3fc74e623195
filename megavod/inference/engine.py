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

Many streams go through one model in lockstep (:func:`detect_many_offline`, :func:`detect_many_online`):
each step gathers the frames every stream's next key frame needs, runs their per-frame passes as one
batched call per frame size (:func:`frame_passes`), then the streams' key-frame steps (one batched
call where the detector has one, :func:`key_steps`). One stream at a
time (:func:`detect_offline`, :func:`detect_online`) is the same loop with a single stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from megavod.inference.feature_store import FeatureStore
from megavod.inference.memory import LongRangeMemory
from megavod.inference.schedules import KeyPlan, OnlinePlanner, Schedule, last_use
from megavod.models.contract import BatchedFramePass, BatchedKeyStep, KeyFrameInputs, KeyFrameOutput, VideoDetector
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
        return self.update(model.detect_key(self.gather(plan, frame), self.cache))

    def gather(self, plan: KeyPlan, frame: Callable[[int], Any]) -> KeyFrameInputs:
        """What the key frame's step receives: the passes of its window and pool, the memory's rows."""
        local = [frame(t) for t in plan.local]
        global_pool = [frame(g) for g in plan.global_pool]
        return KeyFrameInputs(
            key=frame(plan.key),
            local=local,
            key_index=plan.key_index,
            global_pool=global_pool,
            memory=self.memory.levels() if self.memory is not None else None,
            relation_inputs=self.relation_inputs,
        )

    def update(self, out: KeyFrameOutput) -> Detections:
        """After the key frame's step: Update(M, L^l_{k-tau}); its detections."""
        if self.memory is not None:
            self.memory.push(out.memory_push)
        return out.detections


@dataclass
class FrameRequest:
    """A frame whose per-frame pass a step needs: the detector's input tensor [3, H, W], the frame's
    number in its video and its original (height, width)."""

    index: int
    image: Tensor
    original_size: tuple[int, int]


def frame_passes(model: VideoDetector, requests: Sequence[FrameRequest], batch: bool = True) -> list[Any]:
    """The per-frame passes of ``requests``, in order. With ``batch`` and a detector that has a batched
    pass (:class:`BatchedFramePass`), frames of one size run as one call (frames of different sizes are
    not padded together: padding would change the features near the bottom and right edges)."""
    out: list[Any] = [None] * len(requests)
    groups: dict[Any, list[int]] = {}
    batched = batch and isinstance(model, BatchedFramePass)
    for i, request in enumerate(requests):
        groups.setdefault(tuple(request.image.shape) if batched else i, []).append(i)
    for members in groups.values():
        if len(members) == 1:
            r = requests[members[0]]
            out[members[0]] = model.frame_features(r.image, r.index, r.original_size)
            continue
        passes = model.frame_features_batch(torch.stack([requests[i].image for i in members]),
                                            [requests[i].index for i in members],
                                            [requests[i].original_size for i in members])
        for i, frame in zip(members, passes):
            out[i] = frame
    return out


def key_steps(model: VideoDetector, inputs: Sequence[KeyFrameInputs], caches: Sequence[Any],
              batch: bool = True) -> list[KeyFrameOutput]:
    """The key-frame steps of several streams, in order: one call when ``batch`` and the detector has a
    batched key step (:class:`BatchedKeyStep`, measured faster for the single-frame detector), else one
    call per stream."""
    if batch and len(inputs) > 1 and isinstance(model, BatchedKeyStep):
        return model.detect_keys(inputs, caches)
    return [model.detect_key(i, c) for i, c in zip(inputs, caches)]


class OfflineStream:
    """One video detected offline, one key frame per :meth:`step` (or :meth:`gather`, the step run
    outside, then :meth:`finish`).

    ``load_frame(t)`` is called once per frame, when a key frame first needs frame t, unless the frame's
    pass was handed in before by :meth:`provide` (the frames :meth:`needed` lists); ``store`` replaces
    the default :class:`FeatureStore` (a test's, or one that spills to disk differently).
    """

    def __init__(self, model: VideoDetector, load_frame: FrameLoader | None, num_frames: int, schedule: Schedule,
                 store: FeatureStore | None = None, *, relation_inputs: bool = False) -> None:
        self.model = model
        self.load_frame = load_frame
        self.plans = schedule.plan_offline(num_frames) if num_frames > 0 else []
        self.release_after: dict[int, list[int]] = {}
        for frame, k in last_use(self.plans).items():
            self.release_after.setdefault(k, []).append(frame)
        self.store = store if store is not None else FeatureStore(self._frame_pass)
        self.state = StreamState.start(model, schedule, relation_inputs)
        self.k = 0

    def _frame_pass(self, t: int) -> Any:
        image, original_size = self.load_frame(t)
        return self.model.frame_features(image, t, original_size)

    @property
    def done(self) -> bool:
        return self.k >= len(self.plans)

    def needed(self) -> list[int]:
        """Frames the next key frame receives whose pass has not run yet, in the order it reads them."""
        plan = self.plans[self.k]
        return [t for t in dict.fromkeys((*plan.local, *plan.global_pool, plan.key)) if t not in self.store]

    def provide(self, t: int, frame: Any) -> None:
        self.store.put(t, frame)

    def step(self) -> tuple[int, Detections]:
        """Key frame k's detections; then the frames no later key frame uses are released."""
        return self.finish(self.model.detect_key(self.gather(), self.state.cache))

    def gather(self) -> KeyFrameInputs:
        """The next key frame's inputs (its step runs outside: alone, or batched with other streams')."""
        return self.state.gather(self.plans[self.k], self.store.get)

    def finish(self, out: KeyFrameOutput) -> tuple[int, Detections]:
        k = self.k
        detections = self.state.update(out)
        for frame in sorted(self.release_after.get(k, ())):
            self.store.release(frame)
        self.k += 1
        return k, detections

    def close(self) -> None:
        self.store.close()


class OnlineStream:
    """One live stream detected causally: :meth:`step` takes frame k's pass and returns its detections.

    Memory use is bounded whatever the stream's length: the stream holds the frames a later key frame
    may receive (MEGA: T_l window frames and T_g global frames) and T_m frames per memory level.
    """

    def __init__(self, model: VideoDetector, schedule: Schedule, *, relation_inputs: bool = False) -> None:
        self.model = model
        self.state = StreamState.start(model, schedule, relation_inputs, online=True)
        self.k = 0

    def step(self, frame: Any) -> tuple[int, Detections]:
        """Frame k's detections from its per-frame pass ``frame``."""
        return self.finish(self.model.detect_key(self.gather(frame), self.state.cache))

    def gather(self, frame: Any) -> KeyFrameInputs:
        """Hold frame k's pass; its key step's inputs (the step runs outside: alone or batched)."""
        state = self.state
        state.held[self.k] = frame
        return state.gather(state.planner.plan(self.k), state.held.__getitem__)

    def finish(self, out: KeyFrameOutput) -> tuple[int, Detections]:
        k, state = self.k, self.state
        detections = state.update(out)
        keep = state.planner.keep_after(k)
        for t in [t for t in state.held if t not in keep]:
            del state.held[t]
        self.k += 1
        return k, detections


def detect_offline(
    model: VideoDetector,
    load_frame: FrameLoader | None,
    num_frames: int,
    schedule: Schedule,
    store: FeatureStore | None = None,
    *,
    relation_inputs: bool = False,
) -> Iterator[tuple[int, Detections]]:
    """Algorithm 1 (offline) over a video of ``num_frames`` frames: (k, detections of frame k) in order
    (:class:`OfflineStream`)."""
    stream = OfflineStream(model, load_frame, num_frames, schedule, store, relation_inputs=relation_inputs)
    try:
        while not stream.done:
            yield stream.step()
    finally:
        stream.close()


def detect_online(
    model: VideoDetector,
    frames: Iterable[tuple[Tensor, tuple[int, int]]],
    schedule: Schedule,
    *,
    relation_inputs: bool = False,
) -> Iterator[tuple[int, Detections]]:
    """Algorithm 1 (online, causal): frame k's detections are yielded before frame k+1 is read
    (:class:`OnlineStream`)."""
    stream = OnlineStream(model, schedule, relation_inputs=relation_inputs)
    for k, (image, original_size) in enumerate(frames):
        yield stream.step(model.frame_features(image, k, original_size))


def detect_many_offline(
    model: VideoDetector,
    videos: Sequence[tuple[FrameLoader, int]],
    schedule: Schedule,
    *,
    relation_inputs: bool = False,
    batch_frames: bool = True,
) -> Iterator[tuple[int, int, Detections]]:
    """Algorithm 1 (offline) over several videos ``(load_frame, num_frames)`` in lockstep: (video i, k,
    detections of its frame k). Each step runs the per-frame passes that the next key frame of every
    unfinished video needs as batched calls (:func:`frame_passes`), then the videos' key-frame steps
    (:func:`key_steps`); a video that ends leaves the batch. Each video's detections are those it gives
    alone (exactly with ``batch_frames=False``; batched, up to the float rounding of batched kernels)."""
    streams = {i: OfflineStream(model, load, n, schedule, relation_inputs=relation_inputs)
               for i, (load, n) in enumerate(videos)}
    try:
        while active := [i for i, s in streams.items() if not s.done]:
            wanted = [(i, t) for i in active for t in streams[i].needed()]
            requests = [FrameRequest(t, *videos[i][0](t)) for i, t in wanted]
            for (i, t), frame in zip(wanted, frame_passes(model, requests, batch_frames)):
                streams[i].provide(t, frame)
            inputs = [streams[i].gather() for i in active]
            outs = key_steps(model, inputs, [streams[i].state.cache for i in active], batch_frames)
            for i, out in zip(active, outs):
                yield (i, *streams[i].finish(out))
    finally:
        for stream in streams.values():
            stream.close()


def detect_many_online(
    model: VideoDetector,
    sources: Sequence[Iterable[tuple[Tensor, tuple[int, int]]]],
    schedule: Schedule,
    *,
    relation_inputs: bool = False,
    batch_frames: bool = True,
) -> Iterator[tuple[int, int, Detections]]:
    """Algorithm 1 (online) over several live streams in lockstep: (stream i, k, detections of its frame
    k). Each step reads the next frame of every unfinished stream, runs their per-frame passes as batched
    calls (:func:`frame_passes`) and the streams' key-frame steps (:func:`key_steps`); a stream's frame k
    is yielded before its frame k+1 is read. A stream that ends leaves the batch."""
    readers = {i: iter(source) for i, source in enumerate(sources)}
    streams = {i: OnlineStream(model, schedule, relation_inputs=relation_inputs) for i in readers}
    while readers:
        arrived: list[tuple[int, FrameRequest]] = []
        for i in list(readers):
            try:
                image, original_size = next(readers[i])
            except StopIteration:
                del readers[i]
                continue
            arrived.append((i, FrameRequest(streams[i].k, image, original_size)))
        passes = frame_passes(model, [request for _, request in arrived], batch_frames)
        inputs = [streams[i].gather(frame) for (i, _), frame in zip(arrived, passes)]
        outs = key_steps(model, inputs, [streams[i].state.cache for i, _ in arrived], batch_frames)
        for (i, _), out in zip(arrived, outs):
            yield (i, *streams[i].finish(out))
