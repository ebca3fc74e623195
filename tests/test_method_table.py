"""The method table: every method is one row, and a new method is one module plus one registration.

The toy method below ("average the window's C4 maps, then the single-frame RPN and box head") lives in
this file only, its hyper-parameter (the window) in its own config section; it runs through ``detect``
(API and CLI), ``train``, ``bench`` and the config's YAML and overrides without any other file knowing
it (docs/architecture.md#adding-a-method).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import megavod
from megavod.apps.bench import run_bench
from megavod.apps.cli import main as cli_main
from megavod.checkpoints.loading import config_from_record
from megavod.config import dump_config, to_dict
from megavod.config_checks import require
from megavod.data.sampling import OffsetSampler
from megavod.data.synthetic import generate_synthetic_dataset
from megavod.inference.schedules import FlowWindowSchedule, build_schedule
from megavod.models.contract import KeyFrameInputs, KeyFrameOutput, VideoDetector
from megavod.models.single_frame import build_single_frame_detector
from megavod.registry import MethodSpec, get_method, method_names, register_method, unregister_method
from megavod.structures import FrameMaps

SMALL = ["input.min_size_train=[48]", "input.max_size_train=64", "input.min_size_test=48",
         "input.max_size_test=64"]


# -- the toy method: one module's worth of code -----------------------------------------------------------


class WindowAverageDetector(nn.Module):
    """The single-frame detector's parts; the key frame's C4 is the mean of its window's."""

    def __init__(self, single: nn.Module) -> None:
        super().__init__()
        self.backbone, self.rpn, self.roi_heads = single.backbone, single.rpn, single.roi_heads

    def frame_features(self, image: Tensor, index: int, original_size: tuple[int, int]) -> FrameMaps:
        return FrameMaps(index, image, self.backbone(image[None])[0], None, tuple(image.shape[-2:]), original_size)

    def new_stream_cache(self) -> None:
        return None

    def detect_key(self, inputs: KeyFrameInputs[FrameMaps], cache: None = None) -> KeyFrameOutput:
        key = inputs.key
        c4 = torch.stack([f.c4 for f in inputs.local]).mean(0, keepdim=True)
        proposals, _ = self.rpn(c4, [key.image_size], None)
        det = self.roi_heads["box"](c4, proposals, [key.image_size], None)[0]
        (h, w), (oh, ow) = key.image_size, key.original_size
        return KeyFrameOutput(det.scale(ow / w, oh / h))

    def forward(self, batch: Sequence[Any]) -> dict[str, Tensor]:
        sample = batch[0]
        c4 = self.backbone(torch.stack([sample.image, *sample.refs["ref"]])).mean(0, keepdim=True)
        size, target = [sample.image_size], [sample.target]
        proposals, rpn_losses = self.rpn(c4, size, target)
        return {**rpn_losses, **self.roi_heads["box"](c4, proposals, size, target)}


@dataclass
class WindowAverageConfig:
    """The toy's config section: ``window_average.window`` in YAML and overrides."""

    window: int = 3  # frames averaged at a key frame, the key in the middle

    @property
    def half(self) -> int:
        """Frames on each side of the key."""
        return self.window // 2

    def validate(self, cfg: Any, key: str) -> None:
        require(self.window >= 3 and self.window % 2 == 1, f"{key}.window", "an odd number >= 3", self.window)


TOY = MethodSpec(
    name="window_average", title="window average",
    build=lambda cfg: WindowAverageDetector(build_single_frame_detector(cfg)),
    schedule=lambda cfg: FlowWindowSchedule(-cfg.window_average.half, cfg.window_average.half),
    reference_sampler=lambda cfg: OffsetSampler(-cfg.window_average.half, cfg.window_average.half, 2),
    config_key="window_average", config_type=WindowAverageConfig,
)


@pytest.fixture
def toy(tmp_path):
    register_method(TOY)
    path = tmp_path / "window_average.yaml"
    path.write_text("_base_: synthetic_single\nmethod: window_average\n")
    try:
        yield str(path)
    finally:
        unregister_method(TOY.name)


# -- the table --------------------------------------------------------------------------------------------


def test_builtin_methods_are_the_table():
    assert method_names()[:5] == ["single", "mega", "rdn", "fgfa", "dff"]
    for name, preset in [("single", "single_R_101"), ("mega", "mega_R_101"), ("rdn", "rdn_R_101"),
                         ("fgfa", "fgfa_R_101"), ("dff", "dff_R_101")]:
        spec = get_method(name)
        cfg = megavod.load_config(preset)
        assert spec.checkpoint is not None and build_schedule(cfg) == spec.schedule(cfg)
        assert (spec.reference_sampler(cfg) is None) == (name == "single")
    with pytest.raises(megavod.ConfigError, match="config key 'method': expected one of 'single', 'mega'"):
        get_method("yolo")
    with pytest.raises(ValueError, match="already registered"):
        register_method(get_method("mega"))


def test_every_builtin_detector_follows_the_contract():
    for name in ["single", "mega", "rdn", "fgfa", "dff"]:
        cfg = megavod.load_config("synthetic_single" if name != "mega" else "synthetic_mega",
                                  [] if name in ("single", "mega") else [f"method={name}"])
        assert isinstance(megavod.methods.build_detector(cfg), VideoDetector), name


