"""Loading and converting checkpoints (docs/conventions.md#state-dict-names,
docs/conventions.md#checkpoint-files-and-key-listings): the authors' released files key for key, megavod's own
files, recognition of the method from the keys, and one exact line for each bad file.

Synthetic checkpoints are built from the key listings of docs/conventions.md#checkpoint-files-and-key-listings
(``tests/data/checkpoint_keys``: every key and shape of every released model, in the authors' state-dict
order) with seeded random values and the authors' top-level layout. R-101 models are built on the ``meta``
device and filled with cheap strided views of one random pool (names and shapes are what is checked; layers
are then run on their loaded weights); R-50 models get real independent values and a full forward pass.
"""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megavod.methods.convert import convert
from megavod.checkpoint_files import read_detectron_pickle, read_weights, sidecar_path
from megavod.checkpoints.loading import (
    authors_to_megavod_keys,
    load_model_weights,
    load_state,
    match_state_dict,
    resolve_config,
)
from megavod.checkpoints.recognise import recognise, signature_of_config
from megavod.apps.cli import main as cli_main
from megavod.config import load_config
from megavod.errors import ConfigError, MegavodError
from megavod.methods import build_detector, load_detector
from megavod.models.contract import KeyFrameInputs
from megavod.models.rpn import legacy_cell_anchors
from reference_data import authors_listing as listing

FE = "roi_heads.box.feature_extractor."

# listing -> (preset, description, tensors renamed by the mapping). Only the aggregators of MEGA and
# RDN are named differently (docs/conventions.md#state-dict-names): MEGA R-101 l_fcs 3x2 +
# l_W{g,q,k,v}s 3x4x2 + l_us 3 + g_W{q,k,v}s 2x3x2 + g_us 2 = 47; RDN fcs Bx2 + W{g,q,k,v}s (B+A+1 or B)x4x2.
RELEASED = {
    "vid_R_50_C4_1x": ("single_R_50", "single-frame Faster R-CNN R-50 (256-channel reduce conv)", 0),
    "vid_R_101_C4_1x": ("single_R_101", "single-frame Faster R-CNN R-101", 0),
    "vid_R_50_C4_MEGA_1x": ("mega_R_50", "MEGA R-50 (256-channel reduce conv, N_l=3, 1 global module)", 40),
    "vid_R_101_C4_MEGA_1x": ("mega_R_101", "MEGA R-101 (N_l=3, 2 global modules)", 47),
    "vid_R_50_C4_RDN_base_1x": ("rdn_base_R_50", "RDN-base R-50 (256-channel reduce conv, 2 relation modules)", 20),
    "vid_R_101_C4_RDN_base_1x": ("rdn_base_R_101", "RDN-base R-101 (2 relation modules)", 20),
    "vid_R_101_C4_RDN_1x": ("rdn_R_101", "RDN R-101 (4 relation modules)", 38),
    "vid_R_50_C4_FGFA_1x": ("fgfa_R_50", "FGFA R-50 (256-channel reduce conv)", 0),
    "vid_R_101_C4_FGFA_1x": ("fgfa_R_101", "FGFA R-101", 0),
    "vid_R_50_C4_DFF_1x": ("dff_R_50", "DFF R-50 (256-channel reduce conv)", 0),
    "vid_R_101_C4_DFF_1x": ("dff_R_101", "DFF R-101", 0),
}

# Layers run on their loaded weights, by the authors' module name ({last}: the last layer3 block).
COMMON_LAYERS = ["backbone.body.stem.conv1", "backbone.body.layer3.{last}.conv2", "rpn.head.cls_logits",
                 "rpn.head.bbox_pred", FE + "head.layer4.2.conv3", "roi_heads.box.predictor.cls_score"]
METHOD_LAYERS = {
    "single": [FE + "fc7"],
    "mega": [FE + "l_fcs.2", FE + "l_Wqs.1", FE + "l_Wks.0", FE + "l_Wgs.2", FE + "g_Wvs.0"],
    "rdn": [FE + "fcs.1", FE + "Wks.1", FE + "Wgs.0", FE + "Wvs.1"],
    "fgfa": [FE + "fc7", "embednet.embed_conv2", "flownet.conv4", "flownet.deconv3", "flownet.Convolution2"],
    "dff": [FE + "fc7", "flownet.Convolution5_scale", "flownet.upsample_flow4to3", "flownet.conv3_1"],
}

