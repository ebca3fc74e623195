"""Loading weights into a megavod model: megavod's own checkpoints and the authors' ``.pth`` files.

Safe by default: files are read with ``torch.load(weights_only=True)``; a file that needs arbitrary
unpickling is refused unless the user passes ``--trust-pickle``. The key mapping is explicit and
complete: every model tensor must be filled and every checkpoint tensor used, otherwise one line names
the first offending keys, and nothing is loaded (spec §9: the authors' suffix matching and silent
leftovers are not reproduced).
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from megavod.errors import MegavodError

_MODULE_PREFIX = "module."


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> dict:
    """The raw object saved in ``path`` (weights only unless ``trust_pickle``)."""
    path = Path(path)
    if not path.is_file():
        raise MegavodError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            raise MegavodError(
                f"{path}: the file needs arbitrary unpickling to load ({str(e).splitlines()[0][:120]}); "
                "pass --trust-pickle only if you trust where it comes from"
            ) from None
        raise MegavodError(f"{path}: not a readable checkpoint ({e})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise MegavodError(f"{path}: not a readable checkpoint, truncated or corrupt ({str(e).splitlines()[0][:160]})") from None


def state_dict_of(obj: object, path: str | Path = "checkpoint") -> dict[str, Tensor]:
    """The model state dict in a checkpoint: ``obj["model"]`` (the authors' and megavod's training
    checkpoints) or ``obj`` itself; a DDP ``module.`` prefix is removed when every key has it."""
    sd = obj.get("model", obj) if isinstance(obj, Mapping) else None
    if not isinstance(sd, Mapping) or not sd:
        raise MegavodError(f"{path}: holds no state dict (expected a mapping of names to tensors)")
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise MegavodError(f"{path}: entries that are not tensors: {', '.join(map(str, bad[:3]))}")
    if all(k.startswith(_MODULE_PREFIX) for k in sd):
        sd = {k[len(_MODULE_PREFIX):]: v for k, v in sd.items()}
    return dict(sd)


def authors_to_megavod_keys(model: nn.Module) -> dict[str, str]:
    """{authors' key: our key} for every tensor of ``model`` whose name differs from the authors'.

    Only MEGA's aggregator is named differently (``...feature_extractor.l_fcs.0`` is our
    ``...feature_extractor.aggregator.fcs.0``); every other name equals the authors'.
    """
    mapping: dict[str, str] = {}
    for prefix, module in model.named_modules():
        rename = getattr(module, "authors_key_mapping", None)
        if rename is None:
            continue
        outer = prefix.rsplit(".", 1)[0] + "." if "." in prefix else ""
        for ours, theirs in rename().items():
            mapping[outer + theirs] = f"{prefix}.{ours}"
    return mapping


def _summarise(keys: list[str], n: int = 3) -> str:
    more = f" (and {len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def match_state_dict(model: nn.Module, sd: Mapping[str, Tensor], path: str | Path = "checkpoint") -> dict[str, Tensor]:
    """Rename ``sd`` to ``model``'s keys and check it fills the model exactly (names and shapes)."""
    expected = model.state_dict()
    rename = authors_to_megavod_keys(model)
    mapped = {rename.get(k, k): v for k, v in sd.items()}
    missing = [k for k in expected if k not in mapped]
    unexpected = [k for k in sd if rename.get(k, k) not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_summarise(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_summarise(unexpected)}")
        raise MegavodError(f"{path}: does not match the model ({'; '.join(parts)}); wrong method, backbone or file?")
    wrong = [f"{k} is {tuple(mapped[k].shape)}, expected {tuple(v.shape)}"
             for k, v in expected.items() if mapped[k].shape != v.shape]
    if wrong:
        raise MegavodError(f"{path}: shape mismatch: {_summarise(wrong)}")
    return mapped


def load_model_weights(model: nn.Module, path: str | Path, cfg: object | None = None, trust_pickle: bool = False) -> None:
    """Fill ``model`` from ``path`` (megavod's or the authors' checkpoint) or raise, loading nothing."""
    sd = state_dict_of(read_checkpoint(path, trust_pickle), path)
    mapped = match_state_dict(model, sd, path)
    model.load_state_dict(mapped, strict=True)
