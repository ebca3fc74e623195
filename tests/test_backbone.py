"""C4 ResNet body, res5 head, FrozenBN, freezing, calibration and pretrained loading
(docs/conventions.md#backbone-and-frozen-batch-norm, docs/conventions.md#state-dict-names)."""

from __future__ import annotations

import pickle

import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d

from megavod.config import Config
from megavod.errors import MegavodError
from megavod.models.backbone import (
    C4Backbone,
    FrozenBN,
    ResNetHead,
    _make_stage,
    calibrate_frozen_bn,
    load_pretrained_resnet,
    resnet_spec,
)
from megavod.models.single_frame import build_single_frame_detector
from reference_data import authors_listing


@pytest.mark.parametrize(
    "arch,listing,n_keys,n_elements",
    [("R-101-C4", "vid_R_101_C4_1x", 535, 156_075_207), ("R-50-C4", "vid_R_50_C4_1x", 282, 47_640_007)],
)
def test_single_frame_state_dict_equals_authors_listing(arch, listing, n_keys, n_elements):
    cfg = Config()
    cfg.model.backbone.arch = arch
    cfg.model.roi_head.reduce_channel = arch == "R-50-C4"  # the R-50 configs' REDUCE_CHANNEL
    sd = build_single_frame_detector(cfg).state_dict()
    header_keys, header_elements, authors = authors_listing(listing)
    assert (header_keys, header_elements) == (n_keys, n_elements)
    # parameters + buffers counted like the listing's header
    assert len(sd) == n_keys
    assert sum(t.numel() for t in sd.values()) == n_elements
    # and every key has the authors' name and shape, so their checkpoints load without renaming
    assert {k: tuple(v.shape) for k, v in sd.items()} == authors


def test_stride_in_1x1_and_res5_dilation_in_every_block():
    spec = resnet_spec("R-101-C4")
    backbone = C4Backbone(spec)
    for layer, stride in ((backbone.body.layer1, 1), (backbone.body.layer2, 2), (backbone.body.layer3, 2)):
        assert layer[0].conv1.stride == (stride, stride)  # MSRA: stride on the 1x1
        assert layer[0].conv2.stride == (1, 1)
        assert layer[0].downsample[0].stride == (stride, stride)
        assert all(b.conv2.dilation == (1, 1) for b in layer)
    assert len(backbone.body.layer3) == 23
    res5 = ResNetHead(spec, dilation=2)
    assert len(res5.layer4) == 3
    for block in res5.layer4:  # block 0 included, unlike torchvision's replace_stride_with_dilation
        assert block.conv2.dilation == (2, 2) and block.conv2.padding == (2, 2)
        assert block.conv1.stride == block.conv2.stride == block.conv3.stride == (1, 1)
    assert res5.layer4[0].downsample[0].stride == (1, 1)
    assert res5.layer4[0].conv1.in_channels == 1024 and res5.out_channels == 2048


def test_resnext_stride_in_3x3_and_grouped_width():
    spec = resnet_spec("X-101-C4", num_groups=32, width_per_group=8, stride_in_1x1=False)
    stage = _make_stage(spec, 1, 256, stride=2, dilation=1)  # res3
    block = stage[0]
    assert block.conv1.out_channels == 512 and block.conv2.groups == 32
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    assert block.conv3.out_channels == 512
    assert tuple(block.conv2.weight.shape) == (512, 16, 3, 3)


def test_output_strides_and_shapes():
    spec = resnet_spec("small", small_stem_channels=8, small_blocks=(1, 1, 1, 1))
    backbone, res5 = C4Backbone(spec), ResNetHead(spec)
    x = torch.randn(2, 3, 64, 96)
    c4 = backbone(x)
    assert c4.shape == (2, spec.c4_channels, 4, 6) and backbone.out_channels == 128
    assert res5(c4).shape == (2, 256, 4, 6)  # dilated res5 keeps stride 16
    assert ResNetHead(spec, dilation=1)(c4).shape == (2, 256, 2, 3)


def test_frozen_bn_has_no_eps_and_only_buffers():
    bn = FrozenBN(3)
    assert isinstance(bn, FrozenBatchNorm2d) and bn.eps == 0.0
    assert list(bn.parameters()) == []
    bn.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
    bn.bias.copy_(torch.tensor([0.5, 0.0, -1.0]))
    bn.running_mean.copy_(torch.tensor([1.0, -1.0, 0.0]))
    bn.running_var.copy_(torch.tensor([1e-6, 4.0, 0.25]))  # eps 1e-5 would change channel 0 a lot
    x = torch.randn(2, 3, 4, 5)
    s = bn.weight / bn.running_var.sqrt()
    expected = x * s[:, None, None] + (bn.bias - bn.running_mean * s)[:, None, None]
    torch.testing.assert_close(bn(x), expected, rtol=1e-5, atol=1e-4)


def test_freeze_at_2_freezes_stem_and_res2_only():
    spec = resnet_spec("small")
    backbone = C4Backbone(spec, freeze_at=2)
    assert not any(p.requires_grad for p in backbone.body.stem.parameters())
    assert not any(p.requires_grad for p in backbone.body.layer1.parameters())
    assert all(p.requires_grad for p in backbone.body.layer2.parameters())
    assert all(p.requires_grad for p in backbone.body.layer3.parameters())
    assert all(p.requires_grad for p in ResNetHead(spec).parameters())
    assert not any(p.requires_grad for p in ResNetHead(spec, freeze=True).parameters())


