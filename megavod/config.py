"""Typed configuration: dataclasses whose defaults are the authors' numbers (docs/conventions.md), YAML
presets, overrides.

A preset is a YAML file under ``megavod/configs/`` holding only what differs from the defaults below,
optionally on top of another preset (``_base_: mega_R_101``). ``load_config("mega_R_101",
["mega.T_g=20"])`` gives a validated :class:`Config`. Every bad key, type or value raises
:class:`~megavod.errors.ConfigError` with one line naming the key and what is allowed.

MEGA's hyper-parameters carry the paper's names (§4.3, Table 5):

* ``T_l``: frames in the local window (key frame included); offline ``tau = (T_l - 1) / 2`` frames on
  each side, online the ``T_l - 1`` previous frames.
* ``T_g``: frames in the global pool.
* ``T_m``: frames each Long Range Memory level holds.
* ``N_g``: location-free relation modules of the global stage; ``N_l``: location-based modules of the
  local stage.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from megavod.errors import ConfigError, first_line
from megavod.registry import get_method

PRESET_DIR = Path(__file__).parent / "configs"

Arch = Literal["R-50-C4", "R-101-C4", "X-101-C4", "small"]


@dataclass
class BackboneConfig:
    """ResNet "C4" body (stem..res4, stride 16) and the res5 stage that runs in the box head
    (docs/conventions.md#backbone-and-frozen-batch-norm)."""

    arch: Arch = "R-101-C4"
    num_groups: int = 1
    width_per_group: int = 64
    # MSRA weights put the stride on the 1x1 conv (docs/conventions.md#backbone-and-frozen-batch-norm)
    stride_in_1x1: bool = True
    res5_dilation: int = 2
    freeze_at: int = 2  # stem and res2 are frozen
    weights: str | None = None  # local ImageNet-pretrained file; never downloaded
    # Only for arch == "small": a CPU-sized network of the same structure.
    small_stem_channels: int = 16
    small_blocks: tuple[int, ...] = (1, 1, 2, 1)


@dataclass
class RPNConfig:
    """Single-level RPN on C4 (docs/conventions.md#rpn)."""

    anchor_sizes: tuple[int, ...] = (64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    anchor_stride: int = 16
    pre_nms_top_n_train: int = 6000
    post_nms_top_n_train: int = 300
    pre_nms_top_n_test: int = 6000
    post_nms_top_n_test: int = 300
    nms_thresh: float = 0.7
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    ref_pre_nms_top_n: int = 6000  # "ref" mode: every reference/global/memory frame
    ref_post_nms_top_n: int = 75  # code 75; the paper's 80 is an override


@dataclass
class ROIHeadConfig:
    """RoIAlign on the res5 map, fc6/fc7 (or MEGA/RDN relation head) and the predictor
    (docs/conventions.md#box-head-and-predictor)."""

    pooler_resolution: int = 7
    pooler_scale: float = 1.0 / 16
    sampling_ratio: int = 0
    reduce_channel: bool = False  # 1x1 conv 2048 -> 256 + ReLU before pooling
    reduced_channels: int = 256
    representation_size: int = 1024
    num_classes: int = 31
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    batch_size_per_image: int = 128
    positive_fraction: float = 0.25
    bbox_reg_weights: tuple[float, ...] = (10.0, 10.0, 5.0, 5.0)
    score_thresh: float = 0.001
    nms_thresh: float = 0.5
    detections_per_img: int = 300


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_head: ROIHeadConfig = field(default_factory=ROIHeadConfig)
    # A whole-detector checkpoint (megavod's or the authors') loaded by build_detector before training:
    # tensors it holds must match the model, the model's others keep their init, and nothing of the
    # optimizer, schedule or iteration is taken (the authors' VID.IGNORE; RDN's second phase from
    # RDN-base, docs/conventions.md#rdn). ``--resume`` and ``--weights`` load over it.
    init_weights: str | None = None


@dataclass
class RelationConfig:
    """Relation module (docs/conventions.md#relation-module): 16 heads, 64-d geometric embedding, wave length 1000."""

    num_heads: int = 16
    embed_dim: int = 64
    wave_length: float = 1000.0
    # the paper's relative frame-index term (docs/departures.md#temporal-embedding), off in presets
    temporal_embedding: bool = False


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



@dataclass
class RDNConfig:
    """RDN (docs/conventions.md#rdn)."""

    min_offset: int = -18
    max_offset: int = 18
    train_refs: int = 2
    ratio: float = 0.2
    basic_stages: int = 2
    advanced_stages: int = 0  # RDN full: 1


@dataclass
class FGFAConfig:
    """FGFA (docs/conventions.md#fgfa-and-dff)."""

    min_offset: int = -9
    max_offset: int = 9
    train_refs: int = 2
    flow_network: Literal["flownet_s", "raft_small"] = "flownet_s"  # raft_small: torchvision's
    flownet_weights: str | None = None  # local file: the authors' FLOWNET_WEIGHT, or RAFT-small weights


@dataclass
class DFFConfig:
    """DFF (docs/conventions.md#fgfa-and-dff)."""

    key_interval: int = 10
    min_offset: int = -9
    max_offset: int = 0
    flow_network: Literal["flownet_s", "raft_small"] = "flownet_s"  # raft_small has no scale map (scale 1)
    flownet_weights: str | None = None  # local file: the authors' FLOWNET_WEIGHT, or RAFT-small weights


@dataclass
class InputConfig:
    """Input pipeline (docs/conventions.md#input-pipeline): resize, flip, the authors' BGR x 255 pixel convention."""

    min_size_train: tuple[int, ...] = (600,)
    max_size_train: int = 1000
    min_size_test: int = 600
    max_size_test: int = 1000
    pixel_mean: tuple[float, ...] = (102.9801, 115.9465, 122.7717)  # B, G, R
    pixel_std: tuple[float, ...] = (1.0, 1.0, 1.0)
    to_bgr255: bool = True
    flip_prob: float = 0.5


@dataclass
class SolverConfig:
    """SGD with warm-up and steps (docs/conventions.md#solver)."""

    base_lr: float = 0.001
    reference_batch: int = 4  # base_lr is for this many images per iteration; lr scales linearly
    momentum: float = 0.9
    weight_decay: float = 0.0001
    bias_lr_factor: float = 2.0
    weight_decay_bias: float = 0.0
    attention_lr_factor: float = 1.0  # ours: lr multiplier of the relation modules' Wq, Wk, u, Wg (solver.py)
    steps: tuple[int, ...] = (80000,)
    gamma: float = 0.1
    max_iter: int = 120000
    warmup_iters: int = 500
    warmup_factor: float = 1.0 / 3
    images_per_process: int = 1
    checkpoint_period: int = 2500
    bf16: bool = True  # autocast on CUDA only
    # torch.use_deterministic_algorithms (warn_only), CUBLAS_WORKSPACE_CONFIG, cuDNN deterministic (train/engine.py)
    deterministic: bool = False


@dataclass
class DataConfig:
    train_sets: tuple[str, ...] = ("DET_train_30classes", "VID_train_15frames")
    test_set: str = "VID_val_videos"
    num_workers: int = 2


@dataclass
class Config:
    method: str = "single"  # a registered method (megavod.registry)
    model: ModelConfig = field(default_factory=ModelConfig)
    relation: RelationConfig = field(default_factory=RelationConfig)
    mega: MEGAConfig = field(default_factory=MEGAConfig)
    rdn: RDNConfig = field(default_factory=RDNConfig)
    fgfa: FGFAConfig = field(default_factory=FGFAConfig)
    dff: DFFConfig = field(default_factory=DFFConfig)
    input: InputConfig = field(default_factory=InputConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0
    name: str = "custom"

    @property
    def distilled_proposals(self) -> int:
        """Rows per frame in MEGA's later local stages and memory levels >= 1 (code: int(75 * 0.2) = 15)."""
        return int(self.model.rpn.ref_post_nms_top_n * self.mega.distill_ratio)


# ----------------------------------------------------------------------------------------------
# Loading


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))



def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror or first_line(e)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} not valid YAML") from None
    except MemoryError:  # the machine's, not the file's (MemoryError is an Exception too)
        raise
    except Exception as e:  # noqa: BLE001 - YAML values that fail as Python values: a date 2020-13-45, deep nesting
        raise ConfigError(f"{path}: not valid YAML ({first_line(e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values")
    return data


