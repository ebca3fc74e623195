"""Export to ONNX and run the streaming engine on ONNX Runtime (README "Export and deploy",
docs/architecture.md#export-and-onnx-runtime): per-method graphs (:mod:`megavod.export.graphs`), their
traceable pieces (:mod:`megavod.export.ops`), the exporter (:mod:`megavod.export.exporter`) and the
detector that runs the graphs behind the detector contract (:mod:`megavod.export.runtime`)."""
