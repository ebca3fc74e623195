"""Writing a method's two ONNX graphs and the manifest (``megavod export``, README "Export and deploy").

The graphs are traced with torch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``):
it carries torchvision's ONNX symbolics for ``nms`` and ``roi_align`` (the dynamo exporter of torch 2.14
has none) and traces the data-dependent parts (NMS, the per-class postprocess) that ``torch.export``
refuses. Example inputs come from running the graph modules in PyTorch through the streaming engine on a
short random clip, so the key graph is traced with full local windows, a global pool and memory. The
export is written into a temporary folder beside ``OUT`` and renamed into place: a failed or interrupted
export leaves no half-written folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megavod.config import Config, to_dict
from megavod.errors import MegavodError
from megavod.export.graphs import Feeds, MethodGraphs, NamedGraph
from megavod.export.runtime import FORMAT, MANIFEST, GraphDetector, method_graphs, torch_runner
from megavod.inference.engine import detect_offline
from megavod.inference.schedules import build_schedule
from megavod.structures import RelationInputs

OPSET = 17  # GridSample (FGFA/DFF warping) needs 16; 17 is the newest the TorchScript exporter covers well
FORMATS = ("onnx",)
#: Size of the random frames the graphs are traced on (any size works at run time: the axes are dynamic).
EXAMPLE_SIZE = (128, 192)
EXAMPLE_FRAMES = 4  # enough for memory entries and a full (clipped) window at the last key frame


def _recording(run: Callable[[Feeds], Feeds], last: dict[str, Feeds], name: str) -> Callable[[Feeds], Feeds]:
    def record(feeds: Feeds) -> Feeds:
        last[name] = feeds
        return run(feeds)

    return record


class _FreshCacheDetector(GraphDetector):
    """Every key frame with an empty stream cache: the last one's extra graphs (MEGA's ``project``) then
    see every global and memory row, not none (a graph traced on zero rows may freeze shapes)."""

    def detect_key(self, inputs: Any, cache: Any = None) -> Any:
        return super().detect_key(inputs, self.new_stream_cache())


def example_feeds(graphs: MethodGraphs, frame: NamedGraph, key: NamedGraph, cfg: Config,
                  frames: int = EXAMPLE_FRAMES, size: tuple[int, int] = EXAMPLE_SIZE,
                  extra: dict[str, NamedGraph] | None = None) -> dict[str, Feeds]:
    """The graphs' inputs at the last key frame of a random clip run by the engine in PyTorch."""
    last: dict[str, Feeds] = {}
    detector = _FreshCacheDetector(graphs, _recording(torch_runner(frame), last, "frame"),
                                   _recording(torch_runner(key), last, "key"),
                                   {n: _recording(torch_runner(g), last, n) for n, g in (extra or {}).items()})
    g = torch.Generator().manual_seed(0)
    clip = [torch.randn(3, *size, generator=g) * 40 for _ in range(frames)]
    for _ in detect_offline(detector, lambda t: (clip[t], size), frames, build_schedule(cfg)):
        pass
    if detector.blr_relation_module() is not None:  # BLR's graph, on rows of the last key frame
        rows = last["key"]["key_feats"], last["key"]["key_boxes"]
        detector.blr_relation_weights(RelationInputs(*(r[:7] for r in rows)), RelationInputs(*(r[2:7] for r in rows)), 0, 1)
    return last


def _describe(path: Path) -> list[dict[str, Any]] | dict[str, list[dict[str, Any]]]:
    # onnx ships with the extra (pip install megavod[onnx]); only the exporter reads the written graphs.
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def values(items) -> list[dict[str, Any]]:
        out = []
        for v in items:
            t = v.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.TensorProto.DataType.Name(t.elem_type).lower(), "shape": shape})
        return out

    return {"inputs": values(model.graph.input), "outputs": values(model.graph.output)}


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise MegavodError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise MegavodError(f"{out}: folder is not empty and holds no earlier export ({MANIFEST}); choose another OUT")


