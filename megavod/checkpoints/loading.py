"""Filling a megavod model from a weight file, and the config a file asks for.

The key mapping is explicit and complete: every model tensor must be filled and every checkpoint tensor
used, otherwise one line names the first offending keys with the shapes expected (and what the file
holds against what the config builds), and nothing is loaded (the authors' suffix matching and silent
leftovers are not reproduced: docs/departures.md). Pixel convention (BGR x 255 minus the mean) and class
order (VID's 30 classes after background) are the authors', so weights load unchanged. Reading the
files themselves: :mod:`megavod.checkpoint_files`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from megavod.checkpoint_files import Checkpoint, read_weights
from megavod.checkpoints.recognise import ModelSignature, config_for, recognise
from megavod.config import Config, apply_overrides, drop_other_sections, from_dict, load_config
from megavod.config_checks import validate
from megavod.errors import ConfigError, MegavodError
from megavod.registry import MethodSpec, get_method


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

    Paths of initial weights (ImageNet backbone, ``model.init_weights``, a section's ``weight_files``
    such as FGFA's FlowNet) are dropped: the checkpoint holds every weight, and the files they named may
    not exist where it is used.
    """
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: recorded config: expected a mapping, got {type(record).__name__}")
    data = copy.deepcopy(record)
    spec = _recorded_method(data)
    if spec is not None:
        # Records written before a config held its own method's section only hold every method's.
        drop_other_sections(data, spec.name)
    for keys in _initial_weight_keys(spec):  # recorded paths of initial weights: the checkpoint supersedes them
        node = data
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and keys[-1] in node:
            node[keys[-1]] = None
    apply_overrides(data, overrides)
    try:
        cfg = from_dict(Config, data)
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{where}: recorded config: {e}") from None
    return cfg


def _recorded_method(data: dict[str, Any]) -> MethodSpec | None:
    """The row of a record's method; None when it names none (``from_dict`` then says what is wrong)."""
    method = data.get("method", Config.method)
    try:
        return get_method(method) if isinstance(method, str) else None
    except ConfigError:
        return None


# Config keys naming files of initial weights shared by every method (ImageNet backbone, a detector to
# start from); a method's section adds its own (``weight_files``, e.g. FGFA's and DFF's FlowNet).
_SHARED_INIT_FILES = (("model", "backbone", "weights"), ("model", "init_weights"))


def _initial_weight_keys(spec: MethodSpec | None) -> list[tuple[str, ...]]:
    keys = list(_SHARED_INIT_FILES)
    if spec is not None and spec.config_type is not None:
        keys += [(spec.config_key, name) for name in getattr(spec.config_type, "weight_files", ())]
    return keys


def without_initial_weights(cfg: Any) -> Any:
    """``cfg`` with every initial-weights file unset (in place): a checkpoint holds every weight."""
    for keys in _initial_weight_keys(get_method(cfg.method)):
        node = cfg
        for k in keys[:-1]:
            node = getattr(node, k, None)
        if node is not None and hasattr(node, keys[-1]):
            setattr(node, keys[-1], None)
    return cfg


def resolve_config(checkpoint: Checkpoint, config: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """The config to build for ``checkpoint``: ``config`` (a preset or YAML path) when given, else the
    config the file records (megavod's files), else the preset recognised from its keys."""
    if config is not None:
        return load_config(config, list(overrides))
    if checkpoint.config is not None:
        return config_from_record(checkpoint.config, overrides, str(checkpoint.path))
    return config_for(recognise(checkpoint.state_dict, str(checkpoint.path)), overrides, str(checkpoint.path))
