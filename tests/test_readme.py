"""The README's "Python API" examples run as written (in a fresh folder)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(section: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, f"README has no section '## {section}'"
    return re.findall(r"```python\n(.*?)```", match.group(1), re.S)


def test_python_api_examples_run(tmp_path, monkeypatch, capsys):
    blocks = python_blocks("Python API")
    assert blocks
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "Detector(method='mega', config='synthetic_mega'" in out and "mAP" in out
    assert (tmp_path / "pred.json").is_file() and (tmp_path / "pred_coco.json").is_file()
    assert (tmp_path / "runs" / "tiny" / "model_final.pth").is_file()
    assert [r.frame for r in namespace["video"].frames] == list(range(12))
    assert len(namespace["boxes"]) == 4
