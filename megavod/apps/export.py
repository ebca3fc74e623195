"""``megavod export``: a detector's two ONNX graphs and their manifest (README "Export and deploy")."""

from __future__ import annotations

import sys

from megavod.config import load_config
from megavod.errors import MegavodError
from megavod.export.exporter import FORMATS, export_onnx
from megavod.methods import build_detector, load_detector


def main(args) -> int:
    """``megavod export OUT [KEY=VALUE...] [--weights FILE] [--config NAME|PATH] [--format onnx]
    [--recompute-in-graph]``."""
    if args.format not in FORMATS:
        raise MegavodError(f"--format: expected one of {', '.join(FORMATS)}, got {args.format!r}")
    if args.weights is not None:
        model, cfg = load_detector(args.weights, args.config, args.overrides, trust_pickle=args.trust_pickle)
    elif args.config is not None:
        cfg = load_config(args.config, args.overrides)
        model = build_detector(cfg)
        print("megavod export: warning: no --weights given: the model is randomly initialised", file=sys.stderr)
    else:
        raise MegavodError("give --weights FILE (and/or --config NAME|PATH)")
    keep = not args.recompute_in_graph
    export_onnx(model, cfg, args.out, args.format, source=str(args.weights or ""),
                log=lambda line: print(line, file=sys.stderr), reference_cache=keep, geometry_cache=keep)
    return 0