# ----------------------------------------------------------------------------------------------
# Helpers: synthetic checkpoints (listing: reference_data.authors_listing), the name mapping of docs/conventions.md#state-dict-names written out by hand


def ours(key: str) -> str:
    """megavod's name for an authors' key, from the tables of docs/conventions.md#state-dict-names and the docstrings of
    mega_head.py / rdn.py (written out here, not taken from the code under test)."""
    if not key.startswith(FE):
        return key
    rest = key[len(FE):]
    rules = [(r"l_fcs\.(\d+)\.(\w+)", r"aggregator.fcs.\1.\2"),
             (r"l_W([gqkv])s\.(\d+)\.(\w+)", r"aggregator.local_stages.\2.W\1.\3"),
             (r"l_us\.(\d+)", r"aggregator.local_stages.\1.u"),
             (r"g_W([gqkv])s\.(\d+)\.(\w+)", r"aggregator.global_stages.\2.W\1.\3"),
             (r"g_us\.(\d+)", r"aggregator.global_stages.\1.u"),
             # RDN (rdn.py docstring): fcs.{i}, W{g,q,k,v}s.{i}.
             (r"fcs\.(\d+)\.(\w+)", r"aggregator.fcs.\1.\2"),
             (r"W([gqkv])s\.(\d+)\.(\w+)", r"aggregator.relations.\2.W\1.\3")]
    for pattern, replacement in rules:
        if re.fullmatch(pattern, rest):
            return FE + re.sub(pattern, replacement, rest)
    return key


_POOL = 1 << 21


