"""Which detector a checkpoint holds, read from its key names and shapes alone
(docs/conventions.md#state-dict-names, docs/conventions.md#checkpoint-files-and-key-listings).

:func:`recognise` turns a state dict (the authors' names or megavod's, ``module.`` already stripped)
into a :class:`ModelSignature`: the method, the ResNet (blocks per stage, stem width, groups) and the
head's module counts. :func:`signature_of_config` gives the signature a config builds, in the same
terms, so a mismatch reads "the file holds MEGA R-50 (...) but the config builds MEGA R-101 (...)".
:func:`config_for` picks the preset (plus overrides) that builds a recognised checkpoint.

What the keys tell apart:

=========================  ==================================================================
method                     keys of the box head's ``feature_extractor`` (and of flow networks)
=========================  ==================================================================
single                     ``fc6``, ``fc7``
mega                       ``l_fcs``, ``l_W*s``, ``g_W*s`` (megavod: ``aggregator.*_stages``)
rdn (RDN-base / RDN)       ``fcs``, ``Wgs``/``Wqs``/... : as many relation modules as fcs for
                           RDN-base, one more for RDN (an advanced stage); megavod:
                           ``aggregator.fcs``, ``aggregator.relations``
fgfa                       ``flownet.*`` and ``embednet.*``
dff                        ``flownet.*`` with ``flownet.Convolution5_scale``
=========================  ==================================================================

YOLOX and YOLOV (the YOLOV repository's files, megavod's the same names) are told apart by their
``backbone.backbone.*`` keys and give a :class:`YOLOXSignature`: the stem width
(``backbone.backbone.stem.conv.conv.weight``: 32 / 64 / 80 channels for S / L / X), the CSP depth (the
bottlenecks of ``backbone.backbone.dark2.1.m`` and of the PAFPN's ``backbone.C3_p4.m``: 1 / 3 / 4), the
head's width and classes, and YOLOV's head (``head.trans.*``, ``head.cls_convs2.*``) from YOLOX's. Their
YOLOV++ heads and Swin / FocalNet backbones are named and refused.

The ResNet follows from the block counts (``layer3``: 6 for R-50, 23 for R-101) and the grouped 3x3
(``layer1.0.conv2``: [256, 8, 3, 3] for ResNeXt 32x8d); the R-50 configs' reduce conv from
``feature_extractor.conv``; MEGA's N_l and global module count from ``l_W*s`` / ``g_W*s``.
What keys cannot tell (the stride position of ResNeXt, how MEGA's global modules split into N_g and
``global_res_stages``, RDN's basic vs advanced stages beyond "one more relation module") is taken
from the preset.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from megavod.checkpoints.signatures import (
    FE,
    YOLO_FAMILIES,
    YOLO_PREFIX,
    YOLO_STEM,
    YOLO_UNSUPPORTED,
    YOLOXFamily,
    count_indices,
    has_flow_network,
)
from megavod.config import load_config
from megavod.errors import ConfigError, MegavodError
from megavod.models.backbone import spec_from_config
from megavod.registry import get_method, registered_methods

PREDICTOR = "roi_heads.box.predictor.cls_score.weight"
STEM = "backbone.body.stem.conv1.weight"

_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101}

@dataclass(frozen=True)
class ModelSignature:
    """What a state dict's names and shapes say about the model that owns it.

    ``head`` holds the method's module counts: MEGA ``(N_l, global modules, location-based global)``,
    RDN ``(fc layers, relation modules)``, empty otherwise. ``relation`` is ``(heads, geometry
    embedding channels)`` of the relation modules (0 where there is no such module).
    """

    method: str
    blocks: tuple[int, int, int, int]
    stem_channels: int
    groups: int
    width_per_group: int
    reduced_channels: int  # 0: no 1x1 reduce conv after res5
    representation_size: int
    num_classes: int
    head: tuple[int, ...] = ()
    relation: tuple[int, int] = (0, 0)

    @property
    def arch(self) -> str:
        """``R-50``, ``R-101``, ``X-101-32x8d`` or a plain description of an other ResNet."""
        depth = _DEPTHS.get(self.blocks)
        if depth is not None and self.stem_channels == 64:
            if self.groups == 1 and self.width_per_group == 64:
                return f"R-{depth}"
            return f"X-{depth}-{self.groups}x{self.width_per_group}d"
        extra = f", {self.groups} groups of {self.width_per_group}" if self.groups > 1 else ""
        return f"ResNet with blocks {list(self.blocks)} and stem {self.stem_channels}{extra}"

    @property
    def method_name(self) -> str:
        spec = get_method(self.method)
        return (spec.checkpoint.title(self.head) if spec.checkpoint else None) or spec.title

    def describe(self) -> str:
        """One phrase, e.g. ``MEGA R-50 (256-channel reduce conv, N_l=3, 1 global module)``."""
        details = []
        if self.reduced_channels:
            details.append(f"{self.reduced_channels}-channel reduce conv")
        checkpoint = get_method(self.method).checkpoint
        if checkpoint is not None:
            details += checkpoint.details(self.head)
        if self.representation_size != 1024:
            details.append(f"{self.representation_size}-d box features")
        if self.num_classes != 31:
            details.append(f"{self.num_classes} classes")
        if self.relation[0] not in (0, 16):
            details.append(f"{self.relation[0]} relation heads")
        text = f"{self.method_name} {self.arch}"
        return f"{text} ({', '.join(details)})" if details else text

    @property
    def preset(self) -> str | None:
        """The preset that builds exactly this model, if one does (see :func:`config_for`)."""
        checkpoint = get_method(self.method).checkpoint
        if checkpoint is None:
            return None
        return checkpoint.preset_for_head(self.arch, self.head) or checkpoint.presets.get(self.arch)


# YOLOX sizes: (stem channels, bottlenecks of dark2's CSP layer, of the PAFPN's) -> name
# (darknet.py::CSPDarknet: int(64 width), max(round(3 depth), 1); yolo_pafpn.py: round(3 depth)).
_YOLO_SIZES = {(32, 1, 1): "S", (48, 2, 2): "M", (64, 3, 3): "L", (80, 4, 4): "X"}


@dataclass(frozen=True)
class YOLOXSignature:
    """What a YOLOX-family state dict's names and shapes say: the family (``method``: ``yolox`` or
    ``yolov``), the backbone's stem width and CSP depths, the head's width and classes."""

    method: str
    stem_channels: int
    csp_blocks: tuple[int, int]  # bottlenecks of dark2's CSP layer, of the PAFPN's
    head_channels: int
    num_classes: int

    @property
    def family(self) -> YOLOXFamily:
        return next(f for f in YOLO_FAMILIES if f.method == self.method)

    @property
    def size(self) -> str | None:
        """``S``, ``M``, ``L`` or ``X`` (YOLOX's multipliers), None for other sizes."""
        name = _YOLO_SIZES.get((self.stem_channels, *self.csp_blocks))
        return name if name is not None and self.head_channels == 4 * self.stem_channels else None

    @property
    def arch(self) -> str:
        if self.size is not None:
            return self.size
        return (f"stem {self.stem_channels}, {self.csp_blocks[0]}/{self.csp_blocks[1]} CSP bottlenecks, "
                f"head {self.head_channels}")

    @property
    def method_name(self) -> str:
        return self.family.title

    def describe(self) -> str:
        """One phrase, e.g. ``YOLOV-S`` or ``YOLOX-L (80 classes)``."""
        text = f"{self.family.title}-{self.size}" if self.size else f"{self.family.title} ({self.arch})"
        return text + (f" ({self.num_classes} classes)" if self.num_classes != 30 else "")

    @property
    def preset(self) -> str | None:
        return self.family.presets.get(self.size) if self.size else None


def _not_a_detector(keys: list[str], where: str) -> MegavodError:
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        what = "ImageNet-pretrained ResNet weights (torchvision names), not a detector checkpoint; " \
               "give them as model.backbone.weights to train"
    elif keys and all(k.startswith(("flownet.", "embednet.")) for k in keys):
        what = "flow-network weights only, not a detector checkpoint"
    else:
        what = (f"no '{STEM}' (MEGA codebase) or '{YOLO_STEM}' (YOLOX, YOLOV) key: not a detector checkpoint "
                f"megavod knows (first keys: {', '.join(keys[:3])})")
    return MegavodError(f"{where}: {what}")


def _dims(shape: tuple[int, ...]) -> str:
    return f"{len(shape)}-d {list(shape)}"


def recognise(state_dict: Mapping[str, Tensor | tuple[int, ...]], where: str = "checkpoint") -> ModelSignature | YOLOXSignature:
    """The :class:`ModelSignature` (or :class:`YOLOXSignature`) of a state dict (values: tensors or
    shapes); ``MegavodError`` (one line, naming ``where``) when it is no detector megavod knows."""
    shapes = {k: tuple(getattr(v, "shape", v)) for k, v in state_dict.items()}
    keys = list(shapes)
    if any(k.startswith(YOLO_PREFIX) for k in keys):
        return _recognise_yolox(keys, shapes, where)
    if STEM not in shapes:
        raise _not_a_detector(keys, where)
    if len(shapes[STEM]) != 4:
        raise MegavodError(f"{where}: '{STEM}' is {_dims(shapes[STEM])}, not a 4-d conv weight: not a C4 ResNet detector")
    if len(shapes.get(PREDICTOR, ())) != 2:
        raise MegavodError(f"{where}: no box predictor ('{PREDICTOR}', 2-d): not a complete detector checkpoint")

    blocks = (
        count_indices(keys, r"backbone\.body\.layer1\.(\d+)\."),
        count_indices(keys, r"backbone\.body\.layer2\.(\d+)\."),
        count_indices(keys, r"backbone\.body\.layer3\.(\d+)\."),
        count_indices(keys, FE.replace(".", r"\.") + r"head\.layer4\.(\d+)\."),
    )
    conv2 = shapes.get("backbone.body.layer1.0.conv2.weight")
    if conv2 is None or len(conv2) != 4:
        raise MegavodError(f"{where}: no 'backbone.body.layer1.0.conv2.weight' (a 4-d conv weight): not a C4 ResNet detector")
    if not 0 < conv2[1] <= conv2[0]:
        raise MegavodError(f"{where}: 'backbone.body.layer1.0.conv2.weight' is {_dims(conv2)}: not a ResNet's 3x3 conv")
    groups = conv2[0] // conv2[1]
    num_classes, representation_size = shapes[PREDICTOR][:2]
    reduce = shapes.get(FE + "conv.weight")
    base = dict(
        blocks=blocks, stem_channels=shapes[STEM][0], groups=groups, width_per_group=conv2[0] // groups,
        reduced_channels=reduce[0] if reduce else 0,
        representation_size=representation_size, num_classes=num_classes,
    )
    method, head, relation = _head(keys, shapes, where)
    return ModelSignature(method=method, head=head, relation=relation, **base)


def _head(keys: list[str], shapes: dict[str, tuple[int, ...]], where: str) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    """(method, head counts, relation dims): the first method of the table whose signature matches."""
    for spec in registered_methods():
        if spec.checkpoint is None or isinstance(spec.checkpoint, YOLOXFamily):  # their keys took the YOLOX path
            continue
        if (found := spec.checkpoint.match(keys, shapes)) is not None:
            return spec.name, *found
    if has_flow_network(keys):
        raise MegavodError(f"{where}: has flownet.* keys but neither embednet.* (FGFA) nor "
                           "flownet.Convolution5_scale (DFF): not a released FGFA/DFF checkpoint")
    head = [k[len(FE):] for k in keys if k.startswith(FE) and not k.startswith(FE + "head.")]
    raise MegavodError(f"{where}: box head of no known method (feature_extractor keys: {', '.join(head[:3]) or 'none'})")


def _conv_out(shapes: dict[str, tuple[int, ...]], key: str, where: str, what: str) -> tuple[int, ...]:
    shape = shapes.get(key)
    if shape is None:
        raise MegavodError(f"{where}: no '{key}': not a complete {what} checkpoint")
    if len(shape) != 4:
        raise MegavodError(f"{where}: '{key}' is {_dims(shape)}, not a 4-d conv weight")
    return shape


def _recognise_yolox(keys: list[str], shapes: dict[str, tuple[int, ...]], where: str) -> YOLOXSignature:
    """A YOLOX-family state dict (keys under ``backbone.backbone.``): YOLOX's sizes and the family."""
    for prefix, what in YOLO_UNSUPPORTED.items():
        if any(k.startswith(prefix) for k in keys):
            raise MegavodError(f"{where}: holds {what} ({prefix}* keys), which megavod does not build; "
                               "it builds YOLOX and YOLOV on CSPDarknet")
    stem = _conv_out(shapes, YOLO_STEM, where, "YOLOX")
    if stem[1] != 12:
        raise MegavodError(f"{where}: '{YOLO_STEM}' is {list(stem)}: not YOLOX's Focus stem (12 input channels)")
    classes = _conv_out(shapes, "head.cls_preds.0.weight", where, "YOLOX")
    head = _conv_out(shapes, "head.stems.0.conv.weight", where, "YOLOX")
    blocks = (count_indices(keys, r"backbone\.backbone\.dark2\.1\.m\.(\d+)\."),
              count_indices(keys, r"backbone\.C3_p4\.m\.(\d+)\."))
    family = next(f for f in YOLO_FAMILIES if f.match(keys))
    return YOLOXSignature(method=family.method, stem_channels=stem[0], csp_blocks=blocks,
                          head_channels=head[0], num_classes=classes[0])


# ----------------------------------------------------------------------------------------------
# Config side


def signature_of_config(cfg: Any) -> ModelSignature | YOLOXSignature:
    """The signature of the model ``cfg`` builds (same terms as :func:`recognise`)."""
    if isinstance(get_method(cfg.method).checkpoint, YOLOXFamily):
        return _built_signature(cfg)
    spec = spec_from_config(cfg.model.backbone)
    h = cfg.model.roi_head
    checkpoint = get_method(cfg.method).checkpoint
    head, relation = checkpoint.of_config(cfg) if checkpoint is not None else ((), (0, 0))
    return ModelSignature(
        method=cfg.method, blocks=tuple(spec.blocks), stem_channels=spec.stem_channels, groups=spec.groups,
        width_per_group=spec.width_per_group, reduced_channels=h.reduced_channels if h.reduce_channel else 0,
        representation_size=h.representation_size, num_classes=h.num_classes, head=head, relation=relation,
    )


def _built_signature(cfg: Any) -> YOLOXSignature:
    """The YOLOX family's configs: the keys of the model the method's row builds, on the ``meta`` device
    (names and shapes only), read as a file's are."""
    build = get_method(cfg.method).build
    try:
        with torch.device("meta"):
            model = build(cfg)
    except (NotImplementedError, RuntimeError):  # a builder that computes with its tensors
        model = build(cfg)
    return recognise(model.state_dict(), f"config '{cfg.name}'")


def _overrides(sig: ModelSignature, cfg: Any) -> list[str]:
    """Dotted ``KEY=VALUE`` overrides that turn the preset ``cfg`` into a config building ``sig``."""
    out: list[str] = []
    have = signature_of_config(cfg)
    b = cfg.model.backbone
    if (sig.blocks, sig.stem_channels, sig.groups, sig.width_per_group) != (
            have.blocks, have.stem_channels, have.groups, have.width_per_group):
        depth = _DEPTHS.get(sig.blocks)
        if depth is not None and sig.stem_channels == 64:
            arch = f"{'X' if sig.groups > 1 else 'R'}-{depth}-C4"
            out += [f"model.backbone.arch={arch}", f"model.backbone.num_groups={sig.groups}",
                    f"model.backbone.width_per_group={sig.width_per_group}"]
            if (sig.groups > 1) != (b.num_groups > 1):
                # FAIR's ResNeXt puts the stride on the 3x3, MSRA's ResNets on the 1x1
                # (docs/conventions.md#backbone-and-frozen-batch-norm).
                out.append(f"model.backbone.stride_in_1x1={str(sig.groups == 1).lower()}")
        elif sig.groups == 1 and sig.width_per_group == sig.stem_channels:
            out += ["model.backbone.arch=small", f"model.backbone.small_stem_channels={sig.stem_channels}",
                    f"model.backbone.small_blocks=[{','.join(map(str, sig.blocks))}]"]
    if sig.reduced_channels != have.reduced_channels:
        out.append(f"model.roi_head.reduce_channel={str(bool(sig.reduced_channels)).lower()}")
        if sig.reduced_channels:
            out.append(f"model.roi_head.reduced_channels={sig.reduced_channels}")
    if sig.representation_size != have.representation_size:
        out.append(f"model.roi_head.representation_size={sig.representation_size}")
    if sig.num_classes != have.num_classes:
        out.append(f"model.roi_head.num_classes={sig.num_classes}")
    if sig.relation[0] and sig.relation[0] != have.relation[0]:
        out.append(f"relation.num_heads={sig.relation[0]}")
    if sig.relation[1] and sig.relation[1] != have.relation[1]:
        e = cfg.relation.embed_dim
        out.append("relation.temporal_embedding=true" if sig.relation[1] == e + e // 4 else f"relation.embed_dim={sig.relation[1]}")
    if sig.head != have.head:
        out += get_method(sig.method).checkpoint.head_overrides(sig.head, cfg)
    return out


def config_for(sig: ModelSignature, overrides: list[str] | tuple[str, ...] = (), where: str = "checkpoint") -> Any:
    """The config that builds ``sig``: its preset (or the method's R-101 preset) plus the overrides the
    keys call for, then the user's ``overrides``. ``MegavodError`` if no config builds it."""
    if isinstance(sig, YOLOXSignature):
        return _yolox_config_for(sig, overrides, where)
    fallback = get_method(sig.method).checkpoint.fallback_preset
    if (sig.preset is None and not sig.arch.startswith(("R-", "X-"))) or (sig.preset or fallback) is None:
        # A CPU-sized network (arch "small") says nothing of its anchors, budgets or input size.
        raise MegavodError(f"{where}: holds {sig.describe()}, which no preset builds; pass --config")
    preset = sig.preset or fallback
    return _checked_config(sig, preset, _overrides(sig, load_config(preset)), overrides, where)


def _checked_config(sig: Any, preset: str, needed: list[str], overrides: list[str] | tuple[str, ...],
                    where: str) -> Any:
    """``preset`` with the overrides the keys call for (``needed``), checked to build ``sig``, then the
    user's ``overrides``; ``MegavodError`` naming the closest config when it does not."""
    try:
        built = signature_of_config(load_config(preset, needed))
    except ConfigError as e:  # sizes no config accepts (e.g. 0 classes): the file's numbers, not the user's
        raise MegavodError(f"{where}: holds {sig.describe()}, which no megavod config builds "
                           f"({preset} with {' '.join(needed)}: {e})") from None
    if built != sig:
        raise MegavodError(f"{where}: holds {sig.describe()}, which no megavod config builds from its keys "
                           f"(closest: {preset} with {' '.join(needed) or 'no overrides'} builds {built.describe()}); "
                           "pass --config")
    return load_config(preset, [*needed, *overrides])


def _yolox_overrides(sig: YOLOXSignature, cfg: Any) -> list[str]:
    """Overrides of the family's section that turn the preset ``cfg`` into a config building ``sig``."""
    have = signature_of_config(cfg)
    key = get_method(sig.method).config_key
    out = []
    if (have.stem_channels, have.csp_blocks, have.head_channels) != (sig.stem_channels, sig.csp_blocks, sig.head_channels):
        pafpn = sig.csp_blocks[1]
        # depth d: max(round(3 d), 1) bottlenecks in dark2, round(3 d) in the PAFPN; width w: int(64 w) at the stem.
        out += [f"{key}.depth={pafpn / 3 if pafpn else 0.1}", f"{key}.width={sig.stem_channels / 64}"]
    if have.num_classes != sig.num_classes:
        out.append(f"{key}.num_classes={sig.num_classes}")
    return out


def _yolox_config_for(sig: YOLOXSignature, overrides: list[str] | tuple[str, ...], where: str) -> Any:
    preset = sig.preset or sig.family.fallback_preset
    return _checked_config(sig, preset, _yolox_overrides(sig, load_config(preset)), overrides, where)
