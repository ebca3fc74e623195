"""``megavod postprocess --method seqnms|blr PRED OUT``: post-process a prediction file."""

from __future__ import annotations

import argparse
import sys
import time

from megavod.data.predictions import VideoPredictions, read_predictions, write_predictions
from megavod.postprocess import apply_postprocess


def main(args: argparse.Namespace) -> int:
    """Read ``args.pred``, run ``args.method`` on each video, write ``args.out`` atomically.

    A malformed prediction file raises the predictions module's one-line MegavodError (the CLI
    prints it and exits non-zero). Frames are processed in frame-number order. A prediction file
    has no relation weights, so BLR runs here with w = 0.
    """
    start = time.perf_counter()
    videos = read_predictions(args.pred)
    out = []
    before = after = frames = 0
    for v in videos:
        records = sorted(v.frames, key=lambda f: f.frame)
        processed = apply_postprocess(records, args.method)
        before += sum(len(r.detections) for r in records)
        after += sum(len(r.detections) for r in processed)
        frames += len(records)
        out.append(VideoPredictions(v.video, v.width, v.height, processed))
    write_predictions(args.out, out)
    print(
        f"{args.pred}: {args.method} on {len(videos)} videos, {frames} frames, {before} -> {after} "
        f"detections in {time.perf_counter() - start:.1f} s -> {args.out}",
        file=sys.stderr,
    )
    return 0
