"""Flow networks of FGFA and DFF (docs/conventions.md#fgfa-and-dff): FlowNet Simple as the authors use it, and
RAFT-small.

:class:`FlowNetS` is the authors' network layer for layer, with their layer names, so the ``flownet.*``
entries of their FGFA/DFF checkpoints (and the converted ``flownet.ckpt``) load key for key:

* input: [key / 255, reference / 255] (the normalised BGR x 255 images divided by 255), 6 channels,
  average-pooled 2x2 (ceil mode) first;
* encoder ``flow_conv1`` (7x7 s2) ``conv2`` (5x5 s2) ``conv3`` (5x5 s2) ``conv3_1`` ``conv4`` (s2)
  ``conv4_1`` ``conv5`` (s2) ``conv5_1`` ``conv6`` (s2) ``conv6_1``, each with bias and LeakyReLU(0.1);
* decoder: at each level the flow prediction ``ConvolutionN`` (3x3 -> 2), ``deconvN`` and
  ``upsample_flowAtoB`` (4x4 s2 transposed convs, no padding) cropped like the encoder map (offset 1),
  concatenated as [encoder activation, LeakyReLU(deconv), upsampled flow];
* the last concatenation (194 channels, stride 8 of the image) is average-pooled again, so the flow
  ``Convolution5(.) * 2.5`` lies on the C4 grid (stride 16) and is in C4 pixels;
* DFF adds ``Convolution5_scale`` (1x1 194 -> C4 channels, no bias, zero init) whose output + 1 is the
  per-channel scale map that multiplies the warped key features.

Initialisation: the authors always overwrite FlowNet with pretrained weights (``FLOWNET_WEIGHT``), so
its random init only matters when training without them. megavod zero-initialises the final flow
predictor ``Convolution5`` so that such a run starts from zero flow (aligned features), as DFF's scale
starts from 1; every other layer keeps PyTorch's default init, like the authors' module.

:class:`RAFTFlow` (config ``flow_network: raft_small``) wraps torchvision's RAFT-small (randomly
initialised: weights are never downloaded) to give the same interface; it has no scale map, so DFF
with RAFT uses a scale of 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.optical_flow import raft_small

from megavod.checkpoint_files import read_weights
from megavod.errors import MegavodError

FLOW_SCALE = 2.5  # the authors' Convolution5 output multiplier (flow in C4 pixels)


@dataclass
class FlowOutput:
    """flow [B, 2, h, w] in C4 pixels (x then y); scale [B, C, h, w] (DFF's scale map) or None."""

    flow: Tensor
    scale: Tensor | None = None


def _crop_like(x: Tensor, target: Tensor) -> Tensor:
    # The authors' crop_like: a 4x4 stride-2 transposed conv gives 2n+2 pixels; keep [1, 1 + size).
    if x.shape[-2:] == target.shape[-2:]:
        return x
    return x[:, :, 1 : target.shape[2] + 1, 1 : target.shape[3] + 1]


def _leaky(x: Tensor) -> Tensor:
    return F.leaky_relu(x, 0.1)


class FlowNetS(nn.Module):
    """FlowNet Simple as in the authors' ``backbone/flownet.py`` (see the module docstring).

    Args:
        scale_channels: channels of DFF's scale map (``Convolution5_scale``, the C4 width, 1024 for
            ResNet); None (FGFA) builds no scale layer.
    """

    def __init__(self, scale_channels: int | None = None) -> None:
        super().__init__()
        conv = nn.Conv2d
        self.flow_conv1 = conv(6, 64, 7, stride=2, padding=3)
        self.conv2 = conv(64, 128, 5, stride=2, padding=2)
        self.conv3 = conv(128, 256, 5, stride=2, padding=2)
        self.conv3_1 = conv(256, 256, 3, padding=1)
        self.conv4 = conv(256, 512, 3, stride=2, padding=1)
        self.conv4_1 = conv(512, 512, 3, padding=1)
        self.conv5 = conv(512, 512, 3, stride=2, padding=1)
        self.conv5_1 = conv(512, 512, 3, padding=1)
        self.conv6 = conv(512, 1024, 3, stride=2, padding=1)
        self.conv6_1 = conv(1024, 1024, 3, padding=1)

        self.Convolution1 = conv(1024, 2, 3, padding=1)
        self.Convolution2 = conv(1026, 2, 3, padding=1)
        self.Convolution3 = conv(770, 2, 3, padding=1)
        self.Convolution4 = conv(386, 2, 3, padding=1)
        self.Convolution5 = conv(194, 2, 3, padding=1)
        nn.init.zeros_(self.Convolution5.weight)
        nn.init.zeros_(self.Convolution5.bias)
        if scale_channels is not None:
            self.Convolution5_scale = conv(194, scale_channels, 1, bias=False)
            nn.init.zeros_(self.Convolution5_scale.weight)
        else:
            self.register_module("Convolution5_scale", None)

        deconv = nn.ConvTranspose2d
        self.deconv5 = deconv(1024, 512, 4, stride=2)
        self.deconv4 = deconv(1026, 256, 4, stride=2)
        self.deconv3 = deconv(770, 128, 4, stride=2)
        self.deconv2 = deconv(386, 64, 4, stride=2)
        self.upsample_flow6to5 = deconv(2, 2, 4, stride=2)
        self.upsample_flow5to4 = deconv(2, 2, 4, stride=2)
        self.upsample_flow4to3 = deconv(2, 2, 4, stride=2)
        self.upsample_flow3to2 = deconv(2, 2, 4, stride=2)

    @property
    def has_scale(self) -> bool:
        return self.Convolution5_scale is not None

    def _decode(self, coarse: Tensor, flow: Tensor, skip: Tensor, deconv: nn.Module, upsample: nn.Module) -> Tensor:
        # One decoder level: [encoder activation, LeakyReLU(cropped deconv), cropped upsampled flow].
        up_flow = _crop_like(upsample(flow), skip)
        up_feat = _leaky(_crop_like(deconv(coarse), skip))
        return torch.cat((skip, up_feat, up_flow), dim=1)

    def forward(self, key: Tensor, ref: Tensor) -> FlowOutput:
        """Flow(key, ref) on the C4 grid for images [B, 3, H, W] (normalised BGR x 255; ``key`` may be
        one image for all of ``ref``): sampling ``ref``'s features at pixel + flow aligns them to ``key``."""
        if key.shape[0] == 1 and ref.shape[0] > 1:
            key = key.expand(ref.shape[0], -1, -1, -1)
        x = F.avg_pool2d(torch.cat((key / 255, ref / 255), dim=1), 2, stride=2, ceil_mode=True)
        relu2 = _leaky(self.conv2(_leaky(self.flow_conv1(x))))
        relu4 = _leaky(self.conv3_1(_leaky(self.conv3(relu2))))
        relu6 = _leaky(self.conv4_1(_leaky(self.conv4(relu4))))
        relu8 = _leaky(self.conv5_1(_leaky(self.conv5(relu6))))
        relu10 = _leaky(self.conv6_1(_leaky(self.conv6(relu8))))

        concat2 = self._decode(relu10, self.Convolution1(relu10), relu8, self.deconv5, self.upsample_flow6to5)
        concat3 = self._decode(concat2, self.Convolution2(concat2), relu6, self.deconv4, self.upsample_flow5to4)
        concat4 = self._decode(concat3, self.Convolution3(concat3), relu4, self.deconv3, self.upsample_flow4to3)
        concat5 = self._decode(concat4, self.Convolution4(concat4), relu2, self.deconv2, self.upsample_flow3to2)
        concat5 = F.avg_pool2d(concat5, 2, stride=2, ceil_mode=True)
        flow = self.Convolution5(concat5) * FLOW_SCALE
        scale = self.Convolution5_scale(concat5) + 1 if self.has_scale else None
        return FlowOutput(flow, scale)


class RAFTFlow(nn.Module):
    """torchvision's RAFT-small behind :class:`FlowNetS`'s interface: randomly initialised, or filled by
    :func:`load_raft_weights` from a local file (``*.flownet_weights``; nothing is downloaded).

    The images are turned back into RGB in [-1, 1] (RAFT's input) and padded at the bottom/right (edge
    replication) to a multiple of 8 and at least 128 pixels; the full-resolution flow of the last of
    ``num_flow_updates`` refinements is average-pooled to the C4 grid and divided by ``stride`` (image
    pixels -> C4 pixels). RAFT's own convention matches FlowNet's: frame 1 at x matches frame 2 at
    x + flow(x).
    """

    has_scale = False

    def __init__(self, pixel_mean: Sequence[float] = (102.9801, 115.9465, 122.7717),
                 pixel_std: Sequence[float] = (1.0, 1.0, 1.0), stride: int = 16, num_flow_updates: int = 12) -> None:
        super().__init__()
        self.raft = raft_small(weights=None, progress=False)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False)
        self.stride = stride
        self.num_flow_updates = num_flow_updates

    def _rgb(self, images: Tensor) -> Tensor:
        # The input convention (megavod.data.transforms): (BGR x 255 - mean) / std.
        rgb = (images * self.pixel_std + self.pixel_mean).flip(1)
        return rgb / 127.5 - 1

    def forward(self, key: Tensor, ref: Tensor) -> FlowOutput:
        if key.shape[0] == 1 and ref.shape[0] > 1:
            key = key.expand(ref.shape[0], -1, -1, -1)
        h, w = ref.shape[-2:]
        # RAFT needs sides that are multiples of 8 and at least 128 pixels (its correlation pyramid).
        pad = (0, max(w + (-w) % 8, 128) - w, 0, max(h + (-h) % 8, 128) - h)
        a, b = (F.pad(self._rgb(t), pad, mode="replicate") for t in (key, ref))
        flow = self.raft(a, b, num_flow_updates=self.num_flow_updates)[-1][..., :h, :w]
        flow = F.avg_pool2d(flow, self.stride, stride=self.stride, ceil_mode=True) / self.stride
        return FlowOutput(flow, None)


