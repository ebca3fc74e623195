"""Multiply-adds per frame of the single-frame detector, the base model and MEGA (steady state).

Usage::

    python benchmarks/flops.py [--config single_R_101 --config base_R_101 --config mega_R_101] [--size 600]

Counts come from ``torch.utils.flop_counter.FlopCounterMode`` on a real forward pass (random weights,
FrozenBN calibrated on the frame, so the RPN keeps its full 300 proposals) over one synthetic frame of
S x round(5S/3) pixels (600 x 1000 by default). Multiply-adds = counted FLOPs / 2. Counted: convolutions,
matrix products (linear layers, the geometry term's projection) and attention (PyTorch has no formula
for the CPU attention kernel ``_scaled_dot_product_flash_attention_for_cpu``; the script registers the
standard one: two batched products). Not counted (no multiply-add formula, small): RoIAlign, NMS,
element-wise ops, and the sin/cos/log of the geometry embedding, which on a CPU cost far more time
than their share of multiply-adds (see ``profile_mega.py``).

Per frame at steady state:

* single frame: one ``frame_features`` (the backbone) plus one ``detect_key`` (RPN and box head).
* MEGA / base: one per-frame pass (``frame_features``: backbone, RPN, res5, RoIAlign, fc6; the engine
  runs it exactly once per frame) plus one ``detect_key`` with T_l window frames, T_g global frames and,
  for MEGA, every memory level holding T_m frames; of these, only the newest global frame and the
  newest memory entry of each level are met for the first time (the others' keys and values are kept,
  ``ReferenceProjectionCache``), and only the newest window frame's boxes (the others' geometry blocks
  are kept, ``GeometryBiasCache``). The window, pool and memory frames all reuse the frame's own rows,
  window frames with shifted boxes (the cost depends only on the row counts: 300 key, 75 per frame, 15
  distilled).

``--authors`` adds an estimate of what the authors' test code spends per frame on the same model
(docs/departures.md#same-numbers-less-work: C4 of 2 images, res5 and RPN head 3 times, fc6 on 300 + 2 x 75 rows,
the global stage also on the 375 distilled rows, and relation modules that aggregate the raw 1024-d
references per head before a grouped 1x1 conv, i.e. M_h = 16 times the multiply-adds of the weighted
sum); the CNN parts are the counted ones, the relation modules use the closed-form counts below.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megavod.api import Detector
from megavod.apps.bench_frames import bench_config, calibrate, synthetic_frames
from megavod.inference.memory import LongRangeMemory
from megavod.inference.schedules import RelationSchedule, SingleFrameSchedule
from megavod.methods import build_detector
from megavod.models.contract import KeyFrameInputs

# FlopCounterMode names modules by path from the outermost module called (e.g. ``C4Backbone.body`` when
# ``frame_features`` calls the backbone, ``RPN.head`` when the single-frame ``detect_key`` calls the RPN).
# Report groups: (label, pattern); a module is assigned to the first pattern it matches unless one of
# its enclosing modules already was.
GROUPS = [
    ("backbone (C4)", r"(^C4Backbone|\.backbone)$"),
    ("RPN head", r"(^RPNHead|^RPN\.head|\.rpn)$"),
    ("res5 (full map)", r"(^ResNetHead|feature_extractor\.head)$"),
    ("reduce conv", r"(^Conv2d|feature_extractor\.conv)$"),
    ("fc6", r"(^Linear|feature_extractor\.fc6)$"),
    ("fc7", r"feature_extractor\.fc7$"),
    ("global stage {0}", r"global_stages\.(\d+)$"),
    ("local stage {0}", r"local_stages\.(\d+)$"),
    ("fc after local stage {0}", r"aggregator\.fcs\.(\d+)$|^MEGAAggregator\.fcs\.(\d+)$"),
    ("predictor", r"(^FPNPredictor|\.predictor)$"),
]


NEW_ROWS = "K/V of new global/memory rows"
NEW_GEOMETRY = "geometry of new local pairs"


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)  # q k^T, then weights v


def _addmm_inplace_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]  # as PyTorch's formula for the out-of-place addmm


def counter() -> FlopCounterMode:
    cpu_attention = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    mapping = {cpu_attention: _cpu_attention_flops} if cpu_attention is not None else {}
    mapping[torch.ops.aten.addmm_] = _addmm_inplace_flops  # the geometry term accumulates with it
    return FlopCounterMode(display=False, custom_mapping=mapping)


def grouped(fc: FlopCounterMode) -> dict[str, float]:
    """G multiply-adds per report group (see ``GROUPS``), plus ``other`` (whatever no group holds)."""
    counts = fc.get_flop_counts()
    total = sum(counts.get("Global", {}).values())
    out: dict[str, float] = defaultdict(float)
    taken: list[str] = []
    for name in sorted((n for n in counts if n != "Global"), key=len):
        if any(name.startswith(t + ".") for t in taken):
            continue
        for label, pattern in GROUPS:
            m = re.search(pattern, name)
            if m:
                index = next((g for g in m.groups() if g and g.isdigit()), None)
                if label == "fc after local stage {0}":
                    index = str(int(index) - 1)  # fcs[i + 1] follows local stage i
                out[label.format(index)] += sum(counts[name].values()) / 2e9
                taken.append(name)
                break
    out["other"] = total / 2e9 - sum(out.values())
    return dict(out)


def _group_order(label: str) -> tuple[int, int]:
    for i, (template, _) in enumerate(GROUPS):
        prefix = template.split("{")[0]
        if label == template or ("{" in template and label.startswith(prefix)):
            tail = label[len(prefix):]
            return i, int(tail) if tail.isdigit() else 0
    labelled = (NEW_GEOMETRY, NEW_ROWS)  # after the modules' groups, in a fixed order (not the set's)
    return len(GROUPS), labelled.index(label) if label in labelled else len(labelled)


def count(fn) -> tuple[float, dict[str, float]]:
    with counter() as fc:
        fn()
    return fc.get_total_flops() / 2e9, grouped(fc)


def relation_macs(n: int, m: int, c: int = 1024, heads: int = 16, geometry: bool = False,
                  authors: bool = False, embed: int = 64, projected: int | None = None) -> float:
    """Closed-form multiply-adds of one relation module with N queries and M references:
    Wq N C^2, Wk M C^2, logits N M C, geometry N M E M_h; weighted sum + Wv: ours M C^2 + N M C (value
    projection first), the authors' N M C M_h (raw references per head) + N C^2 (grouped conv).
    ``projected``: references whose Wk / Wv products this module computes (ours: the others' are kept,
    ``ReferenceProjectionCache``; default all M)."""
    p = m if projected is None else projected
    macs = n * c * c + p * c * c + n * m * c
    macs += n * m * embed * heads if geometry else 0
    macs += n * m * c * heads + n * c * c if authors else p * c * c + n * m * c
    return macs


def steady_state_sizes(cfg, s: RelationSchedule, key: int, authors: bool) -> list[tuple[int, int, bool, int]]:
    """(queries, references, location-based, references projected here) of every relation module at
    steady state (docs/conventions.md#mega-inference-schedule) for frames of ``key`` proposals (300 unless the
    RPN keeps fewer). Ours projects the global pool and memory rows once (:func:`new_rows_macs`); the authors
    every time."""
    ref = min(key, cfg.model.rpn.ref_post_nms_top_n)
    dis = min(ref, cfg.mega.distilled_rows(cfg.model.rpn))
    local, local_dis = s.T_l * ref, s.T_l * dis
    mem0, mem = (s.T_m * ref, s.T_m * dis) if s.memory_levels else (0, 0)
    pool = s.T_g * ref
    sizes = []
    for _ in range(cfg.mega.N_g):  # the authors also run the global stage on the 375 distilled rows
        sizes.append((key + local + (local_dis if authors else 0), pool, cfg.mega.location_based_global,
                      pool if authors else 0))
    n_l = cfg.mega.N_l
    for i in range(n_l):
        queries = key if i == n_l - 1 else key + local_dis
        fresh, kept = (local, mem0) if i == 0 else (local_dis, mem)
        sizes.append((queries, fresh + kept, True, fresh + (kept if authors else 0)))
    for _ in range(cfg.mega.global_res_stages):
        sizes.append((key, pool, cfg.mega.location_based_global, pool if authors else 0))
    return sizes


def new_rows_macs(cfg, s: RelationSchedule, key: int, c: int) -> float:
    """Ours per key frame: Wk and Wv of the rows met for the first time, the newest global frame (for
    every global module) and the newest memory entry of each level."""
    ref = min(key, cfg.model.rpn.ref_post_nms_top_n)
    dis = min(ref, cfg.mega.distilled_rows(cfg.model.rpn))
    rows = ref * cfg.mega.global_modules if s.T_g else 0
    if s.memory_levels:
        rows += ref + dis * (cfg.mega.N_l - 1)
    return 2 * rows * c * c


def geometry_macs(cfg, s: RelationSchedule, key: int, heads: int, embed: int) -> float:
    """Ours per key frame: the geometry terms computed. Location-based global modules (the §4.5
    ablation) compute every pair; the local stages only the pairs not met at the previous key frame
    (``GeometryBiasCache``): the key's rows and the newest window frame's distilled rows against every
    reference, the other window frames' distilled rows against the newest window frame."""
    ref = min(key, cfg.model.rpn.ref_post_nms_top_n)
    dis = min(ref, cfg.mega.distilled_rows(cfg.model.rpn))
    pairs = 0
    if cfg.mega.location_based_global and s.T_g:
        pairs += (cfg.mega.N_g * (key + s.T_l * ref) + cfg.mega.global_res_stages * key) * s.T_g * ref
    for i in range(cfg.mega.N_l):
        per_frame = ref if i == 0 else dis
        refs = (s.T_l + (s.T_m if s.memory_levels else 0)) * per_frame
        pairs += key * refs
        if i < cfg.mega.N_l - 1:  # the last stage queries the key only
            pairs += dis * refs + (s.T_l - 1) * dis * per_frame
    return pairs * heads * embed


