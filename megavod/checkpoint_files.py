"""Reading weight files: megavod's own and the authors' ``.pth`` files, safetensors, Detectron pickles.

Accepted files (:func:`read_weights`):

* the authors' training checkpoints ``{"model", "optimizer", "scheduler", "iteration"}`` or a bare
  state dict, with or without the DDP ``module.`` prefix (docs/conventions.md#state-dict-names);
* megavod's converted files (``megavod convert``): a torch file ``{"format": "megavod", "model",
  "config"}`` or a ``.safetensors`` file whose metadata (or sidecar ``FILE.yaml``) holds the config;
* megavod's training checkpoints (:mod:`megavod.train.checkpoint`), which record their config too.

Safe by default: torch files are read with ``torch.load(weights_only=True)``; a file that needs
arbitrary unpickling is refused unless the user passes ``--trust-pickle``; safetensors files need no
unpickling at all. This module only reads: filling a model from a file is
:mod:`megavod.checkpoints.loading`.
"""

from __future__ import annotations

import collections
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from torch import Tensor

from megavod.errors import MegavodError

_MODULE_PREFIX = "module."
FORMAT = "megavod"  # converted files; training checkpoints say "megavod.train_checkpoint"
SAFETENSORS_SUFFIX = ".safetensors"


@dataclass
class Checkpoint:
    """The weights of one file and what came with them.

    state_dict: tensors by name (``module.`` removed); config: the recorded config (megavod's files)
    or None; kind: ``authors`` (no format field), ``megavod``, ``megavod.train_checkpoint`` or
    ``safetensors``; dropped: top-level entries that are not weights (optimizer, scheduler, ...).
    """

    path: Path
    state_dict: dict[str, Tensor]
    config: dict[str, Any] | None = None
    kind: str = "authors"
    dropped: list[str] = field(default_factory=list)
    had_module_prefix: bool = False


