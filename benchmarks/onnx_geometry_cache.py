"""Local stage 0's geometry term in ONNX Runtime: recomputed in the graph (A) or kept per frame pair (B).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/onnx_geometry_cache.py [--repeats 7] [--threads 1]

The question: a cache of the PyTorch path is kept or recomputed inside the graph, whichever is faster. The
PyTorch path keeps the geometry blocks of local stages per (query frame, reference frame)
(``megavod/models/geometry_cache.py``); key.onnx recomputed them (:meth:`RelationModule.geometry_bias`, traced)
when this was written. It measured the choice; the export now keeps them (``benchmarks/onnx_key_profile.py``
times the built version).
This times one MEGA R-101 local stage 0 on a sliding window, the shapes of mega_R_101's key graph:
queries = the key frame's 300 rows + 15 distilled rows of each of the 25 window frames (675), references
= 75 rows of each window frame + memory level 0's 25 frames of 75 rows (3750), 16 heads of 64 channels
(docs/architecture.md#where-megas-ideas-live; the authors' MEGA config: ref_post_nms_top_n 75, advanced 0.2, 16 heads).

* (A) recompute: one graph ``softmax(q k^T / 8 + geometry_bias(boxes)) v``, the geometry term in
  ``megavod.models.relation.GEOMETRY_CHUNKS`` chunks as the traced module computes it.
* (B) keep: the same attention graph with the bias [16, 675, 3750] as an input, assembled in numpy
  from kept [16, 15, 75] blocks; a geometry-only graph computes the new pairs (the key frame's and the
  newest window frame's rows x all references, the other queries x the newest window frame), and the
  new blocks are kept (copies); blocks not used by this step are dropped, as GeometryBiasCache does.
* (C) keep, one graph: the kept blocks assembled as in B with zeros at the new pairs, and the attention
  graph computes the new pairs itself (query-row indices x all references, the other rows x the new
  reference columns), writes them in (ScatterND on a [N, M, H] view) and returns them to be kept. What
  key.onnx could do without a further graph file. Runs on a copy of B's cache, before A and B.

Both take turns on the same q, k, v and boxes, one window step per repeat (after 2 untimed steps that
fill B's cache); prints the median ms per key step of A, B and C, B's parts, and the largest difference
of the outputs (C's new pairs are zeros in its input, so equal outputs check the scatter). Random boxes and weights (the cost does not depend on their values).
"""

from __future__ import annotations

import argparse
import warnings
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megavod.models.relation import RelationModule  # noqa: E402

HEADS, HEAD_DIM = 16, 64


class Recompute(nn.Module):
    def __init__(self, module: RelationModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, q, k, v, x_boxes, ref_boxes):
        logits = q @ k.transpose(1, 2) / 8.0 + self.module.geometry_bias(x_boxes, ref_boxes)
        return logits.softmax(dim=-1) @ v


class Given(nn.Module):
    def forward(self, q, k, v, bias):
        return (q @ k.transpose(1, 2) / 8.0 + bias).softmax(dim=-1) @ v


class Scattered(nn.Module):
    """(C) the kept bias as an input, the new pairs computed in the same graph and written into it
    (ScatterND on a [N, M, H] view) and returned for the caller to keep: no extra graph file."""

    def __init__(self, module: RelationModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, q, k, v, bias, x_boxes, ref_boxes, new_rows, other_rows, new_cols):
        rows_block = self.module.geometry_bias(x_boxes[new_rows], ref_boxes)  # [H, r, M]
        cols_block = self.module.geometry_bias(x_boxes[other_rows], ref_boxes[new_cols])  # [H, o, c]
        b = bias.permute(1, 2, 0)  # [N, M, H]
        b = b.index_put((other_rows[:, None], new_cols[None, :]), cols_block.permute(1, 2, 0))
        b = b.index_put((new_rows,), rows_block.permute(1, 2, 0)).permute(2, 0, 1)
        return (q @ k.transpose(1, 2) / 8.0 + b).softmax(dim=-1) @ v, rows_block, cols_block


class Geometry(nn.Module):
    def __init__(self, module: RelationModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, x_boxes, ref_boxes):
        return self.module.geometry_bias(x_boxes, ref_boxes)