def _locate(name_or_path: str) -> Path:
    """The YAML file of a preset name or a path."""
    path = Path(name_or_path)
    try:
        if not (path.suffix in (".yaml", ".yml") or path.exists()):
            path = PRESET_DIR / f"{name_or_path}.yaml"
            if not path.exists():
                raise ConfigError(
                    f"unknown config '{name_or_path}': not a file and not a preset "
                    f"(presets: {', '.join(available_presets())})"
                )
        elif not path.exists():
            raise ConfigError(f"{path}: config file not found")
    except OSError as e:  # a name the file system refuses, e.g. too long
        shown = name_or_path if len(name_or_path) <= 80 else name_or_path[:77] + "..."
        raise ConfigError(f"{shown}: cannot read config ({e.strerror or first_line(e)})") from None
    return path


def _resolve(name_or_path: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a preset (by name) or a YAML file (by path), following ``_base_`` links."""
    path = _locate(name_or_path)
    key = str(path.resolve())
    if key in seen:
        raise ConfigError(f"{path}: _base_ chain loops back on itself")
    data = _read_yaml(path)
    base = data.pop("_base_", None)
    if base is None:
        data.setdefault("name", path.stem)
        return data
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: _base_ must be a preset name or a YAML path, got {base!r}")
    try:
        merged = _resolve(base, seen + (key,))
    except ConfigError as e:  # say which file the broken link is in
        raise ConfigError(f"{path}: _base_: {e}") from None
    merged["name"] = path.stem
    return _deep_merge(merged, data)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"mega.T_g=20"`` -> (["mega", "T_g"], 20). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected KEY=VALUE with a dotted key, e.g. mega.T_g=20")
    key, _, raw = text.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        # YAML 1.1 reads "2e-3" as a string; on a command line it is a number.
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip().split("."), value


def _set_dotted(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node = data
    for k in keys[:-1]:
        child = node.get(k)
        if not isinstance(child, dict):
            child = {}
            node[k] = child
        node = child
    node[keys[-1]] = value


def load_config(name_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a validated :class:`Config` from a preset name or YAML path plus ``KEY=VALUE`` overrides."""
    data = _resolve(name_or_path) if name_or_path else {}
    for text in overrides:
        keys, value = parse_override(text)
        _set_dotted(data, keys, value)
    try:
        cfg = from_dict(Config, data)
        validate(cfg)
    except ConfigError as e:
        source = _locate(name_or_path) if name_or_path else None
        if source is not None and source.parent.resolve() != PRESET_DIR.resolve():  # a user's file: name it
            raise ConfigError(f"{source}: {e}") from None
        raise
    return cfg


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(
                f"unknown config key '{full}' (allowed here: {', '.join(sorted(fields))})"
            )
        kwargs[key] = _coerce(hints[key], value, full)
    return cls(**kwargs)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(arg, value, key)
            except ConfigError:
                continue
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            (item_tp, *_) = typing.get_args(tp)
            return tuple(_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value))
        return (_coerce(typing.get_args(tp)[0], value, key),)  # a scalar for a one-item list
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        # Within int64: every count and size goes to torch or into float arithmetic.
        if isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63:
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key '{key}': expected {_describe(tp)}, got {value!r}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), e.g. to record a config beside a checkpoint."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ----------------------------------------------------------------------------------------------
# Validation: ranges and combinations that types cannot express


