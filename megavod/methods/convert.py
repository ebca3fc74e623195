"""``megavod convert SRC DST``: a checkpoint (the authors' ``.pth``, megavod's training checkpoint, a
bare state dict) -> megavod's own format, with the config that builds its model recorded alongside.

DST ending in ``.safetensors``: a safetensors file whose metadata holds ``format: megavod`` and the
config as YAML, plus the same YAML in a sidecar ``DST.yaml``. Any other name: a torch file
``{"format": "megavod", "version": 1, "model": state dict, "config": to_dict(cfg)}`` that loads with
``weights_only=True``. Tensor names are megavod's (:func:`~megavod.checkpoints.loading.authors_to_megavod_keys`),
values are the file's, unchanged: same pixel convention, same class order. ``megavod detect --weights
DST`` then needs no ``--config``.

Nothing partial is ever written: every key is checked against the model the config builds first, and
files are written to a temporary name and renamed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from safetensors.torch import save_file

from megavod.atomic import atomic_path, atomic_write_text
from megavod.checkpoint_files import FORMAT, SAFETENSORS_SUFFIX, Checkpoint, read_weights, sidecar_path
from megavod.checkpoints.loading import authors_to_megavod_keys, match_state_dict, resolve_config, without_initial_weights
from megavod.checkpoints.recognise import signature_of_config
from megavod.config import dump_config, to_dict
from megavod.methods.building import build_detector

VERSION = 1
# Why top-level entries of a training checkpoint are not converted.
_DROPPED_REASON = "training state, not weights"


@dataclass
class ConversionReport:
    """What a conversion did: ``keys`` tensors in the file, of which ``renamed`` got a megavod name
    (the rest keep the authors' name); ``ignored`` (key, reason) is empty for any file that converts,
    since an unused tensor is an error; ``dropped`` lists top-level non-weight entries."""

    src: Path
    dst: Path
    model: str
    config_name: str
    keys: int
    renamed: int
    ignored: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    module_prefix: bool = False

    def line(self) -> str:
        prefix = ", 'module.' prefix removed" if self.module_prefix else ""
        dropped = f"; dropped {', '.join(self.dropped)} ({_DROPPED_REASON})" if self.dropped else ""
        return (f"{self.src}: {self.model} (config {self.config_name}): {self.keys} tensors, "
                f"{self.renamed} renamed, {self.keys - self.renamed} same name, {len(self.ignored)} ignored"
                f"{prefix}{dropped} -> {self.dst}")


def shape_model(cfg: Any) -> nn.Module:
    """The detector ``cfg`` builds, on the ``meta`` device when it can be (names and shapes only: no
    memory, no init cost), else on the CPU."""
    try:
        with torch.device("meta"):
            return build_detector(cfg)
    except (NotImplementedError, RuntimeError):  # a builder that computes with its tensors
        return build_detector(cfg)


def convert(
    src: str | Path,
    dst: str | Path,
    config: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    trust_pickle: bool = False,
) -> ConversionReport:
    """Convert ``src`` to ``dst`` (see the module docstring); the config is ``config`` when given (the
    file must fit it), else the file's recorded one, else the preset recognised from its keys."""
    src, dst = Path(src), Path(dst)
    checkpoint = read_weights(src, trust_pickle)
    cfg = without_initial_weights(resolve_config(checkpoint, config, overrides))
    model = shape_model(cfg)
    state = match_state_dict(model, checkpoint.state_dict, src, cfg.name)
    write_converted(dst, state, cfg)
    return _report(checkpoint, model, cfg, dst)


def _report(checkpoint: Checkpoint, model: nn.Module, cfg: Any, dst: Path) -> ConversionReport:
    rename = authors_to_megavod_keys(model)
    return ConversionReport(
        src=checkpoint.path, dst=dst, model=signature_of_config(cfg).describe(), config_name=cfg.name,
        keys=len(checkpoint.state_dict), renamed=sum(1 for k in checkpoint.state_dict if k in rename),
        dropped=list(checkpoint.dropped), module_prefix=checkpoint.had_module_prefix,
    )


def _plain_tensors(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous tensors that share no memory (safetensors stores each tensor on its own)."""
    out, seen = {}, set()
    for k, v in state.items():
        t = v.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def write_converted(dst: str | Path, state: dict[str, Tensor], cfg: Any) -> None:
    """Write ``state`` (megavod names) and ``cfg`` to ``dst`` in megavod's format."""
    dst = Path(dst)
    if dst.suffix == SAFETENSORS_SUFFIX:
        text = dump_config(cfg)
        metadata = {"format": FORMAT, "version": str(VERSION), "config": text}
        tensors = _plain_tensors(state)
        with atomic_path(dst) as tmp:
            save_file(tensors, tmp, metadata=metadata)
        atomic_write_text(sidecar_path(dst), text)
    else:
        record = {"format": FORMAT, "version": VERSION, "model": dict(state), "config": to_dict(cfg)}
        with atomic_path(dst) as tmp:
            torch.save(record, tmp)