def cheap_values(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, Tensor]:
    """Every tensor a distinct view of one seeded random pool (8 MB whatever the model's size):
    small ones at distinct offsets, big ones as rows shifted by a distinct stride."""
    pool = torch.randn(_POOL, generator=torch.Generator().manual_seed(seed))
    out = {}
    for i, (key, shape) in enumerate(shapes.items()):
        numel = int(np.prod(shape))
        if numel <= _POOL // 2:
            offset = (i * 7919) % (_POOL // 2)
            out[key] = pool[offset: offset + numel].view(shape)
        else:
            rows, cols = shape[0], numel // shape[0]
            shift = 1 + (i * 13) % ((_POOL - cols) // rows - 1)
            inner = [int(np.prod(shape[d + 1:])) for d in range(1, len(shape))]
            out[key] = pool.as_strided(shape, (shift, *inner), i % 64)
    return out


def real_values(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, Tensor]:
    """Independent seeded tensors with sane magnitudes (a forward pass stays finite): weights
    N(0, 1/fan_in), FrozenBN scale and variance around 1, the 12 anchors of docs/conventions.md#anchors
    shifted by 0.5 so that a model keeping its own anchors would differ."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith("cell_anchors.0"):
            out[key] = legacy_cell_anchors(16, (64, 128, 256, 512), (0.5, 1.0, 2.0)) + 0.5
        elif key.endswith("running_var") or (key.endswith(".weight") and len(shape) == 1):
            out[key] = torch.rand(shape, generator=g) + 0.5
        elif len(shape) == 1 or key.endswith((".u", "_us.0", "_us.1", "_us.2")):
            out[key] = torch.randn(shape, generator=g) * 0.05
        else:
            fan_in = int(np.prod(shape[1:]))
            out[key] = torch.randn(shape, generator=g) / fan_in**0.5
    return out


def write_authors_file(path: Path, values: dict[str, Tensor], training_layout: bool) -> Path:
    """The authors' layouts (docs/conventions.md#checkpoint-files-and-key-listings): a 4-GPU training
    checkpoint (``module.`` prefix, optimizer, scheduler, iteration) or a bare single-process state dict."""
    if training_layout:
        obj = {
            "model": {f"module.{k}": v for k, v in values.items()},
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.001, "momentum": 0.9, "params": [0, 1]}]},
            "scheduler": {"milestones": [80000], "gamma": 0.1, "warmup_method": "linear", "last_epoch": 120000},
            "iteration": 120000,
        }
    else:
        obj = dict(values)
    torch.save(obj, path)
    return path


def meta_model(preset: str) -> tuple[nn.Module, object]:
    """The detector of ``preset`` on the meta device; skipped while its method is not built yet."""
    cfg = load_config(preset)
    try:
        with torch.device("meta"):
            return build_detector(cfg), cfg
    except ConfigError as e:
        if "not available" in str(e):
            pytest.skip("method not available")
        raise


def tensor_of(model: nn.Module, name: str) -> Tensor:
    module_name, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module_name), attr)


def layer_matches(module: nn.Module, weight: Tensor, bias: Tensor | None) -> bool:
    """``module`` run on a random input equals the functional op with the file's tensors."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if isinstance(module, nn.Linear):
            x = torch.randn(2, weight.shape[1], generator=g)
            expected = F.linear(x, weight, bias)
        elif isinstance(module, nn.ConvTranspose2d):
            x = torch.randn(1, weight.shape[0], 3, 3, generator=g)
            expected = F.conv_transpose2d(x, weight, bias, module.stride, module.padding, module.output_padding,
                                          module.groups, module.dilation)
        elif isinstance(module, nn.Conv2d):
            x = torch.randn(1, weight.shape[1] * module.groups, 9, 9, generator=g)
            expected = F.conv2d(x, weight, bias, module.stride, module.padding, module.dilation, module.groups)
        else:
            raise AssertionError(f"no functional check for {type(module).__name__}")
        return torch.equal(module(x), expected)


# ----------------------------------------------------------------------------------------------
# Every released model


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_recognise_every_released_model(name):
    preset, description, _ = RELEASED[name]
    sig = recognise(listing(name)[2])
    assert (sig.describe(), sig.preset) == (description, preset)
    assert sig == signature_of_config(load_config(preset))


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_checkpoint_loads_key_for_key(name, tmp_path):
    preset, _, n_renamed = RELEASED[name]
    n_keys, n_elements, shapes = listing(name)
    assert (len(shapes), sum(int(np.prod(s)) for s in shapes.values())) == (n_keys, n_elements)
    values = cheap_values(shapes, seed=len(name))
    path = write_authors_file(tmp_path / "model_final.pth", values, training_layout=len(name) % 2 == 0)

    checkpoint = read_weights(path)
    cfg = resolve_config(checkpoint)  # method and backbone recognised from the keys
    assert cfg.name == preset
    model, _ = meta_model(preset)
    load_state(model, checkpoint, cfg.name)

    # Every parameter and buffer of our model is filled, each by exactly one of the file's tensors.
    state = model.state_dict()
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert sorted(state) == sorted(ours(k) for k in shapes)
    assert sum(ours(k) != k for k in shapes) == n_renamed
    for key, src in values.items():
        got = state[ours(key)]
        assert (got.storage_offset(), got.stride(), got.shape) == (src.storage_offset(), src.stride(), src.shape), key

    last = max(int(k.split(".")[3]) for k in shapes if k.startswith("backbone.body.layer3."))
    layers = [n.format(last=last) for n in COMMON_LAYERS + METHOD_LAYERS[cfg.method]]
    if cfg.model.roi_head.reduce_channel:
        layers.append(FE + "conv")
    for layer in layers:
        module = model.get_submodule(ours(layer + ".weight").rsplit(".", 1)[0])
        assert layer_matches(module, values[layer + ".weight"], values.get(layer + ".bias")), layer
    if cfg.method == "mega":
        for i in range(3):
            assert torch.equal(model.get_submodule(FE + f"aggregator.local_stages.{i}").u, values[FE + f"l_us.{i}"])


def test_key_counts_per_released_model():
    """The key-count table, from the code's mapping: every authors' key is mapped (keeping its name
    or renamed), none is ignored."""
    rows = {}
    for name, (preset, _, _) in RELEASED.items():
        model, _ = meta_model(preset)
        file = {k: torch.empty(s, device="meta") for k, s in listing(name)[2].items()}
        mapped = match_state_dict(model, file, name)
        renamed = sum(k in authors_to_megavod_keys(model) for k in file)
        rows[name] = (len(file), len(mapped) - renamed, renamed)
    assert rows == {
        "vid_R_50_C4_1x": (282, 282, 0), "vid_R_101_C4_1x": (535, 535, 0),
        "vid_R_50_C4_MEGA_1x": (318, 278, 40), "vid_R_101_C4_MEGA_1x": (578, 531, 47),
        "vid_R_50_C4_RDN_base_1x": (298, 278, 20), "vid_R_101_C4_RDN_base_1x": (551, 531, 20),
        "vid_R_101_C4_RDN_1x": (569, 531, 38),
        "vid_R_50_C4_FGFA_1x": (334, 334, 0), "vid_R_101_C4_FGFA_1x": (587, 587, 0),
        "vid_R_50_C4_DFF_1x": (329, 329, 0), "vid_R_101_C4_DFF_1x": (582, 582, 0),
    }


# ----------------------------------------------------------------------------------------------
# Round trip on R-50: authors' file -> convert -> detect, against tensors placed by hand


# Each method is converted to one of the two formats (the CLI test converts the other way too).
R50_FORMATS = {"vid_R_50_C4_1x": ".pth", "vid_R_50_C4_MEGA_1x": ".safetensors"}


@pytest.fixture(scope="module")
def r50_files(tmp_path_factory):
    """Per method: the authors' tensors, their 4-GPU training checkpoint, and its conversion."""
    root = tmp_path_factory.mktemp("r50")
    out = {}
    for name, ext in R50_FORMATS.items():
        values = real_values(listing(name)[2], seed=7)
        src = write_authors_file(root / f"{name}_authors.pth", values, training_layout=True)
        out[name] = (values, src, convert(src, root / f"converted{ext}"))
    return out


def _placed_by_hand(preset: str, values: dict[str, Tensor]) -> nn.Module:
    """Our model with every tensor copied in by hand under the names of docs/conventions.md#state-dict-names
    (storage left uninitialised first: a tensor not placed would show in the output)."""
    with torch.device("meta"):
        model = build_detector(load_config(preset))
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for key, value in values.items():
            tensor_of(model, ours(key)).copy_(value)
    return model


def _images(n: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(3, 48, 64, generator=g) * 50 for _ in range(n)]


@pytest.mark.parametrize("name,preset", [("vid_R_50_C4_1x", "single_R_50"), ("vid_R_50_C4_MEGA_1x", "mega_R_50")])
def test_convert_round_trip_gives_the_same_detections(r50_files, name, preset):
    values, src, report = r50_files[name]
    assert (report.keys, report.renamed, report.ignored, report.config_name) == (len(values), RELEASED[name][2], [], preset)
    assert report.dropped == ["optimizer", "scheduler", "iteration"] and report.module_prefix

    # The converted file holds the authors' tensors unchanged under megavod's names, with the config.
    converted = read_weights(report.dst)
    assert converted.kind == {".pth": "megavod", ".safetensors": "safetensors"}[R50_FORMATS[name]]
    assert not converted.dropped
    assert sorted(converted.state_dict) == sorted(ours(k) for k in values)
    assert all(torch.equal(converted.state_dict[ours(k)], v) for k, v in values.items())
    cfg = resolve_config(converted)
    assert cfg.name == preset and cfg.method == load_config(preset).method
    # The authors' pixel convention and 31 classes (background first) are recorded unchanged.
    assert cfg.input.pixel_mean == (102.9801, 115.9465, 122.7717) and cfg.input.to_bgr255
    assert cfg.model.roi_head.num_classes == 31
    if report.dst.suffix == ".safetensors":
        assert sidecar_path(report.dst).read_text().startswith("method: mega")

    # detect --weights CONVERTED (no --config) == our model with the tensors placed by hand.
    model, cfg = load_detector(report.dst)
    model.eval()
    hand = _placed_by_hand(preset, values)
    frames = _images(2)

    @torch.no_grad()
    def run(m: nn.Module) -> list:
        if cfg.method == "single":
            return m(torch.stack(frames))
        feats = [m.frame_features(f, i, (96, 128)) for i, f in enumerate(frames)]
        return [m.detect_key(KeyFrameInputs(feats[1], feats, global_pool=feats[:1])).detections]

    got, want = run(model), run(hand)
    for a, b in zip(got, want):
        assert len(a.boxes) > 0 and torch.isfinite(a.scores).all()
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores) and torch.equal(a.labels, b.labels)


def test_authors_file_loads_directly_like_its_conversion(r50_files):
    values, src, report = r50_files["vid_R_50_C4_MEGA_1x"]
    direct, _ = meta_model("mega_R_50")
    load_model_weights(direct, src, load_config("mega_R_50"))
    converted, _ = meta_model("mega_R_50")
    load_model_weights(converted, report.dst)
    a, b = direct.state_dict(), converted.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_convert_cli_and_recorded_config_overrides(r50_files, tmp_path, capsys):
    _, src, _ = r50_files["vid_R_50_C4_1x"]
    dst = tmp_path / "out.safetensors"
    assert cli_main(["convert", str(src), str(dst), "--config", "single_R_50"]) == 0
    out = capsys.readouterr().out
    assert out == (f"{src}: single-frame Faster R-CNN R-50 (256-channel reduce conv) (config single_R_50): 282 tensors, "
                   f"0 renamed, 282 same name, 0 ignored, 'module.' prefix removed; dropped optimizer, scheduler, "
                   f"iteration (training state, not weights) -> {dst}\n")
    cfg = resolve_config(read_weights(dst), overrides=["model.roi_head.score_thresh=0.05"])
    assert cfg.name == "single_R_50" and cfg.model.roi_head.score_thresh == 0.05
    # The sidecar alone is enough when the metadata has no config.
    from safetensors.torch import load_file, save_file
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(dst), bare)
    sidecar_path(bare).write_text(sidecar_path(dst).read_text())
    assert resolve_config(read_weights(bare)).name == "single_R_50"
    # A config that does not fit the file: one line, exit 1, nothing written.
    assert cli_main(["convert", str(src), str(tmp_path / "x.pth"), "--config", "single_R_101"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"megavod convert: error: {src}: the file holds single-frame Faster R-CNN R-50 "
                          "(256-channel reduce conv) but the config 'single_R_101' builds single-frame Faster R-CNN R-101: ")
    assert err.endswith("; the file fits --config single_R_50\n") and err.count("\n") == 1
    assert not (tmp_path / "x.pth").exists()


def test_megavod_training_checkpoint_loads_with_its_config(tmp_path):
    from megavod.config import to_dict
    from megavod.train.checkpoint import save_checkpoint

    cfg = load_config("synthetic_mega")
    trained = build_detector(cfg)
    path = save_checkpoint(tmp_path, "model_0000010.pth", model=trained.state_dict(), optimizer={}, scheduler={},
                           iteration=10, rng=[], config=to_dict(cfg))
    model, got = load_detector(path)
    assert got.name == "synthetic_mega" and got.mega.N_l == 2
    a, b = model.state_dict(), trained.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)
    report = convert(path, tmp_path / "small.safetensors")
    assert (report.config_name, report.renamed, report.dropped) == ("synthetic_mega", 0,
                                                                     ["optimizer", "scheduler", "iteration", "rng"])