def _trace(graph: NamedGraph, feeds: Feeds, path: Path, opset: int) -> None:
    io = graph.io
    with warnings.catch_warnings():
        # The tracer warns at every Python-level use of a size; ops.py keeps those as graph values.
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, tuple(feeds[n] for n in io.inputs), str(path), dynamo=False, opset_version=opset,
                          input_names=io.inputs, output_names=io.outputs, dynamic_axes=io.dynamic_axes,
                          do_constant_folding=True)


def _input_description(i: Any) -> dict[str, Any]:
    """What the manifest says about the graphs' input image and their boxes (docs/yolov.md#input for the
    letterbox of YOLOX / YOLOV)."""
    if i.letterbox:
        side = i.letterbox
        return {"input": {"letterbox": side, "pad_value": i.pad_value,
                          "image": f"[1, 3, {side}, {side}] float32: BGR 0-255, the frame scaled by r = min({side}/h, "
                                   f"{side}/w) (cv2 INTER_LINEAR) at the top left, the rest {i.pad_value:g}; no mean/std"},
                "boxes": "x1, y1, x2, y2 in pixels of the letterboxed image (width = x2 - x1)"}
    return {"input": {"min_size_test": i.min_size_test, "max_size_test": i.max_size_test,
                      "pixel_mean": list(i.pixel_mean), "pixel_std": list(i.pixel_std),
                      "image": "[1, 3, H, W] float32: RGB frame resized (shorter side min_size_test, longer at most "
                               "max_size_test), channels BGR, x255, minus pixel_mean, over pixel_std"},
            "boxes": "x1, y1, x2, y2 in pixels of the resized image, legacy +1 convention (width = x2 - x1 + 1)"}


def export_onnx(model: nn.Module, cfg: Config, out: str | os.PathLike, fmt: str = "onnx", *,
                source: str = "", opset: int = OPSET, log: Callable[[str], None] | None = None,
                reference_cache: bool = True, geometry_cache: bool = True) -> dict[str, Any]:
    """Write ``OUT/frame.onnx``, ``OUT/key.onnx`` (MEGA: also ``OUT/project.onnx`` with ``reference_cache``,
    ``OUT/geometry_{i}.onnx`` per local stage with ``geometry_cache``) and ``OUT/manifest.json`` for
    ``model`` (filled, built from ``cfg``); returns the manifest. An existing export in ``OUT`` is
    replaced. ``reference_cache=False`` / ``geometry_cache=False``: MEGA's key graph projects the global
    and memory rows / computes the local stages' geometry terms itself
    (:meth:`megavod.export.graphs.MethodGraphs.use_stream_caches`)."""
    if fmt not in FORMATS:
        raise MegavodError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    _check_out(out)
    graphs = method_graphs(cfg, reference_cache, geometry_cache)
    model = model.eval().cpu()
    # Eval mode on the wrappers too: the exporter restores each module's mode after tracing, recursively.
    frame, key = graphs.frame_graph(model).eval(), graphs.key_graph(model).eval()
    extra = {n: g.eval() for n, g in graphs.extra_graphs(model).items()}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise MegavodError(f"{out}: cannot write the export there ({e.strerror or e})") from None
    try:
        start = time.perf_counter()
        feeds = example_feeds(graphs, frame, key, cfg, extra=extra)
        described = {}
        for name, graph in (("frame", frame), ("key", key), *extra.items()):
            path = tmp / f"{name}.onnx"
            _trace(graph, feeds[name], path, opset)
            described[name] = {"file": path.name, "bytes": path.stat().st_size, **_describe(path)}
        manifest = {
            "format": FORMAT, "version": 1, "method": cfg.method, "config_name": cfg.name, "source": source,
            "opset": opset, "torch": torch.__version__, "config": to_dict(cfg),
            "reference_cache": graphs.kept_projections, "geometry_cache": graphs.kept_geometry,
            **_input_description(cfg.input),
            "graphs": described,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        os.chmod(tmp, 0o755)
        if out.exists():  # an earlier export (checked above): swap it out, then remove it
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "export")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if log:
        sizes = ", ".join(f"{n}.onnx {d['bytes'] / 2**20:.1f} MiB" for n, d in described.items())
        log(f"exported {cfg.method} ({cfg.name}) to {out}: {sizes}, opset {opset}, {time.perf_counter() - start:.0f} s")
    return manifest
