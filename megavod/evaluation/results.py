"""What an evaluation produces: per-class AP by motion range, PR curves (:mod:`megavod.evaluation.vid_eval`
computes them, :mod:`megavod.evaluation.report` prints and writes them)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class PRCurve:
    """Precision-recall points of one class, in descending-score order.

    Kept at every true positive (where recall changes) plus the last prediction: the precision
    envelope, and so the AP, is unchanged by dropping the points in between.
    """

    recall: np.ndarray
    precision: np.ndarray


@dataclass
class RangeResult:
    """AP of one motion range. Arrays are indexed by class label (index 0 = background, NaN AP)."""

    name: str
    low: float | None  # motion-IoU bounds; None for a subset given by mask (evaluate_vid's ``subsets``)
    high: float | None
    empty_weight: float  # FP weight of a prediction in an image with no GT of its class
    ap: np.ndarray  # float64 [C]; NaN where the class has no non-ignored GT
    num_pos: np.ndarray  # int64 [C]: non-ignored GT boxes
    num_ignored_gt: np.ndarray  # int64 [C]
    num_det: np.ndarray  # int64 [C]: all predictions of the class
    num_tp: np.ndarray  # int64 [C]
    num_fp: np.ndarray  # float64 [C]: weighted false positives
    curves: dict[int, PRCurve] = field(default_factory=dict)

    @property
    def map(self) -> float:
        valid = ~np.isnan(self.ap)
        return float(self.ap[valid].mean()) if valid.any() else float("nan")


@dataclass
class VIDEvalResult:
    """Everything one evaluation produced; ``ranges`` holds "all" and, with motion IoUs, the buckets."""

    protocol: str
    classes: tuple[str, ...]
    num_frames: int
    num_gt: int
    num_det: int
    ranges: dict[str, RangeResult]
    bucket_shares: dict[str, float] | None = None
    frames_without_predictions: int = 0

    @property
    def map(self) -> float:
        return self.ranges["all"].map