# ----------------------------------------------------------------------------------------------
# Files that do not fit: one exact line each, nothing loaded


@pytest.fixture(scope="module")
def mega101_values():
    return cheap_values(listing("vid_R_101_C4_MEGA_1x")[2], seed=11)


def _load_error(model: nn.Module, path: Path, preset: str) -> str:
    with pytest.raises(MegavodError) as e:
        load_model_weights(model, path, load_config(preset))
    return str(e.value)


def test_another_method_is_refused_naming_both(tmp_path):
    path = write_authors_file(tmp_path / "single.pth", cheap_values(listing("vid_R_101_C4_1x")[2], 1), True)
    model, _ = meta_model("mega_R_101")
    assert _load_error(model, path, "mega_R_101") == (
        f"{path}: the file holds single-frame Faster R-CNN R-101 but the config 'mega_R_101' builds MEGA R-101 "
        "(N_l=3, 2 global modules): missing 47 key(s): roi_heads.box.feature_extractor.l_fcs.0.weight (1024, 100352), "
        "roi_heads.box.feature_extractor.l_fcs.0.bias (1024,), roi_heads.box.feature_extractor.l_fcs.1.weight "
        "(1024, 1024) (and 44 more); unexpected 4 key(s): roi_heads.box.feature_extractor.fc6.weight (1024, 100352), "
        "roi_heads.box.feature_extractor.fc6.bias (1024,), roi_heads.box.feature_extractor.fc7.weight (1024, 1024) "
        "(and 1 more); the file fits --config single_R_101")