def test_calibrate_frozen_bn_normalises_every_layer():
    torch.manual_seed(0)
    spec = resnet_spec("small", small_stem_channels=16, small_blocks=(3, 4, 6, 3))
    backbone = C4Backbone(spec)
    x = torch.randn(2, 3, 64, 64) * 60
    raw = backbone(x)
    calibrate_frozen_bn(backbone, x)
    seen = []
    backbone.body.stem.bn1.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    out = backbone(x)
    assert torch.isfinite(out).all()
    # the first BN now maps its input batch to zero mean, unit variance per channel
    stem = seen[0]
    torch.testing.assert_close(stem.mean(dim=(0, 2, 3)), torch.zeros(16), atol=1e-3, rtol=0)
    torch.testing.assert_close(stem.var(dim=(0, 2, 3), unbiased=False), torch.ones(16), atol=1e-2, rtol=0)
    assert 0.3 < out.std().item() < 3.0
    assert abs(raw.std().item() - 1.0) > abs(out.std().item() - 1.0)


def _to_c2_name(name: str) -> str:
    """torchvision name -> Detectron C2 blob name, written independently of the loader's mapping."""
    if name == "conv1.weight":
        return "conv1_w"
    if name.startswith("bn1."):
        return "res_conv1_bn_" + {"weight": "s", "bias": "b"}[name.split(".")[1]]
    layer, block, sub, *rest = name.split(".")
    stage = int(layer[-1]) + 1
    table = {"conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c",
             "bn1": "branch2a_bn", "bn2": "branch2b_bn", "bn3": "branch2c_bn"}
    if sub == "downsample":
        branch = "branch1" if rest[0] == "0" else "branch1_bn"
        kind = rest[1]
    else:
        branch, kind = table[sub], rest[0]
    suffix = {"weight": "s" if "bn" in branch else "w", "bias": "b"}[kind]
    return f"res{stage}_{block}_{branch}_{suffix}"


def _torchvision_state(body, res5) -> dict[str, torch.Tensor]:
    out = {f"{k}": v for k, v in body.stem.state_dict().items()}
    for i, layer in enumerate((body.layer1, body.layer2, body.layer3), start=1):
        out.update({f"layer{i}.{k}": v for k, v in layer.state_dict().items()})
    out.update({f"layer4.{k}": v for k, v in res5.layer4.state_dict().items()})
    return out


def test_load_detectron_c2_pickle(tmp_path):
    torch.manual_seed(0)
    spec = resnet_spec("small", small_stem_channels=8, small_blocks=(1, 2, 1, 1))
    src_body, src_res5 = C4Backbone(spec).body, ResNetHead(spec)
    for m in (src_body, src_res5):
        for t in m.state_dict().values():
            t.copy_(torch.randn_like(t))
    blobs = {
        _to_c2_name(k): v.numpy() for k, v in _torchvision_state(src_body, src_res5).items()
        if not k.endswith(("running_mean", "running_var"))
    }
    blobs["fc1000_w"] = torch.zeros(10, 4).numpy()  # classifier blobs are ignored
    path = tmp_path / "R-tiny.pkl"
    path.write_bytes(pickle.dumps({"blobs": blobs}))
    body, res5 = C4Backbone(spec).body, ResNetHead(spec)
    loaded = load_pretrained_resnet(path, body, res5)
    assert "layer2.1.conv2.weight" in loaded and "layer4.0.downsample.1.bias" in loaded
    torch.testing.assert_close(body.layer2[1].bn3.weight, src_body.layer2[1].bn3.weight)
    torch.testing.assert_close(res5.layer4[0].downsample[0].weight, src_res5.layer4[0].downsample[0].weight)
    torch.testing.assert_close(body.stem.conv1.weight, src_body.stem.conv1.weight)
    # C2 files carry no statistics: mean 0, var 1 stay
    assert torch.equal(body.layer1[0].bn1.running_var, torch.ones(8))


def test_load_torchvision_names_folds_eps_and_rejects_bad_shapes(tmp_path):
    spec = resnet_spec("small", small_stem_channels=8, small_blocks=(1, 1, 1, 1))
    src_body, src_res5 = C4Backbone(spec).body, ResNetHead(spec)
    state = _torchvision_state(src_body, src_res5)
    state["layer1.0.bn1.running_var"] = torch.full((8,), 2.0)
    state["fc.weight"] = torch.zeros(3, 3)
    path = tmp_path / "tv.pth"
    torch.save(state, path)
    body, res5 = C4Backbone(spec).body, ResNetHead(spec)
    load_pretrained_resnet(path, body, res5)
    torch.testing.assert_close(body.layer1[0].bn1.running_var, torch.full((8,), 2.0 + 1e-5))

    state["layer3.0.conv2.weight"] = torch.zeros(1, 1, 3, 3)
    torch.save(state, path)
    with pytest.raises(MegavodError, match=r"layer3\.0\.conv2\.weight.*shape"):
        load_pretrained_resnet(path, body, res5)
    with pytest.raises(MegavodError, match="not found"):
        load_pretrained_resnet(tmp_path / "missing.pkl", body, res5)
