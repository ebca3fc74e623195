"""The config sections of the one-stage family: YOLOX (the single-frame base detector) and YOLOV.

Defaults are the authors' (YuHengsss/YOLOV, ``exps/yolov/yolov_base.py`` and ``yoloxs_vid.py`` at
28ff8b0; docs/yolov.md); the S / L / X presets set ``depth`` and ``width``. The input is
the shared ``input`` section's letterbox (``input.letterbox: 576``, docs/yolov.md#input).
Names follow the authors' where they are names (``gframe``: frames per chunk), megavod's words where
theirs are misspellings (their ``defualt_p`` is ``proposals``, ``defulat_pre`` is ``pre_top``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from megavod.config import Config
from megavod.config_checks import require

#: The released scales: (depth, width) of ``exps/yolov/yolox{s,l,x}_vid.py`` / ``yolov_{s,l,x}.py``.
YOLO_SCALES = {"s": (0.33, 0.5), "l": (1.0, 1.0), "x": (1.33, 1.25)}


@dataclass
class YOLOXConfig:
    """YOLOX 0.3.0 with the Focus stem (the YOLOV repository's base detector)."""

    weight_files: ClassVar[tuple[str, ...]] = ()
    #: The family reads letterboxed frames (``input.letterbox``); other methods refuse the setting.
    letterbox_input: ClassVar[bool] = True

    depth: float = 0.33  # CSP bottlenecks: max(round(3 * depth), 1) per block, x3 in dark3 and dark4 (darknet.py)
    width: float = 0.5  # channels = int(64 * width) at the stem, C = int(256 * width) in the head
    num_classes: int = 30
    test_conf: float = 0.001  # obj x class score kept (exp.test_conf)
    nms_thresh: float = 0.5  # class-aware NMS of the output (exp.nmsthre)
    prior_prob: float = 0.01  # initial class / objectness bias (YOLOXHead.initialize_biases)
    use_l1: bool = False  # the authors add the L1 box loss in the last, no-augmentation epochs

    def validate(self, cfg: Config, key: str) -> None:
        require(self.depth > 0, f"{key}.depth", "> 0", self.depth)
        require(self.width > 0 and int(256 * self.width) % 4 == 0, f"{key}.width",
                "> 0 with int(256 * width) a multiple of 4", self.width)
        require(self.num_classes >= 1, f"{key}.num_classes", ">= 1", self.num_classes)
        require(0.0 <= self.test_conf < 1.0, f"{key}.test_conf", "in [0, 1)", self.test_conf)
        require(0.0 < self.nms_thresh <= 1.0, f"{key}.nms_thresh", "in (0, 1]", self.nms_thresh)
        require(0.0 < self.prior_prob < 1.0, f"{key}.prior_prob", "in (0, 1)", self.prior_prob)
        require(cfg.input.letterbox > 0, "input.letterbox",
                f"a side (e.g. 576) for method {cfg.method!r}: YOLOX reads letterboxed BGR 0-255 frames",
                cfg.input.letterbox)

    @property
    def channels(self) -> int:
        """C, the width of the head's features (``int(256 * width)``)."""
        return int(256 * self.width)


@dataclass
class YOLOVConfig(YOLOXConfig):
    """YOLOV: YOLOX plus the feature selection and aggregation (``yolox/models/yolovp_msa.py``,
    ``post_trans.py``), run over chunks of ``gframe`` frames of a seeded permutation of the video.

    ``affinity``: ``"2022"`` multiplies the regression branch's affinity by the references'
    objectness, as the code the released YOLOV weights were trained with (28ff8b0); ``"2023"`` is the
    current code (fe777cb, "modified in 2023.12.5"), without it.
    """

    proposals: int = 30  # their defualt_p: proposals kept per frame after the selection
    pre_top: int = 750  # their defulat_pre: anchors by objectness before the selection's NMS
    pre_nms_thresh: float = 0.75  # their pre_nms
    sim_thresh: float = 0.75  # the average pooling's cosine mask
    heads: int = 4
    scale: float = 25.0
    affinity: Literal["2022", "2023"] = "2022"
    gframe: int = 32  # frames per chunk (their gframe_val)
    shuffle_seed: int = 41  # the permutation's seed (tools/vid_demo.py: random.seed(41))
    base_below: int = 4  # chunks of at most this many frames give the base detector's output (Predictor)
    train_frames: int = 16  # frames of one video per training sample (their VIDBatchSampler's batch)

    def validate(self, cfg: Config, key: str) -> None:
        super().validate(cfg, key)
        require(self.proposals >= 1, f"{key}.proposals", ">= 1", self.proposals)
        require(self.pre_top >= self.proposals, f"{key}.pre_top", f">= {key}.proposals", self.pre_top)
        require(0.0 < self.pre_nms_thresh <= 1.0, f"{key}.pre_nms_thresh", "in (0, 1]", self.pre_nms_thresh)
        require(-1.0 <= self.sim_thresh < 1.0, f"{key}.sim_thresh", "in [-1, 1)", self.sim_thresh)
        require(self.heads >= 1 and self.channels % self.heads == 0, f"{key}.heads",
                f"a divisor of the head width {self.channels}", self.heads)
        require(self.scale > 0, f"{key}.scale", "> 0", self.scale)
        require(self.gframe >= 1, f"{key}.gframe", ">= 1", self.gframe)
        require(self.base_below >= 0, f"{key}.base_below", ">= 0", self.base_below)
        require(self.train_frames >= 1, f"{key}.train_frames", ">= 1", self.train_frames)


@dataclass
class YOLOVOnlineConfig(YOLOVConfig):
    """The authors' online YOLOV (``exps/yolov/yolov_*_online.py``, ``tools/yolov_demo_online.py``): each
    frame against ``chosen_frames`` frames drawn (``random.seed(bank_seed)`` shuffles) from a bank of the last
    ``bank_frames`` frames, blended with the last ``local_frames`` (docs/yolov.md#online-yolov). Their online
    attention has the 2022 affinity only; ``gframe``, ``shuffle_seed`` and ``base_below`` do not apply."""

    bank_seed: int = 42
    bank_frames: int = 600
    chosen_frames: int = 31
    local_frames: int = 20

    def validate(self, cfg: Config, key: str) -> None:
        super().validate(cfg, key)
        require(self.affinity == "2022", f"{key}.affinity",
                "'2022' (the authors' online attention, Attention_msa_online, never changed)", self.affinity)
        for name in ("bank_frames", "chosen_frames", "local_frames"):
            require(getattr(self, name) >= 1, f"{key}.{name}", ">= 1", getattr(self, name))
