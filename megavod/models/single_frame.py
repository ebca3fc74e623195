"""Single-frame Faster R-CNN (docs/conventions.md#single-frame-detector):
C4 backbone -> RPN (300) -> res5/fc6/fc7 box head -> predictor.

Composed like torchvision's ``GeneralizedRCNN`` from parts passed in. ``forward`` takes images that
are already resized and normalised (BGR x 255 minus the pixel mean, see ``megavod.data.transforms``),
so boxes in and out are in the pixels of that tensor; rescaling to the original frame is the caller's
(``Detections.scale``).

The state dict equals the authors' ``vid_R_101_C4_1x`` key for key (535 entries, 156,075,207
elements; R-50: 282 / 47,640,007), so a released checkpoint loads after stripping ``module.``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from megavod.models.backbone import C4Backbone, build_backbone, load_pretrained_resnet
from megavod.models.roi_heads import RoIBoxHead, build_box_head
from megavod.models.rpn import RPN, build_rpn
from megavod.models.contract import KeyFrameInputs, KeyFrameOutput
from megavod.models.training_batch import box_head_losses, mean_losses, pad_images, sample_key_rois
from megavod.structures import Detections, FrameMaps


class SingleFrameDetector(nn.Module):
    """``backbone``, ``rpn`` and ``roi_heads["box"]`` (names chosen for checkpoint parity)."""

    def __init__(self, backbone: C4Backbone, rpn: RPN, box_head: RoIBoxHead):
        super().__init__()
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = nn.ModuleDict({"box": box_head})

    @property
    def box_head(self) -> RoIBoxHead:
        return self.roi_heads["box"]

    def forward(
        self,
        images: Tensor,
        targets: Sequence[Any] | None = None,
        image_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> dict[str, Tensor] | list[Detections]:
        """``images`` [B,3,H,W] normalised BGR255. Training: ``targets`` (one per image, with
        ``boxes`` [M,4] and ``labels`` [M], as attributes or dict keys) -> the 4 losses
        (``loss_objectness``, ``loss_rpn_box_reg``, ``loss_classifier``, ``loss_box_reg``), the mean over
        the images of each image's losses (docs/departures.md#batch-loss-normalisation). Eval: one
        :class:`Detections` per image. ``image_sizes`` ((H, W) per image) defaults to the tensor's
        size; pass it when the batch is padded."""
        if isinstance(images, (list, tuple)):  # the training engine's list of TrainSample
            images, targets, image_sizes = batch_samples(images)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape [B, 3, H, W], got {tuple(images.shape)}")
        if self.training and targets is None:
            raise ValueError("targets are required in training mode")
        if targets is not None and len(targets) != images.shape[0]:
            raise ValueError(f"got {len(targets)} targets for {images.shape[0]} images")
        if image_sizes is None:
            image_sizes = [tuple(images.shape[-2:])] * images.shape[0]
        c4 = self.backbone(images)
        if self.training:
            return mean_losses(self.image_losses(c4, image_sizes, targets))
        proposals, _ = self.rpn(c4, image_sizes, None)
        return self.box_head(c4, proposals, image_sizes, None)

    def image_losses(self, c4: Tensor, image_sizes: Sequence[tuple[int, int]],
                     targets: Sequence[Any]) -> list[dict[str, Tensor]]:
        """The 4 losses of each image of the C4 batch [B, C, h, w], each as for that image alone."""
        return box_head_losses(self.box_head, c4,
                               sample_key_rois(self.rpn, self.box_head.loss_computation, c4, image_sizes, targets))

    def sample_losses(self, batch: Sequence[Any]) -> list[dict[str, Tensor]]:
        """The 4 losses of each :class:`~megavod.data.vid_dataset.TrainSample` of ``batch`` (one backbone
        batch, zero-padded to the largest image); :meth:`forward` returns their mean."""
        if not self.training:
            raise ValueError("sample_losses computes training losses; call model.train() first")
        images, targets, image_sizes = batch_samples(batch)
        return self.image_losses(self.backbone(images), image_sizes, targets)

    # -- test: the detector contract (megavod.models.contract) -----------------------------------------

    @torch.no_grad()
    def frame_features(self, image: Tensor, index: int, original_size: tuple[int, int]) -> FrameMaps:
        """One resized, normalised frame [3, H, W] through the backbone."""
        return FrameMaps(index, image, self.backbone(image[None])[0], None, tuple(image.shape[-2:]), original_size)

    @torch.no_grad()
    def frame_features_batch(self, images: Tensor, indices: Sequence[int],
                             original_sizes: Sequence[tuple[int, int]]) -> list[FrameMaps]:
        """:meth:`frame_features` of B frames of one size [B, 3, H, W] in one backbone call."""
        return [FrameMaps(index, image, c4, None, tuple(images.shape[-2:]), original)
                for index, image, c4, original in zip(indices, images, self.backbone(images), original_sizes)]

    def new_stream_cache(self) -> None:
        """The single-frame detector keeps nothing between frames."""
        return None

    @torch.no_grad()
    def detect_key(self, inputs: KeyFrameInputs[FrameMaps], cache: None = None) -> KeyFrameOutput:
        """Detections of ``inputs.key`` alone, in the pixels of its original frame."""
        if self.training:
            raise ValueError("detect_key needs the model in eval mode")
        key = inputs.key
        c4, sizes = key.c4[None], [key.image_size]
        proposals, _ = self.rpn(c4, sizes, None)
        det = self.box_head(c4, proposals, sizes, None)[0]
        (h, w), (oh, ow) = key.image_size, key.original_size
        return KeyFrameOutput(det.scale(ow / w, oh / h))

    @torch.no_grad()
    def detect_keys(self, inputs: Sequence[KeyFrameInputs[FrameMaps]], caches: Sequence[None] = ()) -> list[KeyFrameOutput]:
        """:meth:`detect_key` of several key frames (e.g. of several streams): those of one size in one RPN
        and box-head call (6-8 % faster than one call each for single_R_101 on a CPU, benchmarks/README.md)."""
        if self.training:
            raise ValueError("detect_keys needs the model in eval mode")
        keys = [i.key for i in inputs]
        out: list[KeyFrameOutput | None] = [None] * len(keys)
        for size, members in _group_by_size(keys).items():
            c4 = torch.stack([keys[i].c4 for i in members])
            proposals, _ = self.rpn(c4, [size] * len(members), None)
            for i, det in zip(members, self.box_head(c4, proposals, [size] * len(members), None)):
                (h, w), (oh, ow) = size, keys[i].original_size
                out[i] = KeyFrameOutput(det.scale(ow / w, oh / h))
        return out


def _group_by_size(frames: Sequence[FrameMaps]) -> dict[tuple[int, int], list[int]]:
    groups: dict[tuple[int, int], list[int]] = {}
    for i, frame in enumerate(frames):
        groups.setdefault(tuple(frame.image_size), []).append(i)
    return groups


def batch_samples(samples: Sequence[Any]) -> tuple[Tensor, list[Any], list[tuple[int, int]]]:
    """Training samples -> (images zero-padded at the bottom/right to one size [B,3,H,W]
    (:func:`~megavod.models.training_batch.pad_images`), targets, (H, W) of each image)."""
    if not samples:
        raise ValueError("a training batch needs at least one sample")
    return pad_images([s.image for s in samples]), [s.target for s in samples], [s.image_size for s in samples]


def build_single_frame_detector(cfg: Any) -> SingleFrameDetector:
    """Detector from a ``megavod.config.Config``; loads ``model.backbone.weights`` (a local file) into
    the C4 body and res5 when set."""
    m = cfg.model
    backbone = build_backbone(m.backbone)
    detector = SingleFrameDetector(backbone, build_rpn(m.rpn, backbone.out_channels), build_box_head(m))
    if m.backbone.weights:
        load_pretrained_resnet(m.backbone.weights, backbone.body, detector.box_head.feature_extractor.head)
    return detector
