"""Training checkpoints: atomic writes, safe loads, and every random state a resume needs.

A training checkpoint is one ``torch.save`` file::

    {"format": "megavod.train_checkpoint", "version": 1,
     "model": state_dict (no DDP "module." prefix), "optimizer": ..., "scheduler": ...,
     "iteration": completed iterations, "rng": [per-rank RNG state], "config": to_dict(cfg)}

The authors' files (docs/conventions.md#checkpoint-files-and-key-listings) hold
``model``/``optimizer``/``scheduler``/``iteration``; megavod adds the random states (python, numpy, torch,
CUDA) of every rank and the config, so that a run killed and resumed ends with the same weights as an
uninterrupted one, and ``detect``/``eval`` can rebuild the model. Everything in it is tensors and plain Python
values, so it loads with ``torch.load(weights_only=True)``: loading a checkpoint never runs pickled code.

Writes go to a temporary file in the same folder, are flushed to disk, then renamed over the target:
a crash at any moment leaves either the old file or the new one, never a partial file. The folder's
``last_checkpoint`` file (one line, the checkpoint's file name) is written the same way and is what
``--resume`` follows.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megavod.atomic import atomic_path, atomic_write_text  # noqa: F401 (re-exported for the engine)
from megavod.errors import MegavodError

FORMAT = "megavod.train_checkpoint"
VERSION = 1
LAST_CHECKPOINT = "last_checkpoint"


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` through a temporary file + ``os.replace`` (no partial file, ever)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# ----------------------------------------------------------------------------------------------
# Random states, as plain values (weights_only-loadable: no numpy arrays, no custom classes)


def capture_rng_state() -> dict[str, Any]:
    """The python, numpy, torch and (if initialised) CUDA generator states of this process."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    cuda = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return {
        "python": [version, list(internal), gauss],
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`. CUDA states are restored when the device count matches."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": int(n["pos"])},
            "has_gauss": int(n["has_gauss"]),
            "gauss": float(n["gauss"]),
        }
    )
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Files


def checkpoint_name(iteration: int) -> str:
    return f"model_{iteration:07d}.pth"


def save_checkpoint(
    out_dir: str | Path,
    name: str,
    *,
    model: dict[str, Any],
    optimizer: dict[str, Any],
    scheduler: dict[str, Any],
    iteration: int,
    rng: list[dict[str, Any]],
    config: dict[str, Any],
    update_last: bool = True,
) -> Path:
    """Write ``out_dir/name`` atomically, then (``update_last``) point ``last_checkpoint`` at it."""
    out_dir = Path(out_dir)
    path = out_dir / name
    atomic_torch_save(
        {
            "format": FORMAT,
            "version": VERSION,
            "model": model,
            "optimizer": optimizer,
            "scheduler": scheduler,
            "iteration": int(iteration),
            "rng": rng,
            "config": config,
        },
        path,
    )
    if update_last:
        # The pointer moves only once the file it names is complete, so it never names a partial file.
        atomic_write_text(out_dir / LAST_CHECKPOINT, name + "\n")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a megavod training checkpoint with ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise MegavodError(f"{path}: checkpoint not found")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError or EOFError on bad files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MegavodError(f"{path}: cannot load checkpoint safely ({first})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise MegavodError(f"{path}: not a megavod training checkpoint (field 'format' missing or wrong)")
    if data.get("version") != VERSION:
        raise MegavodError(f"{path}: field 'version' is {data.get('version')!r}, this megavod reads {VERSION}")
    for key in ("model", "optimizer", "scheduler", "iteration", "rng", "config"):
        if key not in data:
            raise MegavodError(f"{path}: training checkpoint lacks field '{key}'")
    return data


def read_last_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint ``out_dir/last_checkpoint`` names, or ``None`` if there is none."""
    pointer = Path(out_dir) / LAST_CHECKPOINT
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    if not name:
        raise MegavodError(f"{pointer}: empty; expected a checkpoint file name")
    path = Path(name) if Path(name).is_absolute() else Path(out_dir) / name
    if not path.is_file():
        raise MegavodError(f"{pointer}: names {name}, which does not exist")
    return path


def prune_checkpoints(out_dir: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest periodic ``model_XXXXXXX.pth`` files (``keep <= 0``: keep all)."""
    if keep <= 0:
        return
    files = sorted(Path(out_dir).glob("model_[0-9]*.pth"))
    for old in files[:-keep]:
        old.unlink(missing_ok=True)
