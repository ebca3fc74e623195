"""MEGA's training forward (docs/conventions.md#training-forward) through the shared dataset, and the CLI end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from megavod.config import load_config
from megavod.data.synthetic import generate_synthetic_dataset
from megavod.data.vid_dataset import build_train_dataset
from megavod.methods import build_detector

SMALL = ["mega.T_l=5", "mega.T_g=3", "mega.T_m=4", "model.rpn.post_nms_top_n_test=40",
         "model.rpn.ref_post_nms_top_n=10", "input.min_size_train=[96]", "input.max_size_train=128",
         "input.min_size_test=96", "input.max_size_test=128"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic_dataset(root, num_train_videos=2, num_val_videos=1, frames=10, size=96, seed=0,
                               num_det_images=2)
    return root


def test_training_losses_and_gradients(data):
    cfg = load_config("synthetic_mega", SMALL)
    model = build_detector(cfg).train()
    dataset = build_train_dataset(cfg, data)
    video = next(i for i in range(len(dataset)) if dataset[i].is_video)
    sample = dataset[video]
    assert {k: len(v) for k, v in sample.refs.items()} == {"local": 2, "memory": 3, "global": 2}
    memory_calls = []
    agg = model.aggregator
    original = agg.memory_from_frames
    agg.memory_from_frames = lambda frames, pool: memory_calls.append(len(frames)) or original(frames, pool)
    losses = model([sample])
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert memory_calls == [3]
    # Gradients reach the relation modules of every stage and the trainable backbone.
    for name in ("local_stages.0.Wq.weight", "local_stages.1.Wk.weight", "global_stages.0.Wq.weight",
                 "global_stages.1.Wq.weight", "fcs.0.weight"):
        grad = dict(agg.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert model.backbone.body.layer3[0].conv1.weight.grad.abs().sum() > 0


def test_a_still_image_trains_with_copies_of_itself(data):
    cfg = load_config("synthetic_mega", SMALL)
    model = build_detector(cfg).train()
    dataset = build_train_dataset(cfg, data)
    still = next(i for i in range(len(dataset)) if not dataset[i].is_video)
    losses = model([dataset[still]])
    assert all(torch.isfinite(v) for v in losses.values())


def test_train_then_detect_then_eval_from_the_command_line(data, tmp_path):
    run = [sys.executable, "-m", "megavod"]
    common = SMALL + ["solver.max_iter=2", "solver.checkpoint_period=1"]
    subprocess.run(run + ["train", "--config", "synthetic_mega", "--data", str(data), "--out",
                          str(tmp_path / "run"), *common], check=True, capture_output=True)
    video = next((data / "Data" / "VID" / "val").iterdir())
    out = tmp_path / "det"
    proc = subprocess.run(run + ["detect", str(video), "--config", "synthetic_mega", "--weights",
                                 str(tmp_path / "run" / "model_final.pth"), "--out", str(out), *SMALL],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    pred = out / f"{video.name}.json"
    assert {p.suffix for p in out.iterdir()} == {".json", ".csv", ".mp4"}
    frames = json.loads(pred.read_text())["videos"][0]["frames"]
    assert len(frames) == 10
    proc = subprocess.run(run + ["eval", "--data", str(data), "--pred", str(pred), "--out", str(tmp_path / "eval")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "eval" / "eval.json").exists()
