"""``megavod train``: training through :func:`megavod.api.train` (one process, or many under torchrun)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from megavod.api import train


def main(args: argparse.Namespace) -> int:
    """``megavod train --config NAME --data DIR [--out DIR] [--resume] [KEY=VALUE ...]`` (``args.cfg`` is
    the loaded config)."""
    final = train(args.cfg, Path(args.data), Path(args.out), resume=bool(args.resume))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"final checkpoint: {final}")
    return 0
