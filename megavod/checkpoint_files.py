"""Reading weight files: megavod's own and the authors' ``.pth`` files, safetensors, Detectron pickles.

Accepted files (:func:`read_weights`):

* the authors' training checkpoints ``{"model", "optimizer", "scheduler", "iteration"}`` or a bare
  state dict, with or without the DDP ``module.`` prefix (docs/conventions.md#state-dict-names); the
  YOLOV repository's ``{"start_epoch", "model", "optimizer"}`` (YOLOX and YOLOV, their ``model`` the
  EMA weights) the same way;
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
import os
import pickle
import pickletools
import re
import tarfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
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
        head = f.read(8)
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
        raise MegavodError(_load_failure(path, head, _unpickler_reason(e))) from None
    except MemoryError:  # a machine out of memory is no damaged file (MemoryError is an Exception too)
        raise
    except Exception as e:  # noqa: BLE001 - damaged bytes make torch.load raise anything (IndexError, struct.error, ...)
        raise MegavodError(_load_failure(path, head, _first_line(e))) from None


def _load_failure(path: Path, head: bytes, reason: str) -> str:
    # torch writes zip archives ("PK"), before 1.6 pickles (b"\x80") and long before tar archives: a file of
    # none of these kinds was never a checkpoint (a text file, an HTML error page saved as a download, ...).
    if head.startswith((b"PK", b"\x80")) or tarfile.is_tarfile(path):
        return f"{path}: truncated or corrupt checkpoint ({reason})"
    return f"{path}: not a PyTorch checkpoint (it starts with {head!r}: neither a zip archive nor a pickle)"


# Errors whose message says what went wrong by itself; other types are named in front of their message
# ("IndexError: pop from empty list" rather than "pop from empty list", "KeyError: 101" rather than "101").
_SELF_EXPLAINING = (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile,
                    SafetensorError, yaml.YAMLError)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    if lines and not isinstance(e, _SELF_EXPLAINING):
        text = f"{type(e).__name__}: {text}"
    return text[:160]


def _unpickler_reason(e: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler found wrong: its long message opens with advice about
    ``weights_only=False`` that does not apply to a damaged file; the reason follows "WeightsUnpickler error:"."""
    _, found, rest = str(e).partition("WeightsUnpickler error:")
    reason = next((ln.strip() for ln in rest.splitlines() if ln.strip()), "") if found else ""
    return reason[:160] if reason else _first_line(e)


def state_dict_of(obj: object, path: str | Path = "checkpoint") -> dict[str, Tensor]:
    """The model state dict in a checkpoint: ``obj["model"]`` (the authors' MEGA and YOLOV files and
    megavod's training checkpoints), ``obj["state_dict"]`` or ``obj`` itself; a DDP ``module.`` prefix is removed when
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
    unnamed = [repr(k) for k in sd if not isinstance(k, str)]
    if unnamed:
        raise MegavodError(f"{path}: tensor names that are not strings: {', '.join(unnamed[:3])}")
    # Sparse, quantized or meta tensors hold no plain weights: a model cannot be filled from them.
    odd = [f"{k} ({_kind(v)})" for k, v in sd.items() if v.layout != torch.strided or v.is_quantized or v.is_meta]
    if odd:
        raise MegavodError(f"{path}: entries that are not dense tensors with data: {', '.join(odd[:3])}")
    stripped = all(str(k).startswith(_MODULE_PREFIX) for k in sd)
    if stripped:
        sd = {k[len(_MODULE_PREFIX):]: v for k, v in sd.items()}
    return dict(sd), dropped, stripped


def _kind(t: Tensor) -> str:
    if t.is_meta:
        return "meta, no data"
    return "quantized" if t.is_quantized else str(t.layout).removeprefix("torch.")


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
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - SafetensorError, or whatever a damaged header makes torch raise
        raise MegavodError(f"{path}: truncated or corrupt safetensors file ({_first_line(e)})") from None
    if not sd:
        raise MegavodError(f"{path}: holds no tensors")
    text = metadata.get("config")
    where = f"{path} (metadata 'config')"
    if text is None and sidecar_path(path).is_file():
        where = str(sidecar_path(path))
        try:
            text = sidecar_path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise MegavodError(f"{where}: cannot read the recorded config ({_first_line(e)})") from None
    config = None
    if text is not None:
        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError:
            raise MegavodError(f"{where}: the recorded config is not valid YAML") from None
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - YAML values can fail as Python values (a date "2020-13-45", deep nesting)
            raise MegavodError(f"{where}: the recorded config is not valid YAML ({_first_line(e)})") from None
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


class _Refused(pickle.UnpicklingError):
    """A global outside ``_NUMPY_GLOBALS``; the message is its dotted name."""


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Builds dicts, lists, strings, numbers and numpy arrays; refuses every other global (so no
    pickled code can run)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise _Refused(f"{module}.{name}")


class _Capped:
    """Reads of a file that never ask for more than what is left of it, so that a damaged length field
    cannot make a reader allocate gigabytes."""

    def __init__(self, f: Any) -> None:
        self.f, self.size = f, os.fstat(f.fileno()).st_size

    def read(self, n: int = -1) -> bytes:
        left = max(self.size - self.f.tell(), 0)
        return self.f.read(left if n is None or n < 0 or n > left else n)

    def readline(self) -> bytes:
        return self.f.readline()

    def tell(self) -> int:
        return self.f.tell()


def _is_number_or_array(value: Any) -> bool:
    if isinstance(value, np.ndarray):
        return value.dtype.kind in "biuf"
    return isinstance(value, (int, float, np.integer, np.floating))


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
            # The opcodes first, with reads capped at the file's end: the unpickler allocates what a length
            # field, a frame size or a memo index says before reading on, so a damaged one must be caught first.
            capped = _Capped(f)
            for opcode, arg, pos in pickletools.genops(capped):
                if ((opcode.name == "FRAME" and arg > capped.size - capped.tell())
                        or (opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and int(arg) > pos)):
                    raise ValueError(f"at position {pos}, {opcode.name} {arg} is out of range")
            f.seek(0)
            data = _ArraysOnlyUnpickler(f, encoding="latin1").load()
    except _Refused as e:
        raise MegavodError(f"{path}: refused: the pickle references {e}, not only numpy arrays") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - damaged bytes make the unpickler raise anything
        raise MegavodError(f"{path}: truncated or corrupt Detectron weight pickle ({_first_line(e)})") from None
    blobs = data.get("blobs", data) if isinstance(data, dict) else None
    if not isinstance(blobs, dict):
        raise MegavodError(f"{path}: not a Detectron weight pickle (expected a dict of blobs)")
    unnamed = next((k for k in blobs if not isinstance(k, str)), None)
    if unnamed is not None:
        raise MegavodError(f"{path}: not a Detectron weight pickle: blob name {unnamed!r} is not a string")
    bad = next(((k, v) for k, v in blobs.items() if not _is_number_or_array(v)), None)
    if bad is not None:
        k, v = bad
        what = f"{type(v).__name__}" + (f" of {v.dtype}" if isinstance(v, np.ndarray) else "")
        raise MegavodError(f"{path}: not a Detectron weight pickle: blob {k!r} is a {what}, not a numeric array")
    return blobs
