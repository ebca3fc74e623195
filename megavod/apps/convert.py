"""``megavod convert SRC DST``: a checkpoint -> megavod's format (:func:`megavod.methods.convert.convert`)."""

from __future__ import annotations

import argparse

from megavod.methods.convert import convert


def main(args: argparse.Namespace) -> int:
    """``megavod convert SRC DST [--config NAME] [--trust-pickle]``."""
    report = convert(args.src, args.dst, args.config, getattr(args, "overrides", ()) or (), args.trust_pickle)
    print(report.line())
    return 0
