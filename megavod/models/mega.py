"""The MEGA detector (docs/conventions.md#mega-aggregation-head, docs/conventions.md#mega-inference-schedule,
docs/conventions.md#training-forward): the single-frame detector's backbone and RPN, and a box head whose
features are aggregated by :class:`~megavod.models.mega_head.MEGAAggregator`.

The detector holds weights only. At test time the streaming engine (:mod:`megavod.inference.engine`)
calls :meth:`MEGADetector.frame_features` once per frame and :meth:`MEGADetector.detect_key` once per
key frame with the local window, the global pool and the memory of the stream, and the stream's own
:class:`MEGAStreamCache` (detector contract: :mod:`megavod.models.contract`). Training
(:meth:`MEGADetector.forward` on a list of :class:`~megavod.data.vid_dataset.TrainSample`, B key frames per
process: docs/conventions.md#key-frames-per-process) follows docs/conventions.md#training-forward.

Work the authors' code repeats and megavod does once (same numbers):

* a frame's reference proposals (75) are the first 75 of its own test-time proposals (300): one RPN
  pass, the same NMS order (so ``rpn.ref_pre_nms_top_n`` must equal ``rpn.pre_nms_top_n_test``);
* a frame's raw RoI features (res5, RoIAlign, ``l_fcs[0]`` + ReLU) are computed once, for its 300
  proposals, and serve it as key, local, global and memory frame;
* the value projection runs before the attention-weighted sum (:mod:`megavod.models.relation`).

State-dict names equal the authors' (docs/conventions.md#state-dict-names) except inside the aggregator, whose
names map one to one (:meth:`MEGAAggregator.authors_key_mapping`):
``roi_heads.box.feature_extractor.aggregator.fcs.0`` is their ``roi_heads.box.feature_extractor.l_fcs.0``. The
per-frame pass and the shared training rows are in :mod:`megavod.models.relation_detector`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from megavod.config import Config
from megavod.models.backbone import C4Backbone
from megavod.models.contract import KeyFrameInputs, KeyFrameOutput
from megavod.models.mega_head import MEGAAggregator, RoiRows
from megavod.models.geometry_cache import GeometryBiasCache
from megavod.models.relation import ReferenceProjectionCache, RelationModule, cat_projections
from megavod.models.relation_detector import RelationDetector, build_relation_detector
from megavod.models.roi_heads import RoIBoxHead
from megavod.models.rpn import RPN
from megavod.structures import FrameFeatures


@dataclass
class MEGAStreamCache:
    """What MEGA keeps of one stream between key frames (created by :meth:`MEGADetector.new_stream_cache`,
    owned by the stream): the keys/values of rows met again unchanged (global frames, memory entries;
    :class:`ReferenceProjectionCache`) and the local stages' geometry blocks (:class:`GeometryBiasCache`).
    Both only save work: a step given a fresh cache returns the same numbers."""

    projections: ReferenceProjectionCache = field(default_factory=ReferenceProjectionCache)
    geometry: GeometryBiasCache = field(default_factory=GeometryBiasCache)


class MEGADetector(RelationDetector):
    """MEGA (also the base model: its schedule just keeps no memory).

    Args:
        backbone, rpn: as the single-frame detector.
        box_head: a box head whose feature extractor's aggregator is a :class:`MEGAAggregator`.
        ref_proposals: proposals per local/global/memory frame (code 75, ``REF_POST_NMS_TOP_N``).
        temporal_embedding: tag rows with their frame index (docs/departures.md#temporal-embedding).
    """

    def __init__(self, backbone: C4Backbone, rpn: RPN, box_head: RoIBoxHead, ref_proposals: int = 75,
                 temporal_embedding: bool = False) -> None:
        super().__init__(backbone, rpn, box_head, ref_proposals)
        self.temporal_embedding = temporal_embedding

    def _rows(self, frame: FrameFeatures, n: int | None) -> RoiRows:
        rows = slice(0, n)
        return RoiRows.of_frame(frame.feats[rows], frame.boxes[rows], frame.index if self.temporal_embedding else None)

    # -- inference: the detector contract (megavod.models.contract) -----------------------------------

    def new_stream_cache(self) -> MEGAStreamCache:
        return MEGAStreamCache()

    @torch.no_grad()
    def detect_key(self, inputs: KeyFrameInputs[FrameFeatures], cache: MEGAStreamCache | None = None) -> KeyFrameOutput:
        """Detections of the key frame (original-frame pixels) and the memory push of the oldest window
        frame (level 0: its rows after the global stage; level i: its distilled rows after stage i-1).

        ``inputs``: the key, the local window, the global pool and the memory levels (entries oldest
        first) the schedule gives; ``cache``: this stream's :class:`MEGAStreamCache` (a fresh one when
        None). ``inputs.relation_inputs``: attach to the detections their query rows in the last local
        stage (for BLR, docs/departures.md#blr-as-megavod-reads-the-paper); the detections are the same."""
        cache = cache if cache is not None else MEGAStreamCache()
        key, n = inputs.key, self.ref_proposals
        pool = [self._rows(g, n) for g in inputs.global_pool]
        # Global frames' raw rows and memory entries are the same from one key frame to the next:
        # their keys and values are projected once (the authors project them again every frame).
        projections = cache.projections
        projections.prune()
        global_kv = memory_kv = memory = None
        memory_counts: list[list[int]] = []
        if pool:
            global_kv = [cat_projections([projections.get(g, rows.feats, module)
                                          for g, rows in zip(inputs.global_pool, pool)])
                         for module in self.aggregator.global_stages]
        if inputs.memory is not None:
            levels = [list(level) for level in inputs.memory]
            memory_kv = [cat_projections([projections.get(e, e.feats, module) for e in level]) if level else None
                         for level, module in zip(levels, self.aggregator.local_stages)]
            memory_counts = [[len(e) for e in level] for level in levels]
            memory = [RoiRows.cat(level) if level else RoiRows(key.feats[:0], key.boxes[:0]) for level in levels]
        # So are the boxes of every window frame but the newest: most geometry terms of the local
        # stages were computed at the previous key frame (GeometryBiasCache).
        cache.geometry.next_frame()

        def window_geometry(stage: int, module: RelationModule, queries: RoiRows, query_counts: Sequence[int],
                            refs: RoiRows, ref_counts: Sequence[int]) -> Tensor:
            # The cache keeps blocks per frame: memory level i's rows come per entry.
            all_counts = [*ref_counts, *(memory_counts[stage] if memory_counts else ())]
            return cache.geometry.bias(module, queries.boxes, query_counts, refs.boxes, all_counts,
                                       queries.frames, refs.frames)

        with self.capture_relation_query(inputs.relation_inputs) as tap:
            out = self.aggregator(
                key=self._rows(key, None),
                local_frames=[self._rows(f, n) for f in inputs.local],
                global_pool=RoiRows.cat(pool) if pool else RoiRows(key.feats[:0], key.boxes[:0]),
                memory=memory,
                global_kv=global_kv,
                memory_kv=memory_kv,
                window_geometry=window_geometry,
            )
        return KeyFrameOutput(self.predict(key, out.features, tap.inputs), out.memory_push)

    def blr_relation_module(self) -> RelationModule | None:
        """The last local stage (its queries are the key rows); None without local stages (N_l = 0)."""
        stages = self.aggregator.local_stages
        return stages[-1] if len(stages) else None

    # -- training (docs/conventions.md#training-forward) ----------------------------------------------

    def sample_losses(self, batch: Sequence[Any]) -> list[dict[str, Tensor]]:
        """The 4 losses of each :class:`~megavod.data.vid_dataset.TrainSample` of ``batch``, whose ``refs``
        hold ``local``, ``memory`` and ``global`` images of its key's size and flip.

        Each role's images of all samples go through the backbone as one batch (zero-padded to the
        largest): the global frames, the memory frames (under no_grad) and the keys with their local
        frames; the aggregation runs per sample, over that sample's own rows only
        (benchmarks/README.md#batched-training-relation-modules)."""
        global_rows = self.reference_rows(batch, [s.refs.get("global", []) for s in batch])
        # Memory frames: their own global and local stages under no_grad (stop-gradient, current weights).
        with torch.no_grad():
            memory_rows = self.reference_rows(batch, [s.refs.get("memory", []) for s in batch])
        # Key and local frames; the key is also a local frame (its first 75 proposals).
        parts = self.keys_and_references(batch, [s.refs.get("local", []) for s in batch])
        losses = []
        for sample, global_frames, memory_frames, part in zip(batch, global_rows, memory_rows, parts):
            # Global frames: raw features, with gradient.
            global_pool = RoiRows.cat([RoiRows(f, b) for b, f in global_frames]) if global_frames else RoiRows(
                sample.image.new_zeros(0, self.aggregator.feat_dim), sample.image.new_zeros(0, 4))
            memory = None
            if memory_frames:
                memory = self.aggregator.memory_from_frames([RoiRows(f, b) for b, f in memory_frames], global_pool)
            out = self.aggregator(
                key=RoiRows(part.key_feats, part.sampled.boxes[0]),
                local_frames=[RoiRows(f, b) for f, b in zip(part.ref_feats, part.ref_boxes)],
                global_pool=global_pool,
                memory=memory,
            )
            losses.append(self.losses(part, out.features))
        return losses


def build_mega_detector(cfg: Config) -> MEGADetector:
    """MEGA from a config; loads ``model.backbone.weights`` (a local file) into the C4 body and res5."""
    return build_relation_detector(
        cfg, MEGADetector, lambda pooled: MEGAAggregator.from_config(cfg, pooled),
        temporal_embedding=cfg.relation.temporal_embedding,
    )