# -- a new method through detect, train and bench ----------------------------------------------------------


def test_toy_method_detects_through_the_api_and_the_cli(toy, tmp_path):
    detector = megavod.load(toy, **dict(o.split("=") for o in SMALL[2:]))
    assert detector.cfg.method == "window_average" and isinstance(detector.model, WindowAverageDetector)
    rng = np.random.default_rng(0)
    clip = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(4)]
    seen = []
    original = detector.model.detect_key
    detector.model.detect_key = lambda inputs, cache=None: seen.append([f.index for f in inputs.local]) or original(inputs, cache)
    results = list(detector.stream(clip, "offline"))
    assert [r.frame for r in results] == [0, 1, 2, 3]
    assert seen == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]  # the schedule's windows, clipped
    # The window comes from the toy's own section: an override widens it.
    wide = megavod.load(toy, **dict(o.split("=") for o in SMALL[2:]), **{"window_average.window": 5})
    assert wide.cfg.window_average.window == 5
    seen.clear()
    original_wide = wide.model.detect_key
    wide.model.detect_key = lambda inputs, cache=None: seen.append([f.index for f in inputs.local]) or original_wide(inputs, cache)
    assert len(list(wide.stream(clip, "offline"))) == 4
    assert seen[1] == [0, 0, 1, 2, 3] and all(len(window) == 5 for window in seen)
    # The same frames through the command line.
    folder = tmp_path / "clip"
    folder.mkdir()
    from PIL import Image

    for t, frame in enumerate(clip):
        Image.fromarray(frame).save(folder / f"{t:06d}.png")
    assert cli_main(["detect", str(folder), "--config", toy, "--out", str(tmp_path / "out"), "--device", "cpu",
                     *SMALL[2:]]) == 0
    doc = json.loads((tmp_path / "out" / "clip.json").read_text())
    assert [f["frame"] for f in doc["videos"][0]["frames"]] == [0, 1, 2, 3]


def test_toy_method_trains_a_few_steps(toy, tmp_path):
    generate_synthetic_dataset(tmp_path / "data", 1, 0, frames=12, size=64, num_det_images=2)
    final = megavod.train(toy, tmp_path / "data", tmp_path / "run", **{
        "solver.max_iter": 2, "solver.warmup_iters": 1, "solver.steps": [1], "solver.checkpoint_period": 2,
        **dict(o.split("=") for o in SMALL[1:]), "input.min_size_train": [48], "window_average.window": 5})
    assert final.is_file()
    detector = megavod.load(weights=final, config=toy)
    assert isinstance(detector.model, WindowAverageDetector)
    # Without --config the checkpoint's recorded config comes back, the toy's section with it.
    recorded = megavod.load(weights=final)
    assert recorded.cfg.window_average.window == 5 and recorded.schedule == FlowWindowSchedule(-2, 2)


def test_toy_method_benches(toy):
    (result,) = run_bench([toy], num_frames=3, size=48, warmup=0)
    assert result.method == "window_average" and result.video_ms > 0 and len(result.videos[0].pass_s) == 0


# -- the toy's own config section --------------------------------------------------------------------------


def test_toy_section_reads_yaml_and_overrides(toy, tmp_path):
    assert megavod.load_config(toy).window_average.window == 3  # the section's default
    assert megavod.load_config(toy, ["window_average.window=7"]).window_average.window == 7
    path = tmp_path / "wide.yaml"
    path.write_text(f"_base_: {toy}\nwindow_average: {{window: 5}}\n")
    cfg = megavod.load_config(str(path))
    assert cfg.window_average.window == 5 and build_schedule(cfg) == FlowWindowSchedule(-2, 2)


@pytest.mark.parametrize("override, message", [
    ("window_average.window=4", "config key 'window_average.window': must be an odd number >= 3 (got 4)"),
    ("window_average.size=3", "unknown config key 'window_average.size' (allowed here: window)"),
    ("mega.T_g=3", "config key 'mega.T_g': method 'window_average' has no section 'mega' (the section of method "
                   "'mega'; its own is 'window_average')"),
    ("toy.window=3", "unknown config key 'toy'"),
])
def test_toy_section_errors_are_one_line_naming_the_key(toy, override, message):
    with pytest.raises(megavod.ConfigError) as err:
        megavod.load_config(toy, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_toy_section_through_the_cli_is_one_line(toy, tmp_path, capsys):
    assert cli_main(["detect", str(tmp_path), "--config", toy, "--device", "cpu", "window_average.window=2"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "config key 'window_average.window': must be an odd number >= 3 (got 2)" in line


@pytest.mark.parametrize("preset, overrides", [("synthetic_mega", ["mega.T_m=5"]), ("toy", ["window_average.window=5"])])
def test_config_round_trip_through_yaml_and_records(toy, tmp_path, preset, overrides):
    cfg = megavod.load_config(toy if preset == "toy" else preset, overrides)
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_config(cfg))
    again = megavod.load_config(str(path))
    again.name = cfg.name
    assert again == cfg and again.section == cfg.section
    assert config_from_record(to_dict(cfg)) == cfg  # what a checkpoint records
