"""The method table: one :class:`MethodSpec` per detection method, looked up by ``cfg.method``.

Every place that needs to know what a method is — which detector to build, which frames its key-frame
step receives (its stream schedule), which reference frames a training sample draws, how its released
checkpoints are recognised — reads it here, so adding a method is one new module that calls
:func:`register_method` plus nothing else (docs/architecture.md#adding-a-method).

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
    """What a method is.

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
    """

    name: str
    title: str
    build: Callable[[Any], Any]
    schedule: Callable[[Any], Any]
    reference_sampler: Callable[[Any], Any] = lambda cfg: None
    checkpoint: Any = None
    max_images_per_process: int | None = None
    export: Callable[[Any], Any] | None = None


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


def get_method(name: str) -> MethodSpec:
    """The spec of method ``name``; ``ConfigError`` naming the config key when there is none."""
    spec = _METHODS.get(name)
    if spec is None:
        known = ", ".join(repr(n) for n in _METHODS)
        raise ConfigError(f"config key 'method': expected one of {known}, got {name!r}")
    return spec
