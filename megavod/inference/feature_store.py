"""Per-frame features computed exactly once and dropped when no window needs them any more.

The streaming engine asks the store for a frame's features whenever a window (local, global) needs
them; the first request runs the detector's per-frame pass (backbone, RPN, RoI features), later
requests are served from the store. Offline, the engine knows in advance the last key frame that needs
each frame (local windows and the global schedule are fixed by the seed), so a frame is evicted right
after that key frame; a frame needed again much later (a global frame met again as a local frame) is
kept, in RAM up to ``max_in_memory`` frames and on disk beyond that, never recomputed.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


class FeatureStore(Generic[T]):
    """A cache of per-frame results keyed by frame index.

    Args:
        compute: frame index -> features (the detector's per-frame pass), a dataclass of tensors/scalars.
        max_in_memory: frames held in RAM; older ones are written to ``spill_dir``.
        spill_dir: where spilled frames go (a temporary folder when None, removed by :meth:`close`).
    """

    def __init__(self, compute: Callable[[int], T], max_in_memory: int = 256, spill_dir: Path | None = None) -> None:
        if max_in_memory < 1:
            raise ValueError(f"max_in_memory must be >= 1, got {max_in_memory}")
        self._compute = compute
        self._max_in_memory = max_in_memory
        self._ram: OrderedDict[int, T] = OrderedDict()
        self._disk: dict[int, Path] = {}
        self._spilled_types: dict[int, type] = {}
        self._spill_root = spill_dir
        self._spill_dir: Path | None = None
        self.computed: list[int] = []  # every frame whose per-frame pass ran, in order (for tests/stats)

    def __contains__(self, frame: int) -> bool:
        return frame in self._ram or frame in self._disk

    def __len__(self) -> int:
        return len(self._ram) + len(self._disk)

    @property
    def in_memory(self) -> int:
        return len(self._ram)

    def get(self, frame: int) -> T:
        if frame in self._ram:
            self._ram.move_to_end(frame)
            return self._ram[frame]
        if frame in self._disk:
            cls = self._spilled_types.pop(frame)
            value = cls(**torch.load(self._disk.pop(frame), weights_only=True))
        else:
            value = self._compute(frame)
            self.computed.append(frame)
        self._ram[frame] = value
        self._spill_over_budget()
        return value

    def put(self, frame: int, value: T) -> None:
        """Store a frame's features computed elsewhere (a batched per-frame pass of several streams)."""
        self._ram[frame] = value
        self._ram.move_to_end(frame)
        self.computed.append(frame)
        self._spill_over_budget()

    def release(self, frame: int) -> None:
        """Forget a frame no window will need again."""
        self._ram.pop(frame, None)
        self._spilled_types.pop(frame, None)
        path = self._disk.pop(frame, None)
        if path is not None:
            path.unlink(missing_ok=True)

    def clear(self) -> None:
        for frame in list(self._ram) + list(self._disk):
            self.release(frame)

    def close(self) -> None:
        self.clear()
        if self._spill_dir is not None and self._spill_root is None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
        self._spill_dir = None

    def _spill_over_budget(self) -> None:
        while len(self._ram) > self._max_in_memory:
            frame, value = self._ram.popitem(last=False)
            if self._spill_dir is None:
                if self._spill_root is not None:
                    self._spill_root.mkdir(parents=True, exist_ok=True)
                    self._spill_dir = self._spill_root
                else:
                    self._spill_dir = Path(tempfile.mkdtemp(prefix="megavod-features-"))
            path = self._spill_dir / f"{frame:08d}.pt"
            # Values are dataclasses of tensors; saved as plain dicts so they load with weights_only.
            torch.save({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, path)
            self._spilled_types[frame] = type(value)
            self._disk[frame] = path

    def __enter__(self) -> "FeatureStore[T]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