def build_flow_network(kind: str, scale_channels: int | None, input_cfg: Any = None) -> nn.Module:
    """``"flownet_s"`` (the authors') or ``"raft_small"`` (no scale map; ``input_cfg``, a
    :class:`megavod.config.InputConfig`, gives the pixel mean/std to undo)."""
    if kind == "flownet_s":
        return FlowNetS(scale_channels)
    if kind == "raft_small":
        if input_cfg is None:
            return RAFTFlow()
        return RAFTFlow(tuple(input_cfg.pixel_mean), tuple(input_cfg.pixel_std))
    raise ValueError(f"flow network must be 'flownet_s' or 'raft_small', got {kind!r}")


def load_flownet_weights(flownet: nn.Module, path: str | Path) -> int:
    """Fill ``flownet`` from the authors' ``flownet.ckpt`` (``FLOWNET_WEIGHT``: a dict whose
    ``state_dict`` holds the FlowNet tensors) or any checkpoint holding ``flownet.*`` entries (an FGFA/DFF
    checkpoint). As the authors' ``load_flownet``, only entries whose names contain "flownet" count, and
    layers the file lacks (DFF's ``Convolution5_scale`` in FGFA's FlowNet) keep their init. Returns
    the number of tensors loaded; a shape mismatch or a file without any FlowNet tensor is an error."""
    sd = read_weights(path).state_dict
    own = flownet.state_dict()
    prefixed = any("flownet." in k for k in sd)  # else a bare FlowNet state dict (conv2.weight, ...)
    loaded = {}
    for key, value in sd.items():
        if prefixed and "flownet." not in key:
            continue
        name = key.split("flownet.", 1)[1] if prefixed else key
        if name in own:
            if tuple(value.shape) != tuple(own[name].shape):
                raise MegavodError(f"{path}: {key} is {tuple(value.shape)}, FlowNet expects {tuple(own[name].shape)}")
            loaded[name] = value
    if not loaded:
        raise MegavodError(f"{path}: no FlowNet tensor found (expected keys like flownet.flow_conv1.weight)")
    flownet.load_state_dict(loaded, strict=False)
    return len(loaded)


