"""``python -m megavod`` (and ``torchrun ... -m megavod train``) runs the command line."""

import sys

from megavod.apps.cli import main

sys.exit(main())
