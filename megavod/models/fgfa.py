"""FGFA, flow-guided feature aggregation (Zhu et al. 2017; docs/conventions.md#fgfa-and-dff).

The C4 maps of the frames around the key are warped onto the key frame by FlowNet's flow and averaged
with per-pixel weights: the softmax over frames of the cosine similarity between each frame's warped
embedding (:class:`EmbedNet`) and the key's. The single-frame RPN and box head then run on the
aggregated map. Composition: the single-frame detector's ``backbone``, ``rpn`` and ``roi_heads.box``,
plus ``flownet`` and ``embednet``. State-dict names equal the authors' (checkpoint
``vid_R_101_C4_FGFA_1x``: 587 entries, 198,686,953 elements), so their checkpoints load key for key.

Training (:meth:`FGFADetector.sample_losses`, per key frame the ``ref`` frames drawn from ±9): the key's own
features are *not* in the sum; only the warped references are weighted (softmax over the references).
Their embeddings are taken after warping, the key's from its unwarped C4, as the authors'.

Test (:meth:`FGFADetector.detect_key`, driven by the streaming engine :mod:`megavod.inference.engine`): every frame's C4
and embedding are computed once (:meth:`FGFADetector.frame_features`); for each key frame the flow from
the key to every window frame (the key itself included, flow(key, key)) warps [C4, embedding] together,
and the weights are the softmax over the whole window (19 frames offline) of cos(warped E_j, warped E_key).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megavod.models.backbone import C4Backbone, build_backbone, load_pretrained_resnet
from megavod.models.flownet import build_flow_network, load_flow_weights
from megavod.models.roi_heads import RoIBoxHead, build_box_head
from megavod.models.rpn import RPN, build_rpn
from megavod.models.warp import warp
from megavod.models.contract import KeyFrameInputs, KeyFrameOutput
from megavod.models.training_batch import box_head_losses, mean_losses, pad_images, sample_key_rois
from megavod.structures import Detections, FrameMaps


class EmbedNet(nn.Module):
    """``embednet``: 1x1 C -> C/2, ReLU, 3x3 C/2 -> C/2, ReLU, 1x1 C/2 -> 2C (1024 -> 512 -> 512 -> 2048
    for ResNet; kaiming_uniform(a=1), bias 0, as the authors')."""

    def __init__(self, in_channels: int = 1024) -> None:
        super().__init__()
        hidden = in_channels // 2
        self.embed_conv1 = nn.Conv2d(in_channels, hidden, 1)
        self.embed_conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.embed_conv3 = nn.Conv2d(hidden, 2 * in_channels, 1)
        for layer in (self.embed_conv1, self.embed_conv2, self.embed_conv3):
            nn.init.kaiming_uniform_(layer.weight, a=1)
            nn.init.zeros_(layer.bias)
        self.out_channels = 2 * in_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.embed_conv3(F.relu(self.embed_conv2(F.relu(self.embed_conv1(x)))))


def aggregation_weights(embeds: Tensor, key_embed: Tensor) -> Tensor:
    """Per-pixel weights [N, 1, h, w] of N frames: softmax over the frames of the cosine similarity
    between each frame's embedding [N, D, h, w] and the key's [1, D, h, w] (norms + 1e-10, as the
    authors'). They sum to 1 at every position."""
    a = embeds / (embeds.norm(dim=1, keepdim=True) + 1e-10)
    b = key_embed / (key_embed.norm(dim=1, keepdim=True) + 1e-10)
    return F.softmax((a * b).sum(dim=1, keepdim=True), dim=0)


class FlowDetectorBase(nn.Module):
    """What FGFA and DFF share: the single-frame RPN and box head run on a (warped) C4 map."""

    rpn: RPN

    @property
    def box_head(self) -> RoIBoxHead:
        return self.roi_heads["box"]

    def detect_on_features(self, feats: Tensor, image_size: tuple[int, int],
                           original_size: tuple[int, int]) -> Detections:
        """Detections (original-frame pixels) of a C4-like map [1, C, h, w] of an image of ``image_size``."""
        proposals = self.rpn.proposals(feats, [image_size], "key")
        det = self.box_head(feats, proposals, [image_size])[0]
        (h, w), (oh, ow) = image_size, original_size
        return det.scale(ow / w, oh / h)

    def losses_on_features(self, feats: Tensor, image_sizes: Sequence[tuple[int, int]],
                           targets: Sequence[Any]) -> list[dict[str, Tensor]]:
        """The 4 single-frame losses of each key frame, ``feats`` [B, C, h, w] standing for the key frames'
        C4 (one per sample, each as for that sample alone)."""
        rois = sample_key_rois(self.rpn, self.box_head.loss_computation, feats, image_sizes, targets)
        return box_head_losses(self.box_head, feats, rois)

    def forward(self, batch: Sequence[Any]) -> dict[str, Tensor]:
        """Training losses of a batch of :class:`~megavod.data.vid_dataset.TrainSample`: the mean over the
        samples of :meth:`sample_losses` (docs/departures.md#batch-loss-normalisation)."""
        if not self.training:
            raise ValueError(f"{type(self).__name__}.forward computes training losses; use the flow engine to detect")
        return mean_losses(self.sample_losses(batch))

    def sample_losses(self, batch: Sequence[Any]) -> list[dict[str, Tensor]]:
        """The 4 losses of each sample of ``batch``."""
        raise NotImplementedError


def sample_references(batch: Sequence[Any], method: str) -> list[list[Tensor]]:
    """Each sample's ``refs["ref"]`` images; a method needs at least one training sample."""
    if not batch:
        raise ValueError(f"{method} training needs at least one sample")
    return [list(sample.refs.get("ref", [])) for sample in batch]


class FGFADetector(FlowDetectorBase):
    """FGFA (see the module docstring).

    Args:
        backbone, rpn, box_head: the single-frame detector's parts (``roi_heads.box``).
        flownet: :class:`~megavod.models.flownet.FlowNetS` (no scale layer) or ``RAFTFlow``.
        embednet: :class:`EmbedNet`.
        flow_batch: window frames per FlowNet call at test time (bounds memory; same numbers).
        warp_align_corners: ``grid_sample``'s convention; False is the authors' (:mod:`megavod.models.warp`).
    """

    def __init__(self, backbone: C4Backbone, flownet: nn.Module, embednet: EmbedNet, rpn: RPN,
                 box_head: RoIBoxHead, flow_batch: int = 19, warp_align_corners: bool = False) -> None:
        super().__init__()
        if flow_batch < 1:
            raise ValueError(f"flow_batch must be >= 1, got {flow_batch}")
        # Registration order = the authors' state-dict order (backbone, flownet, embednet, rpn, roi_heads).
        self.backbone = backbone
        self.flownet = flownet
        self.embednet = embednet
        self.rpn = rpn
        self.roi_heads = nn.ModuleDict({"box": box_head})
        self.flow_batch = flow_batch
        self.warp_align_corners = warp_align_corners

    # -- test: the flow engine's entry points ----------------------------------------------------------

    def frame_maps(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """C4 [B, C, h, w] and embedding [B, 2C, h, w] of frames [B, 3, H, W]: the per-frame pass (the ONNX
        per-frame graph is this method)."""
        c4 = self.backbone(images)
        return c4, self.embednet(c4)

    @torch.no_grad()
    def frame_features(self, image: Tensor, index: int, original_size: tuple[int, int]) -> FrameMaps:
        """C4 and embedding of one frame [3, H, W] (once per frame)."""
        c4, embed = self.frame_maps(image[None])
        return FrameMaps(index, image, c4[0], embed[0], tuple(image.shape[-2:]), original_size)

    @torch.no_grad()
    def frame_features_batch(self, images: Tensor, indices: Sequence[int],
                             original_sizes: Sequence[tuple[int, int]]) -> list[FrameMaps]:
        """:meth:`frame_features` of B frames of one size [B, 3, H, W] in one backbone and embedding call."""
        c4, embeds = self.frame_maps(images)
        return [FrameMaps(index, image, c, e, tuple(images.shape[-2:]), original)
                for index, image, c, e, original in zip(indices, images, c4, embeds, original_sizes)]

    def aggregate_maps(self, images: Tensor, maps: Tensor, key_index: int | Tensor) -> tuple[Tensor, Tensor]:
        """The key step's aggregation over a window of N frames given as tensors: images [N, 3, H, W] and
        each frame's C4 and embedding concatenated along the channels, ``maps`` [N, C + D, h, w], the key at
        ``key_index`` (an int or an int64 tensor [1]). Flow from the key to every frame (the key's own
        included), the maps warped together, per-pixel softmax weights of the cosine similarity to the key's
        warped embedding, the weighted sum. Returns the aggregated C4 [1, C, h, w] and the weights
        [N, 1, h, w]. The ONNX key graph traces this method (the window a dynamic axis, the key's place a
        graph input)."""
        index = (key_index.reshape(1) if isinstance(key_index, Tensor)
                 else torch.tensor([key_index], dtype=torch.int64, device=images.device))
        key_image = images.index_select(0, index)
        # FlowNet in parts of flow_batch frames (bounds memory, same numbers); a traced graph takes the
        # window, a dynamic axis, in one call (a Python loop over it would freeze the traced window's size).
        step = images.shape[0] if torch.jit.is_tracing() else self.flow_batch
        warped = []
        for start in range(0, images.shape[0], step):
            part = images[start : start + step]
            # Expanded here, not by the flow network's "one key for all" branch: a trace keeps no Python branch.
            flow = self.flownet(key_image.expand(part.shape[0], -1, -1, -1), part).flow
            warped.append(warp(maps[start : start + step], flow, self.warp_align_corners))
        embed_channels = self.embednet.out_channels
        warped_c4, warped_embeds = torch.cat(warped).split([maps.shape[1] - embed_channels, embed_channels], dim=1)
        weights = aggregation_weights(warped_embeds, warped_embeds.index_select(0, index))
        return (weights * warped_c4).sum(dim=0, keepdim=True), weights

    @torch.no_grad()
    def aggregate(self, window: Sequence[FrameMaps], key_index: int) -> tuple[Tensor, Tensor]:
        """The key's aggregated C4 [1, C, h, w] and the per-pixel weights [N, 1, h, w] over ``window``
        (N frames, the key at ``key_index``; copies of a frame at the video's edges count each time):
        :meth:`aggregate_maps` of the window's stacked maps."""
        if not 0 <= key_index < len(window):
            raise ValueError(f"key_index {key_index} outside a window of {len(window)} frames")
        return self.aggregate_maps(torch.stack([f.image for f in window]),
                                   torch.stack([torch.cat((f.c4, f.embed)) for f in window]), key_index)

    def new_stream_cache(self) -> None:
        """FGFA keeps nothing between key frames but the window, which the stream holds."""
        return None

    @torch.no_grad()
    def detect_key(self, inputs: KeyFrameInputs[FrameMaps], cache: None = None) -> KeyFrameOutput:
        """Detections of the key frame ``inputs.local[inputs.key_index]`` from its window ``inputs.local``."""
        feats, _ = self.aggregate(inputs.local, inputs.key_index)
        key = inputs.local[inputs.key_index]
        return KeyFrameOutput(self.detect_on_features(feats, key.image_size, key.original_size))

    # -- training (docs/conventions.md#fgfa-and-dff) ---------------------------------------------------

    def sample_losses(self, batch: Sequence[Any]) -> list[dict[str, Tensor]]:
        """The 4 losses of each :class:`~megavod.data.vid_dataset.TrainSample` of ``batch``, whose
        ``refs["ref"]`` hold its reference images (2, of its key's size and flip).

        All keys and references go through the backbone as one batch (keys first, then each sample's
        references; zero-padded to the largest image), FlowNet runs on every (key, reference) pair at once
        and the embedding network on all maps at once; the weights are a softmax over each sample's own
        references."""
        refs = sample_references(batch, "FGFA")
        if not all(refs):
            raise ValueError("FGFA training needs at least one reference frame (refs['ref'], fgfa.train_refs)")
        b, counts = len(batch), [len(r) for r in refs]
        images = pad_images([sample.image for sample in batch] + [image for r in refs for image in r])
        c4 = self.backbone(images)
        keys = torch.cat([images[i : i + 1].expand(count, -1, -1, -1) for i, count in enumerate(counts)])
        flow = self.flownet(keys, images[b:]).flow
        warped = warp(c4[b:], flow, self.warp_align_corners)
        embeds = self.embednet(torch.cat([c4[:b], warped]))
        feats, start = [], 0
        for i, count in enumerate(counts):
            rows = slice(start, start + count)
            weights = aggregation_weights(embeds[b:][rows], embeds[i : i + 1])
            feats.append((weights * warped[rows]).sum(dim=0, keepdim=True))
            start += count
        return self.losses_on_features(torch.cat(feats), [s.image_size for s in batch], [s.target for s in batch])


def build_flow_parts(cfg: Any, method_cfg: Any, scale: bool) -> tuple[C4Backbone, nn.Module, RPN, RoIBoxHead]:
    """backbone, flow network (with DFF's scale layer when ``scale``), RPN and plain box head; loads
    ``model.backbone.weights`` and ``<method>.flownet_weights`` when set."""
    m = cfg.model
    backbone = build_backbone(m.backbone)
    scale_channels = backbone.out_channels if scale else None
    flownet = build_flow_network(method_cfg.flow_network, scale_channels, cfg.input)
    box_head = build_box_head(m)
    if m.backbone.weights:
        load_pretrained_resnet(m.backbone.weights, backbone.body, box_head.feature_extractor.head)
    if method_cfg.flownet_weights:
        load_flow_weights(flownet, method_cfg.flownet_weights)
    return backbone, flownet, build_rpn(m.rpn, backbone.out_channels), box_head


def build_fgfa_detector(cfg: Any) -> FGFADetector:
    """FGFA from a :class:`megavod.config.Config` (``model``, ``fgfa``)."""
    backbone, flownet, rpn, box_head = build_flow_parts(cfg, cfg.fgfa, scale=False)
    window = cfg.fgfa.window
    return FGFADetector(backbone, flownet, EmbedNet(backbone.out_channels), rpn, box_head, flow_batch=window)
