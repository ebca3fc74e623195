"""The authors' YOLOX and YOLOV files (YuHengsss/YOLOV: ``{"start_epoch", "model", "optimizer"}``):
recognised from their keys (YOLOX vs YOLOV, S/L/X), loaded strictly through ``megavod.load(weights=...)``,
``megavod detect --weights`` and ``megavod convert``, refused in one line naming the key when a key or a
shape does not fit. Synthetic files are built from the listings in tests/data/checkpoint_keys/yolov/
(every tensor a constant: its index in the listing, so that each one's arrival is checked)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import megavod
from megavod.apps.cli import main as cli_main
from megavod.checkpoint_files import read_weights, sidecar_path
from megavod.checkpoints import signatures
from megavod.checkpoints.loading import match_state_dict, resolve_config
from megavod.checkpoints.recognise import YOLOXSignature, config_for, recognise, signature_of_config
from megavod.config import load_config
from megavod.errors import ConfigError, MegavodError
from megavod.methods import load_detector
from megavod.methods.convert import convert, shape_model
from megavod.models.yolox import SIZES, build_yolox
from megavod.registry import get_method, register_method
from test_yolox import yolov_listing

# listing -> (method, description, preset)
RELEASED = {
    "yolox_s_vid": ("yolox", "YOLOX-S", "yolox_s_vid"),
    "yolox_l_vid": ("yolox", "YOLOX-L", "yolox_l_vid"),
    "yolox_x_vid": ("yolox", "YOLOX-X", "yolox_x_vid"),
    "yolov_s": ("yolov", "YOLOV-S", "yolov_s"),
    "yolov_l": ("yolov", "YOLOV-L", "yolov_l"),
    "yolov_x": ("yolov", "YOLOV-X", "yolov_x"),
}


def shapes_of(name: str) -> dict[str, tuple[int, ...]]:
    return {k: shape for k, (shape, _) in yolov_listing(name).items()}


def marked_values(name: str) -> dict[str, Tensor]:
    """Every tensor of the listing filled with its index (the dtype the listing says)."""
    return {k: torch.full(shape, float(i), dtype=getattr(torch, dtype))
            for i, (k, (shape, dtype)) in enumerate(yolov_listing(name).items())}


def write_authors_file(path: Path, values: dict[str, Tensor], extra: object = None) -> Path:
    """The layout of their trainer's checkpoints (yolox/core/trainer.py::save_model)."""
    optimizer = {"state": {}, "param_groups": [{"lr": 0.0, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0,
                                                "params": [0, 1]}]}
    obj = {"start_epoch": 7, "model": values, "optimizer": optimizer}
    if extra is not None:
        obj["args"] = extra
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def yolo_rows():
    """The ``yolox`` / ``yolov`` rows of the method table with their checkpoint signatures (set here while
    a row does not carry one yet; restored afterwards)."""
    saved = {}
    for family in signatures.YOLO_FAMILIES:
        try:
            spec = get_method(family.method)
        except ConfigError:
            pytest.skip(f"method row {family.method!r} not registered yet")
        if spec.checkpoint is None:
            saved[family.method] = spec
            register_method(dataclasses.replace(spec, checkpoint=family), replace=True)
    yield
    for spec in saved.values():
        register_method(spec, replace=True)


# ----------------------------------------------------------------------------------------------
# Recognition


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_recognise_every_listing(name):
    method, description, preset = RELEASED[name]
    sig = recognise(shapes_of(name), name)
    assert isinstance(sig, YOLOXSignature)
    assert (sig.method, sig.describe(), sig.preset) == (method, description, preset)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_each_preset_builds_what_its_listing_holds(name, yolo_rows):
    method, _, preset = RELEASED[name]
    cfg = load_config(preset)
    assert signature_of_config(cfg) == recognise(shapes_of(name))
    assert config_for(recognise(shapes_of(name))).name == preset
    # The whole model the preset builds takes the listing key for key (on the meta device: shapes only).
    file = {k: torch.empty(shape, device="meta", dtype=getattr(torch, dtype))
            for k, (shape, dtype) in yolov_listing(name).items()}
    assert list(match_state_dict(shape_model(cfg), file, name)) == list(shape_model(cfg).state_dict())