def test_another_backbone_is_refused_naming_both(tmp_path):
    path = write_authors_file(tmp_path / "m50.pth", cheap_values(listing("vid_R_50_C4_MEGA_1x")[2], 1), True)
    model, _ = meta_model("mega_R_101")
    assert _load_error(model, path, "mega_R_101") == (
        f"{path}: the file holds MEGA R-50 (256-channel reduce conv, N_l=3, 1 global module) but the config "
        "'mega_R_101' builds MEGA R-101 (N_l=3, 2 global modules): missing 262 key(s): "
        "backbone.body.layer3.6.conv1.weight (256, 1024, 1, 1), backbone.body.layer3.6.bn1.weight (256,), "
        "backbone.body.layer3.6.bn1.bias (256,) (and 259 more); unexpected 2 key(s): "
        "roi_heads.box.feature_extractor.conv.weight (256, 2048, 1, 1), roi_heads.box.feature_extractor.conv.bias "
        "(256,); shape mismatch: roi_heads.box.feature_extractor.l_fcs.0.weight is (1024, 12544), expected "
        "(1024, 100352); the file fits --config mega_R_50")
    # The same line when the config comes from --config of detect / convert.
    with pytest.raises(MegavodError) as e:
        convert(path, tmp_path / "out.pth", config="mega_R_101")
    assert str(e.value) == _load_error(model, path, "mega_R_101")


