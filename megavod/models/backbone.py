"""ResNet / ResNeXt "C4" backbone and the res5 stage of the box head
(docs/conventions.md#backbone-and-frozen-batch-norm), from torchvision parts.

The network is torchvision's ``Bottleneck`` with ``FrozenBatchNorm2d``, adjusted where the authors'
MSRA models differ (docs/conventions.md#backbone-and-frozen-batch-norm):

* ``stride_in_1x1``: the stride of a stage's first block sits on the 1x1 ``conv1``, not the 3x3.
* res5 (``layer4``) has stride 1 and a dilated 3x3 (dilation 2, padding 2) in **every** block, block 0
  included; its downsample conv has stride 1. It runs on the whole C4 map, so its output is stride 16.
* FrozenBN without eps: y = x * w / sqrt(v) + (b - m * w / sqrt(v)).

State-dict names equal the authors' (docs/conventions.md#state-dict-names) so their checkpoints load key for key:

=====================================================  ==============================================
megavod module                                         authors' key prefix (and torchvision ResNet)
=====================================================  ==============================================
``backbone.body.stem.conv1`` / ``.stem.bn1``           same (torchvision ``conv1`` / ``bn1``)
``backbone.body.layer{1,2,3}.<i>.<sub>``               same (torchvision ``layer{1,2,3}.<i>.<sub>``)
``roi_heads.box.feature_extractor.head.layer4.<i>``    same (torchvision ``layer4.<i>``)
=====================================================  ==============================================

with ``<sub>`` one of ``conv1 bn1 conv2 bn2 conv3 bn3 downsample.0 downsample.1`` and each BN holding
the buffers ``weight bias running_mean running_var``. Only the order of entries inside a block differs
(torchvision registers ``downsample`` last); loading is by name, so order does not matter.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck
from torchvision.ops import FrozenBatchNorm2d

from megavod.checkpoint_files import read_detectron_pickle
from megavod.errors import MegavodError

# FrozenBN with eps = 0, as the authors' layer (torchvision's default eps is 1e-5).
FrozenBN: Callable[[int], FrozenBatchNorm2d] = functools.partial(FrozenBatchNorm2d, eps=0.0)


@dataclass(frozen=True)
class ResNetSpec:
    """Shape of a C4 ResNet: blocks per stage (res2..res5), stem width, groups and 3x3 width per group.

    Stage s (0 for res2) has bottleneck width ``groups * width_per_group * 2**s`` and output width
    ``4 * stem_channels * 2**s`` (256, 512, 1024, 2048 for ResNet-50/101).
    """

    blocks: tuple[int, int, int, int]
    stem_channels: int = 64
    groups: int = 1
    width_per_group: int = 64
    stride_in_1x1: bool = True

    def stage_channels(self, stage: int) -> tuple[int, int]:
        """(bottleneck width, output width) of stage 0..3 (res2..res5)."""
        return self.groups * self.width_per_group * 2**stage, 4 * self.stem_channels * 2**stage

    @property
    def c4_channels(self) -> int:
        return self.stage_channels(2)[1]

    @property
    def res5_channels(self) -> int:
        return self.stage_channels(3)[1]


ARCH_BLOCKS = {"R-50-C4": (3, 4, 6, 3), "R-101-C4": (3, 4, 23, 3), "X-101-C4": (3, 4, 23, 3)}


def _make_stage(
    spec: ResNetSpec, stage: int, in_channels: int, stride: int, dilation: int
) -> nn.Sequential:
    """A stage of torchvision Bottlenecks, with the stride moved to conv1 when ``stride_in_1x1``."""
    width, out_channels = spec.stage_channels(stage)
    planes = out_channels // Bottleneck.expansion
    blocks = []
    for i in range(spec.blocks[stage]):
        block_stride = stride if i == 0 else 1
        downsample = None
        if in_channels != out_channels:
            # The authors' shortcut takes the block stride only when the stage is not dilated.
            down_stride = block_stride if dilation == 1 else 1
            downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=down_stride, bias=False), FrozenBN(out_channels)
            )
        # torchvision's 3x3 width is int(planes * base_width / 64) * groups; pick base_width so that
        # it equals the spec's groups * width_per_group * 2**stage.
        base_width = spec.width_per_group * 64 // spec.stem_channels
        block = Bottleneck(
            in_channels, planes, stride=1, downsample=downsample, groups=spec.groups,
            base_width=base_width, dilation=dilation, norm_layer=FrozenBN,
        )
        if block.conv1.out_channels != width:
            raise ValueError(f"width_per_group {spec.width_per_group} with stem {spec.stem_channels} "
                             f"does not give an integer bottleneck width")
        if block_stride != 1:
            conv = block.conv1 if spec.stride_in_1x1 else block.conv2
            conv.stride = (block_stride, block_stride)
            block.stride = block_stride
        blocks.append(block)
        in_channels = out_channels
    stage_module = nn.Sequential(*blocks)
    for m in stage_module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, a=1)  # the authors' init for every backbone conv
    return stage_module


class Stem(nn.Module):
    """7x7/2 conv, FrozenBN, ReLU, 3x3/2 max-pool (padding 1)."""

    def __init__(self, out_channels: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, out_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBN(out_channels)
        nn.init.kaiming_uniform_(self.conv1.weight, a=1)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu_(self.bn1(self.conv1(x)))
        return nn.functional.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class ResNetC4Body(nn.Module):
    """stem, layer1 (res2), layer2 (res3), layer3 (res4): images -> C4 (stride 16)."""

    def __init__(self, spec: ResNetSpec):
        super().__init__()
        self.spec = spec
        self.stem = Stem(spec.stem_channels)
        self.layer1 = _make_stage(spec, 0, spec.stem_channels, stride=1, dilation=1)
        self.layer2 = _make_stage(spec, 1, spec.stage_channels(0)[1], stride=2, dilation=1)
        self.layer3 = _make_stage(spec, 2, spec.stage_channels(1)[1], stride=2, dilation=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer3(self.layer2(self.layer1(self.stem(x))))


class C4Backbone(nn.Module):
    """``backbone(images) -> C4`` [B, c4_channels, ceil(H/16), ceil(W/16)]; key prefix ``backbone.body``."""

    def __init__(self, spec: ResNetSpec, freeze_at: int = 2):
        super().__init__()
        self.body = ResNetC4Body(spec)
        self.out_channels = spec.c4_channels
        stages = [self.body.stem, self.body.layer1, self.body.layer2, self.body.layer3]
        for module in stages[:freeze_at]:
            for p in module.parameters():
                p.requires_grad_(False)

    def forward(self, images: Tensor) -> Tensor:
        return self.body(images)


class ResNetHead(nn.Module):
    """res5 (``layer4``) on the whole C4 map: stride 1, dilation ``dilation`` in every block
    (docs/conventions.md#backbone-and-frozen-batch-norm).

    With ``dilation == 1`` the authors' code strides block 0 by 2 (output stride 32).
    """

    def __init__(self, spec: ResNetSpec, dilation: int = 2, freeze: bool = False):
        super().__init__()
        stride = 1 if dilation > 1 else 2
        self.layer4 = _make_stage(spec, 3, spec.c4_channels, stride=stride, dilation=dilation)
        self.out_channels = spec.res5_channels
        if freeze:
            for p in self.parameters():
                p.requires_grad_(False)

    def forward(self, c4: Tensor) -> Tensor:
        return self.layer4(c4)


def resnet_spec(
    arch: str,
    num_groups: int = 1,
    width_per_group: int = 64,
    stride_in_1x1: bool = True,
    small_stem_channels: int = 16,
    small_blocks: tuple[int, ...] = (1, 1, 2, 1),
) -> ResNetSpec:
    """Spec for ``R-50-C4``, ``R-101-C4``, ``X-101-C4`` (groups/width from the arguments) or ``small``.

    ``small`` is the CPU network: same structure with ``small_stem_channels`` as the stem width and
    bottleneck width of res2 (ResNet-50 has 64), ``small_blocks`` blocks per stage, no groups.
    """
    if arch == "small":
        if len(small_blocks) != 4:
            raise ValueError(f"small_blocks must have 4 counts (res2..res5), got {small_blocks!r}")
        return ResNetSpec(tuple(small_blocks), small_stem_channels, 1, small_stem_channels, stride_in_1x1)
    if arch not in ARCH_BLOCKS:
        raise ValueError(f"arch must be one of {sorted(ARCH_BLOCKS) + ['small']}, got {arch!r}")
    return ResNetSpec(ARCH_BLOCKS[arch], 64, num_groups, width_per_group, stride_in_1x1)


def spec_from_config(cfg: Any) -> ResNetSpec:
    """:class:`ResNetSpec` from a ``megavod.config.BackboneConfig``."""
    return resnet_spec(
        cfg.arch, cfg.num_groups, cfg.width_per_group, cfg.stride_in_1x1,
        cfg.small_stem_channels, tuple(cfg.small_blocks),
    )


def build_backbone(cfg: Any) -> C4Backbone:
    """C4 body from a ``BackboneConfig`` (weights are loaded by the detector builder, see
    :func:`load_pretrained_resnet`, because res5 lives in the box head)."""
    return C4Backbone(spec_from_config(cfg), freeze_at=cfg.freeze_at)


def build_res5_head(cfg: Any) -> ResNetHead:
    """res5 from a ``BackboneConfig``; frozen only when ``freeze_at >= 5``."""
    return ResNetHead(spec_from_config(cfg), dilation=cfg.res5_dilation, freeze=cfg.freeze_at >= 5)


# ----------------------------------------------------------------------------------------------
# Calibration of random networks


@torch.no_grad()
def calibrate_frozen_bn(model: nn.Module, *inputs: Any, eps: float = 1e-5) -> None:
    """Set every FrozenBN's (and BatchNorm2d's: YOLOX) running_mean/var to the statistics of its input on
    one forward pass.

    A randomly initialised deep ResNet with identity FrozenBN explodes or vanishes numerically; tests
    and synthetic presets that need realistic activations call this once on a batch (e.g.
    ``calibrate_frozen_bn(detector, images)`` in eval mode, or ``calibrate_frozen_bn(backbone, images)``).
    Each layer is calibrated before it runs, so later layers see normalised inputs. ``eps`` keeps dead
    (all-zero) channels finite, since the FrozenBN itself has no eps.
    """

    def hook(module: FrozenBatchNorm2d | nn.BatchNorm2d, args: tuple[Tensor, ...]) -> None:
        x = args[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False) + eps)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d))]
    was_training = model.training
    model.eval()
    try:
        model(*inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------------------------
# ImageNet-pretrained weights from a local file (nothing is ever downloaded)

_C2_BRANCH = {"branch1": "downsample.0", "branch2a": "conv1", "branch2b": "conv2", "branch2c": "conv3"}
_C2_BRANCH_BN = {"branch1": "downsample.1", "branch2a": "bn1", "branch2b": "bn2", "branch2c": "bn3"}


def _c2_to_torchvision_name(name: str) -> str | None:
    """Detectron C2 blob name (``res2_0_branch2a_bn_s``) -> torchvision name (``layer1.0.bn1.weight``)."""
    if name == "conv1_w":
        return "conv1.weight"
    if name in ("res_conv1_bn_s", "res_conv1_bn_b"):
        return "bn1." + ("weight" if name.endswith("_s") else "bias")
    m = re.fullmatch(r"res([2-5])_(\d+)_(branch1|branch2[abc])(_bn)?_([swb])", name)
    if m is None:
        return None  # fc1000 and the like
    stage, block, branch, bn, kind = m.groups()
    prefix = f"layer{int(stage) - 1}.{block}."
    if bn:
        return prefix + _C2_BRANCH_BN[branch] + (".weight" if kind == "s" else ".bias")
    return prefix + _C2_BRANCH[branch] + ".weight" if kind == "w" else None


def _read_weights(path: Path) -> tuple[dict[str, Tensor], bool]:
    """Tensors by torchvision name, and whether BN statistics come with eps = 1e-5 (torchvision)."""
    if path.suffix == ".pkl":
        blobs = read_detectron_pickle(path)
        out = {}
        for k, v in blobs.items():
            name = _c2_to_torchvision_name(k)
            if name is not None:
                out[name] = torch.as_tensor(v).float()
        return out, False
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error
        raise MegavodError(f"{path}: cannot read pretrained weights ({type(e).__name__}: {e})") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
    if not isinstance(data, dict):
        raise MegavodError(f"{path}: expected a state dict of tensors")
    out = {}
    torchvision_names = "conv1.weight" in data or "module.conv1.weight" in data
    for k, v in data.items():
        if not isinstance(v, Tensor) or not isinstance(k, str):
            continue
        # megavod / authors' names (backbone.body.stem.conv1.weight, ...head.layer4.0...) -> torchvision's
        m = re.search(r"(?:^|\.)(layer[1-4]\..+)$", k) or re.search(r"(?:^|\.)stem\.(.+)$", k)
        if m is not None:
            out[m.group(1)] = v
        elif torchvision_names and re.fullmatch(r"(module\.)?(conv1|bn1)\.\w+", k):
            out[k.removeprefix("module.")] = v
    # torchvision's BatchNorm statistics go with eps = 1e-5; megavod's own files already have eps 0.
    return out, torchvision_names


def load_pretrained_resnet(path: str | Path, body: ResNetC4Body, res5: ResNetHead | None = None) -> list[str]:
    """Load ImageNet weights from a local file into the C4 body and (optionally) res5.

    Accepted: a Detectron C2 pickle (``R-101.pkl``: ``conv1_w``, ``res2_0_branch2a_w``, ...; the MSRA
    files the authors start from), or a torch file with torchvision ResNet names (``conv1.weight``,
    ``layer1.0.conv1.weight``) or megavod/authors' names (``backbone.body.stem.conv1.weight``). C2 files
    carry only BN scale and bias (mean 0, var 1 are kept). torchvision BN statistics were trained with
    eps = 1e-5, which is folded into ``running_var`` because megavod's FrozenBN has no eps. Returns
    the names loaded; a missing or mis-shaped tensor raises :class:`MegavodError` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise MegavodError(f"pretrained backbone weights: file not found: {path}")
    weights, fold_eps = _read_weights(path)
    targets: dict[str, Tensor] = {}
    for name, t in body.stem.state_dict(keep_vars=True).items():
        targets[name] = t
    for prefix, module in (("layer1", body.layer1), ("layer2", body.layer2), ("layer3", body.layer3)):
        for name, t in module.state_dict(keep_vars=True).items():
            targets[f"{prefix}.{name}"] = t
    if res5 is not None:
        for name, t in res5.layer4.state_dict(keep_vars=True).items():
            targets[f"layer4.{name}"] = t
    loaded = []
    with torch.no_grad():
        for name, t in targets.items():
            if name not in weights:
                if name.endswith(("running_mean", "running_var")):
                    continue  # C2 pickles have no statistics
                raise MegavodError(f"{path}: no tensor for '{name}' (is it a {body.spec.blocks} ResNet?)")
            src = weights[name]
            if tuple(src.shape) != tuple(t.shape):
                raise MegavodError(
                    f"{path}: '{name}' has shape {tuple(src.shape)}, the model expects {tuple(t.shape)}"
                )
            if not src.is_floating_point() or src.layout != torch.strided or src.is_meta:
                raise MegavodError(f"{path}: '{name}' is a {src.dtype} {src.layout} tensor, not dense floating-point weights")
            if fold_eps and name.endswith("running_var"):
                src = src + 1e-5
            t.copy_(src)
            loaded.append(name)
    return loaded
