"""``megavod reproduce synthetic`` on a tiny budget: every output, resuming, settings, the table."""

from __future__ import annotations

import json
from argparse import Namespace
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from megavod.config import load_config
from megavod.apps.demo import build_demo_model
from megavod.errors import MegavodError
from megavod.train.checkpoint import load_checkpoint
from megavod.methods import load_detector
from megavod.apps.reproduce import (
    METHODS,
    YOLO_METHODS,
    ReproduceSettings,
    YoloReproduceSettings,
    budget_overrides,
    calibrate_model,
    load_pretrained,
    main,
    reproduce_synthetic,
    reproduce_synthetic_yolo,
)
from megavod.apps.reproduce_report import format_table

TINY = dict(videos=2, frames=6, size=64, iterations=2, pretrain_iterations=2)


def test_presets_differ_only_in_method_and_memory():
    """The comparison is fair: same detector, input, solver and seed; only method / memory differ, and
    the base model reads as many reference frames per iteration as MEGA (memory slots spent on local)."""
    single, base, mega = (load_config(preset) for _, preset, _ in METHODS)
    for cfg in (base, mega):
        assert cfg.model == single.model
        assert cfg.input == single.input
        assert cfg.solver == single.solver
        assert cfg.data == single.data and cfg.seed == single.seed
    assert (single.method, base.method, mega.method) == ("single", "mega", "mega")
    assert not base.mega.memory and mega.mega.memory
    m = mega.mega
    assert base.mega.train_local_refs == m.train_local_refs + m.train_memory_refs
    assert base.mega.train_local_refs + base.mega.train_global_refs == m.train_local_refs + m.train_memory_refs + m.train_global_refs
    base.mega.memory = True
    base.mega.train_local_refs = m.train_local_refs
    assert base.mega == mega.mega and base.relation == mega.relation


def test_budget_overrides_scale_the_schedule():
    assert budget_overrides(None) == []
    cfg = load_config("synthetic_mega", budget_overrides(1000))
    assert cfg.solver.max_iter == 1000
    assert tuple(cfg.solver.steps) == (750,)
    assert cfg.solver.warmup_iters == 100
    assert cfg.solver.checkpoint_period == 250
    tiny = load_config("synthetic_single", budget_overrides(2))
    assert (tiny.solver.max_iter, tuple(tiny.solver.steps), tiny.solver.warmup_iters) == (2, (1,), 1)


def test_format_table_gains_over_the_row_above():
    rows = [
        {"name": "A", "map": {"all": 50.0, "slow": 60.0, "medium": 50.0, "fast": 40.0}, "timing": {"ms_per_frame": 10.0}},
        {"name": "B", "map": {"all": 54.25, "slow": 61.0, "medium": None, "fast": 45.0, "cue_hidden": 30.5,
                                "cue_visible": 70.0}, "timing": {"ms_per_frame": 20.0}},
    ]
    lines = format_table(rows).splitlines()
    assert lines[2] == "| A | 50.0 |  | 60.0 | 50.0 | 40.0 | – | – | 10.0 |"
    assert lines[3] == "| B | 54.2 | +4.2 | 61.0 | – | 45.0 | 30.5 | 70.0 | 20.0 |"


def test_settings_split_like_megavod_synth():
    s = ReproduceSettings()
    assert (s.num_train, s.num_val) == (80, 20)
    assert (ReproduceSettings(videos=2).num_train, ReproduceSettings(videos=2).num_val) == (1, 1)
    with pytest.raises(MegavodError, match="videos"):
        ReproduceSettings(videos=1).check()


