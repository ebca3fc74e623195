"""Time Seq-NMS and BLR on a synthetic prediction file (default 1,000 frames x 300 boxes).

Usage: ``python benchmarks/bench_postprocess.py [--frames 1000] [--boxes 300] [--scaling]``

The synthetic video imitates a detector's output before per-frame NMS: ``--objects`` objects of
random classes move smoothly through the frames; each frame holds, per object, a cloud of jittered
boxes (most of the object's class with high scores, some of other classes with low scores), and the
rest of the ``--boxes`` are low-scoring clutter boxes of random classes. Labels spread over all 30
VID classes. The file is written to a temp folder and read back with ``read_predictions`` so the
timed input is exactly what ``megavod postprocess`` sees; BLR gets random relation weights.
``--scaling`` also times 1/4, 1/2 and 2x the frames to show how the cost grows with video length.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from megavod.data.predictions import FramePrediction, VideoPredictions, read_predictions, write_predictions
from megavod.postprocess import apply_postprocess
from megavod.structures import Detections

NUM_CLASSES = 30
WIDTH, HEIGHT = 1280, 720


def synthetic_video(frames: int, boxes: int, objects: int = 10, seed: int = 0) -> VideoPredictions:
    g = torch.Generator().manual_seed(seed)
    per_object = min(25, boxes // max(objects, 1))
    clutter = boxes - per_object * objects
    cls = torch.randint(1, NUM_CLASSES + 1, (objects,), generator=g)
    size = 60 + 200 * torch.rand(objects, 2, generator=g)
    start = torch.rand(objects, 2, generator=g) * torch.tensor([WIDTH, HEIGHT]) * 0.6
    velocity = (torch.rand(objects, 2, generator=g) - 0.5) * 4.0
    records = []
    for t in range(frames):
        # Objects bounce inside the frame.
        span = torch.tensor([WIDTH, HEIGHT]) - size
        pos = (start + velocity * t) % (2 * span)
        pos = torch.where(pos > span, 2 * span - pos, pos)
        centre = (pos + size / 2).repeat_interleave(per_object, 0)
        wh = size.repeat_interleave(per_object, 0) * (1 + 0.15 * torch.randn(objects * per_object, 2, generator=g))
        centre = centre + 0.1 * wh * torch.randn(objects * per_object, 2, generator=g)
        true_cls = torch.rand(objects * per_object, generator=g) < 0.6
        labels = torch.where(
            true_cls, cls.repeat_interleave(per_object),
            torch.randint(1, NUM_CLASSES + 1, (objects * per_object,), generator=g),
        )
        scores = torch.where(
            true_cls, 0.3 + 0.65 * torch.rand(objects * per_object, generator=g),
            0.2 * torch.rand(objects * per_object, generator=g) ** 2,
        )
        c_wh = 30 + 200 * torch.rand(clutter, 2, generator=g)
        c_centre = torch.rand(clutter, 2, generator=g) * torch.tensor([WIDTH, HEIGHT])
        centre, wh = torch.cat([centre, c_centre]), torch.cat([wh, c_wh]).clamp_min(4)
        labels = torch.cat([labels, torch.randint(1, NUM_CLASSES + 1, (clutter,), generator=g)])
        scores = torch.cat([scores, 0.1 * torch.rand(clutter, generator=g) ** 2])
        xyxy = torch.cat([centre - wh / 2, centre + wh / 2], 1)
        xyxy = torch.minimum(xyxy.clamp_min(0), torch.tensor([WIDTH - 1.0, HEIGHT - 1.0] * 2))
        records.append(FramePrediction(t, f"{t:06d}.JPEG", Detections(xyxy, scores.clamp(0, 1), labels)))
    return VideoPredictions("synthetic/bench", WIDTH, HEIGHT, records)


def relation_weights(records: list[FramePrediction], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.rand(len(a.detections), len(b.detections), generator=g) / max(len(b.detections), 1)
        for a, b in zip(records[:-1], records[1:])
    ]


def time_methods(frames: int, boxes: int, objects: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pred.json"
        write_predictions(path, [synthetic_video(frames, boxes, objects)])
        records = read_predictions(path)[0].frames
    n_in = sum(len(r.detections) for r in records)
    classes = len(torch.unique(torch.cat([r.detections.labels for r in records])))
    weights = relation_weights(records)
    for method, kwargs in (("seqnms", {}), ("blr", {"relation_weights": weights})):
        start, cpu = time.perf_counter(), time.process_time()
        out = apply_postprocess(records, method, **kwargs)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        n_out = sum(len(r.detections) for r in out)
        # CPU time is printed too: on a shared machine it is the steadier of the two.
        print(f"{method:7s} {frames:5d} frames x {boxes} boxes over {classes} classes: "
              f"{elapsed:6.2f} s wall, {cpu:6.2f} s CPU: {frames / elapsed:6.1f} frames/s "
              f"({frames / cpu:6.1f} per CPU second), {n_in} -> {n_out} detections")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--boxes", type=int, default=300)
    parser.add_argument("--objects", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--scaling", action="store_true", help="also time 1/4, 1/2 and 2x the frames")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [args.frames // 4, args.frames // 2, args.frames, 2 * args.frames] if args.scaling else [args.frames]
    for frames in sizes:
        time_methods(frames, args.boxes, args.objects)


if __name__ == "__main__":
    main()