# Prefixes under which RAFT-small's tensors may sit in a file: torchvision's own state dict (none), a
# RAFTFlow's (``raft.``), an FGFA/DFF checkpoint trained with ``flow_network=raft_small`` (``flownet.raft.``).
_RAFT_PREFIXES = ("flownet.raft.", "raft.", "")


def load_raft_weights(flow: RAFTFlow, path: str | Path) -> int:
    """Fill ``flow.raft`` from a local file holding torchvision's RAFT-small state dict (e.g. the
    ``raft_small_C_T_V2`` weights torchvision publishes, saved with ``torch.save(model.state_dict())``),
    a :class:`RAFTFlow`'s or an FGFA/DFF checkpoint with one. Every RAFT tensor must be in the file with
    its shape, else nothing is loaded and one line names the first missing or misshapen keys. Returns
    the number of tensors loaded."""
    sd = read_weights(path).state_dict
    own = flow.raft.state_dict()
    for prefix in _RAFT_PREFIXES:
        found = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and k[len(prefix):] in own}
        if found:
            break
    missing = [k for k in own if k not in found]
    wrong = [f"{k} is {tuple(v.shape)}, expected {tuple(own[k].shape)}" for k, v in found.items()
             if tuple(v.shape) != tuple(own[k].shape)]
    if not found or missing or wrong:
        what = "; ".join(wrong[:2]) if wrong else f"missing {len(missing)} of {len(own)} RAFT-small tensors " \
            f"({', '.join(missing[:3])})"
        raise MegavodError(f"{path}: not torchvision RAFT-small weights: {what}")
    flow.raft.load_state_dict(found)
    return len(found)


def load_flow_weights(flow: nn.Module, path: str | Path) -> int:
    """``*.flownet_weights`` into whichever flow network the config built."""
    return load_raft_weights(flow, path) if isinstance(flow, RAFTFlow) else load_flownet_weights(flow, path)
