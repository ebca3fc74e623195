"""Where MEGA's time per frame goes: the key-frame aggregation at steady state, and the per-frame pass.

Usage::

    python benchmarks/profile_mega.py [--config mega_R_101] [--keys 3] [--threads N] [--ops]
                                      [--pass-size S [--single single_R_101]] [--geometry-sweep [CHUNK ...]]

MEGA's cost per frame is (a) the per-frame pass (backbone, RPN, res5, RoIAlign, fc6), which the
streaming engine runs once per frame and which equals the single-frame detector's minus fc7 and its box
predictor, plus (b) :meth:`MEGADetector.detect_key`: the global stage, the N_l local stages over the
window and the Long Range Memory, the global residual stage, the predictor and the test-time
postprocess. (b) does not depend on the input size, only on the row counts: 300 key rows, 75 per
window/global/memory frame, 15 distilled. It is timed here at steady state (T_l window frames, T_g
global frames, every memory level holding T_m frames) on synthetic rows: random boxes inside a
600x1000 image and ReLU'd random features (values do not change the cost, except the postprocess NMS,
which sees ~uniform class scores from the random predictor: 300 x 30 candidates, like the
single-frame detector's). Each relation module's time is split into its geometry term
(:meth:`RelationModule.geometry_bias`) and the rest (projections + attention); ``--ops`` adds the
profiler's top operators.

``--pass-size S`` (> 0) also times the per-frame pass at S x round(5S/3) pixels (real frames, FrozenBN
calibrated) and the single-frame detector's whole frame (``--single``), so the two add up to a
steady-state estimate of MEGA/single without running a whole video.

``--geometry-sweep`` times local stage 0's geometry term (675 x 3750 pairs) at several chunk sizes of
``megavod.models.relation._GEOMETRY_CHUNK_ELEMENTS`` (patched for the run only; chunks split the query
rows, so results differ only by the rounding of differently shaped products), the whole-embedding
formula it replaced, and the attention with the geometry bias as
returned (contiguous) or permuted.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megavod.api import Detector
from megavod.apps.bench import bench_config, calibrate, share_weights, synthetic_frames
from megavod.config import load_config
from megavod.inference.memory import LongRangeMemory
from megavod.inference.schedules import RelationSchedule, SingleFrameSchedule, build_schedule
from megavod.methods import build_detector
from megavod.models import relation
from megavod.models.contract import KeyFrameInputs
from megavod.models.relation import RelationModule
from megavod.structures import FrameFeatures


class Timers:
    """Wall time per label, accumulated by wrapping bound methods of live objects (nothing is edited)."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.shapes: dict[str, tuple[int, int]] = {}

    def wrap(self, obj, attr: str, label: str, record_shape: bool = False) -> None:
        own = obj.__dict__.get(attr)  # else a method, looked up on the class at call time

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = own(*args, **kwargs) if own is not None else getattr(type(obj), attr)(obj, *args, **kwargs)
            self.total[label] += time.perf_counter() - start
            self.calls[label] += 1
            if record_shape:
                self.shapes[label] = (int(args[0].shape[0]), int(args[1].shape[0]))
            return out

        setattr(obj, attr, timed)

    def reset(self) -> None:
        self.total.clear()
        self.calls.clear()


