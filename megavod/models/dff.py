"""DFF, deep feature flow (Zhu et al. 2017; docs/conventions.md#fgfa-and-dff).

Only key frames go through the backbone; every frame's C4 is the last key frame's C4 warped by
flow(frame, key) and multiplied by FlowNet's per-channel scale map (``Convolution5_scale`` + 1). The
single-frame RPN and box head then run on it. DFF is causal by design: a frame needs only itself and the
last key frame (its schedule: :class:`megavod.inference.schedules.KeyFrameSchedule`).

As the authors' code (which says it departs slightly from the paper):

* test: key frames are the frames whose number is a multiple of ``key_interval`` (10), per video; the
  key frame itself also goes through the flow network, flow(key, key), and is warped and scaled;
* training: one reference drawn from offsets [-9, 0] acts as the key frame; only it goes through the
  backbone, and the current frame's ground truth supervises warp(C4_ref, flow(cur, ref)) x scale.

State-dict names equal the authors' (``vid_R_101_C4_DFF_1x``: 582 entries, 194,950,377 elements).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from megavod.models.backbone import C4Backbone
from megavod.models.contract import KeyFrameInputs, KeyFrameOutput
from megavod.models.fgfa import FlowDetectorBase, build_flow_parts, sample_references
from megavod.models.roi_heads import RoIBoxHead
from megavod.models.rpn import RPN
from megavod.models.training_batch import pad_images
from megavod.models.warp import warp
from megavod.structures import FrameMaps


class DFFDetector(FlowDetectorBase):
    """DFF (see the module docstring).

    Args:
        backbone, rpn, box_head: the single-frame detector's parts.
        flownet: :class:`~megavod.models.flownet.FlowNetS` with ``Convolution5_scale`` (or ``RAFTFlow``,
            which has no scale map: scale 1).
        key_interval: a key frame every this many frames (code: 10, hard-coded).
        warp_align_corners: ``grid_sample``'s convention; False is the authors' (:mod:`megavod.models.warp`).
    """

    def __init__(self, backbone: C4Backbone, flownet: nn.Module, rpn: RPN, box_head: RoIBoxHead,
                 key_interval: int = 10, warp_align_corners: bool = False) -> None:
        super().__init__()
        if key_interval < 1:
            raise ValueError(f"key_interval must be >= 1, got {key_interval}")
        self.backbone = backbone
        self.flownet = flownet
        self.rpn = rpn
        self.roi_heads = nn.ModuleDict({"box": box_head})
        self.key_interval = key_interval
        self.warp_align_corners = warp_align_corners

    def is_key_frame(self, index: int) -> bool:
        """Frame ``index`` (its number in the video) is a key frame: index mod key_interval == 0."""
        return index % self.key_interval == 0

    def propagate(self, image: Tensor, key_image: Tensor, key_c4: Tensor) -> Tensor:
        """The frame's C4 [B, C, h, w] from the key's: warp(C4_key, flow(frame, key)) x scale.

        ``image``, ``key_image``: [B, 3, H, W]; ``key_c4``: [B, C, h, w]."""
        out = self.flownet(image, key_image)
        feats = warp(key_c4, out.flow, self.warp_align_corners)
        return feats if out.scale is None else feats * out.scale

    # -- test: the detector contract (megavod.models.contract) -----------------------------------------

    @torch.no_grad()
    def frame_features(self, image: Tensor, index: int, original_size: tuple[int, int]) -> FrameMaps:
        """A frame's pass: the backbone runs on key frames only; other frames keep just their image."""
        c4 = self.backbone(image[None])[0] if self.is_key_frame(index) else None
        return FrameMaps(index, image, c4, None, tuple(image.shape[-2:]), original_size)

    @torch.no_grad()
    def frame_features_batch(self, images: Tensor, indices: Sequence[int],
                             original_sizes: Sequence[tuple[int, int]]) -> list[FrameMaps]:
        """:meth:`frame_features` of B frames of one size [B, 3, H, W]: one backbone call on the key frames."""
        keys = [i for i, index in enumerate(indices) if self.is_key_frame(index)]
        c4: list[Tensor | None] = [None] * len(indices)
        if keys:
            for i, maps in zip(keys, self.backbone(images[keys])):
                c4[i] = maps
        return [FrameMaps(index, image, c, None, tuple(images.shape[-2:]), original)
                for index, image, c, original in zip(indices, images, c4, original_sizes)]

    def new_stream_cache(self) -> None:
        """DFF keeps nothing between frames but the last key frame, which the stream holds."""
        return None

    @torch.no_grad()
    def detect_key(self, inputs: KeyFrameInputs[FrameMaps], cache: None = None) -> KeyFrameOutput:
        """Detections of frame ``inputs.key`` (original-frame pixels) from the key frame ``inputs.local[0]``."""
        frame, key = inputs.key, inputs.local[0]
        if key.c4 is None:
            raise ValueError(f"frame {key.index} is not a key frame of this DFF (key_interval {self.key_interval})")
        if frame.image_size != key.image_size:
            raise ValueError(f"frame is {frame.image_size} pixels but its key frame is {key.image_size}")
        feats = self.propagate(frame.image[None], key.image[None], key.c4[None])
        return KeyFrameOutput(self.detect_on_features(feats, frame.image_size, frame.original_size))

    # -- training (docs/conventions.md#fgfa-and-dff) ---------------------------------------------------

    def sample_losses(self, batch: Sequence[Any]) -> list[dict[str, Tensor]]:
        """The 4 losses of each :class:`~megavod.data.vid_dataset.TrainSample` of ``batch``, whose
        ``refs["ref"]`` holds the one frame (offset in [-9, 0]) that plays its key frame. The B reference
        frames go through the backbone as one batch, FlowNet on the B (frame, reference) pairs at once."""
        refs = sample_references(batch, "DFF")
        if any(len(r) != 1 for r in refs):
            raise ValueError(f"DFF trains with exactly one reference frame (refs['ref']), got {[len(r) for r in refs]}")
        ref = pad_images([r[0] for r in refs])
        feats = self.propagate(pad_images([sample.image for sample in batch]), ref, self.backbone(ref))
        return self.losses_on_features(feats, [s.image_size for s in batch], [s.target for s in batch])


def build_dff_detector(cfg: Any) -> DFFDetector:
    """DFF from a :class:`megavod.config.Config` (``model``, ``dff``)."""
    backbone, flownet, rpn, box_head = build_flow_parts(cfg, cfg.dff, scale=True)
    return DFFDetector(backbone, flownet, rpn, box_head, key_interval=cfg.dff.key_interval)