def test_missing_unexpected_and_misshapen_keys(tmp_path, mega101_values):
    model, _ = meta_model("mega_R_101")
    values = dict(mega101_values)
    del values["rpn.head.conv.bias"], values[FE + "l_us.1"]
    values[FE + "extra.weight"] = torch.zeros(3)
    path = write_authors_file(tmp_path / "a.pth", values, True)
    assert _load_error(model, path, "mega_R_101") == (
        f"{path}: does not match the model: missing 2 key(s): rpn.head.conv.bias (1024,), "
        f"{FE}l_us.1 (16, 1, 64); unexpected 1 key(s): {FE}extra.weight (3,)")

    values = dict(mega101_values)
    values["rpn.head.conv.weight"] = torch.zeros(1024, 1024, 1, 1)
    values[FE + "g_us.1"] = torch.zeros(16, 64)
    path = write_authors_file(tmp_path / "b.pth", values, False)
    assert _load_error(model, path, "mega_R_101") == (
        f"{path}: does not match the model: shape mismatch: rpn.head.conv.weight is (1024, 1024, 1, 1), expected "
        f"(1024, 1024, 3, 3), {FE}g_us.1 is (16, 64), expected (16, 1, 64)")


def test_mixed_module_prefix_is_not_stripped(tmp_path, mega101_values):
    values = {("module." + k if i % 2 else k): v for i, (k, v) in enumerate(mega101_values.items())}
    path = write_authors_file(tmp_path / "mixed.pth", values, False)
    model, _ = meta_model("mega_R_101")
    message = _load_error(model, path, "mega_R_101")
    assert message.startswith(f"{path}: does not match the model: missing 289 key(s): backbone.body.stem.bn1.weight (64,)")


def test_nothing_is_half_loaded(tmp_path):
    cfg = load_config("synthetic_single")
    model = build_detector(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = build_detector(cfg).state_dict()
    last = list(other)[-1]
    other[last] = torch.zeros(other[last].shape[0] + 1)  # only the very last tensor is wrong
    torch.save(other, tmp_path / "bad.pth")
    with pytest.raises(MegavodError, match="shape mismatch: roi_heads.box.predictor.bbox_pred.bias is"):
        load_model_weights(model, tmp_path / "bad.pth", cfg)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_truncated_and_corrupt_files(tmp_path, mega101_values):
    path = write_authors_file(tmp_path / "full.pth", mega101_values, True)
    data = path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(MegavodError) as e:
        read_weights(cut)
    assert str(e.value) == f"{cut}: truncated checkpoint (the zip archive has lost its end); download or copy it again"

    legacy = tmp_path / "legacy.pth"
    torch.save({"model": {"a": torch.zeros(1000)}}, legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:-2000])
    with pytest.raises(MegavodError, match=r"^.*legacy.pth: truncated or corrupt checkpoint \(unexpected EOF"):
        read_weights(legacy)

    from safetensors.torch import save_file
    st = tmp_path / "cut.safetensors"
    save_file({"a": torch.zeros(1000)}, st)
    st.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(MegavodError) as e:
        read_weights(st)
    assert str(e.value) == (f"{st}: truncated or corrupt safetensors file "
                            "(Error while deserializing header: incomplete metadata, file not fully covered)")

    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(MegavodError, match=r"empty.pth: empty file$"):
        read_weights(empty)
    with pytest.raises(MegavodError, match=r"nope.pth: checkpoint not found$"):
        read_weights(tmp_path / "nope.pth")


