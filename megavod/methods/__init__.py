"""The built-in methods: one row of the method table each (:class:`megavod.registry.MethodSpec`).

============  ====================  =============================  ==============  ================  =================
method        detector (``build``)  stream schedule                training refs   checkpoints       section
============  ====================  =============================  ==============  ================  =================
single        SingleFrameDetector   frame k alone                  none            fc6/fc7 head      none
mega          MEGADetector          local window, global pool,     local, memory,  l_*/g_* modules   MEGAConfig
                                    Long Range Memory              global
rdn           RDNDetector           37-frame window                2 of +-18       fcs/W*s modules   RDNConfig
fgfa          FGFADetector          19-frame window                2 of +-9        flownet+embednet  FGFAConfig
dff           DFFDetector           last key frame (every 10)      1 of -9..0      flownet+scale     DFFConfig
yolox         YOLOXDetector         frame k alone                  none            YOLOX head        YOLOXConfig
yolov         YOLOVDetector         k's chunk of 32 (seeded        15 frames of    head.trans        YOLOVConfig
                                    permutation)                   its video
yolov_online  YOLOVOnlineDetector   frame k (the bank of earlier   15 frames of    head.trans        YOLOVOnlineConfig
                                    frames: the stream cache)      its video
============  ====================  =============================  ==============  ================  =================

The base model and the ablations are MEGA configs (``mega.memory=false``, ``mega.N_g=0``, ...), not
methods of their own. Each row brings its config section (:mod:`megavod.methods.sections`,
:mod:`megavod.methods.yolo_sections`: the hyper-parameters under ``mega.``, ``rdn.``, ``yolov.``, ... with
their validation and derived values); the default inference mode is offline except MEGA's
``mega.online``. A new method is one module that builds its detector, optionally defines its section,
and calls :func:`megavod.registry.register_method` (docs/architecture.md#adding-a-method).
"""

from __future__ import annotations

from megavod.checkpoints import signatures
from megavod.data.sampling import MEGASampler, OffsetSampler, VideoFramesSampler
from megavod.export.flow_graphs import DFFGraphs, FGFAGraphs
from megavod.export.graphs import SingleFrameGraphs
from megavod.export.mega_graphs import MEGAGraphs
from megavod.export.relation_graphs import RDNGraphs
from megavod.export.yolo_graphs import YOLOVGraphs, YOLOXGraphs
from megavod.inference.schedules import (ChunkSchedule, FlowWindowSchedule, KeyFrameSchedule, RelationSchedule,
                                         SingleFrameSchedule)
from megavod.methods.building import build_detector, load_detector, load_initial_weights
from megavod.methods.sections import DFFConfig, FGFAConfig, MEGAConfig, RDNConfig
from megavod.methods.yolo_sections import YOLOVConfig, YOLOVOnlineConfig, YOLOXConfig
from megavod.models.dff import build_dff_detector
from megavod.models.fgfa import build_fgfa_detector
from megavod.models.mega import build_mega_detector
from megavod.models.rdn import build_rdn_detector
from megavod.models.single_frame import build_single_frame_detector
from megavod.models.yolov import build_yolov_detector, build_yolov_online_detector, build_yolox_detector
from megavod.registry import MethodSpec, get_method, method_names, register_method

__all__ = ["BUILTIN_METHODS", "DFFConfig", "FGFAConfig", "MEGAConfig", "RDNConfig", "YOLOVConfig", "YOLOXConfig",
           "build_detector", "get_method", "load_detector", "load_initial_weights", "method_names"]


def _mega_schedule(cfg) -> RelationSchedule:
    m = cfg.mega
    return RelationSchedule(T_l=m.T_l, T_g=m.T_g if m.uses_global else 0, T_m=m.T_m, memory_levels=m.memory_levels,
                            feat_dim=cfg.model.roi_head.representation_size, global_shuffle=m.global_shuffle,
                            seed=cfg.seed)


