"""``megavod eval``: the ImageNet VID protocol on a prediction file."""

from __future__ import annotations

from megavod.evaluation.vid_eval import evaluate_dataset


def main(args) -> int:
    evaluate_dataset(args.data, args.pred, args.protocol, args.out, image_set=args.split)
    return 0
