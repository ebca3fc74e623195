"""Per method, how its checkpoints are told apart by their keys (the method table's ``checkpoint``).

A :class:`HeadSignature` reads the box head's (and flow networks') keys of a state dict: whether they
are this method's, and the module counts they show (``head``) and the relation modules' dims
(``relation``, heads and geometry channels); it says the same of the model a config builds, and which
config overrides turn a preset into one that builds a given file. The generic part (backbone, classes,
box-feature width, presets) is :mod:`megavod.checkpoints.recognise`. Key names:
docs/conventions.md#state-dict-names.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

FE = "roi_heads.box.feature_extractor."
AGG = FE + "aggregator."

Shapes = dict[str, tuple[int, ...]]
HeadMatch = tuple[tuple[int, ...], tuple[int, int]]  # (head counts, relation (heads, geometry channels))


def count_indices(keys: list[str], pattern: str) -> int:
    """How many distinct integers ``(\\d+)`` in ``pattern`` the keys show."""
    rx = re.compile(pattern)
    return len({int(m.group(1)) for k in keys if (m := rx.match(k))})


def relation_dims(shapes: Shapes, wg_keys: list[str], u_keys: list[str]) -> tuple[int, int]:
    """(heads, geometry channels) from a ``Wg`` weight, else (heads, 0) from a content bias ``u``."""
    wg = next((shapes[k] for k in wg_keys if k in shapes), None)
    if wg is not None and len(wg) >= 2:
        return wg[0], wg[1]
    u = next((shapes[k] for k in u_keys if k in shapes), None)
    return (u[0], 0) if u else (0, 0)  # a malformed shape gives dims no config has: refused by the caller


def has_flow_network(keys: list[str]) -> bool:
    return any(k.startswith("flownet.") for k in keys)


def geometry_channels(cfg: Any) -> int:
    e = cfg.relation.embed_dim
    return e + (e // 4 if cfg.relation.temporal_embedding else 0)


@dataclass(frozen=True)
class HeadSignature:
    """How one method's checkpoints look.

    Args:
        match: (keys, shapes) -> (head, relation) when the keys are this method's, else None.
        of_config: config -> (head, relation) of the model it builds.
        presets: released architecture ("R-101", ...) -> the preset that builds it.
        fallback_preset: the preset to adapt with overrides when no preset matches the architecture.
        title: head -> how the model is called (default: the method's title).
        details: head -> phrases describing the head ("N_l=3", ...).
        head_overrides: (head, preset config) -> config overrides that make the preset build ``head``.
        preset_for_head: (arch, head) -> a preset that builds exactly this head, overriding ``presets``.
    """

    match: Callable[[list[str], Shapes], HeadMatch | None]
    of_config: Callable[[Any], HeadMatch]
    presets: dict[str, str] = field(default_factory=dict)
    fallback_preset: str | None = None
    title: Callable[[tuple[int, ...]], str | None] = lambda head: None
    details: Callable[[tuple[int, ...]], list[str]] = lambda head: []
    head_overrides: Callable[[tuple[int, ...], Any], list[str]] = lambda head, cfg: []
    preset_for_head: Callable[[str, tuple[int, ...]], str | None] = lambda arch, head: None


def _no_head(cfg: Any) -> HeadMatch:
    return (), (0, 0)


# -- single frame --------------------------------------------------------------------------------------


def _match_single(keys: list[str], shapes: Shapes) -> HeadMatch | None:
    if not has_flow_network(keys) and f"{FE}fc6.weight" in shapes and f"{FE}fc7.weight" in shapes:
        return (), (0, 0)
    return None


SINGLE = HeadSignature(
    match=_match_single, of_config=_no_head,
    presets={"R-50": "single_R_50", "R-101": "single_R_101", "X-101-32x8d": "single_X_101"},
    fallback_preset="single_R_101",
)


# -- FGFA and DFF: flow networks -----------------------------------------------------------------------


def _match_fgfa(keys: list[str], shapes: Shapes) -> HeadMatch | None:
    if (has_flow_network(keys) and "flownet.Convolution5_scale.weight" not in shapes
            and any(k.startswith("embednet.") for k in keys)):
        return (), (0, 0)
    return None


def _match_dff(keys: list[str], shapes: Shapes) -> HeadMatch | None:
    return ((), (0, 0)) if "flownet.Convolution5_scale.weight" in shapes else None


FGFA = HeadSignature(match=_match_fgfa, of_config=_no_head,
                     presets={"R-50": "fgfa_R_50", "R-101": "fgfa_R_101"}, fallback_preset="fgfa_R_101")
DFF = HeadSignature(match=_match_dff, of_config=_no_head,
                    presets={"R-50": "dff_R_50", "R-101": "dff_R_101"}, fallback_preset="dff_R_101")


# -- MEGA: head = (N_l, global modules, location-based global) ----------------------------------------


def _match_mega(keys: list[str], shapes: Shapes) -> HeadMatch | None:
    if has_flow_network(keys):
        return None
    fe, agg = re.escape(FE), re.escape(AGG)
    # The authors' names: l_fcs, l_W*s, g_W*s.
    n_local = count_indices(keys, fe + r"l_Wqs\.(\d+)\.")
    n_global = count_indices(keys, fe + r"g_Wqs\.(\d+)\.")
    if n_local or n_global or f"{FE}l_fcs.0.weight" in shapes:
        location = int(f"{FE}g_Wgs.0.weight" in shapes)
        wg = [f"{FE}l_Wgs.0.weight", f"{FE}g_Wgs.0.weight"]
        return (n_local, n_global, location), relation_dims(shapes, wg, [f"{FE}l_us.0", f"{FE}g_us.0"])
    # megavod's names (MEGAAggregator: fcs, local_stages, global_stages; RDN's has relations).
    if f"{AGG}fcs.0.weight" in shapes and not any(k.startswith(AGG + "relations.") for k in keys):
        n_local = count_indices(keys, agg + r"local_stages\.(\d+)\.Wq\.")
        n_global = count_indices(keys, agg + r"global_stages\.(\d+)\.Wq\.")
        location = int(f"{AGG}global_stages.0.Wg.weight" in shapes)
        wg = [f"{AGG}local_stages.0.Wg.weight", f"{AGG}global_stages.0.Wg.weight"]
        u = [f"{AGG}local_stages.0.u", f"{AGG}global_stages.0.u"]
        return (n_local, n_global, location), relation_dims(shapes, wg, u)
    return None


def _mega_of_config(cfg: Any) -> HeadMatch:
    m = cfg.mega
    n_global = m.global_modules
    head = (m.N_l, n_global, int(m.location_based_global and n_global > 0))
    relation = (0, 0)
    if m.N_l or n_global:
        located = m.N_l > 0 or (m.location_based_global and n_global > 0)
        relation = (cfg.relation.num_heads, geometry_channels(cfg) if located else 0)
    return head, relation


def _mega_details(head: tuple[int, ...]) -> list[str]:
    n_l, n_global, location = head
    details = [f"N_l={n_l}", f"{n_global} global module{'s' if n_global != 1 else ''}"]
    return details + (["location-based global"] if location else [])


def _mega_overrides(head: tuple[int, ...], cfg: Any) -> list[str]:
    n_l, n_global, location = head
    if cfg.mega.global_modules == n_global:
        n_g, res = cfg.mega.N_g, cfg.mega.global_res_stages
    else:  # the code's layout: one global stage, the rest after the local stack (Table 4: all before)
        n_g, res = (n_global, 0) if n_l == 0 else (min(n_global, 1), max(n_global - 1, 0))
    out = [f"mega.N_l={n_l}", f"mega.N_g={n_g}", f"mega.global_res_stages={res}",
           f"mega.location_based_global={str(bool(location)).lower()}"]
    if n_l == 0:
        out.append("mega.memory=false")  # memory feeds the local stage only
    return out


MEGA = HeadSignature(
    match=_match_mega, of_config=_mega_of_config,
    presets={"R-50": "mega_R_50", "R-101": "mega_R_101", "X-101-32x8d": "mega_X_101"},
    fallback_preset="mega_R_101", details=_mega_details, head_overrides=_mega_overrides,
)


# -- RDN: head = (fc layers, relation modules); one more module than fcs for RDN ------------------------


def _match_rdn(keys: list[str], shapes: Shapes) -> HeadMatch | None:
    if has_flow_network(keys):
        return None
    fe, agg = re.escape(FE), re.escape(AGG)
    if f"{AGG}fcs.0.weight" in shapes and any(k.startswith(AGG + "relations.") for k in keys):  # megavod's names
        n_fcs = count_indices(keys, agg + r"fcs\.(\d+)\.")
        n_rel = count_indices(keys, agg + r"relations\.(\d+)\.Wq\.")
        return (n_fcs, n_rel), relation_dims(shapes, [f"{AGG}relations.0.Wg.weight"], [])
    if f"{FE}fcs.0.weight" in shapes:  # the authors' names
        n_fcs = count_indices(keys, fe + r"fcs\.(\d+)\.")
        n_rel = count_indices(keys, fe + r"Wqs\.(\d+)\.")
        return (n_fcs, n_rel), relation_dims(shapes, [f"{FE}Wgs.0.weight"], [])
    return None


def _rdn_of_config(cfg: Any) -> HeadMatch:
    b, a = cfg.rdn.basic_stages, cfg.rdn.advanced_stages
    head = (b + a, b + a + 1) if a > 0 else (b, b)
    return head, (cfg.relation.num_heads, cfg.relation.embed_dim)


def _rdn_overrides(head: tuple[int, ...], cfg: Any) -> list[str]:
    n_fcs, n_rel = head
    if n_rel == n_fcs:
        basic, advanced = n_fcs, 0
    else:
        basic = cfg.rdn.basic_stages if cfg.rdn.basic_stages < n_fcs else max(n_fcs - 1, 1)
        advanced = n_fcs - basic
    return [f"rdn.basic_stages={basic}", f"rdn.advanced_stages={advanced}"]


RDN = HeadSignature(
    match=_match_rdn, of_config=_rdn_of_config,
    presets={"R-50": "rdn_base_R_50", "R-101": "rdn_base_R_101"}, fallback_preset="rdn_base_R_101",
    title=lambda head: "RDN-base" if head[0] == head[1] else "RDN",
    details=lambda head: [f"{head[1]} relation modules"],
    head_overrides=_rdn_overrides,
    preset_for_head=lambda arch, head: "rdn_R_101" if arch == "R-101" and head[1] == head[0] + 1 else None,
)


# -- YOLOX and YOLOV: networks of their own (megavod/models/yolox.py) ----------------------------------

YOLO_STEM = "backbone.backbone.stem.conv.conv.weight"
YOLO_PREFIX = "backbone.backbone."  # CSPDarknet (or Swin / FocalNet) under the PAFPN: the YOLOX family


@dataclass(frozen=True)
class YOLOXFamily:
    """How the checkpoints of a YOLOX-family method look (the method table's ``checkpoint`` of its rows).

    Their keys name the whole network (the authors' names are megavod's, so there is nothing to rename);
    :func:`megavod.checkpoints.recognise.recognise` reads the network's sizes from them and asks each
    family, most specific first, whether the head is its own.

    Args:
        method: the row that builds the file (the offline one where several rows share the keys).
        title: how the model is called (``"YOLOV"``); a size is appended (``"YOLOV-S"``).
        head_keys: key prefixes only this family's head has (empty: the plain YOLOX head).
        presets: released size (``"S"``, ``"L"``, ``"X"``) -> the preset that builds it.
        fallback_preset: the preset to adapt (depth, width, classes) for a size without one.
    """

    method: str
    title: str
    head_keys: tuple[str, ...]
    presets: dict[str, str]
    fallback_preset: str

    def match(self, keys: list[str]) -> bool:
        return not self.head_keys or any(k.startswith(self.head_keys) for k in keys)


YOLOV = YOLOXFamily(
    method="yolov", title="YOLOV", head_keys=("head.trans.", "head.cls_convs2.", "head.linear_pred."),
    presets={"S": "yolov_s", "L": "yolov_l", "X": "yolov_x"}, fallback_preset="yolov_s",
)
YOLOX = YOLOXFamily(
    method="yolox", title="YOLOX", head_keys=(),
    presets={"S": "yolox_s_vid", "L": "yolox_l_vid", "X": "yolox_x_vid"}, fallback_preset="yolox_s_vid",
)
YOLO_FAMILIES = (YOLOV, YOLOX)  # most specific first

# Heads and backbones of the authors' repository that megavod does not build, by a key prefix only they have.
YOLO_UNSUPPORTED = {
    "head.agg.": "a YOLOV++ head",
    "head.cls_pred.": "a YOLOV++ head",
    "backbone.backbone.patch_embed.": "a Swin or FocalNet backbone",
}