class _Callable:
    """Holds a plain callable so its ``__call__`` can be wrapped (the postprocessor is not a Module)."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def random_frame(index: int, rows: int, feat_dim: int, size: tuple[int, int], g: torch.Generator) -> FrameFeatures:
    h, w = size
    xy = torch.rand(rows, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
    wh = 16 + torch.rand(rows, 2, generator=g) * torch.tensor([w * 0.4, h * 0.4])
    boxes = torch.cat([xy, (xy + wh).minimum(torch.tensor([w - 1.0, h - 1.0]))], 1)
    feats = torch.randn(rows, feat_dim, generator=g).relu()
    return FrameFeatures(index, boxes, feats, size, size)


def key_inputs(key: FrameFeatures, window, pool, memory: LongRangeMemory | None) -> KeyFrameInputs:
    """What the engine gives ``detect_key``: the key, the local window, the global pool, the memory levels."""
    return KeyFrameInputs(key, window, global_pool=pool, memory=memory.levels() if memory is not None else None)


def steady_state_inputs(model, settings: RelationSchedule, rows: int, cache, size=(600, 1000)):
    """Key, T_l window frames, T_g global frames and a memory filled to T_m frames per level
    (``cache``: the stream's, from ``model.new_stream_cache()``, shared by every later call)."""
    g = torch.Generator().manual_seed(0)
    dim = settings.feat_dim
    key = random_frame(100, rows, dim, size, g)
    window = [random_frame(100 - settings.tau + i, rows, dim, size, g) for i in range(settings.T_l)]
    pool = [random_frame(200 + i, rows, dim, size, g) for i in range(settings.T_g)]
    memory = None
    if settings.memory_levels:
        memory = LongRangeMemory(settings.memory_levels, settings.T_m, settings.feat_dim)
        push = model.detect_key(key_inputs(key, window, pool, None), cache).memory_push
        for _ in range(settings.T_m):
            memory.push(push)
    return key, window, pool, memory


def instrument(model, timers: Timers) -> None:
    agg = model.aggregator
    timers.wrap(model, "detect_key", "detect_key (total)")
    timers.wrap(agg, "forward", "aggregator")
    timers.wrap(agg, "global_stage", "global stage")
    timers.wrap(agg, "local_stage", "local stages")
    timers.wrap(agg, "global_residual_stage", "global residual stage")
    n_g = agg.N_g
    for i, module in enumerate(agg.global_stages):
        name = f"global[{i}]" if i < n_g else f"global_res[{i - n_g}]"
        timers.wrap(module, "forward", name, record_shape=True)
    for i, module in enumerate(agg.local_stages):
        timers.wrap(module, "forward", f"local[{i}]", record_shape=True)
        timers.wrap(module, "geometry_bias", f"local[{i}] geometry")
    for i, fc in enumerate(agg.fcs[1:], start=1):
        timers.wrap(fc, "forward", f"fcs[{i}]")
    head = model.box_head
    timers.wrap(head.predictor, "forward", "predictor")
    head.postprocessor = _Callable(head.postprocessor)
    timers.wrap(head.postprocessor, "fn", "postprocess (softmax, decode, NMS)")


def _print_key_table(ms: dict[str, float], shapes: dict[str, tuple[int, int]]) -> None:
    order = ["detect_key (total)", "aggregator", "global stage", "local stages", "global residual stage",
             "predictor", "postprocess (softmax, decode, NMS)"]
    extra = sorted(k for k in ms if k not in order)
    for label in order + extra:
        if label not in ms:
            continue
        shape = shapes.get(label)
        where = f"  (queries {shape[0]} x refs {shape[1]})" if shape else ""
        print(f"  {label:<38s} {ms[label]:9.1f} ms{where}")
    geometry = sum(v for k, v in ms.items() if k.endswith("geometry"))
    total = ms["detect_key (total)"]
    print(f"  geometry terms, all local stages       {geometry:9.1f} ms ({100 * geometry / total:.0f}% of detect_key)")


def profile_key(config: str, keys: int, ops: bool = False) -> dict[str, float]:
    """Time ``detect_key`` at steady state (mean of ``keys`` calls after one warm-up), by part."""
    cfg = load_config(config)
    torch.manual_seed(0)
    model = build_detector(cfg).eval()
    settings = build_schedule(cfg)
    if not isinstance(settings, RelationSchedule):
        raise SystemExit(f"{config}: method '{cfg.method}' has no relation schedule (window, pool, memory)")
    rows = cfg.model.rpn.post_nms_top_n_test
    timers = Timers()
    cache = model.new_stream_cache()  # one stream: every call below shares its kept K/V and geometry
    with torch.inference_mode():
        key, window, pool, memory = steady_state_inputs(model, settings, rows, cache)
        push = model.detect_key(key_inputs(key, window, pool, memory), cache).memory_push  # warm-up

        g = torch.Generator().manual_seed(1)

        def next_key():  # as at every key frame: one new global frame, one new memory entry per level,
            nonlocal pool, window  # and the window slides by one frame (its geometry blocks are new)
            if memory is not None:
                memory.push(push)
            pool = pool[1:] + [dataclasses.replace(pool[0])]
            window = window[1:] + [random_frame(window[-1].index + 1, rows, settings.feat_dim, (600, 1000), g)]

        instrument(model, timers)
        for _ in range(keys):
            next_key()
            model.detect_key(key_inputs(key, window, pool, memory), cache)
        if ops:
            from torch.profiler import profile

            next_key()
            with profile() as prof:
                model.detect_key(key_inputs(key, window, pool, memory), cache)
    ms = {label: 1000 * t / keys for label, t in timers.total.items()}
    mem_frames = [memory.num_frames(i) for i in range(memory.num_levels)] if memory is not None else []
    print(f"{config}: detect_key at steady state: key {rows} rows, T_l={settings.T_l} window frames, "
          f"T_g={settings.T_g} global frames, memory frames per level {mem_frames} "
          f"(mean of {keys} calls, torch threads: {torch.get_num_threads()})")
    _print_key_table(ms, timers.shapes)
    if ops:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return ms


class _Laps:
    """Consecutive wall-time laps by name."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, name: str, value=None):
        now = time.perf_counter()
        self.laps[name] = now - self._last
        self._last = now
        return value


def _pass_parts(model, image: torch.Tensor, hw: tuple[int, int]) -> dict[str, float]:
    """MEGA's ``frame_features`` step by step (same calls), seconds per part."""
    lap = _Laps()
    c4 = lap("backbone", model.backbone(image[None]))
    boxes = lap("rpn", model.rpn.proposals(c4, [hw], "key")[0].boxes)
    extractor = model.box_head.feature_extractor
    feature_map = lap("res5", extractor.res5(c4))
    pooled = lap("roi_align", extractor.pool(feature_map, [boxes]))
    lap("fc6", extractor.aggregator.embed(pooled))
    return lap.laps


def profile_frame_pass(config: str, single: str, size: int, frames: int) -> tuple[float, float]:
    """ms of MEGA's per-frame pass (by part) and of the single-frame detector's whole frame at ``size``,
    the two models taking turns frame by frame (so that load on the machine hits both alike)."""
    detectors = []
    for name in (single, config):
        cfg = bench_config(name, size)
        torch.manual_seed(cfg.seed)
        detector = Detector(build_detector(cfg), cfg, "cpu")
        if detectors:
            share_weights(detectors[0].model, detector.model)  # same proposals
        detectors.append(detector)
    image, hw = detectors[0].prepare(synthetic_frames(1, size)[0])
    parts: list[dict[str, float]] = [defaultdict(float), defaultdict(float)]
    with torch.inference_mode():
        for detector in detectors:
            calibrate(detector.model, image)
        for i in range(frames + 1):  # the first is warm-up
            for detector, acc in zip(detectors, parts):
                model = detector.model
                if isinstance(detector.schedule, SingleFrameSchedule):
                    start = time.perf_counter()  # the per-frame pass and the key-frame step of one frame
                    model.detect_key(KeyFrameInputs(model.frame_features(image, 0, hw)))
                    laps = {"whole frame": time.perf_counter() - start}
                else:
                    laps = _pass_parts(model, image, hw)
                for k, v in laps.items():
                    acc[k] += 1000 * v / frames if i > 0 else 0.0
    totals = []
    for name, detector, acc in zip((single, config), detectors, parts):
        total = sum(acc.values())
        what = "frame_features + detect_key" if isinstance(detector.schedule, SingleFrameSchedule) else "per-frame pass"
        desc = ", ".join(f"{k} {v:.0f}" for k, v in acc.items())
        print(f"{name} at {hw[0]}x{hw[1]}: {what} {total:.0f} ms ({desc}; mean of {frames})")
        totals.append(total)
    return totals[1], totals[0]


def geometry_sweep(n: int, m: int, chunks: list[int], repeats: int = 2) -> None:
    """Time local stage 0's geometry term (n queries x m references, default sizes of MEGA R-101) with
    several values of ``relation._GEOMETRY_CHUNK_ELEMENTS`` (chunks split the query rows: the same
    values up to the rounding of differently shaped products), the whole-embedding formula it replaces
    (N x M x 64 sin/cos, then Wg; what ``geometry_bias`` computed before the w/h terms were factored), and the
    attention with the bias as returned (contiguous) and as a permuted copy."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    module = RelationModule(location_based=True, content_bias=True).eval()
    torch.nn.init.normal_(module.Wg.weight, std=0.1, generator=g)  # non-trivial relu pattern
    frame = random_frame(0, n + m, 1024, (600, 1000), g)
    qb, rb = frame.boxes[:n], frame.boxes[n:]
    default = relation._GEOMETRY_CHUNK_ELEMENTS
    reference = None
    with torch.inference_mode():
        for chunk in chunks:
            relation._GEOMETRY_CHUNK_ELEMENTS = chunk
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                bias = module.geometry_bias(qb, rb)
                times.append(time.perf_counter() - start)
            reference = bias if reference is None else reference
            clear = reference > -5  # relu(logit) > ~7e-3, where the log is well-conditioned
            mark = " (current)" if chunk == default else ""
            print(f"  geometry {n}x{m}, chunk {chunk:>9d} elements{mark}: {1000 * min(times):7.1f} ms, "
                  f"max |difference| to the first {(bias - reference)[clear].abs().max():.1e}")
        relation._GEOMETRY_CHUNK_ELEMENTS = default
        weight = module.Wg.weight.view(module.num_heads, -1)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            whole = qb.new_empty(module.num_heads, n, m)
            rows = max(1, default // (m * weight.shape[1]))
            for i in range(0, n, rows):
                embedding = relation.box_geometry_embedding(qb[i : i + rows], rb)
                whole[:, i : i + rows] = (F.relu(F.linear(embedding, weight, module.Wg.bias)) + 1e-6).log().permute(2, 0, 1)
            times.append(time.perf_counter() - start)
        clear = whole > -5  # relu(logit) > ~7e-3, where the log is well-conditioned
        print(f"  geometry {n}x{m}, whole-embedding formula: {1000 * min(times):7.1f} ms, max |difference| "
              f"{(whole - reference)[clear].abs().max():.1e} where relu(logit) > 7e-3")
        h, d = module.num_heads, module.head_dim
        q, k, v = (torch.randn(h, x, d, generator=g) for x in (n, m, m))
        permuted = reference.permute(1, 2, 0).contiguous().permute(2, 0, 1)
        for name, mask in (("contiguous bias (as geometry_bias returns it)", reference),
                           ("permuted bias", permuted), ("no bias", None)):
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                times.append(time.perf_counter() - start)
            print(f"  attention {n}x{m}, {name}: {1000 * min(times):7.1f} ms")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="mega_R_101")
    p.add_argument("--single", default="single_R_101", help="single-frame config for --pass-size")
    p.add_argument("--keys", type=int, default=3, help="detect_key calls timed (default 3)")
    p.add_argument("--pass-size", type=int, default=0, help="also time the per-frame pass at this short side")
    p.add_argument("--pass-frames", type=int, default=2, help="frames timed for --pass-size (plus 1 warm-up)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--geometry-sweep", type=int, nargs="*", default=None, metavar="CHUNK",
                   help="time local stage 0's geometry term at these chunk sizes (elements; default "
                        "4194304 1048576 262144 65536), the whole-embedding formula and the attention with a "
                        "contiguous/permuted bias")
    p.add_argument("--ops", action="store_true", help="print the profiler's top operators of one detect_key")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    key_ms = profile_key(args.config, args.keys, args.ops)["detect_key (total)"]
    if args.geometry_sweep is not None:
        geometry_sweep(675, 3750, args.geometry_sweep or [1 << 22, 1 << 20, 1 << 18, 1 << 16])
    if args.pass_size > 0:
        pass_ms, single_ms = profile_frame_pass(args.config, args.single, args.pass_size, args.pass_frames)
        mega = pass_ms + key_ms
        print(f"steady-state estimate: {args.config} {mega:.0f} ms/frame (pass {pass_ms:.0f} + key {key_ms:.0f}), "
              f"{args.single} {single_ms:.0f} ms/frame, ratio {mega / single_ms:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
