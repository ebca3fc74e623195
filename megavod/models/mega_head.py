"""MEGA's box-feature aggregation (paper §3, docs/conventions.md#mega-aggregation-head,
docs/conventions.md#mega-inference-schedule, docs/conventions.md#training-forward,
docs/departures.md#ablations-the-released-code-cannot-run): pure modules on RoI features, no backbone, no
state. The streaming engine owns the local window, the global pool and the Long Range Memory
(:mod:`megavod.inference.memory`) and passes them in.

MEGA's three ideas each live in one named method of :class:`MEGAAggregator`:

* :meth:`~MEGAAggregator.global_stage`: N_g stacked location-free relation modules bring the global
  pool G (raw features of T_g frames from anywhere in the video) into the key and every local row;
  R-101 adds ``global_res_stages`` more on the key after the local stack
  (:meth:`~MEGAAggregator.global_residual_stage`).
* :meth:`~MEGAAggregator.local_stage`: N_l location-based relation modules over the T_l-frame local
  window; stage 0 queries the key and distilled rows D over all local rows, the middle stages query
  [key; D] over D, the last stage queries the key over D.
* memory: local stage i also attends to memory level i (rows of frames that left the window); what each
  level receives from this frame is returned as ``memory_push`` (the oldest window frame's rows as
  stage i saw them).

Parameter names -> the authors' ``roi_heads.box.feature_extractor.*`` keys (docs/conventions.md#state-dict-names), via
:meth:`MEGAAggregator.authors_key_mapping`:

=====================================  =====================================
``fcs.{i}.weight|bias``                ``l_fcs.{i}.weight|bias``
``local_stages.{i}.W{g,q,k,v}.*``      ``l_W{g,q,k,v}s.{i}.*``
``local_stages.{i}.u``                 ``l_us.{i}``
``global_stages.{r}.W{q,k,v}.*``       ``g_W{q,k,v}s.{r}.*`` (r < N_g: global stage, then residual)
``global_stages.{r}.u``                ``g_us.{r}``
=====================================  =====================================

``fcs[0]`` is the raw per-RoI feature (the authors' ``l_fcs[0]``, fc6): :meth:`MEGAAggregator.embed`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megavod.models.relation import RelationModule, first_rows_index, make_fc_init


Projection = tuple[Tensor, Tensor]  # keys and values of reference rows, [M_h, M, d] each
Counts = Sequence[int] | Tensor  # rows per frame of rows laid out frame by frame (a tensor in a traced graph)

#: The geometry term [M_h, Q, M] of local stage ``i``'s window queries D (Q rows, ``query_counts`` per
#: frame) over its references (the local part ``reference_counts`` per frame, then memory level i's rows),
#: kept between key frames: called as ``(i, module, queries, query_counts, references, reference_counts)``
#: for every stage but the last (which queries the key only). In PyTorch the stream's
#: :class:`~megavod.models.geometry_cache.GeometryBiasCache` assembles it (:meth:`MEGADetector.detect_key`);
#: an exported key graph takes it as an input. The key's own rows, never met again, get theirs in the module.
WindowGeometry = Callable[[int, RelationModule, "RoiRows", Counts, "RoiRows", Counts], Tensor]


def _at_most(counts: Counts | int, n: int) -> Counts | int:
    """min(count, n) of a count or of every count (Python ints, or a tensor in a traced graph)."""
    if isinstance(counts, Tensor):
        return torch.clamp(counts, max=n)
    if isinstance(counts, int):
        return min(counts, n)
    return [min(c, n) for c in counts]


@dataclass
class RoiRows:
    """RoI rows of one or more frames.

    feats: [R, C] (None for rows given by their keys and values only: an exported key graph's global pool
    and memory, docs/architecture.md#export-and-onnx-runtime); boxes: [R, 4] proposals of the rows' own
    frames (None where no module needs geometry); frames: [R] frame index of each row (only needed by the
    temporal embedding, docs/departures.md#temporal-embedding).
    """

    feats: Tensor | None
    boxes: Tensor | None = None
    frames: Tensor | None = None

    def __len__(self) -> int:
        return (self.feats if self.feats is not None else self.boxes).shape[0]

    @classmethod
    def of_frame(cls, feats: Tensor, boxes: Tensor | None, frame: int | None = None) -> RoiRows:
        """Rows of a single frame, every row tagged with ``frame`` when given."""
        frames = None if frame is None else torch.full((feats.shape[0],), frame, device=feats.device)
        return cls(feats, boxes, frames)

    def select(self, index: slice | Tensor) -> RoiRows:
        return RoiRows(
            self.feats[index],
            None if self.boxes is None else self.boxes[index],
            None if self.frames is None else self.frames[index],
        )

    def with_feats(self, feats: Tensor) -> RoiRows:
        return RoiRows(feats, self.boxes, self.frames)

    def detach(self) -> RoiRows:
        return RoiRows(
            self.feats.detach(),
            None if self.boxes is None else self.boxes.detach(),
            None if self.frames is None else self.frames.detach(),
        )

    @staticmethod
    def cat(parts: Sequence[RoiRows]) -> RoiRows:
        """Concatenate rows in order. Empty parts are skipped (an empty memory level is exactly "no
        memory"); boxes/frames are kept only when every non-empty part has them."""
        if not parts:
            raise ValueError("RoiRows.cat needs at least one part")
        # (A traced graph keeps every part: a part's row count is a graph value, empty or not.)
        kept = list(parts) if torch.jit.is_tracing() else [p for p in parts if len(p)] or [parts[0]]
        if len(kept) == 1:
            return kept[0]
        boxes = None if any(p.boxes is None for p in kept) else torch.cat([p.boxes for p in kept])
        frames = None if any(p.frames is None for p in kept) else torch.cat([p.frames for p in kept])
        return RoiRows(torch.cat([p.feats for p in kept]), boxes, frames)


@dataclass
class MEGAOutput:
    """features: [K, C] key-frame features for the box predictor (no final ReLU,
    docs/conventions.md#mega-aggregation-head).
    memory_push: per level i < N_l, the oldest window frame's rows as local stage i used them as
    references (all its rows after the global stage at level 0, its distilled rows after stage i-1's
    FC+ReLU at levels >= 1); push them to memory *after* this call (memory is read before the push)."""

    features: Tensor
    memory_push: list[RoiRows]


class MEGAAggregator(nn.Module):
    """MEGA's aggregation head on RoI features (docs/conventions.md#mega-aggregation-head).

    Args:
        in_features: size of a flattened pooled RoI (2048*49 R-101, 256*49 R-50 with the reduce conv).
        feat_dim: C of the relation features (1024).
        num_heads, embed_dim, wave_length: of every relation module (16, 64, 1000; docs/conventions.md#relation-module).
        N_g: stacked location-free modules of the global stage (1; 0 = no global stage, Table 4).
        N_l: location-based local stages (3; 0 = the key only queries the global pool,
            docs/departures.md#ablations-the-released-code-cannot-run).
        global_res_stages: global modules on the key after the local stack (R-101: 1, R-50: 0).
        advanced_num: rows per local/memory frame kept in D for the later stages (int(75 * 0.2) = 15).
        location_based_global: give the global modules the geometry term too (paper §4.5 ablation).
        temporal_embedding: the paper's relative frame-index term (docs/departures.md#temporal-embedding; rows
            need ``frames``).
    """

    def __init__(
        self,
        in_features: int,
        feat_dim: int = 1024,
        num_heads: int = 16,
        embed_dim: int = 64,
        *,
        N_g: int = 1,
        N_l: int = 3,
        global_res_stages: int = 1,
        advanced_num: int = 15,
        location_based_global: bool = False,
        temporal_embedding: bool = False,
        wave_length: float = 1000.0,
    ) -> None:
        super().__init__()
        for name, value in (("N_g", N_g), ("N_l", N_l), ("global_res_stages", global_res_stages)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if advanced_num < 1:
            raise ValueError(f"advanced_num must be >= 1, got {advanced_num}")
        self.N_g, self.N_l = N_g, N_l
        self.advanced_num = advanced_num
        self.feat_dim = feat_dim
        # fcs[0]: raw RoI feature; fcs[i+1]: FC+ReLU between local stages i and i+1 (none after the last).
        self.fcs = nn.ModuleList(
            [nn.Linear(in_features, feat_dim)] + [nn.Linear(feat_dim, feat_dim) for _ in range(max(N_l - 1, 0))]
        )
        for fc in self.fcs:
            make_fc_init(fc)
        relation = dict(feat_dim=feat_dim, num_heads=num_heads, embed_dim=embed_dim, wave_length=wave_length)
        self.local_stages = nn.ModuleList(
            RelationModule(**relation, location_based=True, content_bias=True, temporal_embedding=temporal_embedding)
            for _ in range(N_l)
        )
        self.global_stages = nn.ModuleList(
            RelationModule(
                **relation,
                location_based=location_based_global,
                content_bias=True,
                temporal_embedding=temporal_embedding and location_based_global,
            )
            for _ in range(N_g + global_res_stages)
        )

    @classmethod
    def from_config(cls, cfg, in_features: int) -> MEGAAggregator:
        """Build from a :class:`megavod.config.Config` (``model.roi_head``, ``relation``, ``mega``)."""
        mega = cfg.mega
        return cls(
            in_features,
            feat_dim=cfg.model.roi_head.representation_size,
            num_heads=cfg.relation.num_heads,
            embed_dim=cfg.relation.embed_dim,
            N_g=mega.N_g,
            N_l=mega.N_l,
            global_res_stages=mega.global_res_stages,
            advanced_num=mega.distilled_rows(cfg.model.rpn),
            location_based_global=mega.location_based_global,
            temporal_embedding=cfg.relation.temporal_embedding,
            wave_length=cfg.relation.wave_length,
        )

    def embed(self, pooled: Tensor) -> Tensor:
        """Raw RoI features ReLU(fcs[0](flatten(pooled))): [R, ...] -> [R, C]; computed once per frame
        (the authors' ``_forward_ref``) and cached by the engine for window, global and memory frames."""
        return F.relu(self.fcs[0](pooled.flatten(1)))

    # -- the global stage -------------------------------------------------------------------------------

    def global_stage(self, rows: RoiRows, global_pool: RoiRows, pool_kv: Sequence[Projection] | None = None) -> RoiRows:
        """F <- F + Rel_g(F, G) for each of the N_g location-free modules in turn, G the raw global pool
        (kept raw for every module, as the code's residual global stage also uses it raw). ``pool_kv``:
        optional keys/values of G per module of ``global_stages`` (see :meth:`forward`)."""
        return self._attend_global(rows, global_pool, self.global_stages[: self.N_g], pool_kv)

    def global_residual_stage(self, key: RoiRows, global_pool: RoiRows,
                              pool_kv: Sequence[Projection] | None = None) -> RoiRows:
        """The code's ``GLOBAL.RES_STAGE`` modules: the same update on the key after the local stack."""
        return self._attend_global(key, global_pool, self.global_stages[self.N_g :],
                                   None if pool_kv is None else pool_kv[self.N_g :])

    @staticmethod
    def _attend_global(rows: RoiRows, pool: RoiRows, modules: nn.ModuleList,
                       pool_kv: Sequence[Projection] | None) -> RoiRows:
        feats = rows.feats
        for j, module in enumerate(modules):
            kv = None if pool_kv is None else pool_kv[j]
            refs = pool.feats if kv is None else None
            feats = feats + module(feats, refs, rows.boxes, pool.boxes, rows.frames, pool.frames, ref_kv=kv)
        return rows.with_feats(feats)

    # -- the local stage (with memory) -------------------------------------------------------------------

    def local_stage(
        self,
        key: RoiRows,
        local: RoiRows,
        counts: Counts,
        memory: Sequence[RoiRows] | None = None,
        memory_kv: Sequence[Projection | None] | None = None,
        window_geometry: WindowGeometry | None = None,
    ) -> tuple[RoiRows, list[RoiRows]]:
        """The N_l location-based stages (docs/conventions.md#mega-aggregation-head); memory level i joins the
        references of stage i, after the local rows.

        ``local`` holds the window's rows after the global stage, frame by frame (``counts`` rows each,
        oldest first). Queries are [key; D] (D: the first ``advanced_num`` rows of every frame); the
        last stage queries the key only. References are all local rows at stage 0 and D, as updated by
        the previous stage and its FC+ReLU, afterwards.

        Returns the key rows after the last stage and, per stage i, the local part of its references
        (what memory level i stores, frame by frame). ``memory_kv``: optional keys/values of memory level
        i for stage i (None for a level: project its rows here); ``window_geometry``: the geometry terms
        of the window's queries D, kept between key frames (see :data:`WindowGeometry`).
        """
        if self.N_l == 0:
            return key, []
        n_key = key.feats.shape[0]
        distilled_counts = _at_most(counts, self.advanced_num)
        ref_counts = counts
        queries = RoiRows.cat([key, local.select(first_rows_index(counts, self.advanced_num, local.feats.device))])
        refs = local
        stage_refs = []
        for i, module in enumerate(self.local_stages):
            stage_refs.append(refs)
            last = i == self.N_l - 1
            if last:
                queries = queries.select(slice(0, n_key))
            level = None if memory is None else memory[i]
            kv = None if memory_kv is None else memory_kv[i]
            ref_feats, ref_boxes, ref_frames = refs.feats, refs.boxes, refs.frames
            if level is not None:  # its rows come last; given as keys/values, only their boxes are needed
                ref_feats = ref_feats if kv is not None else torch.cat([ref_feats, level.feats])
                ref_boxes = torch.cat([ref_boxes, level.boxes])
                ref_frames = None if ref_frames is None else torch.cat([ref_frames, level.frames])
            geometry = None
            if window_geometry is not None and not last:  # the last stage queries the key only
                geometry = window_geometry(i, module, queries.select(slice(n_key, None)), distilled_counts,
                                           RoiRows(ref_feats, ref_boxes, ref_frames), ref_counts)
            relation = module(queries.feats, ref_feats, queries.boxes, ref_boxes, queries.frames, ref_frames,
                              ref_kv=kv, geometry=geometry)
            feats = queries.feats + relation
            if not last:
                feats = F.relu(self.fcs[i + 1](feats))
            queries = queries.with_feats(feats)
            refs = queries.select(slice(n_key, None))
            ref_counts = distilled_counts
        return queries.select(slice(0, n_key)), stage_refs

    def _oldest_frame_rows(self, stage_refs: list[RoiRows], counts: Counts) -> list[RoiRows]:
        # Level 0 stores all rows of the oldest window frame, levels >= 1 its distilled rows.
        if len(counts) == 0:
            return []
        oldest = counts[0]
        sizes = [oldest] + [_at_most(oldest, self.advanced_num)] * (len(stage_refs) - 1)
        return [refs.select(slice(0, size)).detach() for refs, size in zip(stage_refs, sizes)]

    # -- the whole head -----------------------------------------------------------------------------------

    def forward(self, key: RoiRows, local_frames: Sequence[RoiRows], global_pool: RoiRows,
                memory: Sequence[RoiRows] | None = None, **kept: Any) -> MEGAOutput:
        """Aggregate the key frame's RoI features (docs/conventions.md#mega-inference-schedule; training:
        docs/conventions.md#training-forward): :meth:`aggregate` with the window given frame by frame.

        Args:
            key: the key frame's proposals: raw features (:meth:`embed`), boxes, [frames].
            local_frames: the T_l window frames' rows, raw, oldest first, one entry per frame (the key
                frame's own reference proposals included). Ignored when N_l = 0.
            global_pool, memory: see :meth:`aggregate`.
            kept: what inference keeps between key frames, :meth:`aggregate`'s keyword arguments
                (``global_kv``, ``memory_kv``, ``window_geometry``).
        """
        if self.N_l == 0:
            local_frames = []
        elif not local_frames:
            raise ValueError("local_frames must hold at least one frame when N_l > 0")
        local = RoiRows.cat(list(local_frames)) if local_frames else None
        return self.aggregate(key, local, [len(frame) for frame in local_frames], global_pool, memory, **kept)

    def aggregate(
        self,
        key: RoiRows,
        local: RoiRows | None,
        counts: Counts,
        global_pool: RoiRows,
        memory: Sequence[RoiRows] | None = None,
        *,
        global_kv: Sequence[Projection] | None = None,
        memory_kv: Sequence[Projection | None] | None = None,
        window_geometry: WindowGeometry | None = None,
    ) -> MEGAOutput:
        """The global stage, the local stages with memory, the residual global stage. Traces to ONNX with
        the row counts as graph values: the exported key graph is this method
        (docs/architecture.md#export-and-onnx-runtime).

        Args:
            key: the key frame's rows (raw features, boxes, [frames]).
            local: the window frames' rows, raw, oldest first, frame after frame, ``counts`` rows each
                (None when N_l = 0).
            global_pool: raw rows of the T_g global frames (boxes only for ``location_based_global``; no
                features when ``global_kv`` is given).
            memory: per level i < N_l the rows read from memory *before* this frame's push (None: no
                memory; a level's features may be None when its ``memory_kv`` is given).
            global_kv, memory_kv: optional keys and values (:meth:`RelationModule.project_refs`) of the
                global pool for each module of ``global_stages`` and of memory level i for local stage
                i, computed earlier: these rows do not change from one key frame to the next, so
                inference keeps their projections (:class:`~megavod.models.relation.ReferenceProjectionCache`).
            window_geometry: the local stages' geometry terms of the window's queries, kept between key
                frames (:data:`WindowGeometry`).
        """
        if memory is not None and len(memory) != self.N_l:
            raise ValueError(f"memory must have N_l = {self.N_l} levels, got {len(memory)}")
        n_key = key.feats.shape[0]
        both = RoiRows.cat([key, local]) if self.N_l > 0 else key
        rows = self.global_stage(both, global_pool, global_kv)
        key_rows, stage_refs = self.local_stage(
            rows.select(slice(0, n_key)), rows.select(slice(n_key, None)), counts, memory, memory_kv, window_geometry,
        )
        key_rows = self.global_residual_stage(key_rows, global_pool, global_kv)
        return MEGAOutput(key_rows.feats, self._oldest_frame_rows(stage_refs, counts) if self.N_l > 0 else [])

    @torch.no_grad()
    def memory_from_frames(self, frames: Sequence[RoiRows], global_pool: RoiRows) -> list[RoiRows]:
        """Training memory (docs/conventions.md#training-forward): memory frames' raw rows go through the
        global stage and the local stack among themselves (no memory of memory), with stop-gradient.
        Level 0 = all rows after the global stage, level i = their D rows after stage i-1 and its FC+ReLU."""
        if not frames:
            empty = RoiRows(global_pool.feats.new_zeros(0, self.feat_dim), global_pool.feats.new_zeros(0, 4))
            return [empty for _ in range(self.N_l)]
        rows = self.global_stage(RoiRows.cat(list(frames)), global_pool)
        _, stage_refs = self.local_stage(rows.select(slice(0, 0)), rows, [len(f) for f in frames], None)
        return [refs.detach() for refs in stage_refs]

    def authors_key_mapping(self) -> dict[str, str]:
        """{our parameter name: the authors' feature-extractor key} (docs/conventions.md#state-dict-names), e.g.
        ``local_stages.0.Wq.weight`` -> ``l_Wqs.0.weight``."""
        rules = [
            (r"^fcs\.(\d+)\.", r"l_fcs.\1."),
            (r"^local_stages\.(\d+)\.(W[gqkv])\.", r"l_\2s.\1."),
            (r"^local_stages\.(\d+)\.u$", r"l_us.\1"),
            (r"^global_stages\.(\d+)\.(W[gqkv])\.", r"g_\2s.\1."),
            (r"^global_stages\.(\d+)\.u$", r"g_us.\1"),
        ]
        mapping = {}
        for name, _ in self.named_parameters():
            for pattern, replacement in rules:
                if re.match(pattern, name):
                    mapping[name] = re.sub(pattern, replacement, name)
                    break
            else:  # pragma: no cover - every parameter is covered by a rule
                raise AssertionError(f"no authors' key for {name}")
        return mapping
