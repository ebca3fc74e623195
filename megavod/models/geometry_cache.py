"""Geometry-term blocks kept from one key frame to the next (MEGA inference on a stream).

A location-based relation module's geometry term b_ij (:meth:`RelationModule.geometry_bias`) depends
only on the boxes of query i and reference j and on ``Wg``. Proposals are fixed per frame, so as the
local window slides by one frame most (query frame, reference frame) pairs of a local stage were
already met at the previous key frame: at steady state only the key frame's own rows, the newest
window frame's rows and the newest reference frame are new (about half of local stage 0's pairs; the
authors compute all of them at every key frame). The geometry term is the dearest part of the key
frame on a CPU (benchmarks/README.md "Where MEGA's time goes"), so the blocks are kept.

Blocks are keyed by content: the module, the version of its ``Wg`` and the exact bytes of the two
frames' boxes (and frame indices, for the temporal embedding). A window frame that moves into memory
keeps its boxes, so its blocks stay valid; equal keys mean equal inputs, so a hit can never be stale.
Blocks not used by a key frame are dropped before the next one (:meth:`GeometryBiasCache.next_frame`),
which bounds the cache by what one key frame uses.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import numpy as np
import torch
from torch import Tensor

from megavod.models.relation import RelationModule

#: (query row index, reference row index) -> the geometry term of those pairs, [M_h, n, m].
BlockFn = Callable[[Tensor, Tensor], Tensor]


def _group_keys(boxes: Tensor, frames: Tensor | None, counts: Sequence[int]) -> list[bytes]:
    """The bytes of each group's boxes (and frame indices): one device-to-host copy for all groups."""
    values = boxes.detach().float().cpu().numpy()
    if frames is not None:
        values = np.concatenate([values, frames.detach().float().cpu().numpy()[:, None]], axis=1)
    keys, start = [], 0
    for count in counts:
        keys.append(values[start : start + count].tobytes())
        start += count
    return keys


