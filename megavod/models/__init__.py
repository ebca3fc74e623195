"""Detectors. ``build_detector(cfg)`` builds the one ``cfg.method`` names."""

from __future__ import annotations

from torch import nn

from megavod.config import Config
from megavod.errors import ConfigError


def build_detector(cfg: Config) -> nn.Module:
    """The detector of ``cfg.method``, randomly initialised (plus ``model.backbone.weights`` if set)."""
    if cfg.method == "single":
        from megavod.models.single_frame import build_single_frame_detector

        return build_single_frame_detector(cfg)
    if cfg.method == "mega":
        from megavod.models.mega import build_mega_detector

        return build_mega_detector(cfg)
    raise ConfigError(f"config key 'method': '{cfg.method}' is not available yet (see issue #7)")
