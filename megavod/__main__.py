"""``python -m megavod`` (and ``torchrun ... -m megavod train``) runs the command line."""

import sys

from megavod.cli import main

sys.exit(main())
