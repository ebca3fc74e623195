"""The method table: one :class:`MethodSpec` per detection method, looked up by ``cfg.method``.

Every place that needs to know what a method is — which detector to build, which frames its key-frame
step receives (its stream schedule), which reference frames a training sample draws, how its released
checkpoints are recognised, its config section and its default inference mode — reads it here, so
adding a method is one new module that calls :func:`register_method` plus nothing else
(docs/architecture.md#adding-a-method).

This module sits in the bottom layer (it imports nothing of megavod): the table is filled from above,
by :mod:`megavod.methods` (the built-in methods, imported by ``import megavod``) or by a user's own
module, and read from anywhere through :func:`get_method`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megavod.errors import ConfigError


@dataclass(frozen=True)
class MethodSpec:
    """What a method is: one row of the table, every field of it below.

    Args:
        name: the value of ``cfg.method`` (``"mega"``).
        title: how people write it (``"MEGA"``).
        build: config -> the randomly initialised detector (an ``nn.Module`` implementing the detector
            contract, :class:`megavod.models.contract.VideoDetector`).
        schedule: config -> the stream schedule (:class:`megavod.inference.schedules.Schedule`): which
            frames the key-frame step of frame k receives, offline and online, and the memory it keeps.
        reference_sampler: config -> the training sampler of reference frames
            (:class:`megavod.data.sampling.ReferenceSampler`), or None for a method without references.
        checkpoint: how the method's checkpoints are told apart by their keys
            (:class:`megavod.checkpoints.signatures.HeadSignature`); None: such files need ``--config``.
        max_images_per_process: key frames one process may train on at once (None: no limit). Every
            built-in method trains on any number (docs/conventions.md#key-frames-per-process); a method
            whose training forward takes one sample at a time sets 1.
        export: config -> the method's ONNX graphs (:class:`megavod.export.graphs.MethodGraphs`: the
            per-frame pass and the key-frame step as traceable modules, and their runtime adapters);
            None: ``megavod export`` refuses the method.
        config_key: the key of the method's own config section: ``mega`` gives ``mega.T_g: 10`` in YAML,
            ``mega.T_g=20`` as an override and ``cfg.mega.T_g`` in code. None: the method has no
            hyper-parameters of its own. Rows may share a section type, each names its own key.
        config_type: the section's dataclass (None exactly when ``config_key`` is None). Its field
            defaults are the method's defaults; it validates itself with ``validate(self, cfg, key)``,
            raising one-line :class:`~megavod.errors.ConfigError` naming ``f"{key}.{field}"``; values
            derived from it (MEGA's number of global modules, its distilled rows) are its properties and
            methods; a ``weight_files`` class attribute names its fields that hold initial-weight files
            (dropped where a checkpoint supplies every weight). docs/architecture.md#adding-a-method
        default_mode: config -> the inference mode a stream runs in when none is asked for,
            ``"offline"`` (the default) or ``"online"`` (MEGA: ``mega.online``).
    """

    name: str
    title: str
    build: Callable[[Any], Any]
    schedule: Callable[[Any], Any]
    reference_sampler: Callable[[Any], Any] = lambda cfg: None
    checkpoint: Any = None
    max_images_per_process: int | None = None
    export: Callable[[Any], Any] | None = None
    config_key: str | None = None
    config_type: type | None = None
    default_mode: Callable[[Any], str] = lambda cfg: "offline"

    def __post_init__(self) -> None:
        if (self.config_key is None) != (self.config_type is None):
            raise ValueError(f"method {self.name!r}: config_key and config_type come together (both or neither)")


_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec, *, replace: bool = False) -> MethodSpec:
    """Add ``spec`` to the table (``replace``: overwrite a method of the same name)."""
    if spec.name in _METHODS and not replace:
        raise ValueError(f"method {spec.name!r} is already registered")
    _METHODS[spec.name] = spec
    return spec


def unregister_method(name: str) -> None:
    """Remove a method from the table (tests that register a toy method clean up with this)."""
    _METHODS.pop(name, None)


def method_names() -> list[str]:
    """Registered method names, in registration order."""
    return list(_METHODS)


def registered_methods() -> list[MethodSpec]:
    return list(_METHODS.values())


def section_owners() -> dict[str, list[str]]:
    """{config section key: the registered methods whose section it is}."""
    owners: dict[str, list[str]] = {}
    for spec in _METHODS.values():
        if spec.config_key is not None:
            owners.setdefault(spec.config_key, []).append(spec.name)
    return owners


def get_method(name: str) -> MethodSpec:
    """The spec of method ``name``; ``ConfigError`` naming the config key when there is none."""
    spec = _METHODS.get(name)
    if spec is None:
        known = ", ".join(repr(n) for n in _METHODS)
        raise ConfigError(f"config key 'method': expected one of {known}, got {name!r}")
    return spec
