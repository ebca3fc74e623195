"""The ``megavod`` command line.

Every subcommand's shape is fixed here so that docs and scripts can rely on it. User errors
(:class:`~megavod.errors.MegavodError`) print one line ``megavod <cmd>: error: ...`` and exit non-zero
(2 for usage and config errors), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path
from typing import Callable, Sequence

from megavod.config import load_config
from megavod.errors import MegavodError

# A dotted config override such as ``mega.T_g=20`` (URLs with "=" in the query are inputs, not overrides).
_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*=")


def split_overrides(tokens: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split positional tokens into (inputs, KEY=VALUE overrides)."""
    inputs, overrides = [], []
    for t in tokens:
        (overrides if _OVERRIDE.match(t) and "://" not in t else inputs).append(t)
    return inputs, overrides


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _handler(module: str) -> Callable[[argparse.Namespace], int]:
    """The subcommand ``main`` of ``megavod.apps.<module>``, imported when the command runs (a command's
    own dependencies, e.g. the reproduction's plotting, load only for that command)."""

    def run(args: argparse.Namespace) -> int:
        return int(importlib.import_module(f"megavod.apps.{module}").main(args) or 0)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megavod",
        description="MEGA video object detection: detect, train, evaluate, post-process, benchmark.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_: str, module: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=_handler(module))
        return p

    p = add("demo", "Generate a synthetic clip, run MEGA with the shipped weights, write an annotated "
            "MP4, the prediction JSON and a summary.", "demo")
    p.add_argument("--out", type=Path, default=Path("megavod-demo"), help="output folder (default: ./megavod-demo)")

    p = add("detect", "Run a detector on video files, frame folders or streams.",
            "detect")
    p.add_argument("inputs", nargs="+", metavar="INPUT [KEY=VALUE]",
                   help="video files, frame folders, globs or stream URLs, then optional dotted config "
                        "overrides such as mega.T_g=20")
    p.add_argument("--config", default=None,
                   help="preset name or YAML path (default: the one --weights records or its keys show, "
                        "else mega_R_101)")
    p.add_argument("--weights", type=Path, help="checkpoint: megavod's own or the authors' .pth")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a checkpoint that needs arbitrary unpickling (only for files you trust)")
    p.add_argument("--mode", choices=("offline", "online"), default=None,
                   help="offline: look ahead over the whole video; online: causal, frame k is emitted "
                        "before frame k+1 is read (default: the method's, offline; MEGA: the config's mega.online)")
    p.add_argument("--postprocess", choices=("none", "seqnms", "blr"), default="none",
                   help="video-level post-processing of the detections (default: none)")
    p.add_argument("--out", type=Path, default=Path("megavod-out"), help="output folder (default: ./megavod-out)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when present), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--score-thresh", type=float, default=0.5,
                   help="minimum score of a box drawn on the annotated video (default: 0.5; the JSON keeps all)")
    p.add_argument("--batch-streams", type=_positive_int, default=1, metavar="N",
                   help="run N inputs at once through one model, their per-frame passes batched (default: 1)")
    p.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch",
                   help="torch, or onnxruntime: the graphs of megavod export (--weights: an export folder "
                        "or a weight file, exported first) (default: torch)")

    p = add("export", "Export a detector's per-frame pass and key-frame step as ONNX graphs with a manifest.",
            "export")
    p.add_argument("out", type=Path, metavar="OUT", help="output folder (replaced if it holds an earlier export)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("--weights", type=Path, help="checkpoint: megavod's own or the authors' .pth (without it: "
                   "randomly initialised, needs --config)")
    p.add_argument("--config", default=None, help="preset name or YAML path (default: the one --weights records "
                   "or its keys show)")
    p.add_argument("--format", default="onnx", help="onnx (the only format)")
    p.add_argument("--recompute-in-graph", action="store_true",
                   help="MEGA: key.onnx recomputes what a stream otherwise keeps between key frames (keys/values of "
                        "global and memory rows, geometry blocks): no project/geometry graphs to drive, slower")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a checkpoint that needs arbitrary unpickling (only for files you trust)")

    p = add("train", "Train a detector (one process, or many through torchrun).",
            "train")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("--config", required=True, help="preset name or YAML path")
    p.add_argument("--data", type=Path, required=True,
                   help="dataset: a root in the ImageNet VID layout, or a COCO-VID .json (images relative to it)")
    p.add_argument("--out", type=Path, default=Path("runs/train"), help="output folder (default: runs/train)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")

    p = add("eval", "Evaluate predictions with the ImageNet VID protocol (mAP and mAP by motion speed).",
            "evaluate")
    p.add_argument("--data", type=Path, required=True,
                   help="ground truth: a root in the ImageNet VID layout, or a COCO-VID .json")
    p.add_argument("--pred", type=Path, required=True, help="prediction file written by megavod detect")
    p.add_argument("--out", type=Path, default=None, help="folder for eval.json and PR curves")
    p.add_argument("--protocol", choices=("authors", "ilsvrc"), default="authors",
                   help="authors: fixed IoU 0.5 as their code; ilsvrc: the devkit's small-object IoU rule")
    p.add_argument("--split", default=None,
                   help="image set ImageSets/SPLIT.txt to evaluate (default: VID_val_videos if present, else "
                        "every annotated val frame)")

    p = add("postprocess", "Seq-NMS or BLR on a prediction file.", "postprocess")
    p.add_argument("--method", choices=("seqnms", "blr"), required=True, help="post-processing method")
    p.add_argument("pred", type=Path, metavar="PRED", help="input prediction file")
    p.add_argument("out", type=Path, metavar="OUT", help="output prediction file")

    p = add("reproduce", "Reproduce an experiment end to end.", "reproduce")
    p.add_argument("experiment", choices=("synthetic", "synthetic-yolo"),
                   help="synthetic: train single frame, base model and MEGA on the synthetic benchmark, "
                        "evaluate and time each, write a Table-3-style table; synthetic-yolo: the same for "
                        "YOLOX (from scratch) and YOLOV (from that YOLOX), in its own folder")
    p.add_argument("--out", type=Path, default=Path("runs/reproduce"), help="output folder")
    p.add_argument("--jobs", type=int, default=None,
                   help="methods trained at once, each in its own process with a share of the CPU threads "
                        "(default: 1; 3 runs one process per method)")

    p = add("bench", "Time detectors on the same frames (ms/frame and ratios).", "bench")
    p.add_argument("--config", action="append", default=None, metavar="NAME|PATH",
                   help="preset or YAML path; repeat to compare several (default: single_R_101, base_R_101, mega_R_101)")
    p.add_argument("--frames", type=int, default=30, help="frames per run (default: 30)")
    p.add_argument("--size", type=int, default=600, help="shorter side of the frames (default: 600)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when present), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per config; the median is reported (default: 1)")
    p.add_argument("--warmup", type=int, default=2, help="frames of the untimed warm-up video (default: 2)")
    p.add_argument("--streams", type=_positive_int, nargs="+", default=None, metavar="N",
                   help="instead of comparing configs: N streams of --frames frames through one model "
                        "(Detector.stream_many), for each N given, e.g. --streams 1 2 4 8")
    p.add_argument("--batch", type=_positive_int, nargs="+", default=None, metavar="B",
                   help="instead of comparing configs: training iterations with B images per process, "
                        "for each B given, e.g. --batch 1 2 4")
    p.add_argument("--iterations", type=_positive_int, default=2,
                   help="timed training iterations per B with --batch (default: 2)")
    p.add_argument("--mode", choices=("offline", "online"), default="offline",
                   help="detection mode with --streams (default: offline)")

    p = add("synth", "Write the synthetic benchmark in the ImageNet VID layout.",
            "synth")
    p.add_argument("out", type=Path, metavar="OUT", help="output folder")
    p.add_argument("--videos", type=int, default=100, help="videos in all, 80%% train and 20%% val (default: 100)")
    p.add_argument("--frames", type=int, default=90, help="frames per video (default: 90)")
    p.add_argument("--size", type=int, default=192, help="frame size in pixels (default: 192)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")

    p = add("convert", "Convert a checkpoint (e.g. the authors' MEGA_R_101.pth) to megavod's format.",
            "convert")
    p.add_argument("src", type=Path, metavar="SRC", help="input checkpoint")
    p.add_argument("dst", type=Path, metavar="DST", help="output file (.safetensors or .pth)")
    p.add_argument("--config", default=None, help="preset the checkpoint belongs to (default: recognised from its keys)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a checkpoint that needs arbitrary unpickling (only for files you trust)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # argparse stops collecting positionals at the first option, so inputs and KEY=VALUE overrides
    # written after options come back as extras: fold them in for the commands that take them.
    args, extras = parser.parse_known_args(argv)
    if extras and (args.command not in ("detect", "train", "export") or any(t.startswith("-") for t in extras)):
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if args.command == "detect":
        args.inputs, args.overrides = split_overrides(args.inputs + extras)
        if not args.inputs:
            parser.error("detect: give at least one INPUT")
    elif args.command in ("train", "export"):
        inputs, overrides = split_overrides(args.overrides + extras)
        if inputs:
            parser.error(f"{args.command}: not a KEY=VALUE override: {' '.join(inputs)}")
        args.overrides = overrides
    try:
        if args.command == "train" or (args.command == "detect" and args.weights is None):
            # Config errors come first, whatever the command would do next. (With --weights, detect
            # takes the config from the checkpoint when none is given.)
            args.cfg = load_config(args.config or "mega_R_101", args.overrides)
        return args.func(args)
    except MegavodError as e:
        print(f"megavod {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"megavod {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