def test_tiny_reproduction_writes_table_plot_and_results_then_resumes(tmp_path, capsys, one_thread):
    out = tmp_path / "repro"
    results = reproduce_synthetic(out, ReproduceSettings(**TINY), progress=False)
    for name in ("table.md", "table.png", "results.json", "settings.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert [r["key"] for r in saved["rows"]] == ["single", "base", "mega"]
    for row in saved["rows"]:
        assert row["iterations"] == 2
        assert set(row["map"]) >= {"all"} and 0.0 <= row["map"]["all"] <= 100.0
        assert all(v is None or 0.0 <= v <= 100.0 for v in row["map"].values())
        assert row["timing"]["frames"] == 6 and row["timing"]["ms_per_frame"] > 0
        assert (out / "runs" / row["key"] / "model_final.pth").is_file()
        assert (out / "pred" / f"{row['key']}.json").is_file()
    assert (out / "runs" / "pretrain" / "model_final.pth").is_file()
    for _, preset, _ in METHODS:  # each model exported as megavod/weights/ ships it, and loadable
        cfg, _, used = build_demo_model(out / "weights" / f"{preset}.safetensors", out / "weights" / f"{preset}.yaml")
        assert cfg.name == preset and used is not None
        assert load_detector(used)[1] == cfg  # the file records its config: `detect --weights` alone
    table = (out / "table.md").read_text()
    assert all(name in table for _, _, name in METHODS)
    assert results["rows"][2]["map"] == saved["rows"][2]["map"]

    # Running again resumes: nothing is trained or detected again, the same table comes out.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("model_final.pth")}
    stamps.update({p: p.stat().st_mtime_ns for p in (out / "pred").glob("*.json")})
    capsys.readouterr()
    again = reproduce_synthetic(out, ReproduceSettings(**TINY), progress=False)
    log = capsys.readouterr().out
    assert "reusing" in log and "predictions exist" in log
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert [r["map"] for r in again["rows"]] == [r["map"] for r in saved["rows"]]

    # Other settings in the same folder are refused rather than mixed with the earlier run.
    with pytest.raises(MegavodError, match="other settings"):
        reproduce_synthetic(out, ReproduceSettings(**{**TINY, "iterations": 3}), progress=False)

    # The methods trained side by side in their own processes (--jobs) end with the same weights.
    parallel = tmp_path / "parallel"
    capsys.readouterr()
    reproduce_synthetic(parallel, ReproduceSettings(**TINY), progress=False, jobs=3)
    assert "3 at a time" in capsys.readouterr().out
    for key, _, _ in METHODS:
        mine = load_checkpoint(parallel / "runs" / key / "model_final.pth")["model"]
        theirs = load_checkpoint(out / "runs" / key / "model_final.pth")["model"]
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), key


def test_main_reads_budget_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGAVOD_REPRODUCE_ITERATIONS", "zero")
    with pytest.raises(MegavodError, match="iterations must be an integer"):
        main(Namespace(experiment="synthetic", out=tmp_path / "x"))
    monkeypatch.setenv("MEGAVOD_REPRODUCE_ITERATIONS", "0")
    with pytest.raises(MegavodError, match="iterations must be >= 1"):
        main(Namespace(experiment="synthetic", out=tmp_path / "x"))
    monkeypatch.setenv("MEGAVOD_REPRODUCE_ITERATIONS", "2")
    with pytest.raises(MegavodError, match="jobs must be >= 1"):
        main(Namespace(experiment="synthetic", out=tmp_path / "x", jobs=0))
    assert not (tmp_path / "x").exists()


def test_pretrained_single_frame_detector_initialises_every_method(tmp_path, one_thread):
    """MEGA gets the single-frame detector's every tensor (fc6/fc7 as its first two FCs); only the
    relation modules start fresh. A tensor with no place is an error, not silently dropped."""
    from megavod.methods import build_detector

    torch.manual_seed(1)
    single = build_detector(load_config("synthetic_single"))
    path = tmp_path / "single.pth"
    torch.save({"model": single.state_dict()}, path)
    assert load_pretrained(build_detector(load_config("synthetic_single")), path) == []
    mega = build_detector(load_config("synthetic_mega"))
    fresh = load_pretrained(mega, path)
    assert fresh and all(".local_stages." in k or ".global_stages." in k for k in fresh)
    agg = mega.roi_heads.box.feature_extractor.aggregator
    head = single.roi_heads.box.feature_extractor
    assert torch.equal(agg.fcs[0].weight, head.fc6.weight) and torch.equal(agg.fcs[1].bias, head.fc7.bias)
    assert torch.equal(mega.rpn.head.conv.weight, single.rpn.head.conv.weight)
    bad = {"model": {**single.state_dict(), "extra.weight": torch.zeros(1)}}
    torch.save(bad, path)
    with pytest.raises(MegavodError, match="extra.weight"):
        load_pretrained(build_detector(load_config("synthetic_mega")), path)


def test_calibration_normalises_the_random_backbone(one_thread):
    from megavod.methods import build_detector

    class Images:
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.items = [type("S", (), {"image": torch.rand(3, 64, 96, generator=g) * 255 - 110})() for _ in range(6)]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    model = build_detector(load_config("synthetic_single")).eval()
    images = torch.stack([s.image for s in Images().items])
    with torch.no_grad():
        before = model.backbone(images)
        calibrate_model(model, Images(), count=4)
        after = model.backbone(images)
    # Raw: the activations' scale is whatever the init gives; calibrated: roughly unit scale.
    assert not 0.3 < float(before.std()) < 3.0
    assert 0.3 < float(after.std()) < 3.0