def _is_file(path: str) -> bool:
    try:
        return Path(path).is_file()
    except (OSError, ValueError):  # a name the file system refuses (too long, a NUL byte): no such file
        return False


def _require(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': must be {allowed} (got {value!r})")


def validate(cfg: Config) -> None:
    get_method(cfg.method)  # a method of the table (megavod.registry)
    b, r, h, m = cfg.model.backbone, cfg.model.rpn, cfg.model.roi_head, cfg.mega
    _require(1 <= b.freeze_at <= 5 or b.freeze_at == 0, "model.backbone.freeze_at", "between 0 and 5", b.freeze_at)
    _require(b.res5_dilation in (1, 2), "model.backbone.res5_dilation", "1 or 2", b.res5_dilation)
    _require(b.num_groups >= 1, "model.backbone.num_groups", ">= 1", b.num_groups)
    _require(b.width_per_group >= 1, "model.backbone.width_per_group", ">= 1", b.width_per_group)
    _require(len(b.small_blocks) == 4 and min(b.small_blocks) >= 1, "model.backbone.small_blocks",
             "4 block counts >= 1 (res2..res5)", list(b.small_blocks))
    _require(b.small_stem_channels >= 1, "model.backbone.small_stem_channels", ">= 1", b.small_stem_channels)
    if b.weights is not None and not _is_file(b.weights):
        raise ConfigError(f"config key 'model.backbone.weights': file not found: {b.weights}")
    if cfg.model.init_weights is not None and not _is_file(cfg.model.init_weights):
        raise ConfigError(f"config key 'model.init_weights': file not found: {cfg.model.init_weights}")
    for name in ("fgfa", "dff"):
        path = getattr(cfg, name).flownet_weights
        if path is not None and not _is_file(path):
            raise ConfigError(f"config key '{name}.flownet_weights': file not found: {path}")

    _require(len(r.anchor_sizes) >= 1 and min(r.anchor_sizes) > 0, "model.rpn.anchor_sizes", "positive sizes", list(r.anchor_sizes))
    _require(len(r.aspect_ratios) >= 1 and min(r.aspect_ratios) > 0, "model.rpn.aspect_ratios", "positive ratios", list(r.aspect_ratios))
    _require(r.anchor_stride == 16, "model.rpn.anchor_stride", "16 (the C4 stride)", r.anchor_stride)
    for name in ("pre_nms_top_n_train", "post_nms_top_n_train", "pre_nms_top_n_test",
                 "post_nms_top_n_test", "ref_pre_nms_top_n", "ref_post_nms_top_n", "batch_size_per_image"):
        _require(getattr(r, name) >= 1, f"model.rpn.{name}", ">= 1", getattr(r, name))
    for name in ("nms_thresh", "fg_iou_thresh", "bg_iou_thresh", "positive_fraction"):
        _require(0.0 < getattr(r, name) <= 1.0, f"model.rpn.{name}", "in (0, 1]", getattr(r, name))
    _require(r.bg_iou_thresh <= r.fg_iou_thresh, "model.rpn.bg_iou_thresh", "<= model.rpn.fg_iou_thresh", r.bg_iou_thresh)

    _require(h.pooler_resolution >= 1, "model.roi_head.pooler_resolution", ">= 1", h.pooler_resolution)
    _require(h.sampling_ratio >= 0, "model.roi_head.sampling_ratio", ">= 0 (0 = adaptive)", h.sampling_ratio)
    _require(h.num_classes >= 2, "model.roi_head.num_classes", ">= 2 (background included)", h.num_classes)
    _require(h.representation_size >= 1, "model.roi_head.representation_size", ">= 1", h.representation_size)
    _require(len(h.bbox_reg_weights) == 4, "model.roi_head.bbox_reg_weights", "4 numbers", list(h.bbox_reg_weights))
    for name in ("fg_iou_thresh", "bg_iou_thresh", "positive_fraction", "nms_thresh"):
        _require(0.0 < getattr(h, name) <= 1.0, f"model.roi_head.{name}", "in (0, 1]", getattr(h, name))
    _require(0.0 <= h.score_thresh < 1.0, "model.roi_head.score_thresh", "in [0, 1)", h.score_thresh)
    _require(h.detections_per_img >= 1, "model.roi_head.detections_per_img", ">= 1", h.detections_per_img)
    _require(h.batch_size_per_image >= 1, "model.roi_head.batch_size_per_image", ">= 1", h.batch_size_per_image)

    rel = cfg.relation
    _require(rel.num_heads >= 1, "relation.num_heads", ">= 1", rel.num_heads)
    _require(h.representation_size % rel.num_heads == 0, "relation.num_heads",
             f"a divisor of model.roi_head.representation_size ({h.representation_size})", rel.num_heads)
    _require(rel.embed_dim >= 8 and rel.embed_dim % 8 == 0, "relation.embed_dim", "a positive multiple of 8", rel.embed_dim)
    _require(rel.wave_length > 1.0, "relation.wave_length", "> 1", rel.wave_length)

    _require(m.T_l >= 1 and m.T_l % 2 == 1, "mega.T_l", "an odd number >= 1 (tau = (T_l - 1) / 2 frames each side)", m.T_l)
    _require(m.T_g >= 0, "mega.T_g", ">= 0", m.T_g)
    _require(m.T_m >= 0, "mega.T_m", ">= 0", m.T_m)
    _require(m.N_g >= 0, "mega.N_g", ">= 0", m.N_g)
    _require(m.N_l >= 0, "mega.N_l", ">= 0", m.N_l)
    _require(m.global_res_stages >= 0, "mega.global_res_stages", ">= 0", m.global_res_stages)
    if m.memory:
        _require(m.N_l >= 1, "mega.N_l", ">= 1 when mega.memory is on (memory feeds the local stage)", m.N_l)
        _require(m.T_m >= 1, "mega.T_m", ">= 1 when mega.memory is on", m.T_m)
    if m.N_g + m.global_res_stages > 0:
        _require(m.T_g >= 1, "mega.T_g", ">= 1 when a global stage is on (mega.N_g or mega.global_res_stages > 0)", m.T_g)
    if m.N_l == 0:
        _require(m.N_g >= 1, "mega.N_g", ">= 1 when mega.N_l = 0 (the key needs a stage to aggregate)", m.N_g)
    _require(0.0 < m.distill_ratio <= 1.0 and cfg.distilled_proposals >= 1, "mega.distill_ratio",
             "in (0, 1] with at least one distilled proposal (model.rpn.ref_post_nms_top_n * ratio >= 1)",
             m.distill_ratio)
    for name in ("train_local_refs", "train_global_refs", "train_memory_refs"):
        _require(getattr(m, name) >= 0, f"mega.{name}", ">= 0", getattr(m, name))

    d = cfg.rdn
    _require(d.min_offset <= 0 <= d.max_offset, "rdn.min_offset", "<= 0 <= rdn.max_offset", d.min_offset)
    _require(d.basic_stages >= 1, "rdn.basic_stages", ">= 1", d.basic_stages)
    _require(d.advanced_stages >= 0, "rdn.advanced_stages", ">= 0", d.advanced_stages)
    _require(0.0 < d.ratio <= 1.0, "rdn.ratio", "in (0, 1]", d.ratio)
    _require(cfg.fgfa.min_offset <= 0 <= cfg.fgfa.max_offset, "fgfa.min_offset", "<= 0 <= fgfa.max_offset", cfg.fgfa.min_offset)
    _require(cfg.dff.key_interval >= 1, "dff.key_interval", ">= 1", cfg.dff.key_interval)
    _require(cfg.dff.min_offset <= cfg.dff.max_offset <= 0, "dff.min_offset", "<= dff.max_offset <= 0", cfg.dff.min_offset)

    i = cfg.input
    _require(len(i.min_size_train) >= 1 and min(i.min_size_train) >= 16, "input.min_size_train", "sizes >= 16", list(i.min_size_train))
    _require(i.max_size_train >= max(i.min_size_train), "input.max_size_train", ">= input.min_size_train", i.max_size_train)
    _require(i.min_size_test >= 16, "input.min_size_test", ">= 16", i.min_size_test)
    _require(i.max_size_test >= i.min_size_test, "input.max_size_test", ">= input.min_size_test", i.max_size_test)
    _require(len(i.pixel_mean) == 3, "input.pixel_mean", "3 numbers (B, G, R)", list(i.pixel_mean))
    _require(len(i.pixel_std) == 3 and min(i.pixel_std) > 0, "input.pixel_std", "3 positive numbers", list(i.pixel_std))
    _require(0.0 <= i.flip_prob <= 1.0, "input.flip_prob", "in [0, 1]", i.flip_prob)

    s = cfg.solver
    _require(s.base_lr > 0, "solver.base_lr", "> 0", s.base_lr)
    _require(s.reference_batch >= 1, "solver.reference_batch", ">= 1", s.reference_batch)
    _require(0.0 <= s.momentum < 1.0, "solver.momentum", "in [0, 1)", s.momentum)
    _require(s.weight_decay >= 0, "solver.weight_decay", ">= 0", s.weight_decay)
    _require(s.weight_decay_bias >= 0, "solver.weight_decay_bias", ">= 0", s.weight_decay_bias)
    _require(s.attention_lr_factor > 0, "solver.attention_lr_factor", "> 0", s.attention_lr_factor)
    _require(s.max_iter >= 1, "solver.max_iter", ">= 1", s.max_iter)
    _require(list(s.steps) == sorted(s.steps) and all(0 < x for x in s.steps), "solver.steps",
             "increasing positive iterations", list(s.steps))
    _require(0.0 < s.gamma <= 1.0, "solver.gamma", "in (0, 1]", s.gamma)
    _require(s.warmup_iters >= 0, "solver.warmup_iters", ">= 0", s.warmup_iters)
    _require(0.0 < s.warmup_factor <= 1.0, "solver.warmup_factor", "in (0, 1]", s.warmup_factor)
    _require(s.images_per_process >= 1, "solver.images_per_process", ">= 1", s.images_per_process)
    limit = get_method(cfg.method).max_images_per_process
    if limit is not None:
        _require(s.images_per_process <= limit, "solver.images_per_process",
                 f"<= {limit} for {cfg.method} (its method table entry's max_images_per_process)",
                 s.images_per_process)
    _require(s.checkpoint_period >= 1, "solver.checkpoint_period", ">= 1", s.checkpoint_period)
    _require(cfg.data.num_workers >= 0, "data.num_workers", ">= 0", cfg.data.num_workers)
    _require(len(cfg.data.train_sets) >= 1, "data.train_sets", "at least one image set", list(cfg.data.train_sets))
