"""MEGA's ONNX graphs, also the base model's and the ablations' (docs/architecture.md#export-and-onnx-runtime).

The key graph is ``MEGADetector.detect_key``'s own computation
(:meth:`~megavod.models.mega_head.MEGAAggregator.aggregate`, the box predictor and postprocess) on the rows
the engine holds (:mod:`megavod.export.relation_graphs`); this module only chooses what crosses the graph
boundary. As in PyTorch, the keys/values of global frames and memory entries and the local stages'
geometry blocks are kept per stream in the detector's own :class:`~megavod.models.mega.MEGAStreamCache`,
their new entries computed by graphs ``project`` and ``geometry_{i}``: both measured faster than
recomputing them inside the key graph (benchmarks/README.md#onnx-runtime).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from megavod.models.contract import KeyFrameInputs, KeyFrameOutput
from megavod.models.geometry_cache import GeometryBiasCache
from megavod.models.mega import MEGAStreamCache
from megavod.models.mega_head import RoiRows, WindowGeometry
from megavod.models.relation import ReferenceProjectionCache, first_rows_index
from megavod.export.relation_graphs import BLR_IO, RelationGraphs, cat_rows, key_detections
from megavod.export.graphs import (
    BOX_SETTINGS,
    Feeds,
    GraphIO,
    GraphRunner,
    NamedGraph,
    detection_axes,
    rows_axes,
    size_feed,
)


class _MEGAKeyGraph(NamedGraph):
    """``MEGADetector.detect_key`` on concatenated rows: the aggregator's own
    :meth:`~megavod.models.mega_head.MEGAAggregator.aggregate`, the box predictor and postprocess
    (:func:`key_detections`). Outputs the detections and each memory level's push. ``projected``: the
    global pool and memory are given as keys/values (``global_{j}_keys|values`` per global module j,
    ``memory_{i}_keys|values`` per level), not as rows. ``kept_geometry``: the geometry term of local
    stage i's window queries (all stages but the last) is given (``local_{i}_geometry``); the key's own
    rows, new at every key frame, get theirs computed in the module."""

    def __init__(self, model: nn.Module, io: GraphIO, graphs: MEGAGraphs) -> None:
        super().__init__()
        self.model, self.io = model, io
        self.global_modules, self.memory_levels = graphs.global_modules, graphs.memory_levels
        self.projected, self.kept_geometry, self.blr = graphs.kept_projections, graphs.kept_geometry, graphs.blr

    def compute(self, t: Feeds) -> tuple[Tensor, ...]:
        key = RoiRows(t["key_feats"], t["key_boxes"])
        local = RoiRows(t["local_feats"], t["local_boxes"]) if "local_feats" in t else None
        pool = RoiRows(t.get("global_feats"), t.get("global_boxes"))
        memory = memory_kv = global_kv = None
        if self.memory_levels:
            memory = [RoiRows(t.get(f"memory_{i}_feats"), t[f"memory_{i}_boxes"]) for i in range(self.memory_levels)]
        if self.projected:
            global_kv = [(t[f"global_{j}_keys"], t[f"global_{j}_values"]) for j in range(self.global_modules)]
            memory_kv = [(t[f"memory_{i}_keys"], t[f"memory_{i}_values"]) for i in range(self.memory_levels)]
        window_geometry = _given_window_geometry(t) if self.kept_geometry else None
        with self.model.capture_relation_query(self.blr) as tap:
            out = self.model.aggregator.aggregate(
                key, local, t.get("local_counts", []), pool, memory,
                global_kv=global_kv or None, memory_kv=memory_kv or None, window_geometry=window_geometry)
        pushes = [tensor for rows in out.memory_push[: self.memory_levels] for tensor in (rows.feats, rows.boxes)]
        return (*key_detections(self.model, out.features, t["key_boxes"], t, tap), *pushes)


def _given_window_geometry(t: Feeds) -> WindowGeometry:
    """The aggregator's :data:`~megavod.models.mega_head.WindowGeometry` read from the key graph's
    ``local_{i}_geometry`` inputs."""

    def given(stage: int, *_: Any) -> Tensor:
        return t[f"local_{stage}_geometry"]

    return given


class _MEGAProjectGraph(NamedGraph):
    """Keys and values (:meth:`RelationModule.project_refs`) of global rows for every global module and of
    memory level i's rows for local stage i: what the stream's
    :class:`~megavod.models.relation.ReferenceProjectionCache` keeps."""

    def __init__(self, model: nn.Module, io: GraphIO, uses_global: bool, levels: int) -> None:
        super().__init__()
        self.model, self.io, self.uses_global, self.levels = model, io, uses_global, levels

    def compute(self, t: Feeds) -> tuple[Tensor, ...]:
        agg = self.model.aggregator
        out: list[Tensor] = []
        if self.uses_global:
            for module in agg.global_stages:
                out += module.project_refs(t["global_feats"])
        for i in range(self.levels):
            out += agg.local_stages[i].project_refs(t[f"memory_{i}_feats"])
        return tuple(out)


class _MEGAGeometryGraph(NamedGraph):
    """Local stage i's geometry term of the given query and reference boxes
    (:meth:`RelationModule.geometry_bias`): the pairs a stream meets for the first time."""

    def __init__(self, module: nn.Module, io: GraphIO) -> None:
        super().__init__()
        self.module, self.io = module, io

    def compute(self, t: Feeds) -> tuple[Tensor, ...]:
        return (self.module.geometry_bias(t["x_boxes"], t["ref_boxes"]),)


GEOMETRY_IO = GraphIO(["x_boxes", "ref_boxes"], ["geometry"],
                      {"x_boxes": rows_axes("queries"), "ref_boxes": rows_axes("references"),
                       "geometry": {1: "queries", 2: "references"}})


def _split_cols(tensor: Tensor, counts: Sequence[int]) -> list[Tensor]:
    return list(torch.split(tensor, list(counts), dim=1))


class MEGAGraphs(RelationGraphs):
    """MEGA and its base model and ablations (``mega.*``): the key graph takes the key's rows, the local
    window's first ``ref_post_nms_top_n`` rows per frame (``local_counts``), the global pool and, per
    memory level, the memory; it gives the detections and ``memory_push_{i}_feats/boxes``.

    With the stream caches (the default, :meth:`use_stream_caches`): the global pool and memory come as
    keys/values from the ``project`` graph, kept per stream (without: as rows), and local stage i's
    geometry term as ``local_{i}_geometry``, assembled from the stream's kept blocks with the new pairs
    from the ``geometry_{i}`` graph (without: computed in the key graph)."""

    # The stage and module counts, memory and the global stage's geometry term are the graphs' structure
    # (inputs, modules); distill_ratio sets the distilled rows per frame that the key graph takes (the
    # windows, the pool and the memory length are not: they are dynamic axes, the schedule's).
    baked = (*RelationGraphs.baked, "mega.N_g", "mega.N_l", "mega.global_res_stages", "mega.memory",
             "mega.location_based_global", "mega.distill_ratio")

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        m = cfg.mega
        self.local_stages = m.N_l
        self.advanced_num = m.distilled_rows(cfg.model.rpn)
        self.uses_global, self.global_modules = m.uses_global, m.global_modules
        self.global_boxes = self.uses_global and m.location_based_global
        self.memory_levels = m.memory_levels
        self.heads = cfg.relation.num_heads
        self.blr = m.N_l > 0  # BLR's module is the last local stage (MEGADetector.blr_relation_module)
        self.use_stream_caches(True, True)

    def use_stream_caches(self, projections: bool, geometry: bool) -> None:
        self.kept_projections = projections and (self.uses_global or self.memory_levels > 0)
        # The last local stage queries the key's rows only, whose geometry is never met again: with a
        # single local stage there is nothing to keep.
        self.kept_geometry = geometry and self.local_stages > 1
        inputs = ["image_size", "key_feats", "key_boxes"]
        axes = {"key_feats": rows_axes("key_rows"), "key_boxes": rows_axes("key_rows"), **detection_axes()}
        kv_axes = {}
        if self.local_stages:
            inputs += ["local_feats", "local_boxes", "local_counts"]
            axes.update(local_feats=rows_axes("local_rows"), local_boxes=rows_axes("local_rows"),
                        local_counts=rows_axes("local_frames"))
        project_in, project_out = [], []
        if self.uses_global:
            names = [f"global_{j}_{kind}" for j in range(self.global_modules) for kind in ("keys", "values")]
            project_in.append("global_feats")
            project_out += names
            inputs += names if self.kept_projections else ["global_feats"]
            inputs += ["global_boxes"] if self.global_boxes else []
            axes.update(global_feats=rows_axes("global_rows"), global_boxes=rows_axes("global_rows"))
            kv_axes.update({n: {1: "global_rows"} for n in names})
        outputs = self.key_outputs()
        axes.update(self.key_output_axes())
        for i in range(self.memory_levels):
            names = [f"memory_{i}_keys", f"memory_{i}_values"]
            project_in.append(f"memory_{i}_feats")
            project_out += names
            inputs += (names if self.kept_projections else [f"memory_{i}_feats"]) + [f"memory_{i}_boxes"]
            outputs += [f"memory_push_{i}_feats", f"memory_push_{i}_boxes"]
            axes.update({f"memory_{i}_feats": rows_axes(f"memory_{i}_rows"), f"memory_{i}_boxes": rows_axes(f"memory_{i}_rows"),
                         f"memory_push_{i}_feats": rows_axes(f"push_{i}_rows"),
                         f"memory_push_{i}_boxes": rows_axes(f"push_{i}_rows")})
            kv_axes.update({n: {1: f"memory_{i}_rows"} for n in names})
        if self.kept_geometry:
            for i in range(self.local_stages - 1):
                inputs.append(f"local_{i}_geometry")
                axes[f"local_{i}_geometry"] = {1: f"stage_{i}_queries", 2: f"stage_{i}_references"}
        inputs += list(BOX_SETTINGS)
        axes.update(kv_axes)
        self.key_io = GraphIO(inputs, outputs, {k: v for k, v in axes.items() if k in inputs + outputs})
        self.extra_io = {}
        if self.kept_projections:
            self.extra_io["project"] = GraphIO(project_in, project_out,
                                               {k: v for k, v in axes.items() if k in project_in + project_out})
        if self.kept_geometry:
            self.extra_io.update({f"geometry_{i}": GEOMETRY_IO for i in range(self.local_stages - 1)})
        if self.blr:
            self.extra_io["blr"] = BLR_IO

    def key_graph(self, model: nn.Module) -> NamedGraph:
        return _MEGAKeyGraph(model, self.key_io, self)

    def extra_graphs(self, model: nn.Module) -> dict[str, NamedGraph]:
        graphs: dict[str, NamedGraph] = {}
        if "project" in self.extra_io:
            graphs["project"] = _MEGAProjectGraph(model, self.extra_io["project"], self.uses_global, self.memory_levels)
        if self.kept_geometry:
            graphs.update({f"geometry_{i}": _MEGAGeometryGraph(module, GEOMETRY_IO)
                           for i, module in enumerate(model.aggregator.local_stages[:-1])})
        return {**graphs, **self.blr_graphs(model)}

    def new_stream_cache(self) -> MEGAStreamCache | None:
        """The PyTorch detector's stream cache (:class:`~megavod.models.mega.MEGAStreamCache`), its entries
        computed by the ``project`` and ``geometry_{i}`` graphs."""
        return MEGAStreamCache() if self.kept_projections or self.kept_geometry else None

    def _memory_levels(self, inputs: KeyFrameInputs) -> list[list[Any]]:
        levels = list(inputs.memory) if inputs.memory is not None else [[] for _ in range(self.memory_levels)]
        return [list(level) for level in levels[: self.memory_levels]]

    def _empty_kv(self) -> Tensor:
        return torch.zeros(self.heads, 0, self.feat_dim // self.heads)

    def _projected(self, inputs: KeyFrameInputs, kept: ReferenceProjectionCache, project: GraphRunner) -> Feeds:
        """The key graph's ``global_{j}_*`` / ``memory_{i}_*`` keys and values: the rows met for the
        first time go through ``project`` (one call for all of them) and into the stream's cache, the
        others come from it."""
        kept.prune()
        n = self.ref_proposals
        pool, levels = list(inputs.global_pool), self._memory_levels(inputs)
        sources = [("project", id(project), f"memory_{i}") for i in range(len(levels))]
        global_source = ("project", id(project), "global")
        new_pool = kept.missing(pool, global_source) if self.uses_global else []
        new_levels = [kept.missing(level, source) for level, source in zip(levels, sources)]
        if new_pool or any(new_levels):
            feeds = {}
            if self.uses_global:
                feeds["global_feats"] = cat_rows(new_pool, n, self.feat_dim)[0]
            for i, level in enumerate(new_levels):
                feeds[f"memory_{i}_feats"] = (torch.cat([e.feats for e in level]) if level
                                              else torch.zeros(0, self.feat_dim))
            out = project(feeds)
            if new_pool:
                counts = [min(n, len(g.boxes)) for g in new_pool]
                per_name = [_split_cols(out[name], counts) for name in self.extra_io["project"].outputs
                            if name.startswith("global_")]
                for g, parts in zip(new_pool, zip(*per_name)):
                    kept.put(g, global_source, parts)
            for i, level in enumerate(new_levels):
                counts = [len(e.feats) for e in level]
                pairs = zip(_split_cols(out[f"memory_{i}_keys"], counts), _split_cols(out[f"memory_{i}_values"], counts))
                for e, pair in zip(level, pairs):
                    kept.put(e, sources[i], pair)
        feeds = {}
        if self.uses_global:
            names = [f"global_{j}_{kind}" for j in range(self.global_modules) for kind in ("keys", "values")]
            tensors = [kept.kept(g, global_source) for g in pool]
            for c, name in enumerate(names):
                feeds[name] = torch.cat([k[c] for k in tensors], dim=1) if tensors else self._empty_kv()
        for i, level in enumerate(levels):
            tensors = [kept.kept(e, sources[i]) for e in level]
            for c, kind in enumerate(("keys", "values")):
                feeds[f"memory_{i}_{kind}"] = torch.cat([k[c] for k in tensors], dim=1) if tensors else self._empty_kv()
        return feeds

    def _local_geometry(self, inputs: KeyFrameInputs, local_boxes: Tensor, local_counts: list[int],
                        blocks: GeometryBiasCache, extra: Mapping[str, GraphRunner]) -> Feeds:
        """The key graph's ``local_{i}_geometry``: the geometry term [M_h, queries, references] of local
        stage i's window queries (every window frame's distilled rows; all stages but the last, which
        queries the key only) over its references (the window's rows at stage 0, their distilled rows
        afterwards, then memory level i's entries), as :meth:`MEGAAggregator.local_stage` lays them out
        (its :data:`~megavod.models.mega_head.WindowGeometry`), assembled from the stream's blocks as
        :meth:`MEGADetector.detect_key` does; the new pairs come from graph ``geometry_{i}``."""
        blocks.next_frame()
        distilled_counts = [min(self.advanced_num, c) for c in local_counts]
        distilled_boxes = local_boxes[first_rows_index(local_counts, self.advanced_num)]
        levels = self._memory_levels(inputs)
        ref_boxes, ref_counts = local_boxes, list(local_counts)
        feeds = {}
        for i in range(self.local_stages - 1):
            level = levels[i] if levels else []
            all_boxes = torch.cat([ref_boxes, *(e.boxes for e in level)])
            all_counts = ref_counts + [len(e.boxes) for e in level]
            run = extra[f"geometry_{i}"]
            out = blocks.buffer(i, (self.heads, len(distilled_boxes), len(all_boxes)))
            feeds[f"local_{i}_geometry"] = blocks.assemble(
                (f"geometry_{i}", id(run)), self.heads, _graph_blocks(run, distilled_boxes, all_boxes),
                distilled_boxes, distilled_counts, all_boxes, all_counts, out=out)
            ref_boxes, ref_counts = distilled_boxes, distilled_counts
        return feeds

    def key_feeds(self, inputs: KeyFrameInputs, cache: Any = None, extra: Mapping[str, GraphRunner] | None = None) -> Feeds:
        key, n = inputs.key, self.ref_proposals
        cache = cache if cache is not None else self.new_stream_cache()  # a fresh cache: same numbers, more work
        feeds = {"image_size": size_feed(key.image_size), "key_feats": key.feats, "key_boxes": key.boxes}
        if self.local_stages:
            feeds["local_feats"], feeds["local_boxes"], counts = cat_rows(inputs.local, n, self.feat_dim)
            feeds["local_counts"] = counts
            if self.kept_geometry:
                feeds.update(self._local_geometry(inputs, feeds["local_boxes"], counts.tolist(), cache.geometry, extra))
        if self.uses_global:
            feeds["global_feats"], global_boxes, _ = cat_rows(inputs.global_pool, n, self.feat_dim)
            if self.global_boxes:
                feeds["global_boxes"] = global_boxes
        for i, level in enumerate(self._memory_levels(inputs)):
            if not self.kept_projections:
                feeds[f"memory_{i}_feats"] = (torch.cat([e.feats for e in level]) if level
                                              else torch.zeros(0, self.feat_dim))
            feeds[f"memory_{i}_boxes"] = torch.cat([e.boxes for e in level]) if level else torch.zeros(0, 4)
        if self.kept_projections:
            feeds.update(self._projected(inputs, cache.projections, extra["project"]))
        return {k: v for k, v in feeds.items() if k in self.key_io.inputs}

    def key_output(self, outputs: Feeds, inputs: KeyFrameInputs) -> KeyFrameOutput:
        push = [RoiRows(outputs[f"memory_push_{i}_feats"], outputs[f"memory_push_{i}_boxes"])
                for i in range(self.memory_levels)]
        return KeyFrameOutput(self._detections(outputs, inputs), push)


def _graph_blocks(run: GraphRunner, query_boxes: Tensor, ref_boxes: Tensor):
    """:data:`~megavod.models.geometry_cache.BlockFn` of a ``geometry_{i}`` graph over these boxes."""

    def compute(query_rows: Tensor, ref_rows: Tensor) -> Tensor:
        return run({"x_boxes": query_boxes[query_rows], "ref_boxes": ref_boxes[ref_rows]})["geometry"]

    return compute

