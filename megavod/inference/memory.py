"""MEGA's Long Range Memory (paper §3.3, docs/conventions.md#long-range-memory,
docs/departures.md#memory-length-as-its-own-parameter).

Level i (i < N_l) keeps, for each of the T_m most recent frames that left the local window, the rows
that frame contributed as references of local stage i: all its proposals at level 0 (after the global
stage), its distilled proposals at levels >= 1 (after stage i-1 and its FC+ReLU). Stage i reads level i
*before* this frame's entry is pushed, so at steady state memory covers frames k-tau-T_m ... k-tau-1.

Entries are stored detached and are never recomputed: a row's features are those computed by the
weights and references in force when it was pushed (the paper's "no recomputation" of cached features).
``T_m = 0`` keeps nothing, which is the same as running without memory (the paper's "base model").
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch

from megavod.models.mega_head import RoiRows


class LongRangeMemory:
    """Per-level queues of at most ``T_m`` frame entries (:class:`RoiRows`: features, boxes, frame indices).

    Args:
        num_levels: N_l, one level per local stage.
        T_m: frames kept per level (a real parameter, default 25:
            docs/departures.md#memory-length-as-its-own-parameter).
        feat_dim: feature size, for the empty rows :meth:`read_rows` returns before the first push.
    """

    def __init__(self, num_levels: int, T_m: int, feat_dim: int = 1024) -> None:
        if num_levels < 0:
            raise ValueError(f"num_levels must be >= 0, got {num_levels}")
        if T_m < 0:
            raise ValueError(f"T_m must be >= 0, got {T_m}")
        self.num_levels = num_levels
        self.T_m = T_m
        self.feat_dim = feat_dim
        self._levels: list[deque[RoiRows]] = [deque(maxlen=T_m) for _ in range(num_levels)]
        # Device/dtype of the last pushed rows, so that empty reads concatenate with live tensors.
        self._device = torch.device("cpu")
        self._dtype = torch.float32

    def push(self, level_entries: Sequence[RoiRows]) -> None:
        """Append one frame's entry to every level (one :class:`RoiRows` per level); the oldest frame of a
        full level drops out."""
        if len(level_entries) != self.num_levels:
            raise ValueError(f"push: expected {self.num_levels} level entries, got {len(level_entries)}")
        for level, entry in zip(self._levels, level_entries):
            level.append(entry.detach())
        if level_entries:
            self._device, self._dtype = level_entries[0].feats.device, level_entries[0].feats.dtype

    def num_frames(self, level: int) -> int:
        """Frame entries currently held at ``level`` (never more than T_m)."""
        return len(self._levels[level])

    def entries(self, level: int) -> list[RoiRows]:
        """The frame entries of ``level``, oldest first (the objects held: the same until they drop out)."""
        return list(self._levels[level])

    def read_rows(self, level: int) -> RoiRows:
        """All rows of ``level``, oldest frame first, as one :class:`RoiRows` (empty when nothing is held)."""
        entries = self._levels[level]
        if not entries:
            return RoiRows(
                torch.zeros(0, self.feat_dim, device=self._device, dtype=self._dtype),
                torch.zeros(0, 4, device=self._device, dtype=self._dtype),
                None,
            )
        return RoiRows.cat(list(entries))

    def levels(self) -> list[list[RoiRows]]:
        """Every level's entries, oldest first: what a key-frame step reads (:attr:`KeyFrameInputs.memory`)."""
        return [list(level) for level in self._levels]
