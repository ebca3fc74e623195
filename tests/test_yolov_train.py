"""Training YOLOX and then YOLOV through `megavod train` on a tiny synthetic set: the base detector first,
then the video model initialised from it (`model.init_weights`) with the authors' frozen parts."""

from __future__ import annotations

import warnings

import pytest
import torch

import megavod
from megavod.data.synthetic import generate_synthetic_dataset

TINY = {"input.letterbox": 64, "input.letterbox_train": [64], "solver.max_iter": 2, "solver.warmup_iters": 1,
        "solver.steps": [1], "solver.checkpoint_period": 2, "data.num_workers": 0, "solver.bf16": False}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic_dataset(root, num_train_videos=2, num_val_videos=1, frames=8, size=64, num_det_images=1)
    return root


def test_yolox_then_yolov(synth, tmp_path, one_thread):
    base = megavod.train("yolox_s_vid", synth, tmp_path / "yolox", **TINY, **{"yolox.width": 0.125})
    video = megavod.train("yolov_s", synth, tmp_path / "yolov", **TINY,
                          **{"yolov.width": 0.125, "yolov.train_frames": 4, "model.init_weights": str(base)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yolox = megavod.load(weights=base, device="cpu").model
        yolov = megavod.load(weights=video, device="cpu").model
        fresh = megavod.load("yolov_s", device="cpu", **{"yolov.width": 0.125}).model.state_dict()
    # the frozen parts (backbone, stems, cls_convs, reg_convs, reg_preds) are the base detector's; the
    # trained ones (cls_preds, obj_preds, cls_convs2, the aggregation) moved
    base_state, video_state = yolox.state_dict(), yolov.state_dict()
    frozen = [k for k in base_state if k.startswith(("backbone.", "head.stems.", "head.cls_convs.", "head.reg_convs.",
                                                     "head.reg_preds.")) and "running" not in k and "num_batches" not in k]
    assert frozen and all(torch.equal(base_state[k], video_state[k]) for k in frozen)
    assert not torch.equal(base_state["head.obj_preds.0.weight"], video_state["head.obj_preds.0.weight"])
    assert not torch.equal(fresh["head.trans.linear1.weight"], video_state["head.trans.linear1.weight"])


def test_yolov_samples_are_frames_of_one_video(synth):
    from megavod.config import load_config
    from megavod.data.vid_dataset import build_train_dataset

    cfg = load_config("yolov_s", ["input.letterbox=64", "input.letterbox_train=[64]", "yolov.train_frames=4"])
    dataset = build_train_dataset(cfg, synth)
    sample = dataset[0]
    assert len(sample.refs["frames"]) == 3 and len(sample.ref_targets["frames"]) == 3
    assert sample.image.shape == (3, 64, 64) and all(r.shape == (3, 64, 64) for r in sample.refs["frames"])
