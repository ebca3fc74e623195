"""Export to ONNX and run the streaming engine on ONNX Runtime (README "Export and deploy",
docs/architecture.md#export-and-onnx-runtime): per-method graph boundaries (:mod:`megavod.export.graphs`:
which tensors cross them; the computation is the models' own, traced), the exporter
(:mod:`megavod.export.exporter`) and the detector that runs the graphs behind the detector contract
(:mod:`megavod.export.runtime`)."""
