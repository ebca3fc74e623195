"""``megavod eval``: the ImageNet VID protocol on a prediction file (:func:`megavod.api.evaluate`)."""

from __future__ import annotations

import argparse

from megavod.api import evaluate


def main(args: argparse.Namespace) -> int:
    evaluate(args.data, args.pred, out=args.out, protocol=args.protocol, split=args.split, verbose=True)
    return 0