def test_megavod_network_is_recognised_as_the_authors():
    depth, width = SIZES["L"]
    with torch.device("meta"):
        model = build_yolox(depth, width)
    assert recognise(model.state_dict()) == recognise(shapes_of("yolox_l_vid"))
    video = {**model.state_dict(), "head.trans.msa.qkv_cls.weight": torch.empty(768, 256, device="meta")}
    assert recognise(video).method == "yolov"


def test_other_sizes_get_the_fallback_preset_with_overrides(yolo_rows):
    """YOLOX-M's keys (stem 48, 2 bottlenecks) and 20 classes: the S preset with depth, width and classes."""
    with torch.device("meta"):
        model = build_yolox(0.67, 0.75, num_classes=20)
    sig = recognise(model.state_dict())
    assert (sig.describe(), sig.preset) == ("YOLOX-M (20 classes)", None)
    cfg = config_for(sig, ["yolox.test_conf=0.01"])
    assert (cfg.name, cfg.yolox.num_classes, cfg.yolox.width, cfg.yolox.test_conf) == ("yolox_s_vid", 20, 0.75, 0.01)
    assert signature_of_config(cfg) == sig


@pytest.mark.parametrize("keys,message", [
    ({"backbone.backbone.stem.conv.conv.weight": (32, 12, 3, 3), "head.agg.msa.qkv_cls.weight": (384, 128)},
     "x: holds a YOLOV++ head (head.agg.* keys), which megavod does not build; it builds YOLOX and YOLOV on CSPDarknet"),
    ({"backbone.backbone.patch_embed.proj.weight": (96, 3, 4, 4), "head.stems.0.conv.weight": (128, 192, 1, 1)},
     "x: holds a Swin or FocalNet backbone (backbone.backbone.patch_embed.* keys), which megavod does not build; "
     "it builds YOLOX and YOLOV on CSPDarknet"),
    ({"backbone.backbone.dark2.0.conv.weight": (64, 32, 3, 3)},
     "x: no 'backbone.backbone.stem.conv.conv.weight': not a complete YOLOX checkpoint"),
    ({"backbone.backbone.stem.conv.conv.weight": (32, 3, 3, 3)},
     "x: 'backbone.backbone.stem.conv.conv.weight' is [32, 3, 3, 3]: not YOLOX's Focus stem (12 input channels)"),
    ({"backbone.backbone.stem.conv.conv.weight": (32, 12, 3, 3), "head.cls_preds.0.weight": (30, 128)},
     "x: 'head.cls_preds.0.weight' is 2-d [30, 128], not a 4-d conv weight"),
])
def test_what_is_not_yolox_or_yolov_is_refused_in_one_line(keys, message):
    with pytest.raises(MegavodError) as e:
        recognise(keys, "x")
    assert str(e.value) == message


# ----------------------------------------------------------------------------------------------
# Loading the authors' files


@pytest.fixture(scope="module")
def yolov_s_file(tmp_path_factory):
    values = marked_values("yolov_s")
    return values, write_authors_file(tmp_path_factory.mktemp("yolov") / "yolov_s.pth", values)


def _assert_holds(model: nn.Module, values: dict[str, Tensor]) -> None:
    state = model.state_dict()
    assert set(state) == set(values)
    for k, v in values.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k].cpu(), v), k


@pytest.mark.parametrize("name", ["yolox_s_vid", "yolov_s"])
def test_authors_file_loads_strictly_through_megavod_load(name, yolo_rows, yolov_s_file, tmp_path):
    if name == "yolov_s":
        values, path = yolov_s_file
    else:
        values = marked_values(name)
        path = write_authors_file(tmp_path / f"{name}.pth", values)
    checkpoint = read_weights(path)
    assert (checkpoint.kind, checkpoint.dropped) == ("authors", ["start_epoch", "optimizer"])
    detector = megavod.load(weights=path, device="cpu")
    assert (detector.cfg.name, detector.cfg.method) == (name, RELEASED[name][0])
    _assert_holds(detector.model, values)


def test_a_file_of_the_other_family_is_refused_naming_both(yolo_rows, tmp_path):
    path = write_authors_file(tmp_path / "yolox_s.pth", marked_values("yolox_s_vid"))
    with pytest.raises(MegavodError) as e:
        load_detector(path, "yolov_s")
    message = str(e.value)
    assert message.startswith(f"{path}: the file holds YOLOX-S but the config 'yolov_s' builds YOLOV-S: "
                              "missing 44 key(s): head.cls_convs2.0.0.conv.weight (128, 128, 3, 3), ")
    assert message.endswith("; the file fits --config yolox_s_vid") and "\n" not in message


