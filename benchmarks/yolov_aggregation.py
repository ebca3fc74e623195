"""YOLOV's aggregation (megavod/models/yolov_head.py::YOLOVAggregation) with few queried rows against all
rows: the time of ``forward(..., queries=rows 0..Q)`` over ``forward(...)`` (every row, the whole [H, N, N]
affinity), on N = 960 rows (a chunk of 32 frames x 30 proposals), W = 128 / 256 / 320 (YOLOV-S / L / X),
one thread, the two calls interleaved, medians. At most N / 2 queried rows take the SDPA path (every
reference's A v without the matrix, A for the queried rows only); more take the whole matrix.

    OMP_NUM_THREADS=1 python benchmarks/yolov_aggregation.py [--repeats 9]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megavod.models.yolov_head import YOLOVAggregation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--rows", type=int, default=960)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n = args.rows
    print(f"{n} rows, one thread; time(queries = first Q rows) / time(all rows), median of {args.repeats}")
    print("W     " + "  ".join(f"Q={q:<4d}" for q in (30, n // 4, n // 2, n)))
    for width in (128, 256, 320):
        agg = YOLOVAggregation(width).eval()
        inputs = (torch.randn(n, width), torch.randn(n, width), torch.rand(n), torch.rand(n))
        ratios = []
        with torch.no_grad():
            for q in (30, n // 4, n // 2, n):
                times = {"some": [], "all": []}
                for _ in range(args.repeats):
                    for name, queries in (("some", slice(0, q)), ("all", None)):
                        start = time.perf_counter()
                        agg(*inputs, queries=queries)
                        times[name].append(time.perf_counter() - start)
                ratios.append(statistics.median(times["some"]) / statistics.median(times["all"]))
        print(f"{width:<5d} " + "  ".join(f"{r:6.2f}" for r in ratios))


if __name__ == "__main__":
    main()
