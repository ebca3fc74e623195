"""The built-in methods' config sections: each method's hyper-parameters, their defaults (the authors'
numbers, docs/conventions.md), their validation and the values derived from them.

A section is a dataclass brought by its row of the method table (``config_key``, ``config_type``,
:mod:`megavod.methods`); a :class:`~megavod.config.Config` holds the section of its own method under
the row's key (``cfg.mega``, ``mega: {T_g: 10}`` in YAML). ``validate(cfg, key)`` checks what types
cannot express and raises one line naming ``f"{key}.{field}"``; ``weight_files`` names the fields that
hold initial-weight files (dropped where a checkpoint supplies every weight).

MEGA's hyper-parameters carry the paper's names (§4.3, Table 5):

* ``T_l``: frames in the local window (key frame included); offline ``tau = (T_l - 1) / 2`` frames on
  each side, online the ``T_l - 1`` previous frames.
* ``T_g``: frames in the global pool.
* ``T_m``: frames each Long Range Memory level holds.
* ``N_g``: location-free relation modules of the global stage; ``N_l``: location-based modules of the
  local stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from megavod.config import Config, RPNConfig
from megavod.config_checks import is_file, require
from megavod.errors import ConfigError

# The rows of a share of the proposals: int(75 * 0.2) is 15 in the authors' code, and the epsilon keeps a
# product that floating point puts a hair under an integer (0.29 * 100 = 28.999999999999996) on it.
_ROUNDING = 1e-9


def _share(rows: int, ratio: float) -> int:
    """The highest-objectness ``ratio`` of ``rows`` proposals, as a row count (at least one)."""
    return max(1, int(rows * ratio + _ROUNDING))


@dataclass
class MEGAConfig:
    """MEGA (docs/conventions.md#mega-aggregation-head, docs/conventions.md#mega-inference-schedule,
    docs/departures.md#summary); names follow the paper."""

    T_l: int = 25
    T_g: int = 10
    T_m: int = 25
    N_g: int = 1
    N_l: int = 3
    global_res_stages: int = 1  # code's GLOBAL.RES_STAGE: global modules after the local stack (R-50: 0)
    memory: bool = True  # False gives the paper's "base model"
    # code's GLOBAL.SHUFFLE, seeded by `seed` (docs/departures.md#seeded-global-permutation)
    global_shuffle: bool = True
    location_based_global: bool = False  # §4.5 ablation (82.5 mAP)
    # Proposals per local/global/memory frame are model.rpn.ref_post_nms_top_n (code 75, paper 80);
    # this share of them (the highest-objectness ones) feeds the later local stages (75 -> 15).
    distill_ratio: float = 0.2
    # causal mode: no look-ahead, global frames from the past only (docs/departures.md#online-mode)
    online: bool = False
    train_local_refs: int = 2
    train_global_refs: int = 2
    train_memory_refs: int = 3  # code 3, paper 2 (docs/departures.md#where-the-paper-and-the-code-disagree)

    @property
    def tau(self) -> int:
        """Frames on each side of the key in the offline local window."""
        return (self.T_l - 1) // 2

    @property
    def global_modules(self) -> int:
        """Global relation modules: the N_g of the global stage and the global_res_stages after the local
        stack (code: 1 + 1 for R-101)."""
        return self.N_g + self.global_res_stages

    @property
    def uses_global(self) -> bool:
        """Whether there is a global stage at all, so a global pool to fill."""
        return self.global_modules > 0

    @property
    def memory_levels(self) -> int:
        """Long Range Memory levels a stream keeps: one per local stage when the memory is on."""
        return self.N_l if self.memory else 0

    def distilled_rows(self, rpn: RPNConfig) -> int:
        """Rows per frame in the later local stages and memory levels >= 1: the distilled share of
        ``rpn.ref_post_nms_top_n`` (code: int(75 * 0.2) = 15)."""
        return _share(rpn.ref_post_nms_top_n, self.distill_ratio)

    def validate(self, cfg: Config, key: str) -> None:
        require(self.T_l >= 1 and self.T_l % 2 == 1, f"{key}.T_l",
                "an odd number >= 1 (tau = (T_l - 1) / 2 frames each side)", self.T_l)
        for name in ("T_g", "T_m", "N_g", "N_l", "global_res_stages"):
            require(getattr(self, name) >= 0, f"{key}.{name}", ">= 0", getattr(self, name))
        if self.memory:
            require(self.N_l >= 1, f"{key}.N_l", f">= 1 when {key}.memory is on (memory feeds the local stage)",
                    self.N_l)
            require(self.T_m >= 1, f"{key}.T_m", f">= 1 when {key}.memory is on", self.T_m)
        if self.uses_global:
            require(self.T_g >= 1, f"{key}.T_g",
                    f">= 1 when a global stage is on ({key}.N_g or {key}.global_res_stages > 0)", self.T_g)
        if self.N_l == 0:
            require(self.N_g >= 1, f"{key}.N_g", f">= 1 when {key}.N_l = 0 (the key needs a stage to aggregate)",
                    self.N_g)
        # distilled_rows clamps to one row; the product itself must reach one
        unclamped = cfg.model.rpn.ref_post_nms_top_n * self.distill_ratio + _ROUNDING
        require(0.0 < self.distill_ratio <= 1.0 and unclamped >= 1, f"{key}.distill_ratio",
                "in (0, 1] with at least one distilled proposal (model.rpn.ref_post_nms_top_n * ratio >= 1)",
                self.distill_ratio)
        for name in ("train_local_refs", "train_global_refs", "train_memory_refs"):
            require(getattr(self, name) >= 0, f"{key}.{name}", ">= 0", getattr(self, name))


@dataclass
class RDNConfig:
    """RDN (docs/conventions.md#rdn)."""

    min_offset: int = -18
    max_offset: int = 18
    train_refs: int = 2
    ratio: float = 0.2
    basic_stages: int = 2
    advanced_stages: int = 0  # RDN full: 1

    @property
    def window(self) -> int:
        """Frames of the test window, key included (37: key at 18)."""
        return self.max_offset - self.min_offset + 1

    def advanced_rows(self, rpn: RPNConfig) -> int:
        """Rows per frame the advanced stages relate: the ``ratio`` share of ``rpn.ref_post_nms_top_n``
        (code: int(75 * 0.2) = 15)."""
        return _share(rpn.ref_post_nms_top_n, self.ratio)

    def validate(self, cfg: Config, key: str) -> None:
        require(self.min_offset <= 0 <= self.max_offset, f"{key}.min_offset", f"<= 0 <= {key}.max_offset",
                self.min_offset)
        require(self.basic_stages >= 1, f"{key}.basic_stages", ">= 1", self.basic_stages)
        require(self.advanced_stages >= 0, f"{key}.advanced_stages", ">= 0", self.advanced_stages)
        require(0.0 < self.ratio <= 1.0, f"{key}.ratio", "in (0, 1]", self.ratio)


def _check_weight_files(section: object, key: str) -> None:
    for name in section.weight_files:
        path = getattr(section, name)
        if path is not None and not is_file(path):
            raise ConfigError(f"config key '{key}.{name}': file not found: {path}")


@dataclass
class FGFAConfig:
    """FGFA (docs/conventions.md#fgfa-and-dff)."""

    weight_files: ClassVar[tuple[str, ...]] = ("flownet_weights",)

    min_offset: int = -9
    max_offset: int = 9
    train_refs: int = 2
    flow_network: Literal["flownet_s", "raft_small"] = "flownet_s"  # raft_small: torchvision's
    flownet_weights: str | None = None  # local file: the authors' FLOWNET_WEIGHT, or RAFT-small weights

    @property
    def window(self) -> int:
        """Frames aggregated at a key frame, key included (19: key at 9)."""
        return self.max_offset - self.min_offset + 1

    def validate(self, cfg: Config, key: str) -> None:
        _check_weight_files(self, key)
        require(self.min_offset <= 0 <= self.max_offset, f"{key}.min_offset", f"<= 0 <= {key}.max_offset",
                self.min_offset)


@dataclass
class DFFConfig:
    """DFF (docs/conventions.md#fgfa-and-dff)."""

    weight_files: ClassVar[tuple[str, ...]] = ("flownet_weights",)

    key_interval: int = 10
    min_offset: int = -9
    max_offset: int = 0
    flow_network: Literal["flownet_s", "raft_small"] = "flownet_s"  # raft_small has no scale map (scale 1)
    flownet_weights: str | None = None  # local file: the authors' FLOWNET_WEIGHT, or RAFT-small weights

    def validate(self, cfg: Config, key: str) -> None:
        _check_weight_files(self, key)
        require(self.key_interval >= 1, f"{key}.key_interval", ">= 1", self.key_interval)
        require(self.min_offset <= self.max_offset <= 0, f"{key}.min_offset", f"<= {key}.max_offset <= 0",
                self.min_offset)
