"""Atomic writes: the result reads like any other file, whatever the writer did to the temporary file."""

from __future__ import annotations

import os
import stat

import pytest
from safetensors.torch import save_file
import torch

from megavod.atomic import atomic_path


def test_file_replaced_by_its_writer_keeps_normal_permissions(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    out = tmp_path / "w.safetensors"
    with atomic_path(out) as tmp:
        save_file({"x": torch.zeros(2)}, tmp)  # writes a new file in place of the temporary one
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "x.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []
