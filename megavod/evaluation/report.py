"""What an evaluation leaves behind: a terminal table, ``eval.json`` and per-class PR plots.

* ``format_table`` gives the authors' ``AP50 | motion=...`` lines followed by one row per class with
  the AP of every motion range and the number of ground-truth boxes.
* ``eval.json`` holds every figure of the table plus the per-class counts (TP, weighted FP,
  ignored GT), each range's ``empty_weight``, the motion-bucket shares, and each PR curve as the
  interpolated precision at the 101 recalls 0, 0.01, ..., 1.
* ``pr_curves/<class>.png`` draws each class's precision-recall curve for every range (matplotlib's
  Agg canvas directly, so the caller's pyplot backend is left alone).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from megavod.atomic import atomic_write_text
from megavod.evaluation.results import PRCurve, VIDEvalResult

RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def _num(x: float) -> float | None:
    """JSON has no NaN: a class without ground truth gets null."""
    x = float(x)
    return None if math.isnan(x) else x


def interpolated_precision(curve: "PRCurve", recalls: np.ndarray = RECALL_POINTS) -> np.ndarray:
    """Precision envelope (max precision at recall >= r) at each of ``recalls``; 0 past the end."""
    if not len(curve.recall):
        return np.zeros(len(recalls))
    envelope = np.maximum.accumulate(curve.precision[::-1])[::-1]
    idx = np.searchsorted(curve.recall, recalls, side="left")
    out = np.zeros(len(recalls))
    inside = idx < len(envelope)
    out[inside] = envelope[idx[inside]]
    return out


def result_to_dict(result: "VIDEvalResult") -> dict[str, Any]:
    """Every figure of ``result`` as plain JSON types (NaN -> null)."""
    ranges: dict[str, Any] = {}
    for name, r in result.ranges.items():
        per_class: dict[str, Any] = {}
        for c in range(1, len(result.classes)):
            entry: dict[str, Any] = {
                "label": c,
                "ap": _num(r.ap[c]),
                "num_pos": int(r.num_pos[c]),
                "num_ignored_gt": int(r.num_ignored_gt[c]),
                "num_det": int(r.num_det[c]),
                "num_tp": int(r.num_tp[c]),
                "num_fp": float(r.num_fp[c]),
            }
            if c in r.curves:
                entry["precision_at_recall"] = [
                    round(float(p), 6) for p in interpolated_precision(r.curves[c])
                ]
            per_class[result.classes[c]] = entry
        ranges[name] = {
            "low": r.low,
            "high": r.high,
            "empty_weight": r.empty_weight,
            "map": _num(r.map),
            "classes": per_class,
        }
    return {
        "protocol": result.protocol,
        "num_frames": result.num_frames,
        "num_gt": result.num_gt,
        "num_det": result.num_det,
        "frames_without_predictions": result.frames_without_predictions,
        "bucket_shares": result.bucket_shares,
        "map": {name: _num(r.map) for name, r in result.ranges.items()},
        "recall_points": [round(float(x), 2) for x in RECALL_POINTS],
        "ranges": ranges,
    }


def _fmt(x: float) -> str:
    return "   -  " if math.isnan(float(x)) else f"{float(x):.4f}"


def format_table(result: "VIDEvalResult") -> str:
    """The terminal summary: mAP per motion range, then AP per class and range."""
    names = list(result.ranges)
    lines = [
        f"ImageNet VID evaluation, protocol {result.protocol}: {result.num_frames} frames, "
        f"{result.num_gt} GT boxes, {result.num_det} detections"
    ]
    if result.frames_without_predictions:
        lines.append(f"note: {result.frames_without_predictions} frames had no prediction entry")
    for name in names:
        lines.append(f"AP50 | motion={name:>6s} = {_fmt(result.ranges[name].map)}")
    lines.append("")
    header = f"{'class':<16}" + "".join(f"{n:>8s}" for n in names) + f"{'#GT':>8s}"
    lines += [header, "-" * len(header)]
    all_range = result.ranges["all"]
    for c in range(1, len(result.classes)):
        if all_range.num_pos[c] == 0 and all_range.num_det[c] == 0:
            continue
        row = f"{result.classes[c]:<16}" + "".join(f"{_fmt(result.ranges[n].ap[c]):>8s}" for n in names)
        lines.append(row + f"{int(all_range.num_pos[c]):>8d}")
    lines.append("-" * len(header))
    lines.append(
        f"{'mAP':<16}" + "".join(f"{_fmt(result.ranges[n].map):>8s}" for n in names)
        + f"{int(all_range.num_pos.sum()):>8d}"
    )
    return "\n".join(lines)


def plot_pr_curves(result: "VIDEvalResult", out_dir: str | Path) -> list[Path]:
    """One PNG per class with ground truth: its PR curve in every range. Returns the files."""
    # matplotlib costs ~0.5 s to import: only when curves are drawn.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for c in range(1, len(result.classes)):
        curves = [(n, r) for n, r in result.ranges.items() if c in r.curves]
        if not curves:
            continue
        fig = Figure(figsize=(4.5, 4.0), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        for name, r in curves:
            curve = r.curves[c]
            # Step plot from recall 0 so that the area under it reads as the AP.
            rec = np.r_[0.0, curve.recall]
            prec = np.r_[curve.precision[0] if len(curve.precision) else 0.0, curve.precision]
            ax.step(rec, prec, where="pre", label=f"{name} AP {r.ap[c]:.3f}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(f"{result.classes[c]} ({result.protocol})")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{result.classes[c]}.png"
        fig.savefig(path)
        written.append(path)
    return written


def write_report(result: "VIDEvalResult", out_dir: str | Path, plots: bool = True) -> str:
    """Write ``eval.json``, ``result.txt`` (the table) and ``pr_curves/``; return the table text."""
    out_dir = Path(out_dir)
    table = format_table(result)
    text = json.dumps(result_to_dict(result), indent=1)
    # Keep lists of numbers on one line each: the file stays readable with 101-point curves.
    text = re.sub(r"\[\s*([^\[\]{}\"]*?)\s*\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    atomic_write_text(out_dir / "eval.json", text + "\n")
    atomic_write_text(out_dir / "result.txt", table + "\n")
    if plots:
        plot_pr_curves(result, out_dir / "pr_curves")
    return table