def _cue_dataset(root: Path) -> list:
    """Two val videos of 4 frames, one object each: video 0 is an airplane whose cue is hidden in
    frames 2-3, video 1 an antelope always visible."""
    from megavod.data.image_sets import ImageSetEntry, write_image_set
    from megavod.data.vid_xml import write_annotation
    from megavod.structures import FrameAnnotation

    anns, entries = [], []
    for v in range(2):
        video = f"val/ILSVRC2015_val_{v:08d}"
        for f in range(4):
            ann = FrameAnnotation(
                video, f, 320, 240, torch.tensor([[10.0 + 50 * v, 20, 110 + 50 * v, 120]]), torch.tensor([v + 1]),
                torch.tensor([0]), occluded=torch.tensor([v == 0 and f >= 2]),
            )
            write_annotation(root / "Annotations" / "VID" / video / f"{f:06d}.xml", ann, video, f"{f:06d}")
            anns.append(ann)
            entries.append(ImageSetEntry(video, f, 4, len(entries) + 1))
    (root / "ImageSets").mkdir(parents=True)
    write_image_set(root / "ImageSets" / "VID_val_videos.txt", entries)
    return anns


def test_cue_visibility_map_splits_hidden_from_visible_boxes(tmp_path):
    from megavod.data.predictions import FramePrediction, VideoPredictions, write_predictions
    from megavod.evaluation.vid_eval import load_for_evaluation
    from megavod.apps.reproduce_report import cue_visibility_maps
    from megavod.structures import Detections

    anns = _cue_dataset(tmp_path / "data")
    pred = tmp_path / "pred.json"

    def write(label_of_hidden: int) -> None:
        videos = {}
        for a in anns:
            hidden = bool(a.occluded[0])
            label = torch.tensor([label_of_hidden]) if hidden else a.labels
            score = torch.tensor([0.5 if hidden else 0.9])
            videos.setdefault(a.video, VideoPredictions(a.video, 320, 240, [])).frames.append(
                FramePrediction(a.frame, None, Detections(a.boxes, score, label)))
        write_predictions(pred, list(videos.values()))

    # Hidden airplanes called antelopes (a single frame's guess): no hidden box is found (airplane AP 0
    # on them, antelope has no hidden box), while on the visible boxes both classes are perfect (the
    # wrong antelopes rank below every true one).
    write(label_of_hidden=2)
    maps = cue_visibility_maps(*load_for_evaluation(tmp_path / "data", pred)[:2])
    far = maps.pop("cue_hidden_far")  # within the default window every hidden frame is near: no far box
    assert far != far and maps == {"cue_hidden": 0.0, "cue_visible": 100.0, "cue_hidden_near": 0.0}
    # Called right, every subset is perfect.
    write(label_of_hidden=1)
    maps = cue_visibility_maps(*load_for_evaluation(tmp_path / "data", pred)[:2])
    maps.pop("cue_hidden_far")
    assert maps == {"cue_hidden": 100.0, "cue_visible": 100.0, "cue_hidden_near": 100.0}


def test_hidden_cue_boxes_split_by_distance_to_a_visible_frame(tmp_path):
    """The airplane's cue is visible in frames 0-1 and hidden in 2-3: with a window of 1 frame, frame 2
    (1 frame from a visible one) is near, frame 3 (2 frames) far. Right on frame 2 only: near 100, far 0."""
    from megavod.data.predictions import FramePrediction, VideoPredictions, write_predictions
    from megavod.evaluation.vid_eval import load_for_evaluation
    from megavod.apps.reproduce_report import CUE_WINDOW, cue_visibility_maps
    from megavod.structures import Detections

    assert CUE_WINDOW == (load_config("synthetic_mega").mega.T_l - 1) // 2
    anns = _cue_dataset(tmp_path / "data")
    videos = {}
    for a in anns:
        label = torch.tensor([2]) if (a.video.endswith("0") and a.frame == 3) else a.labels
        videos.setdefault(a.video, VideoPredictions(a.video, 320, 240, [])).frames.append(
            FramePrediction(a.frame, None, Detections(a.boxes, torch.tensor([0.9]), label)))
    write_predictions(tmp_path / "pred.json", list(videos.values()))
    loaded = load_for_evaluation(tmp_path / "data", tmp_path / "pred.json")[:2]
    maps = cue_visibility_maps(*loaded, window=1)
    assert (maps["cue_hidden_near"], maps["cue_hidden_far"]) == pytest.approx((100.0, 0.0))
    # one of the two hidden airplanes found, no false positive ranked above it
    assert maps["cue_hidden"] == pytest.approx(50.0)
    wide = cue_visibility_maps(*loaded, window=2)  # both hidden frames within reach: none is far
    assert wide["cue_hidden_near"] == pytest.approx(50.0) and wide["cue_hidden_far"] != wide["cue_hidden_far"]


TINY_YOLO = dict(videos=2, frames=6, size=64, yolox_iterations=2, yolov_iterations=2)