def _mega_sampler(cfg) -> MEGASampler:
    m = cfg.mega
    return MEGASampler(T_l=m.T_l, T_m=m.T_m, num_local=m.train_local_refs, num_memory=m.train_memory_refs,
                       num_global=m.train_global_refs, memory=m.memory, global_stage=m.uses_global,
                       online=m.online)


def _rdn_schedule(cfg) -> RelationSchedule:
    """RDN: MEGA's local window without global pool or memory: 37 frames, key at 18."""
    return RelationSchedule(T_l=cfg.rdn.window, seed=cfg.seed, feat_dim=cfg.model.roi_head.representation_size)


BUILTIN_METHODS = (
    MethodSpec(
        name="single", title="single-frame Faster R-CNN", build=build_single_frame_detector,
        schedule=lambda cfg: SingleFrameSchedule(), checkpoint=signatures.SINGLE,
        export=SingleFrameGraphs,
    ),
    MethodSpec(
        name="mega", title="MEGA", build=build_mega_detector, schedule=_mega_schedule,
        reference_sampler=_mega_sampler, checkpoint=signatures.MEGA, export=MEGAGraphs,
        config_key="mega", config_type=MEGAConfig,
        default_mode=lambda cfg: "online" if cfg.mega.online else "offline",
    ),
    MethodSpec(
        name="rdn", title="RDN", build=build_rdn_detector, schedule=_rdn_schedule,
        reference_sampler=lambda cfg: OffsetSampler(cfg.rdn.min_offset, cfg.rdn.max_offset, cfg.rdn.train_refs),
        checkpoint=signatures.RDN, export=RDNGraphs, config_key="rdn", config_type=RDNConfig,
    ),
    MethodSpec(
        name="fgfa", title="FGFA", build=build_fgfa_detector,
        schedule=lambda cfg: FlowWindowSchedule(cfg.fgfa.min_offset, cfg.fgfa.max_offset),
        reference_sampler=lambda cfg: OffsetSampler(cfg.fgfa.min_offset, cfg.fgfa.max_offset, cfg.fgfa.train_refs),
        checkpoint=signatures.FGFA, export=FGFAGraphs, config_key="fgfa", config_type=FGFAConfig,
    ),
    MethodSpec(
        name="dff", title="DFF", build=build_dff_detector,
        schedule=lambda cfg: KeyFrameSchedule(cfg.dff.key_interval),
        reference_sampler=lambda cfg: OffsetSampler(cfg.dff.min_offset, cfg.dff.max_offset, 1),
        checkpoint=signatures.DFF, export=DFFGraphs, config_key="dff", config_type=DFFConfig,
    ),
    MethodSpec(
        name="yolox", title="YOLOX", build=build_yolox_detector, schedule=lambda cfg: SingleFrameSchedule(),
        checkpoint=signatures.YOLOX, export=YOLOXGraphs, config_key="yolox", config_type=YOLOXConfig,
    ),
    MethodSpec(
        name="yolov", title="YOLOV", build=build_yolov_detector,
        schedule=lambda cfg: ChunkSchedule(cfg.yolov.gframe, cfg.yolov.shuffle_seed),
        reference_sampler=lambda cfg: VideoFramesSampler(cfg.yolov.train_frames - 1),
        checkpoint=signatures.YOLOV, export=YOLOVGraphs, config_key="yolov", config_type=YOLOVConfig,
    ),
    MethodSpec(  # the same network and weights as yolov; the key against a bank of earlier frames
        name="yolov_online", title="YOLOV (online)", build=build_yolov_online_detector,
        schedule=lambda cfg: KeyFrameSchedule(1), checkpoint=signatures.YOLOV,
        reference_sampler=lambda cfg: VideoFramesSampler(cfg.yolov_online.train_frames - 1),
        config_key="yolov_online", config_type=YOLOVOnlineConfig,
    ),
)

for _spec in BUILTIN_METHODS:
    if _spec.name not in method_names():
        register_method(_spec)
