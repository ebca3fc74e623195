"""Building detectors from a config and filling them from weight files (the CLI's and the API's way in)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from torch import nn

from megavod.checkpoint_files import read_weights
from megavod.checkpoints.loading import authors_to_megavod_keys, load_state, resolve_config, without_initial_weights
from megavod.config import Config
from megavod.errors import MegavodError
from megavod.registry import get_method


def build_detector(cfg: Config) -> nn.Module:
    """The detector of ``cfg.method`` (the method table's ``build``), randomly initialised (plus
    ``model.backbone.weights`` if set), then filled from ``model.init_weights`` if set
    (:func:`load_initial_weights`)."""
    model = get_method(cfg.method).build(cfg)
    if cfg.model.init_weights:
        load_initial_weights(model, cfg.model.init_weights)
    return model


def load_initial_weights(model: nn.Module, path: str | Path, verbose: bool = True) -> list[str]:
    """Initialise ``model`` from a detector checkpoint (``model.init_weights``; the authors' ``MODEL.WEIGHT``
    with ``VID.IGNORE``): any file ``--weights`` accepts (the authors', megavod's training checkpoints
    and converted files); only the model state is read, never an optimizer, schedule or iteration.

    Every tensor of the file must be a tensor of the model with the same shape (the authors' names are
    mapped as for ``--weights``), otherwise nothing is loaded and one line names the mismatch. Model
    tensors the file lacks keep their initialisation, e.g. RDN's ``fcs.2`` and relation modules 2 and 3
    when RDN starts from RDN-base (docs/conventions.md#rdn). Returns the names of those tensors.
    """
    sd = read_weights(path).state_dict
    expected = model.state_dict()
    rename = authors_to_megavod_keys(model)
    mapped = {rename.get(k, k): v for k, v in sd.items()}
    unexpected = [k for k in sd if rename.get(k, k) not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
        raise MegavodError(f"{path}: model.init_weights holds tensors this model does not have: "
                           f"{', '.join(unexpected[:3])}{more}; wrong method, backbone or file?")
    wrong = [f"{k} is {tuple(v.shape)}, expected {tuple(expected[k].shape)}"
             for k, v in mapped.items() if v.shape != expected[k].shape]
    if wrong:
        raise MegavodError(f"{path}: model.init_weights shape mismatch: {'; '.join(wrong[:3])}")
    model.load_state_dict(mapped, strict=False)
    kept = [k for k in expected if k not in mapped]
    if verbose:
        listed = ", ".join(kept[:4]) + (", ..." if len(kept) > 4 else "")
        note = f"; {len(kept)} model tensors keep their initialisation ({listed})" if kept else ""
        print(f"model.init_weights: loaded {len(mapped)} tensors from {path}{note}", file=sys.stderr)
    return kept


def load_detector(
    weights: str | Path,
    config: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    trust_pickle: bool = False,
) -> tuple[nn.Module, Any]:
    """(detector filled from ``weights``, its config): what ``megavod detect --weights FILE`` runs.

    Without ``config`` the file's recorded config (or the preset recognised from its keys) is used,
    so ``megavod detect --weights MEGA_R_101.pth`` needs no ``--config``; with one, a file that does
    not fit it is refused in one line saying what the file holds and what the config builds.
    """
    checkpoint = read_weights(weights, trust_pickle)
    cfg = without_initial_weights(resolve_config(checkpoint, config, overrides))
    model = build_detector(cfg)
    load_state(model, checkpoint, cfg.name)
    return model, cfg
