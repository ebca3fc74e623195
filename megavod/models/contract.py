"""The one contract every detector follows at test time (docs/architecture.md#the-detector-contract).

A detector splits its work on a video into two steps:

* the **per-frame pass** :meth:`VideoDetector.frame_features`, run exactly once per frame, whatever role the
  frame plays later (key, local, global or memory frame): backbone, and for the relation methods the
  RPN and the raw RoI features of its proposals;
* the **key-frame step** :meth:`VideoDetector.detect_key`, run once per frame as key frame, on what the
  method's stream schedule (:mod:`megavod.inference.schedules`) gives it in a :class:`KeyFrameInputs`:
  the key frame's pass, the other frames' passes (local window, global pool), the Long Range Memory's
  rows, and the per-stream cache the detector asked for (:meth:`VideoDetector.new_stream_cache`).

Detectors hold weights only: everything that belongs to one stream (window, pool, memory, caches of
keys/values and geometry, whether BLR's relation inputs are recorded) is owned by the stream
(:class:`megavod.inference.engine.StreamState`) and passed in, so one model serves many streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from torch import Tensor

from megavod.structures import Detections

FrameT = TypeVar("FrameT")


@dataclass
class KeyFrameInputs(Generic[FrameT]):
    """What a key-frame step receives.

    key: the key frame's per-frame pass.
    local: the frames of the local window (MEGA, RDN: T_l frames; FGFA: its window; DFF: the last key
        frame), in the schedule's order; may hold the key itself and repeated frames at a video's edges.
    key_index: the key's position in ``local`` (where the schedule places it).
    global_pool: MEGA's global frames (empty for the other methods).
    memory: MEGA's Long Range Memory, per level the entries of the frames it holds, oldest first
        (:class:`megavod.models.mega_head.RoiRows`); None when the method keeps no memory.
    relation_inputs: attach to each detection its query row in the last location-based relation module
        (for BLR); the detections themselves are the same.
    """

    key: FrameT
    local: Sequence[FrameT] = ()
    key_index: int = 0
    global_pool: Sequence[FrameT] = ()
    memory: Sequence[Sequence[Any]] | None = None
    relation_inputs: bool = False


@dataclass
class KeyFrameOutput:
    """The key frame's detections (original-frame pixels) and, for MEGA, what each memory level
    receives from the frame that leaves the local window (empty for the other methods)."""

    detections: Detections
    memory_push: list[Any] = field(default_factory=list)


@runtime_checkable
class VideoDetector(Protocol[FrameT]):
    """The detector contract (single frame, DFF, FGFA, RDN, MEGA and the base model follow it)."""

    def frame_features(self, image: Tensor, index: int, original_size: tuple[int, int]) -> FrameT:
        """One frame's per-frame pass: ``image`` [3, H, W] resized and normalised, ``index`` its number
        in the video, ``original_size`` (height, width) of the frame as read."""
        ...

    def new_stream_cache(self) -> Any:
        """A fresh per-stream cache for :meth:`detect_key` (None when the detector keeps nothing between
        key frames). The stream owns it; the detector only reads and fills it."""
        ...

    def detect_key(self, inputs: KeyFrameInputs[FrameT], cache: Any = None) -> KeyFrameOutput:
        """Detections of ``inputs.key``."""
        ...


@runtime_checkable
class BatchedFramePass(Protocol[FrameT]):
    """A detector whose per-frame pass can run on several frames of one size in one call (many streams
    through one model, :func:`megavod.inference.engine.detect_many_online`). Optional: the engine runs
    :meth:`VideoDetector.frame_features` frame by frame for a detector without it."""

    def frame_features_batch(self, images: Tensor, indices: Sequence[int],
                             original_sizes: Sequence[tuple[int, int]]) -> list[FrameT]:
        """The per-frame passes of ``images`` [B, 3, H, W] (frames of one size, e.g. of B streams), equal
        to B calls of :meth:`VideoDetector.frame_features` up to the float rounding of batched kernels."""
        ...


@runtime_checkable
class BatchedKeyStep(Protocol[FrameT]):
    """A detector whose key-frame step can run for several streams' key frames in one call (optional;
    the single-frame detector has one: its RPN and box head batch well). ``caches[i]`` is the stream
    cache of ``inputs[i]``; key frames of different sizes may come together (the detector groups them)."""

    def detect_keys(self, inputs: Sequence[KeyFrameInputs[FrameT]], caches: Sequence[Any]) -> list[KeyFrameOutput]:
        """:meth:`VideoDetector.detect_key` of each of ``inputs``, in order."""
        ...