def measure(name: str, size: int, authors: bool) -> dict:
    cfg = bench_config(name, size)
    torch.manual_seed(cfg.seed)
    detector = Detector(build_detector(cfg), cfg, "cpu")
    model = detector.model
    frame = synthetic_frames(1, size)[0]
    image, hw = detector.prepare(frame)
    calibrate(model, image)
    result: dict = {"name": name, "method": cfg.method}
    with torch.inference_mode():
        if isinstance(detector.schedule, SingleFrameSchedule):
            # The per-frame pass (backbone) and the key-frame step (RPN, box head) of the one frame.
            total, groups = count(lambda: model.detect_key(KeyFrameInputs(model.frame_features(image, 0, hw))))
            result.update(total=total, groups=groups)
            return result
        s = detector.schedule
        if not isinstance(s, RelationSchedule):
            raise SystemExit(f"{name}: method '{cfg.method}' has no relation schedule (window, pool, memory)")
        box: dict = {}
        pass_total, pass_groups = count(lambda: box.setdefault("f", model.frame_features(image, 0, hw)))
        f = box["f"]
        # Distinct frame objects (same rows): the stream cache keeps the projections of global frames and
        # memory entries per object. Steady state: one call fills the memory and that cache, then the counted
        # call meets one new global frame and one new memory entry per level, as every key frame does.
        # Window frames: the same rows with their own boxes (shifted), as the geometry blocks of the
        # local stages are kept per (query frame, reference frame) pair of boxes (GeometryBiasCache).
        def window_frame(i: int):
            return dataclasses.replace(f, boxes=f.boxes + float(i))

        window, pool = [window_frame(i) for i in range(s.T_l)], [dataclasses.replace(f) for _ in range(s.T_g)]
        memory = LongRangeMemory(s.memory_levels, s.T_m, s.feat_dim) if s.memory_levels else None
        cache = model.new_stream_cache()  # one stream: every call below shares its kept K/V and geometry

        def detect_key(memory: LongRangeMemory | None):
            levels = memory.levels() if memory is not None else None
            return model.detect_key(KeyFrameInputs(f, window, global_pool=pool, memory=levels), cache)

        push = detect_key(None).memory_push
        if memory is not None:
            for _ in range(s.T_m + 1):
                memory.push(push)
            detect_key(memory)
            memory.push(push)
        pool = pool[1:] + [dataclasses.replace(f)]
        window = window[1:] + [window_frame(s.T_l)]  # the window slides: one new frame
        pairs = cache.geometry.computed_pairs
        key_total, key_groups = count(lambda: detect_key(memory))
        # Outside any module's forward, the cache's projections of the new rows land in the bare
        # "Linear" (Wk) and "other" (the Wv product) groups, and so do the geometry terms the local
        # stages get from GeometryBiasCache: heads x embed_dim multiply-adds per (query, reference) pair
        # it computed (the w/h product and the x/y sin and cos products). Label them.
        pairs = cache.geometry.computed_pairs - pairs
        key_groups[NEW_GEOMETRY] = pairs * cfg.relation.num_heads * cfg.relation.embed_dim / 1e9
        key_groups[NEW_ROWS] = key_groups.pop("fc6", 0.0) + key_groups.pop("other", 0.0) - key_groups[NEW_GEOMETRY]
    groups = defaultdict(float)
    for g in (pass_groups, key_groups):
        for k, v in g.items():
            groups[k] += v
    result.update(total=pass_total + key_total, groups=dict(groups), pass_total=pass_total, key_total=key_total,
                  rows=int(f.boxes.shape[0]), settings=s)
    if authors:
        # Their per frame: C4 of 2 images, RPN head and res5 of 3, fc6 of 300 + 75 + 75 rows.
        g = pass_groups
        rows = int(f.boxes.shape[0])
        ref = min(rows, cfg.model.rpn.ref_post_nms_top_n)
        cnn = (2 * g["backbone (C4)"] + 3 * g["RPN head"] + 3 * g["res5 (full map)"]
               + g.get("reduce conv", 0.0) * 3 + g["fc6"] / rows * (rows + 2 * ref))
        dims = {"c": cfg.model.roi_head.representation_size, "heads": cfg.relation.num_heads,
                "embed": cfg.relation.embed_dim}
        rel = sum(relation_macs(n, m, geometry=geo, authors=True, projected=p, **dims)
                  for n, m, geo, p in steady_state_sizes(cfg, s, rows, True))
        ours = sum(relation_macs(n, m, projected=p, **dims) for n, m, _, p in steady_state_sizes(cfg, s, rows, False))
        ours += new_rows_macs(cfg, s, rows, dims["c"]) + geometry_macs(cfg, s, rows, dims["heads"], dims["embed"])
        other = sum(v for k, v in key_groups.items() if k.startswith("fc after") or k == "predictor")
        result.update(authors_total=cnn + rel / 1e9 + other, authors_relation=rel / 1e9,
                      ours_relation_closed_form=ours / 1e9)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", default=None, help="repeat (default: single/base/mega R-101)")
    p.add_argument("--size", type=int, default=600, help="short side; frames are S x round(5S/3) (default 600)")
    p.add_argument("--authors", action="store_true", help="also estimate the authors' code's multiply-adds")
    args = p.parse_args(argv)
    names = args.config or ["single_R_101", "base_R_101", "mega_R_101"]
    results = []
    for name in names:
        print(f"counting {name} ...", file=sys.stderr, flush=True)
        results.append(measure(name, args.size, args.authors))
    h, w = bench_config(names[0], args.size).input.min_size_test, bench_config(names[0], args.size).input.max_size_test
    print(f"G multiply-adds per frame at {h}x{w} (steady state; FlopCounterMode FLOPs / 2)")
    groups = sorted({g for r in results for g in r["groups"] if g != "other"}, key=_group_order) + ["other"]
    print(f"{'':<28s}" + "".join(f"{r['name']:>16s}" for r in results))
    for g in groups:
        cells = (f"{round(r['groups'][g], 2) + 0.0:16.2f}" if g in r["groups"] else f"{'-':>16s}" for r in results)
        print(f"{g:<28s}" + "".join(cells))
    print(f"{'total':<28s}" + "".join(f"{r['total']:16.2f}" for r in results))
    reference = next((r for r in results if r["method"] == "single"), results[0])
    ratios = "".join(f"{r['total'] / reference['total']:16.3f}" for r in results)
    print(f"{'ratio to ' + reference['name']:<28s}" + ratios)
    for r in results:
        if "pass_total" in r:
            s = r["settings"]
            print(f"{r['name']}: per-frame pass {r['pass_total']:.2f} G + key frame {r['key_total']:.2f} G "
                  f"(T_l={s.T_l}, T_g={s.T_g}, T_m={s.T_m if s.memory_levels else 0}, {r['rows']} proposals)")
        if "authors_total" in r:
            counted = sum(v for k, v in r["groups"].items() if k.startswith(("global stage", "local stage")) or k in (NEW_ROWS, NEW_GEOMETRY))
            print(f"{r['name']}: authors' code, estimated: {r['authors_total']:.1f} G per frame "
                  f"(their relation modules {r['authors_relation']:.1f} G; ours {counted:.1f} G counted, "
                  f"{r['ours_relation_closed_form']:.1f} G in closed form, where every pair's geometry counts); ratio to {reference['name']} "
                  f"{r['authors_total'] / reference['total']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