def session(graph: nn.Module, feeds: tuple, names: list[str], threads: int):
    import onnxruntime  # optional dependency (megavod[onnx])

    buffer = io.BytesIO()
    warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
    axes = {n: {0: f"{n}_0"} for n in names if "boxes" in n or n.endswith(("rows", "cols"))}
    torch.onnx.export(graph, feeds, buffer, dynamo=False, opset_version=17, input_names=names,
                      output_names=["out"], dynamic_axes=axes, do_constant_folding=True)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


def boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    xy = rng.uniform(0, 400, (n, 2))
    wh = rng.uniform(8, 200, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--key-rows", type=int, default=300)
    p.add_argument("--ref-rows", type=int, default=75)
    p.add_argument("--distilled", type=int, default=15)
    p.add_argument("--window", type=int, default=25)
    p.add_argument("--memory", type=int, default=25)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    module = RelationModule(HEADS * HEAD_DIM, HEADS, 64, location_based=True, content_bias=True).eval()
    W, M, K, R, D = args.window, args.memory, args.key_rows, args.ref_rows, args.distilled
    n_q, n_r = K + W * D, (W + M) * R
    frame_boxes: dict[int, np.ndarray] = {}
    key_boxes: dict[int, np.ndarray] = {}

    def frame(f: int) -> np.ndarray:
        if f not in frame_boxes:
            frame_boxes[f] = boxes(rng, R)
        return frame_boxes[f]

    q = rng.standard_normal((HEADS, n_q, HEAD_DIM), dtype=np.float32)
    k = rng.standard_normal((HEADS, n_r, HEAD_DIM), dtype=np.float32)
    v = rng.standard_normal((HEADS, n_r, HEAD_DIM), dtype=np.float32)
    t = [torch.from_numpy(a) for a in (q, k, v)]
    xb, rb = torch.from_numpy(boxes(rng, n_q)), torch.from_numpy(boxes(rng, n_r))
    with torch.no_grad():
        a_sess = session(Recompute(module), (*t, xb, rb), ["q", "k", "v", "x_boxes", "ref_boxes"], args.threads)
        b_sess = session(Given(), (*t, torch.zeros(HEADS, n_q, n_r)), ["q", "k", "v", "bias"], args.threads)
        g_sess = session(Geometry(module), (xb, rb), ["x_boxes", "ref_boxes"], args.threads)
        idx = (torch.arange(315), torch.arange(315, 675), torch.arange(1800, 1875))
        c_names = ["q", "k", "v", "bias", "x_boxes", "ref_boxes", "new_rows", "other_rows", "new_cols"]
        c_sess = session(Scattered(module), (*t, torch.zeros(HEADS, n_q, n_r), xb, rb, *idx), c_names, args.threads)

    kept: dict[tuple[int, int], np.ndarray] = {}

    def step(s: int):
        """Key frame s: window s-W//2 .. s+W//2 (oldest first), memory the M frames before the window."""
        window = list(range(s - W // 2, s - W // 2 + W))
        memory = list(range(window[0] - M, window[0]))
        key_boxes[s] = boxes(rng, K)
        x_boxes = np.concatenate([key_boxes[s]] + [frame(f)[:D] for f in window])
        ref_frames = window + memory
        ref_boxes = np.concatenate([frame(f) for f in ref_frames])
        return window, ref_frames, x_boxes, ref_boxes

    def run_a(x_boxes, ref_boxes):
        return a_sess.run(None, {"q": q, "k": k, "v": v, "x_boxes": x_boxes, "ref_boxes": ref_boxes})[0]

    def run_b(window, ref_frames, x_boxes, ref_boxes, parts, scatter=False):
        nonlocal kept
        t0 = time.perf_counter()
        bias = np.empty((HEADS, n_q, n_r), np.float32)
        used: dict[tuple[int, int], np.ndarray] = {}
        fresh_q = [g for g, f in enumerate(window) if (f, ref_frames[0]) not in kept]  # whole rows new
        other = [g for g in range(W) if g not in fresh_q]
        fresh_rows = [np.arange(K)] + [np.arange(K + g * D, K + (g + 1) * D) for g in fresh_q]
        rows = np.concatenate(fresh_rows)
        # reference frames the kept query groups miss (at steady state: the newest window frame)
        new_cols = [c for c, f in enumerate(ref_frames) if other and (window[other[0]], f) not in kept]
        t1 = time.perf_counter()
        block_rows = g_sess.run(None, {"x_boxes": x_boxes[rows], "ref_boxes": ref_boxes})[0]
        other_rows = np.concatenate([np.arange(K + g * D, K + (g + 1) * D) for g in other]) if other else None
        cols = np.concatenate([np.arange(c * R, (c + 1) * R) for c in new_cols]) if new_cols else None
        block_cols = (g_sess.run(None, {"x_boxes": x_boxes[other_rows], "ref_boxes": ref_boxes[cols]})[0]
                      if other_rows is not None and cols is not None else None)
        if scatter:  # (C) must write these pairs itself
            block_rows, block_cols = np.zeros_like(block_rows), np.zeros_like(block_cols)
        t2 = time.perf_counter()
        bias[:, rows] = block_rows
        for i, g in enumerate(fresh_q):  # keep the newest window frame's blocks
            for c, f in enumerate(ref_frames):
                used[(window[g], f)] = block_rows[:, K + i * D : K + (i + 1) * D, c * R : (c + 1) * R].copy()
        for i, g in enumerate(other):
            r0 = K + g * D
            for c, f in enumerate(ref_frames):
                if c in new_cols:
                    j = new_cols.index(c)
                    block = block_cols[:, i * D : (i + 1) * D, j * R : (j + 1) * R].copy()
                else:
                    block = kept[(window[g], f)]
                used[(window[g], f)] = block
                bias[:, r0 : r0 + D, c * R : (c + 1) * R] = block
        kept = used
        t3 = time.perf_counter()
        if scatter:  # (C): the same kept blocks, the new ones computed in the attention graph
            c_feeds = {"q": q, "k": k, "v": v, "bias": bias, "x_boxes": x_boxes, "ref_boxes": ref_boxes,
                       "new_rows": rows, "other_rows": other_rows, "new_cols": cols}
            t3 = time.perf_counter()
            out = c_sess.run(None, c_feeds)[0]
            return out, time.perf_counter() - t3 + (t3 - t0) - (t2 - t1)
        out = b_sess.run(None, {"q": q, "k": k, "v": v, "bias": bias})[0]
        t4 = time.perf_counter()
        parts["new pairs (geometry graph)"].append(t2 - t1)
        parts["assembly + keeping blocks"].append(t1 - t0 + t3 - t2)
        parts["attention graph (bias input)"].append(t4 - t3)
        parts["new pairs"] = rows.size * n_r + (0 if cols is None else other_rows.size * cols.size)
        return out

    parts = {"new pairs (geometry graph)": [], "assembly + keeping blocks": [], "attention graph (bias input)": []}
    for s in range(2):  # fill B's cache (the first step computes every pair)
        run_b(*step(s), {n: [] for n in parts})
    times = {"A": [], "B": [], "C": []}
    diff = 0.0
    for s in range(2, 2 + args.repeats):
        window, ref_frames, x_boxes, ref_boxes = step(s)
        order = ("A", "B") if s % 2 else ("B", "A")
        outs = {}
        saved = dict(kept)
        outs["C"], c_time = run_b(window, ref_frames, x_boxes, ref_boxes, parts, scatter=True)
        times["C"].append(c_time)
        kept = saved
        for name in order:
            t0 = time.perf_counter()
            outs[name] = (run_a(x_boxes, ref_boxes) if name == "A"
                          else run_b(window, ref_frames, x_boxes, ref_boxes, parts))
            times[name].append(time.perf_counter() - t0)
        diff = max(diff, float(np.abs(outs["A"] - outs["B"]).max()), float(np.abs(outs["A"] - outs["C"]).max()))
    print(f"local stage 0: {n_q} x {n_r} pairs, {HEADS} heads, ORT {args.threads} thread(s), "
          f"median of {args.repeats} key steps")
    print(f"(A) recompute in graph: {1e3 * statistics.median(times['A']):.0f} ms")
    print(f"(B) keep blocks:        {1e3 * statistics.median(times['B']):.0f} ms "
          f"({parts.pop('new pairs')} of {n_q * n_r} pairs new)")
    for name, values in parts.items():
        print(f"    {name}: {1e3 * statistics.median(values):.0f} ms")
    print(f"(C) keep, new pairs scattered in the attention graph: {1e3 * statistics.median(times['C']):.0f} ms "
          "(assembly of the kept blocks + one graph call)")
    print(f"max |A - B|, |A - C| of the stage output: {diff:.2e}")


if __name__ == "__main__":
    main()
