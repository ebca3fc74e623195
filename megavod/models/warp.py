"""Bilinear feature warping by an optical flow field (FGFA and DFF, docs/conventions.md#fgfa-and-dff).

``warp(features, flow)`` samples ``features`` [B, C, H, W] at (x + flow_x, y + flow_y) for every output
pixel (x, y): ``flow[:, 0]`` is the column (x) displacement and ``flow[:, 1]`` the row (y) displacement,
both in pixels of the feature map, e.g. C4 pixels (stride 16). Frames are aligned to the key frame by
warping a reference frame's features with flow(key, reference).

The call reproduces the authors' ``resample`` bit for bit, because their FlowNet and heads were trained
through it: the sampling grid is the pixel grid plus the flow, normalised by ((W-1)/2, (H-1)/2) and
shifted by -1, which is the ``align_corners=True`` normalisation, but ``F.grid_sample(bilinear,
padding_mode='border')`` is called without ``align_corners``, i.e. with ``align_corners=False`` under
PyTorch >= 1.3. The two conventions disagree, so with the authors' call a zero flow is not exactly the
identity: output column x reads input column x * W / (W - 1) - 1/2 (clamped to [0, W-1] by the border
padding). The map is stretched by W / (W - 1) about the centre, by at most half a pixel at the edges
(W = 5: columns 0, 0.75, 2, 3.25, 4). ``align_corners=True`` gives the exact identity at zero flow and an
exact shift by a constant integer flow; it is available as an argument but not used by any preset
(it would change what the authors' weights compute).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def flow_grid(flow: Tensor) -> Tensor:
    """The authors' sampling grid [B, H, W, 2] (x, y last) for ``flow`` [B, 2, H, W]:
    (pixel + flow) / ((W-1)/2, (H-1)/2) - 1.

    A map one pixel wide or high would divide by zero in the authors' formula; its one column (row) is
    the only value bilinear sampling with border padding can return anyway, so the divisor is kept at
    least 1/2 there (same output, no inf/NaN).

    The divisors come from the pixel grid itself (its last column and row are W-1 and H-1), not from
    Python ints, so a traced graph (the ONNX export, docs/architecture.md#export-and-onnx-runtime) keeps
    the map's size a graph value and serves any frame size.
    """
    if flow.ndim != 4 or flow.shape[1] != 2:
        raise ValueError(f"flow must have shape [B, 2, H, W], got {tuple(flow.shape)}")
    ys = torch.arange(flow.shape[-2], dtype=flow.dtype, device=flow.device)
    xs = torch.arange(flow.shape[-1], dtype=flow.dtype, device=flow.device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    pixels = torch.stack((grid_x, grid_y))[None]  # [1, 2, H, W]
    half = torch.cat([xs[-1:], ys[-1:]]).clamp(min=1) / 2  # (max(W-1, 1), max(H-1, 1)) / 2
    return ((flow + pixels) / half.view(1, 2, 1, 1) - 1).permute(0, 2, 3, 1)


def warp(features: Tensor, flow: Tensor, align_corners: bool = False) -> Tensor:
    """``features`` [B, C, H, W] sampled at pixel + ``flow`` [B, 2, H, W] (bilinear, border padding).

    ``align_corners=False`` is the authors' call (see the module docstring); keep it for their weights.
    A flow batch of 1 is broadcast over the features' batch.
    """
    if features.ndim != 4:
        raise ValueError(f"features must have shape [B, C, H, W], got {tuple(features.shape)}")
    if flow.shape[-2:] != features.shape[-2:]:
        raise ValueError(
            f"flow is {tuple(flow.shape[-2:])} pixels but the features are {tuple(features.shape[-2:])}"
        )
    grid = flow_grid(flow.to(features.dtype))
    if grid.shape[0] != features.shape[0]:
        if grid.shape[0] != 1:
            raise ValueError(f"flow batch {grid.shape[0]} does not match the features' batch {features.shape[0]}")
        grid = grid.expand(features.shape[0], -1, -1, -1)
    return F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=align_corners)
