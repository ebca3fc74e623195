"""A detector that runs a method's two exported graphs (ONNX Runtime, or the same graph modules in
PyTorch) behind the detector contract, so the streaming engine drives it unchanged
(docs/architecture.md#export-and-onnx-runtime).

:class:`GraphDetector` implements :class:`megavod.models.contract.VideoDetector`: ``frame_features`` runs
the per-frame graph, ``detect_key`` the key-frame graph, with the method's adapters
(:class:`megavod.export.graphs.MethodGraphs`) turning the engine's values into graph inputs and back.
The stream state (window, global pool, memory) stays the engine's; what a stream keeps between key frames
for the graphs (MEGA's projected keys/values and geometry blocks: the PyTorch detector's own
:class:`megavod.models.mega.MEGAStreamCache`, filled by graphs) is the stream's cache
(:meth:`GraphDetector.new_stream_cache`).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from megavod.checkpoints.loading import config_from_record, without_initial_weights
from megavod.config import Config, to_dict
from megavod.errors import ConfigError, MegavodError
from megavod.export.graphs import SETTINGS, Feeds, GraphRunner, MethodGraphs, NamedGraph, setting_feeds
from megavod.models.contract import KeyFrameInputs, KeyFrameOutput
from megavod.registry import get_method
from megavod.structures import RelationInputs

MANIFEST = "manifest.json"
#: Graphs an export may lack (written before they existed): without ``blr``, BLR links with w = 0.
OPTIONAL_GRAPHS = ("blr",)
FORMAT = "megavod.onnx"

def method_graphs(cfg: Config, reference_cache: bool = True, geometry_cache: bool = True) -> MethodGraphs:
    """The method's graphs (the method table's ``export`` entry); one line when it has none.
    ``reference_cache`` / ``geometry_cache``: see :meth:`MethodGraphs.use_stream_caches`."""
    spec = get_method(cfg.method)
    if spec.export is None:
        raise MegavodError(f"method {cfg.method!r} ({spec.title}) cannot be exported to ONNX")
    graphs = spec.export(cfg)
    graphs.use_stream_caches(reference_cache, geometry_cache)
    graphs.settings = setting_feeds(cfg)
    return graphs


class GraphDetector:
    """The detector contract over two graph runners (see the module docstring).

    ``run_frame`` / ``run_key``: inputs by name -> outputs by name (CPU tensors); ``run_extra``: the
    runners of the method's other graphs (:attr:`MethodGraphs.extra_io`).
    """

    def __init__(self, graphs: MethodGraphs, run_frame: GraphRunner, run_key: GraphRunner,
                 run_extra: dict[str, GraphRunner] | None = None) -> None:
        self.graphs = graphs
        self.run_frame = run_frame
        self.run_key = run_key
        self.run_extra = dict(run_extra or {})

    def frame_features(self, image: Tensor, index: int, original_size: tuple[int, int]) -> Any:
        image = image.detach().cpu()
        feeds = self.graphs.frame_feeds(image, index)
        # The settings go with every call; each runner takes the inputs its graph has.
        outputs = None if feeds is None else self.run_frame({**feeds, **self.graphs.settings})
        return self.graphs.frame_value(outputs, image, index, original_size)

    def new_stream_cache(self) -> Any:
        """What the stream keeps between key frames for the graphs (the method's; None: nothing)."""
        return self.graphs.new_stream_cache()

    def detect_key(self, inputs: KeyFrameInputs, cache: Any = None) -> KeyFrameOutput:
        feeds = {**self.graphs.key_feeds(inputs, cache, self.run_extra), **self.graphs.settings}
        return self.graphs.key_output(self.run_key(feeds), inputs)

    def blr_relation_module(self) -> GraphRunner | None:
        """What gives BLR's relation weights: the export's ``blr`` graph (None: the method has no
        location-based relation module, or the export predates the graph; BLR then uses w = 0). The API
        only asks whether there is one (:meth:`megavod.api.Detector.has_relation_module`)."""
        return self.run_extra.get("blr")

    def blr_relation_weights(self, a: RelationInputs, b: RelationInputs, frame_a: int, frame_b: int) -> Tensor:
        """:meth:`megavod.models.relation_detector.RelationDetector.blr_relation_weights` by the ``blr``
        graph: [n_a, n_b] (the frame indices only tag rows for the temporal embedding, never exported)."""
        run = self.blr_relation_module()
        if run is None:
            raise ValueError("this export has no BLR relation graph ('blr')")
        n, m = len(a.boxes), len(b.boxes)
        if n == 0 or m == 0:
            return torch.zeros(n, m)
        return run({"a_feats": a.feats, "a_boxes": a.boxes, "b_feats": b.feats, "b_boxes": b.boxes})["weights"]

    # The API's Detector moves and switches its model like an nn.Module; the graphs hold no device state.
    def to(self, device: Any) -> "GraphDetector":
        return self

    def eval(self) -> "GraphDetector":
        return self


def torch_runner(graph: NamedGraph) -> GraphRunner:
    """Run a graph module in PyTorch (the exporter records its inputs; tests compare it)."""

    @torch.no_grad()
    def run(feeds: Feeds) -> Feeds:
        return dict(zip(graph.io.outputs, graph(*(feeds[n] for n in graph.io.inputs))))

    return run


def torch_graph_detector(model: nn.Module, cfg: Config, reference_cache: bool = True,
                         geometry_cache: bool = True) -> GraphDetector:
    """The method's graph modules run in PyTorch over ``model``'s weights."""
    graphs = method_graphs(cfg, reference_cache, geometry_cache)
    model.eval()
    return GraphDetector(graphs, torch_runner(graphs.frame_graph(model).eval()),
                         torch_runner(graphs.key_graph(model).eval()),
                         {n: torch_runner(g.eval()) for n, g in graphs.extra_graphs(model).items()})


def ort_runner(session: Any, inputs: Sequence[str]) -> GraphRunner:
    """Run an ONNX Runtime session on named CPU tensors."""
    outputs = [o.name for o in session.get_outputs()]

    def run(feeds: Feeds) -> Feeds:
        # contiguous() in torch, not np.ascontiguousarray: that makes a 0-d input (graphs.SETTINGS) 1-d.
        arrays = {n: feeds[n].detach().cpu().contiguous().numpy() for n in inputs}
        return {n: torch.from_numpy(v) for n, v in zip(outputs, session.run(outputs, arrays))}

    return run


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """An export's manifest; one line naming the file when it is missing or not one."""
    path = Path(folder)
    path = path if path.name == MANIFEST else path / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MegavodError(f"{path}: not found (an ONNX export folder holds {MANIFEST}, see megavod export)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MegavodError(f"{path}: not a readable megavod ONNX manifest ({type(e).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise MegavodError(f"{path}: not a megavod ONNX manifest (field 'format' is not {FORMAT!r})")
    return manifest


def providers(device: str) -> list[str]:
    """ONNX Runtime execution providers for ``device`` ("cpu", "cuda", "auto")."""
    # onnxruntime is an optional extra (pip install megavod[onnx]): imported only where it is used.
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if device in ("cuda", "auto") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise MegavodError("device 'cuda': onnxruntime has no CUDAExecutionProvider here (pip install onnxruntime-gpu)")
    return ["CPUExecutionProvider"]


def _override_text(value: Any) -> str:
    """A config value as a KEY=VALUE override writes it."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_text(v) for v in value) + "]"
    return json.dumps(value) if isinstance(value, (bool, type(None))) else str(value)


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
    return out


def export_config(manifest: Mapping[str, Any], overrides: Sequence[str] = (), where: str = MANIFEST) -> Config:
    """The config an export runs with, its manifest's config plus ``overrides``, under the one rule for
    overrides (README "Export and deploy"): an override is honoured when the graphs take the value as an
    input (:data:`megavod.export.graphs.SETTINGS`: the proposal count, the box postprocess's score and
    NMS thresholds and detections per image) or do not use it at all (the stream schedule's windows, pool,
    memory length, key frame spacing and seed, the input resize); one of a value the graphs hold as a
    constant (the method's :attr:`MethodGraphs.baked`) is refused in one line naming the key and both
    values, since the graphs would silently run the export's value. An export written before a setting
    became an input holds it as a constant too. A weight file on ONNX Runtime is exported with its
    overrides (:func:`megavod.api.load_onnxruntime`), so there every override is honoured."""
    exported = config_from_record(manifest["config"], [], where)
    cfg = config_from_record(manifest["config"], list(overrides), where)
    if not overrides:
        return cfg
    baked = method_graphs(exported).baked
    inputs = {i.get("name") for g in manifest.get("graphs", {}).values() for i in g.get("inputs", ())}
    setting_of = {key: name for name, (key, _) in SETTINGS.items()}
    # Initial-weight files are never used here: the export holds every weight.
    before = _flat(to_dict(without_initial_weights(copy.deepcopy(exported))))
    after = _flat(to_dict(without_initial_weights(copy.deepcopy(cfg))))
    for key, value in after.items():
        old = before.get(key)
        if value == old or not any(key == b or key.startswith(b + ".") for b in baked):
            continue
        if setting_of.get(key) in inputs:
            continue
        why = " (this export predates it as a graph input)" if key in setting_of else ""
        raise ConfigError(f"{where}: config key '{key}' is {_override_text(old)} in the exported graphs, which "
                          f"hold it as a constant{why}, and cannot become {_override_text(value)} here: export "
                          f"again with it (megavod export OUT --weights ... {key}={_override_text(value)})")
    return cfg


def load_onnx_detector(folder: str | Path, device: str = "cpu", threads: int | None = None,
                       overrides: Sequence[str] = ()) -> tuple[GraphDetector, Config]:
    """(the detector running ``folder``'s graphs on ONNX Runtime, the export's config plus ``overrides``,
    under :func:`export_config`'s rule)."""
    try:
        # onnxruntime is an optional extra (pip install megavod[onnx]): imported only where it is used.
        import onnxruntime
    except ImportError:
        raise MegavodError("the onnxruntime backend needs onnxruntime: pip install 'megavod[onnx]'") from None
    manifest = read_manifest(folder)
    folder = Path(folder)
    folder = folder.parent if folder.name == MANIFEST else folder
    cfg = export_config(manifest, overrides, str(folder / MANIFEST))
    # Exports written before a stream cache existed have no field for it and no graph for it.
    graphs = method_graphs(cfg, bool(manifest.get("reference_cache", False)), bool(manifest.get("geometry_cache", False)))
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    runners = {}
    for name, io in (("frame", graphs.frame_io), ("key", graphs.key_io), *graphs.extra_io.items()):
        if name in OPTIONAL_GRAPHS and name not in manifest["graphs"]:
            continue
        if name not in manifest["graphs"]:
            raise MegavodError(f"{folder / MANIFEST}: no graph '{name}' (export it again with megavod export)")
        path = folder / manifest["graphs"][name]["file"]
        if not path.is_file():
            raise MegavodError(f"{path}: not found (the manifest's graph '{name}')")
        try:
            session = onnxruntime.InferenceSession(str(path), options, providers=providers(device))
        except Exception as e:  # onnxruntime raises its own exception types for a broken file
            raise MegavodError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]})") from None
        runners[name] = ort_runner(session, [i.name for i in session.get_inputs()])
    frame, key = runners.pop("frame"), runners.pop("key")
    return GraphDetector(graphs, frame, key, runners), cfg
