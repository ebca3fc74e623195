"""Make the trimmed reference vectors of this folder from the authors' full ones (see README.md here).

    python tests/data/reference/trim_vectors.py FULL_VECTORS_DIR [--out DIR] [--heads 0 15]

FULL_VECTORS_DIR holds ``relation_mega_location_based.npz``, ``relation_mega_location_free.npz``,
``relation_rdn.npz`` (each with the full [1024, 1024] ``Wq.weight``, ``Wk.weight`` and
[1024, 1024, 1, 1] ``Wv.weight``) and ``vid_eval_case.json``. DIR defaults to this script's folder.

The relation module (16 heads of 64 channels) is separable per head: output channels [64g, 64g + 64)
depend only on rows [64g, 64g + 64) of ``Wq.weight``, ``Wk.weight`` and ``Wv.weight`` (and of the small
tensors, kept whole). So each trimmed file keeps every small tensor as it is, and of the three large
weights and of ``output`` only the rows / columns of the heads in ``heads`` (an int array stored in the
file), concatenated in head order. Dtypes are kept (float16 inputs and weights are exact values;
``output`` stays float32). ``vid_eval_case.json`` is copied byte for byte.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

RELATION_FILES = ("relation_mega_location_based.npz", "relation_mega_location_free.npz", "relation_rdn.npz")
LARGE = ("Wq.weight", "Wk.weight", "Wv.weight")  # rows = output channels
NUM_HEADS = 16


def trim(full: dict[str, np.ndarray], heads: list[int]) -> dict[str, np.ndarray]:
    channels = full["Wq.weight"].shape[0]
    d = channels // NUM_HEADS
    rows = np.concatenate([np.arange(g * d, (g + 1) * d) for g in heads])
    out = {}
    for key, value in full.items():
        if key in LARGE:
            out[key] = value[rows]
        elif key == "output":
            out[key] = value[:, rows]
        else:
            out[key] = value
    out["heads"] = np.asarray(heads, dtype=np.int64)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("full", type=Path, help="folder with the authors' full vectors")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--heads", type=int, nargs="+", default=[0, NUM_HEADS - 1])
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in RELATION_FILES:
        with np.load(args.full / name) as data:
            full = {k: data[k] for k in data.files}
        np.savez_compressed(args.out / name, **trim(full, args.heads))
        print(f"{name}: {(args.out / name).stat().st_size} bytes")
    shutil.copyfile(args.full / "vid_eval_case.json", args.out / "vid_eval_case.json")


if __name__ == "__main__":
    main()