def test_missing_and_misshapen_keys_are_refused_in_one_line(yolo_rows, tmp_path):
    values = marked_values("yolov_s")
    del values["head.obj_preds.2.bias"]
    path = write_authors_file(tmp_path / "missing.pth", values)
    with pytest.raises(MegavodError) as e:
        megavod.load(weights=path, device="cpu")
    assert str(e.value) == f"{path}: does not match the model: missing 1 key(s): head.obj_preds.2.bias (1,)"

    values = marked_values("yolov_s")
    values["head.reg_preds.1.weight"] = torch.zeros(4, 128, 3, 3)
    values["head.trans.linear2.bias"] = torch.zeros(256)
    path = write_authors_file(tmp_path / "shape.pth", values)
    with pytest.raises(MegavodError) as e:
        megavod.load(weights=path, device="cpu")
    assert str(e.value) == (f"{path}: does not match the model: shape mismatch: head.reg_preds.1.weight is "
                            "(4, 128, 3, 3), expected (4, 128, 1, 1), head.trans.linear2.bias is (256,), expected (512,)")


def test_a_file_needing_arbitrary_unpickling_goes_through_trust_pickle(yolo_rows, tmp_path):
    values = marked_values("yolox_s_vid")
    path = write_authors_file(tmp_path / "pickled.pth", values, extra=argparse.Namespace(fp16=True))
    with pytest.raises(MegavodError) as e:
        megavod.load(weights=path, device="cpu")
    assert str(e.value) == (f"{path}: refused: loading it needs arbitrary unpickling (it references "
                            "argparse.Namespace); pass --trust-pickle only if you trust where the file comes from")
    _assert_holds(megavod.load(weights=path, device="cpu", trust_pickle=True).model, values)


# ----------------------------------------------------------------------------------------------
# convert and detect


def test_convert_to_safetensors_and_load_it_without_config(yolo_rows, yolov_s_file, tmp_path, capsys):
    values, src = yolov_s_file
    dst = tmp_path / "yolov_s.safetensors"
    assert cli_main(["convert", str(src), str(dst)]) == 0
    assert capsys.readouterr().out == (
        f"{src}: YOLOV-S (config yolov_s): {len(values)} tensors, 0 renamed, {len(values)} same name, 0 ignored; "
        f"dropped start_epoch, optimizer (training state, not weights) -> {dst}\n")
    converted = read_weights(dst)
    assert converted.kind == "safetensors" and resolve_config(converted).name == "yolov_s"
    assert sidecar_path(dst).read_text().startswith("method: yolov")
    model, cfg = load_detector(dst)
    assert cfg.name == "yolov_s"
    _assert_holds(model, values)
    # A config that does not fit: one line, nothing written.
    report = convert(src, tmp_path / "again.pth")
    assert (report.config_name, report.model) == ("yolov_s", "YOLOV-S")
    assert cli_main(["convert", str(src), str(tmp_path / "x.safetensors"), "--config", "yolox_s_vid"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"megavod convert: error: {src}: the file holds YOLOV-S but the config 'yolox_s_vid' "
                          "builds YOLOX-S: unexpected 44 key(s): ") and err.count("\n") == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_detect_with_the_authors_file(yolo_rows, tmp_path):
    from megavod.data.video import write_video

    values = marked_values("yolox_s_vid")
    # Sane weights for a forward pass: BatchNorm identity-like, every other tensor small.
    for k, v in values.items():
        if k.endswith(("running_var", "bn.weight")):
            values[k] = torch.ones_like(v)
        elif v.is_floating_point():
            values[k] = torch.full_like(v, 1e-3)
    path = write_authors_file(tmp_path / "yolox_s.pth", values)
    clip = tmp_path / "clip.mp4"
    write_video(clip, (torch.randint(0, 255, (48, 64, 3), dtype=torch.uint8).numpy() for _ in range(2)), fps=10)
    out = tmp_path / "out"
    assert cli_main(["detect", str(clip), "--weights", str(path), "--out", str(out), "--device", "cpu",
                     "input.letterbox=64"]) == 0
    assert json.loads((out / "clip.json").read_text())
