"""The reference data shipped in ``tests/data`` and the helpers that read it (one copy for every test).

- ``CHECKPOINT_KEYS``: the authors' state-dict key listings (``{name}.txt``: a header line ending
  ``header: K keys E elements``, then one ``key (shape)`` line per tensor).
- ``REFERENCE``: vectors computed by the authors' own code, trimmed (``tests/data/reference/README.md``).

Everything is read from inside the repository; a missing file is an error, never a skip.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parent / "data"
CHECKPOINT_KEYS = DATA / "checkpoint_keys"
REFERENCE = DATA / "reference"
VID_EVAL_CASE = REFERENCE / "vid_eval_case.json"

_LARGE = ("Wq.weight", "Wk.weight", "Wv.weight")


def authors_listing(name: str) -> tuple[int, int, dict[str, tuple[int, ...]]]:
    """(keys, elements) of the header and {key: shape} of ``CHECKPOINT_KEYS / f"{name}.txt"``."""
    lines = (CHECKPOINT_KEYS / f"{name}.txt").read_text().splitlines()
    n_keys, n_elements = map(int, re.search(r"header: (\d+) keys (\d+) elements", lines[0]).groups())
    shapes = {}
    for line in lines[1:]:
        key, shape = line.split(" ", 1)
        shapes[key] = tuple(int(v) for v in re.findall(r"\d+", shape))
    return n_keys, n_elements, shapes


def load_relation_vector(name: str) -> dict[str, torch.Tensor]:
    """A trimmed relation vector (``REFERENCE / name``) as float32 tensors, ready for the full-size module.

    The file keeps, of ``Wq.weight``, ``Wk.weight``, ``Wv.weight`` and ``output``, only the rows / columns
    of the heads in its ``heads`` array. Here the three weights come back at full size with those rows
    in place and zeros elsewhere (the module is separable per head, so the other rows cannot change the
    kept heads' output); ``output`` stays [N, kept channels] and ``columns`` (int64) says which output
    channels of the module it holds. Every other tensor is the authors' own, whole.
    """
    with np.load(REFERENCE / name) as data:
        raw = {k: data[k] for k in data.files}
    heads = raw.pop("heads")
    channels = raw["roi_feat"].shape[1]
    d = channels // raw["Wg.weight"].shape[0] if "Wg.weight" in raw else channels // raw["u"].shape[0]
    columns = np.concatenate([np.arange(g * d, (g + 1) * d) for g in heads])
    out = {}
    for key, value in raw.items():
        tensor = torch.from_numpy(value.astype(np.float32))
        if key in _LARGE:
            full = torch.zeros((channels,) + tuple(tensor.shape[1:]))
            full[torch.from_numpy(columns)] = tensor
            tensor = full
        out[key] = tensor
    out["heads"] = torch.from_numpy(heads)
    out["columns"] = torch.from_numpy(columns)
    return out


def load_yolov_vector(name: str) -> dict[str, torch.Tensor | str]:
    """A YOLOV reference vector (``REFERENCE / name``, written by ``make_yolov_vectors.py``): float arrays
    as float32 tensors (the float16 ones are exact values, cast as the authors' run did), integer and
    boolean arrays as tensors of their own dtype, strings (``affinity``) as ``str``."""
    out: dict[str, torch.Tensor | str] = {}
    with np.load(REFERENCE / name) as data:
        for key in data.files:
            value = data[key]
            if value.dtype.kind == "U":
                out[key] = str(value)
            elif value.dtype.kind == "f":
                out[key] = torch.from_numpy(value.astype(np.float32))
            else:
                out[key] = torch.from_numpy(value)
    return out
