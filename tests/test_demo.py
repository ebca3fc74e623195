"""``megavod demo``: the shipped weights, the three outputs and the summary, on a tiny clip."""

from __future__ import annotations

import json

import torch

import megavod.apps.demo as demo
from megavod.apps.cli import main as cli_main
from megavod.data.predictions import read_predictions
from megavod.data.video import open_source
from megavod.methods import build_detector

MAX_WEIGHTS_BYTES = 8 * 1024 * 1024


def test_shipped_weights_are_small_and_fill_the_model_exactly():
    weights, config = demo.shipped_weights()
    assert weights is not None, f"no shipped weights in {demo.WEIGHTS_DIR}"
    assert weights.stat().st_size < MAX_WEIGHTS_BYTES
    assert config.is_file()
    cfg, model, used = demo.build_demo_model()  # strict: every tensor filled, none left over
    assert used == weights and cfg.method == "mega" and cfg.mega.memory
    # Trained, not the initialisation: the classifier differs from a freshly built model's.
    torch.manual_seed(0)
    fresh = build_detector(cfg)
    trained = model.roi_heads.box.predictor.cls_score.weight
    assert trained.dtype == torch.float32
    assert not torch.allclose(trained, fresh.roi_heads.box.predictor.cls_score.weight)


def test_shipped_weights_load_like_any_checkpoint():
    """`megavod detect --weights megavod/weights/synthetic_mega.safetensors` needs no --config: the
    file records its whole config, equal to the YAML beside it."""
    from megavod.methods import load_detector
    from megavod.config import load_config

    weights, config = demo.shipped_weights()
    model, cfg = load_detector(weights)
    assert cfg == load_config(str(config))
    assert model.roi_heads.box.predictor.cls_score.weight.dtype == torch.float32


def test_demo_writes_video_predictions_and_summary(tmp_path, one_thread):
    s = demo.run_demo(tmp_path, frames=8, width=192, height=144, progress=False)
    assert set(s.outputs) == {"mp4", "json", "csv"}
    assert all(p.is_file() and p.stat().st_size > 0 for p in s.outputs.values())
    with open_source(str(s.outputs["mp4"])) as video:
        frames = list(video)
    assert len(frames) == 8 and frames[0].shape == (144, 192, 3)
    (pred,) = read_predictions(s.outputs["json"])
    assert (pred.width, pred.height, len(pred.frames)) == (192, 144, 8)
    drawn = sum(int((f.detections.scores >= demo.SCORE_THRESH).sum()) for f in pred.frames)
    assert s.frames == 8 and s.detections == drawn == sum(s.per_class.values())
    assert s.weights is not None and s.ms_per_frame > 0
    # The shipped model (about 35 mAP on the benchmark's val set) finds objects of a clip it never
    # saw, with the right class; a wrong weight mapping or transform finds none.
    total = sum(s.ground_truth.values())
    assert total > 0 and s.correct >= 0.2 * total, (s.correct, total)
    text = demo.format_summary(s)
    assert "ms/frame" in text and "8 frames" in text and "shipped weights" in text
    assert len(text.splitlines()) <= 24  # one screen
    for name, count in s.per_class.items():
        assert f"{name:<12}{count:>5} /" in text


def test_missing_weights_say_the_model_is_untrained(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setattr(demo, "WEIGHTS_DIR", tmp_path / "no-weights")
    s = demo.run_demo(tmp_path / "out", frames=2, width=64, height=48, progress=False)
    assert s.weights is None
    assert "UNTRAINED" in capsys.readouterr().err
    assert "UNTRAINED" in demo.format_summary(s)
    assert all(p.is_file() for p in s.outputs.values())


def test_cli_demo_prints_the_summary(tmp_path, monkeypatch, capsys, one_thread):
    real = demo.run_demo
    monkeypatch.setattr(demo, "run_demo", lambda out: real(out, frames=3, width=96, height=64, progress=False))
    assert cli_main(["demo", "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "megavod demo: MEGA" in out and "ms/frame" in out
    assert json.loads((tmp_path / "d" / "demo.json").read_text())["format"] == "megavod.predictions"
