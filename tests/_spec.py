"""Where the read-only spec lives: ``../shared/spec`` beside the checkout (as in CI), else
``$MEGAVOD_SPEC``, else ``/work/shared/spec``. Key listings also ship in ``tests/data``."""

import os
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
_CANDIDATES = [Path(os.environ["MEGAVOD_SPEC"])] if os.environ.get("MEGAVOD_SPEC") else []
_CANDIDATES += [_REPO.parent / "shared" / "spec", Path("/work/shared/spec")]

SPEC = next((p for p in _CANDIDATES if p.is_dir()), _CANDIDATES[-1])
VECTORS = SPEC / "vectors"
_SHIPPED_KEYS = _REPO / "tests" / "data" / "checkpoint_keys"
CHECKPOINT_KEYS = _SHIPPED_KEYS if _SHIPPED_KEYS.is_dir() else SPEC / "checkpoint_keys"