def test_arbitrary_unpickling_is_refused_unless_trusted(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"model": {"a": torch.ones(2)}, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(MegavodError) as e:
        read_weights(path)
    assert str(e.value) == (f"{path}: refused: loading it needs arbitrary unpickling (it references "
                            "argparse.Namespace); pass --trust-pickle only if you trust where the file comes from")
    trusted = read_weights(path, trust_pickle=True)
    assert trusted.dropped == ["args"] and torch.equal(trusted.state_dict["a"], torch.ones(2))


def test_files_that_are_no_detector(tmp_path):
    import torchvision

    imagenet = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), imagenet)
    with pytest.raises(MegavodError) as e:
        load_detector(imagenet)
    assert str(e.value) == (f"{imagenet}: ImageNet-pretrained ResNet weights (torchvision names), not a detector "
                            "checkpoint; give them as model.backbone.weights to train")

    odd = tmp_path / "odd.pth"
    shapes = dict(listing("vid_R_50_C4_1x")[2])
    for k in [k for k in shapes if ".fc6." in k or ".fc7." in k]:
        shapes[k.replace(".fc", ".mlp")] = shapes.pop(k)
    torch.save(cheap_values(shapes, 2), odd)
    with pytest.raises(MegavodError) as e:
        load_detector(odd)
    assert str(e.value) == (f"{odd}: box head of no known method (feature_extractor keys: conv.weight, conv.bias, "
                            "mlp6.weight)")

    small = tmp_path / "small.pth"
    torch.save(build_detector(load_config("synthetic_single")).state_dict(), small)
    with pytest.raises(MegavodError) as e:
        load_detector(small)
    assert str(e.value) == (f"{small}: holds single-frame Faster R-CNN ResNet with blocks [1, 1, 2, 1] and stem 16 "
                            "(64-channel reduce conv, 256-d box features), which no preset builds; pass --config")
    model, cfg = load_detector(small, "synthetic_single")
    assert cfg.name == "synthetic_single"

    lists = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], lists)
    with pytest.raises(MegavodError, match=r"list.pth: holds no state dict \(expected a mapping of names to tensors, got list\)$"):
        read_weights(lists)


def test_recognition_of_variants_builds_the_matching_config():
    _, _, shapes = listing("vid_R_101_C4_MEGA_1x")
    # Table 4's "no local" model: N_l = 0, four location-free global modules.
    no_local = {k: s for k, s in shapes.items() if not re.match(rf"{re.escape(FE)}l_(W|us)", k)}
    no_local = {k: s for k, s in no_local.items() if not re.match(rf"{re.escape(FE)}l_fcs\.[12]\.", k)}
    for r in (2, 3):
        for p in ("Wqs", "Wks", "Wvs"):
            no_local[f"{FE}g_{p}.{r}.weight"] = no_local[f"{FE}g_{p}.0.weight"]
            no_local[f"{FE}g_{p}.{r}.bias"] = no_local[f"{FE}g_{p}.0.bias"]
        no_local[f"{FE}g_us.{r}"] = no_local[f"{FE}g_us.0"]
    sig = recognise(no_local)
    assert sig.describe() == "MEGA R-101 (N_l=0, 4 global modules)" and sig.preset == "mega_R_101"
    from megavod.checkpoints.recognise import config_for
    cfg = config_for(sig)
    assert (cfg.mega.N_l, cfg.mega.N_g, cfg.mega.global_res_stages, cfg.mega.memory) == (0, 4, 0, False)
    # ResNeXt-101 32x8d: the grouped 3x3 gives it away.
    x101 = dict(listing("vid_R_101_C4_1x")[2])
    x101["backbone.body.layer1.0.conv2.weight"] = (256, 8, 3, 3)
    sig = recognise(x101)
    assert sig.arch == "X-101-32x8d" and sig.preset == "single_X_101"


def test_detectron_pickle_reads_arrays_and_refuses_code(tmp_path):
    good = tmp_path / "R-tiny.pkl"
    blobs = {"conv1_w": np.ones((4, 3, 7, 7), np.float32), "res_conv1_bn_s": np.arange(4, dtype=np.float32)}
    good.write_bytes(pickle.dumps({"blobs": blobs}, protocol=2))
    got = read_detectron_pickle(good)
    assert set(got) == set(blobs) and np.array_equal(got["res_conv1_bn_s"], blobs["res_conv1_bn_s"])

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"blobs": {"conv1_w": Evil()}}))
    with pytest.raises(MegavodError) as e:
        read_detectron_pickle(evil)
    assert str(e.value) == f"{evil}: refused: the pickle references pathlib.Path.touch, not only numpy arrays"
    assert not marker.exists()
