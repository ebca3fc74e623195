"""``megavod synth OUT``: write the synthetic benchmark (:func:`megavod.data.synthetic.generate_synthetic_dataset`)."""

from __future__ import annotations

import argparse

from megavod.data.synthetic import generate_synthetic_dataset
from megavod.errors import MegavodError


def main(args: argparse.Namespace) -> int:
    """``megavod synth OUT [--videos N] [--frames F] [--size S] [--seed K]``: 80% train, 20% val."""
    if args.videos < 1:
        raise MegavodError(f"synth: --videos must be >= 1, got {args.videos}")
    num_val = max(1, round(0.2 * args.videos)) if args.videos >= 2 else 0
    num_train = args.videos - num_val
    stats = generate_synthetic_dataset(
        args.out, num_train, num_val, frames=args.frames, size=args.size, seed=args.seed,
        num_det_images=15 * num_train, progress=True,
    )
    shares = stats.motion_shares
    print(
        f"wrote {args.out}: {stats.train_videos} train + {stats.val_videos} val videos, "
        f"{stats.frames} frames, {stats.boxes} boxes, {stats.det_images} DET images; "
        f"cue hidden in {stats.hidden_share:.0%} of boxes; motion fast {shares['fast']:.0%} / "
        f"medium {shares['medium']:.0%} / slow {shares['slow']:.0%}; {stats.seconds:.0f} s"
    )
    return 0