class GeometryBiasCache:
    """Blocks [M_h, n_q, n_r] of the geometry term per (module, query group, reference group), where a
    group is one frame's rows (see the module docstring)."""

    def __init__(self) -> None:
        self._blocks: dict[tuple, Tensor] = {}
        self._used: dict[tuple, Tensor] = {}
        self._buffers: dict[Hashable, Tensor] = {}
        self.computed_pairs = 0  # query-reference pairs computed, not taken from the cache (tests, flops.py)

    def __len__(self) -> int:
        """Blocks held: those used by this key frame and the previous one's not (yet) met again."""
        return len(self._blocks) + len(self._used)

    def next_frame(self) -> None:
        """Start a new key frame: keep only the blocks the previous one used."""
        self._blocks, self._used = self._used, {}

    def __getstate__(self) -> dict:  # copies and pickles of a model start empty
        return {"_blocks": {}, "_used": {}, "_buffers": {}, "computed_pairs": 0}

    def buffer(self, name: Hashable, shape: tuple[int, int, int]) -> Tensor:
        """A float32 tensor of ``shape`` over the memory kept under ``name`` (grown when too small), for
        :meth:`assemble`'s ``out``: reused from one key frame to the next (see there). Its contents are
        valid until the next call with the same name."""
        size = shape[0] * shape[1] * shape[2]
        memory = self._buffers.get(name)
        if memory is None or memory.numel() < size:
            memory = self._buffers[name] = torch.empty(size)
        return memory[:size].view(shape)

    def bias(
        self,
        module: RelationModule,
        x_boxes: Tensor,
        x_counts: Sequence[int],
        ref_boxes: Tensor,
        ref_counts: Sequence[int],
        x_frames: Tensor | None = None,
        ref_frames: Tensor | None = None,
        *,
        uncached_queries: int = 0,
    ) -> Tensor:
        """``module.geometry_bias(x_boxes, ref_boxes, x_frames, ref_frames)`` [M_h, N, M], built from the
        kept blocks where it can. ``x_counts`` / ``ref_counts``: rows per frame, in order. The first
        ``uncached_queries`` groups (the key frame's own proposals, never met again) are computed
        and not kept."""
        if not module.temporal_embedding:
            x_frames = ref_frames = None
        weight = module.Wg

        def compute(qi: Tensor, ri: Tensor) -> Tensor:
            return module.geometry_bias(
                x_boxes[qi], ref_boxes[ri],
                None if x_frames is None else x_frames[qi], None if ref_frames is None else ref_frames[ri],
            )

        source = (id(module), weight.weight._version, weight.bias._version)
        return self.assemble(source, module.num_heads, compute, x_boxes, x_counts, ref_boxes, ref_counts,
                             x_frames, ref_frames, uncached_queries=uncached_queries)

    def assemble(
        self,
        source: Hashable,
        heads: int,
        compute: BlockFn,
        x_boxes: Tensor,
        x_counts: Sequence[int],
        ref_boxes: Tensor,
        ref_counts: Sequence[int],
        x_frames: Tensor | None = None,
        ref_frames: Tensor | None = None,
        *,
        uncached_queries: int = 0,
        out: Tensor | None = None,
    ) -> Tensor:
        """:meth:`bias` for any ``compute(query rows, reference rows)`` -> [heads, n, m] (the relation
        module's :meth:`~RelationModule.geometry_bias`, or an exported geometry graph): ``source`` names
        what computes the blocks (blocks of different sources are never mixed; a module's includes the
        version of its ``Wg``). ``x_frames`` / ``ref_frames`` only enter the keys. ``out``: a float32
        tensor [heads, N, M] to write the term into, which the caller may reuse from one key frame to the
        next (a fresh allocation of a large term is paid in page faults: MEGA R-101's 90 MB stage-0 term
        took 77 ms to assemble into a fresh tensor, 42 ms into a reused one, on one CPU thread,
        ``benchmarks/onnx_key_profile.py --assembly``)."""
        if sum(x_counts) != x_boxes.shape[0] or sum(ref_counts) != ref_boxes.shape[0]:
            raise ValueError("GeometryBiasCache.bias: group counts do not add up to the rows")
        q_keys = _group_keys(x_boxes, x_frames, x_counts)
        r_keys = _group_keys(ref_boxes, ref_frames, ref_counts)
        q_starts = np.concatenate([[0], np.cumsum(x_counts)]).tolist()
        r_starts = np.concatenate([[0], np.cumsum(ref_counts)]).tolist()

        def rows(starts: list[int], groups: Sequence[int]) -> Tensor:
            return torch.cat([torch.arange(starts[g], starts[g + 1]) for g in groups]).to(x_boxes.device)

        def computed_blocks(q_groups: Sequence[int], r_groups: Sequence[int]) -> Tensor:
            qi, ri = rows(q_starts, q_groups), rows(r_starts, r_groups)
            self.computed_pairs += qi.numel() * ri.numel()
            return compute(qi, ri)

        shape = (heads, x_boxes.shape[0], ref_boxes.shape[0])
        if out is not None and (tuple(out.shape) != shape or out.dtype != torch.float32):
            raise ValueError(f"GeometryBiasCache.assemble: out is {tuple(out.shape)} {out.dtype}, not {shape} float32")
        bias = out if out is not None else x_boxes.new_empty(shape, dtype=torch.float32)

        def fill(q_groups: Sequence[int], r_groups: Sequence[int]) -> None:
            """Compute the q_groups x r_groups pairs in one call, write them into ``bias``, keep their blocks."""
            computed = computed_blocks(q_groups, r_groups)
            qa = 0
            for q in q_groups:
                qn, ra = q_starts[q + 1] - q_starts[q], 0
                for r in r_groups:
                    rn = r_starts[r + 1] - r_starts[r]
                    block = computed[:, qa : qa + qn, ra : ra + rn]
                    bias[:, q_starts[q] : q_starts[q + 1], r_starts[r] : r_starts[r + 1]] = block
                    if q >= uncached_queries:
                        self._used[(source, q_keys[q], r_keys[r])] = block.clone()
                    ra += rn
                qa += qn

        missing: dict[int, list[int]] = {}  # reference group -> query groups that miss it
        fresh = []  # query groups computed against every reference in one call
        for q, q_key in enumerate(q_keys):
            if q < uncached_queries:
                fresh.append(q)
                continue
            misses = []
            for r, r_key in enumerate(r_keys):
                key = (source, q_key, r_key)
                block = self._used.get(key)
                if block is None:
                    block = self._blocks.pop(key, None)
                if block is None:
                    misses.append(r)
                    continue
                self._used[key] = block
                bias[:, q_starts[q] : q_starts[q + 1], r_starts[r] : r_starts[r + 1]] = block
            if len(misses) == len(ref_counts):
                fresh.append(q)
            else:
                for r in misses:
                    missing.setdefault(r, []).append(q)
        if fresh and ref_counts:
            fill(fresh, range(len(ref_counts)))
        for r, q_groups in missing.items():
            fill(q_groups, [r])
        return bias
