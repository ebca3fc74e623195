"""What every detector's training forward shares when it takes B key frames at once
(docs/conventions.md#key-frames-per-process).

* :func:`pad_images`: the images of one role (keys and their local references, memory frames, ...) of
  all samples as one backbone batch, zero-padded at the bottom/right to the largest, as the authors'
  ``to_image_list`` (``SIZE_DIVISIBILITY`` 0: no rounding up). Each image keeps its own size for the RPN
  and the box head.
* :func:`sample_key_rois`: the RPN of the B key maps in one head call, then per sample, in sample order,
  its proposals, RPN losses and the RoIs sampled for the Fast R-CNN loss. The two samplers draw from the
  global torch stream; drawing sample by sample (RPN, then RoIs) makes a batch draw exactly what the B
  samples draw one after another.
* :func:`mean_losses`: a batch's losses are the mean over its samples of each sample's 4 losses, each
  normalised as for one image (docs/departures.md#batch-loss-normalisation). With B = 1 they are the
  sample's own losses, untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from megavod.models.roi_heads import FastRCNNLossComputation, RoIBoxHead, SampledRoIs
from megavod.models.rpn import RPN, Proposals


def pad_images(images: Sequence[Tensor]) -> Tensor:
    """Images [3, H_i, W_i] -> [N, 3, H, W], each zero-padded at the bottom/right to the largest H and W
    (zero is the pixel mean after normalisation). Images of one size are simply stacked."""
    if not images:
        raise ValueError("pad_images needs at least one image")
    sizes = [tuple(image.shape[-2:]) for image in images]
    if len(set(sizes)) == 1:
        return torch.stack(list(images))
    h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    batch = images[0].new_zeros(len(images), images[0].shape[0], h, w)
    for padded, image in zip(batch, images):
        padded[:, : image.shape[-2], : image.shape[-1]] = image
    return batch


@dataclass
class KeyRoIs:
    """One key frame's share of :func:`sample_key_rois`: its key-mode proposals (with the ground truth
    appended, as in training), its two RPN losses, and its sampled RoIs."""

    proposals: Proposals
    rpn_losses: dict[str, Tensor]
    sampled: SampledRoIs


def sample_key_rois(rpn: RPN, loss_computation: FastRCNNLossComputation, c4: Tensor,
                    image_sizes: Sequence[tuple[int, int]], targets: Sequence[Any]) -> list[KeyRoIs]:
    """The RPN on the key maps ``c4`` [B, C, h, w] (one head call), then, sample by sample: key-mode
    proposals, the RPN losses of that image alone, and its sampled RoIs (see the module docstring for
    why in this order)."""
    objectness, deltas = rpn.head(c4)
    anchors = rpn.anchors(c4)
    out = []
    one = len(image_sizes) == 1
    for i, (size, target) in enumerate(zip(image_sizes, targets)):
        # One image keeps the head's outputs themselves: a slice's backward copies the gradient into a new
        # tensor, which sums the bias gradient in another order (last-bit changes; B = 1 stays bit for bit).
        obj, reg = (objectness, deltas) if one else (objectness[i : i + 1], deltas[i : i + 1])
        proposals = rpn.select(obj, reg, anchors, [size], "key", [target])[0]
        rpn_losses = rpn.loss(obj, reg, anchors, [size], [target])
        out.append(KeyRoIs(proposals, rpn_losses, loss_computation.subsample([proposals], [target])))
    return out


def box_head_losses(box_head: RoIBoxHead, c4: Tensor, rois: Sequence[KeyRoIs]) -> list[dict[str, Tensor]]:
    """The 4 losses of each key frame of ``c4`` [B, C, h, w] with a plain (fc6/fc7) box head: res5, RoIAlign
    and the MLP on all sampled RoIs at once, the Fast R-CNN loss per sample."""
    boxes = [r.sampled.boxes[0] for r in rois]
    class_logits, box_regression = box_head.predictor(box_head.feature_extractor(c4, boxes))
    counts = [len(b) for b in boxes]
    return [
        {**r.rpn_losses, **box_head.loss_computation.loss(logits, regression, r.sampled)}
        for r, logits, regression in zip(rois, class_logits.split(counts), box_regression.split(counts))
    ]


def mean_losses(per_sample: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The mean over samples of each loss (B = 1: the sample's own tensors)."""
    if not per_sample:
        raise ValueError("mean_losses needs at least one sample")
    if len(per_sample) == 1:
        return dict(per_sample[0])
    return {name: sum(losses[name] for losses in per_sample) / len(per_sample) for name in per_sample[0]}
