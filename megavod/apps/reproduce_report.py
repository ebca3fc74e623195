"""How ``megavod reproduce synthetic`` scores and reports its runs: mAP overall, by motion speed and by
cue visibility (the synthetic benchmark's hidden-cue boxes, also split by how far a frame showing the
cue is), the Table-3-style markdown table and its plot."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from megavod.evaluation.vid_eval import evaluate_loaded, load_for_evaluation
from megavod.evaluation.vid_eval import evaluate_vid

SPEEDS = ("slow", "medium", "fast")
# Half the offline local window of the synthetic presets (T_l = 25): a hidden-cue box with a cue-visible
# frame of its object this close is within reach of the local stage alone (cue_visibility_maps).
CUE_WINDOW = 12


def evaluate_method(data: Path, pred_file: Path, eval_dir: Path) -> dict[str, float]:
    """mAP (%) overall, by motion speed (slow / medium / fast) and by cue visibility (``cue_hidden``,
    ``cue_visible``: see :func:`cue_visibility_maps`) with the authors' protocol."""
    gts, preds, missing = load_for_evaluation(data, pred_file)  # read once for both evaluations
    result = evaluate_loaded(gts, preds, missing, "authors", eval_dir, plots=False, log=None)
    maps = {name: 100.0 * result.ranges[name].map for name in ("all", *SPEEDS) if name in result.ranges}
    maps.update(cue_visibility_maps(gts, preds))
    # A bucket without ground truth has no mAP: None (null in results.json), never NaN.
    return {name: (None if value != value else value) for name, value in maps.items()}


def cue_visibility_maps(gts: list, preds: list, window: int = CUE_WINDOW) -> dict[str, float]:
    """mAP (%) on the ground-truth boxes whose class cue is hidden (the benchmark's XML ``occluded``
    flag) and on those where it is visible; ``gts`` / ``preds`` as
    :func:`~megavod.evaluation.vid_eval.load_for_evaluation` returns them. The hidden boxes are also
    split by how far the nearest frame is where the same object's cue is visible: ``cue_hidden_near``
    within ``window`` frames (inside the offline local window, tau = (T_l - 1) / 2), ``cue_hidden_far``
    further or never (only memory or global frames can tell those).

    Each subset is evaluated exactly as the authors evaluate a motion bucket (``evaluate_vid``'s
    ``subsets``): the other boxes are ignored, a detection matching one of them counts neither way,
    and an unmatched detection is a false positive weighted by the subset's share of the boxes. Hidden
    boxes are what a single frame cannot classify; the gap between the methods there is what temporal
    context buys.
    """
    hidden = [g.occluded for g in gts]
    near = _near_visible_cue(gts, window)
    subsets = {"cue_hidden": hidden, "cue_visible": [~h for h in hidden],
               "cue_hidden_near": [h & n for h, n in zip(hidden, near)],
               "cue_hidden_far": [h & ~n for h, n in zip(hidden, near)]}
    result = evaluate_vid(gts, preds, None, "authors", subsets=subsets)
    return {name: 100.0 * result.ranges[name].map for name in subsets}


def _near_visible_cue(gts: list, window: int) -> list[torch.Tensor]:
    """Per frame, per box: does a frame within ``window`` frames show the same track's cue?"""
    visible: dict[tuple[str, int], list[int]] = {}
    for g in gts:
        for track, hidden in zip(g.track_ids.tolist(), g.occluded.tolist()):
            if not hidden:
                visible.setdefault((g.video, track), []).append(g.frame)
    return [
        torch.tensor([any(abs(f - g.frame) <= window for f in visible.get((g.video, t), ())) for t in g.track_ids.tolist()],
                     dtype=torch.bool)
        for g in gts
    ]


def fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}"


#: The caption of the hidden-cue split for the MEGA family (whose offline local window is +- CUE_WINDOW).
CUE_SPLIT_CAPTION = (
    f"Cue hidden, by the distance to the nearest frame where the same object's cue is visible: within "
    f"{CUE_WINDOW} frames (inside the local window) or further (only memory or global frames show it)."
)


def format_table(rows: list[dict], header: str = "", split_caption: str = CUE_SPLIT_CAPTION) -> str:
    """Table-3-style markdown: mAP overall and by motion speed, runtime, the gain over the row above;
    then the hidden-cue split by distance, under ``split_caption``."""
    lines = [header, ""] if header else []
    lines += [
        "| Method | mAP (%) | Δ | mAP slow | mAP medium | mAP fast | cue hidden | cue visible | Runtime (ms/frame) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    previous = None
    for row in rows:
        m = row["map"]
        delta = "" if previous is None or m["all"] is None else f"{m['all'] - previous:+.1f}"
        lines.append(
            f"| {row['name']} | {fmt(m['all'])} | {delta} | {fmt(m.get('slow'))} | {fmt(m.get('medium'))} "
            f"| {fmt(m.get('fast'))} | {fmt(m.get('cue_hidden'))} | {fmt(m.get('cue_visible'))} "
            f"| {fmt(row['timing']['ms_per_frame'])} |"
        )
        previous = m["all"]
    if any("cue_hidden_near" in row["map"] for row in rows):
        lines += [
            "",
            split_caption,
            "",
            "| Method | cue hidden, visible within the window | cue hidden, visible only further |",
            "|---|---:|---:|",
        ]
        lines += [f"| {row['name']} | {fmt(row['map'].get('cue_hidden_near'))} | {fmt(row['map'].get('cue_hidden_far'))} |"
                  for row in rows]
    return "\n".join(lines) + "\n"


def plot_table(rows: list[dict], path: Path) -> None:
    """Grouped bars of mAP (all / slow / medium / fast) per method, and mAP against ms/frame."""
    # matplotlib costs ~0.5 s to import and needs its Agg backend chosen first: only when plotting.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen, see above)

    groups = ("all", *SPEEDS, "cue_hidden", "cue_visible")
    fig, (bars, speed) = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        xs = [g + (i - (len(rows) - 1) / 2) * width for g in range(len(groups))]
        values = [float("nan") if row["map"].get(g) is None else row["map"][g] for g in groups]
        drawn = bars.bar(xs, values, width, label=row["name"])
        bars.bar_label(drawn, fmt="%.1f", fontsize=7)
    bars.set_xticks(range(len(groups)), ["mAP", "slow", "medium", "fast", "cue hidden", "cue visible"])
    bars.set_ylabel("mAP (%)")
    bars.set_title("Synthetic benchmark (ImageNet VID protocol)")
    bars.legend(fontsize=8, loc="lower right")
    for row in rows:
        speed.scatter(row["timing"]["ms_per_frame"], row["map"]["all"], s=40)
        speed.annotate(row["name"].split(" (")[0], (row["timing"]["ms_per_frame"], row["map"]["all"]),
                       textcoords="offset points", xytext=(5, 4), fontsize=8)
    speed.set_xlabel("runtime (ms/frame, CPU)")
    speed.set_ylabel("mAP (%)")
    speed.set_title("Accuracy and speed")
    speed.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
