"""Loading weights into a megavod model: megavod's own files and the authors' ``.pth`` files.

Accepted files (:func:`read_weights`):

* the authors' training checkpoints ``{"model", "optimizer", "scheduler", "iteration"}`` or a bare
  state dict, with or without the DDP ``module.`` prefix (spec §9);
* megavod's converted files (``megavod convert``): a torch file ``{"format": "megavod", "model",
  "config"}`` or a ``.safetensors`` file whose metadata (or sidecar ``FILE.yaml``) holds the config;
* megavod's training checkpoints (:mod:`megavod.train.checkpoint`), which record their config too.

Safe by default: torch files are read with ``torch.load(weights_only=True)``; a file that needs
arbitrary unpickling is refused unless the user passes ``--trust-pickle``; safetensors files need no
unpickling at all. The key mapping is explicit and complete: every model tensor must be filled and
every checkpoint tensor used, otherwise one line names the first offending keys with the shapes
expected (and what the file holds against what the config builds), and nothing is loaded (spec §9:
the authors' suffix matching and silent leftovers are not reproduced). Pixel convention (BGR x 255
minus the mean) and class order (VID's 30 classes after background) are the authors', so weights load
unchanged.
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
from torch import Tensor, nn

from megavod.checkpoints.recognise import ModelSignature, config_for, recognise
from megavod.errors import ConfigError, MegavodError

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
    from safetensors import SafetensorError, safe_open

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
# Matching names and shapes


def authors_to_megavod_keys(model: nn.Module) -> dict[str, str]:
    """{authors' key: our key} for every tensor of ``model`` whose name differs from the authors'.

    Modules with differently named tensors say so with ``authors_key_mapping()`` ({our name relative
    to the module: the authors' name relative to its parent}); e.g. MEGA's aggregator
    (``...feature_extractor.aggregator.fcs.0`` is their ``...feature_extractor.l_fcs.0``). Every
    other name equals the authors'.
    """
    mapping: dict[str, str] = {}
    for prefix, module in model.named_modules():
        rename = getattr(module, "authors_key_mapping", None)
        if rename is None:
            continue
        outer = prefix.rsplit(".", 1)[0] + "." if "." in prefix else ""
        for ours, theirs in rename().items():
            mapping[outer + theirs] = f"{prefix}.{ours}" if prefix else ours
    return mapping


def _summarise(items: list[str], n: int = 3) -> str:
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def _signature(sd: Mapping[str, Tensor]) -> ModelSignature | None:
    try:
        return recognise(sd)
    except MegavodError:
        return None


def match_state_dict(
    model: nn.Module, sd: Mapping[str, Tensor], path: str | Path = "checkpoint", config_name: str | None = None
) -> dict[str, Tensor]:
    """Rename ``sd`` to ``model``'s keys and check it fills the model exactly (names, shapes, float or
    not); else ``MegavodError``: one line with what the file holds against what the model is (when
    both are recognised and differ) and the first offending keys with the shapes expected."""
    expected = model.state_dict()
    rename = authors_to_megavod_keys(model)
    mapped = {rename.get(k, k): v for k, v in sd.items()}
    if len(mapped) != len(sd):
        twice = [k for k in sd if k in rename and rename[k] in sd]
        raise MegavodError(f"{path}: holds both the authors' and megavod's name for {_summarise(twice)}")
    # Keys are named as the file names them: the authors' names for their files, megavod's for ours.
    ours_to_theirs = {v: k for k, v in rename.items()}
    named = (lambda k: k) if any(k in ours_to_theirs for k in sd) else (lambda k: ours_to_theirs.get(k, k))
    missing = [f"{named(k)} {_shape(v)}" for k, v in expected.items() if k not in mapped]
    unexpected = [f"{k} {_shape(v)}" for k, v in sd.items() if rename.get(k, k) not in expected]
    wrong = [f"{k} is {_shape(v)}, expected {_shape(expected[rename.get(k, k)])}"
             for k, v in sd.items() if rename.get(k, k) in expected and v.shape != expected[rename.get(k, k)].shape]
    wrong += [f"{k} is {v.dtype}, expected a floating-point tensor" for k, v in sd.items()
              if rename.get(k, k) in expected and expected[rename.get(k, k)].is_floating_point() and not v.is_floating_point()]
    if not (missing or unexpected or wrong):
        return {k: mapped[k] for k in expected}
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key(s): {_summarise(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} key(s): {_summarise(unexpected)}")
    if wrong:
        parts.append(f"shape mismatch: {_summarise(wrong)}")
    theirs, ours = _signature(sd), _signature(expected)
    if theirs is not None and ours is not None and theirs != ours:
        builds = f"the config '{config_name}' builds" if config_name else "the model is"
        hint = f"; the file fits --config {theirs.preset}" if theirs.preset and theirs.preset != config_name else ""
        raise MegavodError(f"{path}: the file holds {theirs.describe()} but {builds} {ours.describe()}: "
                           f"{'; '.join(parts)}{hint}")
    raise MegavodError(f"{path}: does not match the model: {'; '.join(parts)}")


def load_state(model: nn.Module, checkpoint: Checkpoint, config_name: str | None = None) -> None:
    """Fill ``model`` from ``checkpoint`` or raise, loading nothing. A model built on the ``meta``
    device (no storage, no init cost) receives the checkpoint's tensors themselves."""
    mapped = match_state_dict(model, checkpoint.state_dict, checkpoint.path, config_name)
    on_meta = any(t.is_meta for t in model.state_dict().values())
    model.load_state_dict(mapped, strict=True, assign=on_meta)
    if on_meta and any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise RuntimeError("a tensor outside the state dict is still on the meta device; build this model on the CPU")


def load_model_weights(model: nn.Module, path: str | Path, cfg: object | None = None, trust_pickle: bool = False) -> None:
    """Fill ``model`` (built from ``cfg``) from ``path`` (any accepted file) or raise, loading nothing."""
    load_state(model, read_weights(path, trust_pickle), getattr(cfg, "name", None))


# ----------------------------------------------------------------------------------------------
# Config and model from a file


def config_from_record(record: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), where: str = "checkpoint") -> Any:
    """A validated :class:`~megavod.config.Config` from a recorded ``to_dict(cfg)`` plus overrides.

    Paths of initial weights (ImageNet backbone, ``model.init_weights``, FlowNet) are dropped: the
    checkpoint holds every weight, and the files they named may not exist where it is used.
    """
    from megavod.config import Config, from_dict, parse_override, validate

    data = dict(record)
    for keys in _INIT_FILES:  # recorded paths of initial weights: the checkpoint supersedes them
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                break
            node[k] = dict(node[k])
            node = node[k]
        else:
            if keys[-1] in node:
                node[keys[-1]] = None
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            node[k] = dict(child) if isinstance(child, dict) else {}
            node = node[k]
        node[keys[-1]] = value
    try:
        cfg = from_dict(Config, data)
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{where}: recorded config: {e}") from None
    return cfg


# Config keys naming files of initial weights (ImageNet backbone, a detector to start from, FlowNet).
_INIT_FILES = (("model", "backbone", "weights"), ("model", "init_weights"), ("fgfa", "flownet_weights"),
               ("dff", "flownet_weights"))


def without_initial_weights(cfg: Any) -> Any:
    """``cfg`` with every initial-weights file unset (in place): a checkpoint holds every weight."""
    for keys in _INIT_FILES:
        node = cfg
        for k in keys[:-1]:
            node = getattr(node, k, None)
        if node is not None and hasattr(node, keys[-1]):
            setattr(node, keys[-1], None)
    return cfg


def resolve_config(checkpoint: Checkpoint, config: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """The config to build for ``checkpoint``: ``config`` (a preset or YAML path) when given, else the
    config the file records (megavod's files), else the preset recognised from its keys."""
    from megavod.config import load_config

    if config is not None:
        return load_config(config, list(overrides))
    if checkpoint.config is not None:
        return config_from_record(checkpoint.config, overrides, str(checkpoint.path))
    return config_for(recognise(checkpoint.state_dict, str(checkpoint.path)), overrides, str(checkpoint.path))


def load_detector(
    weights: str | Path,
    config: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    trust_pickle: bool = False,
) -> tuple[nn.Module, Any]:
    """(detector filled from ``weights``, its config): what ``megavod detect --weights FILE`` runs.

    Without ``config`` the file's recorded config (or the preset recognised from its keys) is used,
    so ``megavod detect --weights MEGA_R_101.pth`` needs no ``--config``; with one, a file that does
    not fit it is refused in one line saying what the file holds and what the config builds.
    """
    from megavod.models import build_detector

    checkpoint = read_weights(weights, trust_pickle)
    cfg = without_initial_weights(resolve_config(checkpoint, config, overrides))
    model = build_detector(cfg)
    load_state(model, checkpoint, cfg.name)
    return model, cfg


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
    ``X-101-32x8d.pkl`` files the authors start from, spec §1): {blob name: numpy array}. Python 2
    pickles are read as latin-1. Only numpy arrays and plain containers are built."""
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