def test_yolo_presets_share_network_input_and_test_set():
    """YOLOV is the same network and input as the YOLOX it starts from; it trains on whole videos (VID
    frames only, as the authors'); both letterbox the benchmark's 192 px frames at their own size."""
    yolox, yolov = (load_config(preset) for _, preset, _ in YOLO_METHODS)
    assert (yolox.method, yolov.method) == ("yolox", "yolov")
    assert (yolov.yolov.depth, yolov.yolov.width) == (yolox.yolox.depth, yolox.yolox.width)
    assert yolox.input == yolov.input and yolox.input.letterbox == ReproduceSettings().size
    assert yolox.seed == yolov.seed and yolox.data.test_set == yolov.data.test_set == "VID_val_videos"
    assert tuple(yolov.data.train_sets) == ("VID_train_15frames",)
    assert yolox.model.init_weights is None and yolov.model.init_weights is None  # set by the reproduction


def test_tiny_yolo_reproduction_trains_yolov_from_yolox_then_resumes(tmp_path, capsys, one_thread):
    out = tmp_path / "yolo"
    results = reproduce_synthetic_yolo(out, YoloReproduceSettings(**TINY_YOLO), progress=False)
    for name in ("table.md", "table.png", "results.json", "settings.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    assert saved["experiment"] == "synthetic-yolo" and saved["settings"] == asdict(YoloReproduceSettings(**TINY_YOLO))
    assert [r["key"] for r in saved["rows"]] == ["yolox", "yolov"]
    for row in saved["rows"]:
        assert row["iterations"] == 2
        assert {"all", "cue_hidden", "cue_visible"} <= set(row["map"])
        assert all(v is None or 0.0 <= v <= 100.0 for v in row["map"].values())
        assert row["timing"]["frames"] == 6 and row["timing"]["ms_per_frame"] > 0
    # YOLOV starts from the YOLOX just trained: the parts the authors freeze are YOLOX's, bit for bit.
    yolox_final, yolov_final = (out / "runs" / key / "model_final.pth" for key, _, _ in YOLO_METHODS)
    yolov_cfg = load_checkpoint(yolov_final)["config"]
    assert yolov_cfg["model"]["init_weights"] == str(yolox_final)
    base, video = load_checkpoint(yolox_final)["model"], load_checkpoint(yolov_final)["model"]
    frozen = [k for k in base if k.startswith(("backbone.", "head.stems.", "head.reg_preds.")) and k.endswith("weight")]
    assert frozen and all(torch.equal(base[k], video[k]) for k in frozen)
    assert "head.trans.linear1.weight" in video and "head.trans.linear1.weight" not in base
    for _, preset, _ in YOLO_METHODS:  # exported as megavod/weights/ ships them, loadable by the file alone
        cfg = load_detector(out / "weights" / f"{preset}.safetensors")[1]
        assert cfg.name == preset
    table = (out / "table.md").read_text()
    assert "| YOLOX |" in table and "| YOLOV |" in table and "from scratch 2 iterations" in table
    assert "draws its 32 frames from the whole video" in table and "memory or global" not in table

    # Running again resumes: nothing is trained or detected again, the same table comes out.
    stamps = {p: p.stat().st_mtime_ns for p in [*(out / "runs").rglob("model_final.pth"), *(out / "pred").glob("*")]}
    capsys.readouterr()
    again = reproduce_synthetic_yolo(out, YoloReproduceSettings(**TINY_YOLO), progress=False)
    assert "predictions exist" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert [r["map"] for r in again["rows"]] == [r["map"] for r in results["rows"]]

    # Other budgets, or the MEGA family's reproduction, in the same folder are refused.
    with pytest.raises(MegavodError, match="other settings"):
        reproduce_synthetic_yolo(out, YoloReproduceSettings(**{**TINY_YOLO, "yolov_iterations": 3}), progress=False)
    with pytest.raises(MegavodError, match="other settings"):
        reproduce_synthetic(out, ReproduceSettings(**TINY), progress=False)


def test_main_yolo_budgets_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGAVOD_REPRODUCE_YOLOV_ITERATIONS", "0")
    with pytest.raises(MegavodError, match="yolov-iterations must be >= 1"):
        main(Namespace(experiment="synthetic-yolo", out=tmp_path / "x"))
    monkeypatch.setenv("MEGAVOD_REPRODUCE_YOLOV_ITERATIONS", "2")
    with pytest.raises(MegavodError, match="--jobs does not apply"):
        main(Namespace(experiment="synthetic-yolo", out=tmp_path / "x", jobs=2))
    with pytest.raises(MegavodError, match="unknown experiment"):
        main(Namespace(experiment="table9", out=tmp_path / "x"))
    assert not (tmp_path / "x").exists()
