"""Typed configuration: dataclasses whose defaults are the authors' numbers (docs/conventions.md), YAML
presets, overrides.

A preset is a YAML file under ``megavod/configs/`` holding only what differs from the defaults below,
optionally on top of another preset (``_base_: mega_R_101``). ``load_config("mega_R_101",
["mega.T_g=20"])`` gives a validated :class:`Config`. Every bad key, type or value raises
:class:`~megavod.errors.ConfigError` with one line naming the key and what is allowed.

This module holds the sections every method shares (model, relation module, input, solver, data). A
method's own hyper-parameters are its config section, a dataclass its row of the method table brings
(:class:`megavod.registry.MethodSpec`: ``config_key``, ``config_type``; the built-in ones are in
:mod:`megavod.methods.sections`). A :class:`Config` holds the section of its method only, found
through the table, and shows it under its key: ``cfg.mega.T_g``, ``mega: {T_g: 10}`` in YAML. The checks
that types cannot express are in :mod:`megavod.config_checks`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from megavod.config_checks import validate
from megavod.errors import ConfigError, first_line
from megavod.registry import MethodSpec, get_method, section_owners

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
    # YOLOX / YOLOV (docs/yolov.md#input): 0 = the resize above; S > 0 = the authors' letterbox
    # (yolox/data/data_augment.py::preproc): scale by min(S/h, S/w) with cv2's bilinear resize, pad to
    # S x S with ``pad_value`` at the bottom/right, BGR 0-255 without mean or std (``pixel_mean`` /
    # ``pixel_std`` do not apply). ``letterbox_train``: training sides, one drawn per sample (empty: S).
    letterbox: int = 0
    letterbox_train: tuple[int, ...] = ()
    pad_value: float = 114.0


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
class SharedConfig:
    """The sections every method shares (a :class:`Config` adds its method's own)."""

    method: str = "single"  # a registered method (megavod.registry)
    model: ModelConfig = field(default_factory=ModelConfig)
    relation: RelationConfig = field(default_factory=RelationConfig)  # MEGA's and RDN's relation modules
    input: InputConfig = field(default_factory=InputConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0
    name: str = "custom"


@dataclass
class Config(SharedConfig):
    """A whole config: the shared sections, and ``section``, the config section of ``method`` (its row of
    the method table says its type and its key; None for a method without hyper-parameters of its own).

    The section reads and writes under its key, ``cfg.mega.T_g`` for a MEGA config, and is written
    there by :func:`to_dict` / :func:`dump_config`; a config of another method has no ``cfg.mega``.
    """

    section: Any = None  # None: the method's default section (its config_type's defaults)

    def __post_init__(self) -> None:
        if self.section is None:
            config_type = _section_type(self.method)
            if config_type is not None:
                self.section = config_type()

    @property
    def section_key(self) -> str | None:
        """The key of the method's section (``"mega"``); None for a method without one."""
        spec = _spec_or_none(self.method)
        return spec.config_key if spec is not None else None

    def __getattr__(self, name: str) -> Any:
        # Called only when ordinary lookup fails: the active method's section under its key. Dunder
        # names (copy and pickle probe __setstate__ etc.) and a half-built instance get no section.
        if name.startswith("__") or "section" not in self.__dict__:
            raise AttributeError(name)
        if name == self.section_key:
            return self.section
        raise AttributeError(f"a config of method {self.method!r} has no section {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in _CONFIG_FIELDS and "section" in self.__dict__ and name == self.section_key:
            name = "section"  # cfg.mega = MEGAConfig(...) replaces the section
        object.__setattr__(self, name, value)


_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(Config))


def _spec_or_none(method: Any) -> MethodSpec | None:
    try:
        return get_method(method)
    except (ConfigError, TypeError):  # not a registered method (validate says so); TypeError: unhashable
        return None


def _section_type(method: Any) -> type | None:
    spec = _spec_or_none(method)
    return spec.config_type if spec is not None else None


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
    if "method" in data and data["method"] != merged.get("method", Config.method):
        drop_other_sections(merged, data["method"])  # the base's method settings stay behind with its method
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


def drop_other_sections(data: dict[str, Any], method: Any) -> None:
    """Remove from config mapping ``data`` the sections of methods other than ``method`` (in place)."""
    spec = _spec_or_none(method)
    keep = spec.config_key if spec is not None else None
    for key in section_owners():
        if key != keep:
            data.pop(key, None)


def _drop_sections_at_defaults(data: dict[str, Any]) -> None:
    """Remove other methods' sections that hold nothing but their defaults: config files written before
    a config held its own method's section only (``dump_config``, a training run's ``config.yaml``)
    carry every method's section."""
    spec = _spec_or_none(data.get("method", Config.method))
    owners = section_owners()
    for key in [k for k in data if k in owners and (spec is None or k != spec.config_key)]:
        for name in owners[key]:
            config_type = get_method(name).config_type
            try:
                at_defaults = from_dict(config_type, data[key], f"{key}.") == config_type()
            except ConfigError:
                at_defaults = False
            if at_defaults:
                del data[key]
                break


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> None:
    """Apply ``KEY=VALUE`` overrides to config mapping ``data`` in place. One that switches ``method``
    leaves the sections of other methods behind: they configure a method no longer run."""
    for text in overrides:
        keys, value = parse_override(text)
        if keys == ["method"] and value != data.get("method", Config.method):
            drop_other_sections(data, value)
        _set_dotted(data, keys, value)


def load_config(name_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a validated :class:`Config` from a preset name or YAML path plus ``KEY=VALUE`` overrides."""
    data = _resolve(name_or_path) if name_or_path else {}
    _drop_sections_at_defaults(data)
    apply_overrides(data, overrides)
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
    """Build dataclass ``cls`` from a nested mapping, checking every key and type (a :class:`Config`
    takes its method's section under the section's key, :func:`_config_from_dict`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    if cls is Config:
        return _config_from_dict(data)
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


def _config_from_dict(data: dict[str, Any]) -> Config:
    """A :class:`Config` from a mapping: the shared keys, and the section of the final ``method`` (merging
    presets happens on mappings first, so a preset may change the method of its ``_base_``)."""
    method = _coerce(str, data.get("method", Config.method), "method")
    spec = get_method(method)
    shared = {k: v for k, v in data.items() if k != spec.config_key}
    allowed = (_CONFIG_FIELDS - {"section"}) | ({spec.config_key} if spec.config_key else set())
    for key, value in shared.items():
        if key in allowed:
            continue
        owners = section_owners().get(key)
        if owners is None:
            raise ConfigError(f"unknown config key '{key}' (allowed here: {', '.join(sorted(allowed))})")
        first = _first_set_key(value, get_method(owners[0]).config_type)
        full = f"{key}.{first}" if first is not None else key
        theirs = " and ".join(repr(o) for o in owners)
        mine = f"its own is '{spec.config_key}'" if spec.config_key else "it has none of its own"
        raise ConfigError(f"config key '{full}': method {method!r} has no section '{key}' (the section of "
                          f"method {theirs}; {mine})")
    shared_cfg = from_dict(SharedConfig, shared)
    section = None
    if spec.config_type is not None:
        section = from_dict(spec.config_type, data.get(spec.config_key, {}), f"{spec.config_key}.")
    return Config(**{f.name: getattr(shared_cfg, f.name) for f in dataclasses.fields(SharedConfig)}, section=section)


def _first_set_key(section: Any, config_type: type) -> str | None:
    """The first key of a section mapping that differs from ``config_type``'s default (else its first)."""
    if not isinstance(section, dict) or not section:
        return None
    defaults = _plain(dataclasses.asdict(config_type()))
    return next((k for k, v in section.items() if k not in defaults or _plain(v) != defaults[k]), next(iter(section)))


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
        if isinstance(value, int) and not isinstance(value, bool) and str(value) in typing.get_args(tp):
            return str(value)  # a choice spelt in digits (yolov.affinity=2022) reads as a number in YAML
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
    """Plain nested dict (tuples as lists), e.g. to record a config beside a checkpoint. A
    :class:`Config`'s method section is written under its key, after ``relation``: ``mega: {T_g: 10}``."""

    if not isinstance(cfg, Config):
        return _plain(dataclasses.asdict(cfg))
    out: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        if f.name == "section":
            continue
        value = getattr(cfg, f.name)
        out[f.name] = _plain(dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value)
        if f.name == "relation" and cfg.section is not None:
            out[cfg.section_key] = _plain(dataclasses.asdict(cfg.section))
    return out


def _plain(value: Any) -> Any:
    """Tuples as lists, throughout: what YAML writes and reads back."""
    if isinstance(value, tuple):
        return [_plain(x) for x in value]
    if isinstance(value, dict):
        return {k: _plain(x) for k, x in value.items()}
    return value


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