# ----------------------------------------------------------------------------------------------
# Reading files


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> Any:
    """The raw object saved in torch file ``path`` (weights only unless ``trust_pickle``)."""
    path = Path(path)
    if not path.is_file():
        raise MegavodError(f"{path}: checkpoint not found")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise MegavodError(f"{path}: empty file")
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        # torch's zip format keeps its directory at the end: a cut-short download loses it first.
        raise MegavodError(f"{path}: truncated checkpoint (the zip archive has lost its end); download or copy it again")
    try:
        # collections.Counter: torch < 1.x schedulers stored milestones as one; it runs no code.
        with torch.serialization.safe_globals([collections.Counter]):
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if unsafe and not trust_pickle:
            raise MegavodError(
                f"{path}: refused: loading it needs arbitrary unpickling (it references {unsafe.group(1)}); "
                "pass --trust-pickle only if you trust where the file comes from"
            ) from None
        raise MegavodError(f"{path}: truncated or corrupt checkpoint ({_first_line(e)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, KeyError, ValueError) as e:
        raise MegavodError(f"{path}: truncated or corrupt checkpoint ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    return text[:160]


def state_dict_of(obj: object, path: str | Path = "checkpoint") -> dict[str, Tensor]:
    """The model state dict in a checkpoint: ``obj["model"]`` (the authors' and megavod's training
    checkpoints), ``obj["state_dict"]`` or ``obj`` itself; a DDP ``module.`` prefix is removed when
    every key has it."""
    return _unwrap(obj, Path(path))[0]


def _unwrap(obj: object, path: Path) -> tuple[dict[str, Tensor], list[str], bool]:
    """(state dict, dropped top-level entries, whether ``module.`` was removed)."""
    if not isinstance(obj, Mapping):
        raise MegavodError(f"{path}: holds no state dict (expected a mapping of names to tensors, got {type(obj).__name__})")
    dropped: list[str] = []
    sd: Any = obj
    for wrapper in ("model", "state_dict"):
        if isinstance(obj.get(wrapper), Mapping):
            sd = obj[wrapper]
            dropped = [str(k) for k in obj if k != wrapper]
            break
    if not sd:
        raise MegavodError(f"{path}: holds no state dict (expected a mapping of names to tensors)")
    bad = [str(k) for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise MegavodError(f"{path}: entries that are not tensors: {', '.join(bad[:3])}")
    stripped = all(str(k).startswith(_MODULE_PREFIX) for k in sd)
    if stripped:
        sd = {k[len(_MODULE_PREFIX):]: v for k, v in sd.items()}
    return dict(sd), dropped, stripped


def _is_safetensors(path: Path) -> bool:
    if path.suffix == SAFETENSORS_SUFFIX:
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    # 8-byte little-endian header length, then the JSON header.
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def sidecar_path(path: str | Path) -> Path:
    """``FILE.yaml`` beside a safetensors ``FILE``: the config, readable by people."""
    return Path(f"{path}.yaml")


def _read_safetensors(path: Path) -> Checkpoint:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise MegavodError(f"{path}: truncated or corrupt safetensors file ({_first_line(e)})") from None
    if not sd:
        raise MegavodError(f"{path}: holds no tensors")
    text = metadata.get("config")
    where = f"{path} (metadata 'config')"
    if text is None and sidecar_path(path).is_file():
        text, where = sidecar_path(path).read_text(encoding="utf-8"), str(sidecar_path(path))
    config = None
    if text is not None:
        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError:
            raise MegavodError(f"{where}: the recorded config is not valid YAML") from None
        if not isinstance(config, dict):
            raise MegavodError(f"{where}: the recorded config is not a mapping")
    stripped = all(k.startswith(_MODULE_PREFIX) for k in sd)
    if stripped:
        sd = {k[len(_MODULE_PREFIX):]: v for k, v in sd.items()}
    return Checkpoint(path, sd, config, "safetensors", [], stripped)


def read_weights(path: str | Path, trust_pickle: bool = False) -> Checkpoint:
    """Read any accepted file (see the module docstring) into a :class:`Checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise MegavodError(f"{path}: checkpoint not found")
    if _is_safetensors(path):
        return _read_safetensors(path)
    obj = read_checkpoint(path, trust_pickle)
    sd, dropped, stripped = _unwrap(obj, path)
    kind = str(obj.get("format", "authors")) if isinstance(obj, Mapping) else "authors"
    config = obj.get("config") if isinstance(obj, Mapping) and kind.startswith(FORMAT) else None
    if config is not None and not isinstance(config, dict):
        raise MegavodError(f"{path}: field 'config' is not a mapping")
    return Checkpoint(path, sd, config, kind, [d for d in dropped if d not in ("format", "version", "config")], stripped)


# ----------------------------------------------------------------------------------------------
# Detectron (Caffe2) ImageNet pickles, without arbitrary unpickling

_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"), ("collections", "OrderedDict"),
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Builds dicts, lists, strings, numbers and numpy arrays; refuses every other global (so no
    pickled code can run)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def read_detectron_pickle(path: str | Path) -> dict[str, Any]:
    """The blobs of a Detectron C2 weight pickle (the MSRA ``R-50.pkl`` / ``R-101.pkl`` and FAIR
    ``X-101-32x8d.pkl`` files the authors start from, docs/conventions.md#backbone-and-frozen-batch-norm):
    {blob name: numpy array}. Python 2 pickles are read as latin-1. Only numpy arrays and plain containers are
    built."""
    path = Path(path)
    if not path.is_file():
        raise MegavodError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            data = _ArraysOnlyUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise MegavodError(f"{path}: refused: the pickle references {e}, not only numpy arrays") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise MegavodError(f"{path}: truncated or corrupt Detectron weight pickle ({_first_line(e)})") from None
    blobs = data.get("blobs", data) if isinstance(data, dict) else None
    if not isinstance(blobs, dict):
        raise MegavodError(f"{path}: not a Detectron weight pickle (expected a dict of blobs)")
    return blobs
