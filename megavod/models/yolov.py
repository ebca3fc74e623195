"""YOLOX and YOLOV as megavod detectors (docs/yolov.md).

Both follow the detector contract (:mod:`megavod.models.contract`):

* :class:`YOLOXDetector`, the single-frame base detector: the per-frame pass is the whole network
  (backbone, PAFPN, decoupled head, decode); the key-frame step is the authors' post-processing
  (``yolox/utils/boxes.py::postprocess``: obj x class score >= ``test_conf``, class-aware NMS).
* :class:`YOLOVDetector`: the per-frame pass is the YOLOX pass plus the feature selection (top 750 by
  objectness, class-aware NMS 0.75, 30 proposals with their class and regression features,
  ``yolox/models/yolovp_msa.py::YOLOXHead.postpro_woclass``). The key-frame step aggregates the
  proposals of the frames its schedule gives it (:class:`~megavod.inference.schedules.ChunkSchedule`:
  the key's chunk) and classifies the key's proposals again (``linear_pred``), as the authors' head does
  for a batch of frames. Their aggregation is row-separable, so a frame's output depends only on its
  chunk: offline, the first key frame of a chunk aggregates the whole chunk and the stream cache
  (:class:`ChunkLogits`) serves the chunk's other frames; online each key frame's window differs, and
  the step computes the key's rows only. Chunks of at most ``base_below`` frames give the base
  detector's output (their ``Predictor.inference``: ``if len(outputs) <= 4: outputs = outputs_ori``).

Module names are the authors' (``backbone.backbone.dark2...``, ``head.cls_convs2``, ``head.trans.msa...``,
``head.linear_pred``), so their ``ckpt["model"]`` loads as it is. Boxes come out in the frame's own pixels:
divided by the letterbox ratio r = min(S / h, S / w) (docs/yolov.md#input).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from megavod.data.transforms import letterbox_ratio
from megavod.models.contract import KeyFrameInputs, KeyFrameOutput
from megavod.models.yolov_head import YOLOVAggregation, base_detections, refined_detections, select_proposals
from megavod.models.yolov_online import OnlineBank, online_key_logits
from megavod.models.yolox import AnchorPredictions, build_yolox, yolox_detections
from megavod.models.yolox_losses import freeze_yolov_base, yolov_training_losses, yolox_training_losses
from megavod.structures import Detections


@dataclass
class AnchorFrame:
    """YOLOX's per-frame pass of one frame: every anchor's decoded box (input pixels), objectness and
    class scores; ``image_size`` (H, W) of the letterboxed input, ``original_size`` of the frame."""

    index: int
    boxes: Tensor
    objectness: Tensor
    class_scores: Tensor
    image_size: tuple[int, int]
    original_size: tuple[int, int]


@dataclass
class ProposalFrame:
    """YOLOV's per-frame pass of one frame: its selected proposals (at most ``proposals`` rows, in the
    selection's order) with their boxes (input pixels), objectness, class scores [P, C] and the class and
    regression features [P, C'] the aggregation reads."""

    index: int
    boxes: Tensor
    objectness: Tensor
    class_scores: Tensor
    cls_features: Tensor
    reg_features: Tensor
    image_size: tuple[int, int]
    original_size: tuple[int, int]

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def class_confidence(self) -> Tensor:
        """The highest class score of each proposal (the affinity's ``cls_score``)."""
        return self.class_scores.max(dim=1).values


@dataclass
class ChunkLogits:
    """A stream's cache of refined class logits per chunk: ``chunks[frames of the chunk]`` holds each
    frame's logits [P_t, C + 1] until that frame has had its key step."""

    chunks: dict[tuple[int, ...], dict[int, Tensor]] = field(default_factory=dict)

    def take(self, chunk: tuple[int, ...], frame: int) -> Tensor | None:
        """Frame ``frame``'s logits if its chunk was aggregated (and forget them: a frame is served once)."""
        entry = self.chunks.get(chunk)
        if entry is None or frame not in entry:
            return None
        logits = entry.pop(frame)
        if not entry:
            del self.chunks[chunk]
        return logits

    def key_logits(self, frames: Sequence[ProposalFrame], key_index: int,
                   compute: Callable[[Sequence[ProposalFrame]], Tensor]) -> Tensor:
        """The key's refined logits: from this cache when its chunk was aggregated at an earlier key frame,
        else ``compute`` (the chunk's frames -> every row's logits, stacked in order) on the whole chunk at
        once (every row's aggregation reads every row's attention output, so the key's rows alone cost about
        as much), its other frames' logits kept for their key steps. Both runtimes step through here."""
        chunk = tuple(f.index for f in frames)
        logits = self.take(chunk, frames[key_index].index)
        if logits is not None:
            return logits
        every = compute(frames)
        per_frame = dict(zip(chunk, torch.split(every, [len(f) for f in frames])))
        logits = per_frame.pop(chunk[key_index])
        if per_frame:
            self.put(chunk, per_frame)
        return logits

    def put(self, chunk: tuple[int, ...], logits: dict[int, Tensor]) -> None:
        """Keep a chunk's logits, dropping every kept chunk that shares a frame with it: offline chunks
        partition the video and stay until served; online windows overlap, so the cache holds one."""
        frames = set(chunk)
        for other in [c for c in self.chunks if frames.intersection(c)]:
            del self.chunks[other]
        self.chunks[chunk] = logits


def to_frame_pixels(det: Detections, image_size: tuple[int, int], original_size: tuple[int, int]) -> Detections:
    """Input-pixel boxes -> the frame's pixels: divided by the letterbox ratio (their ``bboxes /= ratio``)."""
    r = letterbox_ratio(original_size[0], original_size[1], min(image_size))
    return det.scale(1.0 / r, 1.0 / r)


def gives_base_output(inputs: KeyFrameInputs[ProposalFrame], base_below: int) -> bool:
    """Whether YOLOV's key step returns the base detector's output: a chunk of at most ``base_below`` frames
    (their ``Predictor.inference``), of one frame (their head's ``postprocess_single_img``), or a key
    without proposals."""
    return len(inputs.local or [inputs.key]) <= max(1, base_below) or len(inputs.key) == 0


class YOLOXDetector(nn.Module):
    """YOLOX: ``backbone`` (YOLOPAFPN around CSPDarknet) and ``head`` (the decoupled head), the authors'
    names. ``forward`` on a training batch returns the losses (:mod:`megavod.models.yolox_losses`)."""

    #: The authors evaluate in fp16 on CUDA (``Predictor``: ``model.half()``); megavod's API casts a
    #: detector with this flag to half precision on CUDA and keeps float32 on CPU.
    half_on_cuda = True

    def __init__(self, backbone: nn.Module, head: nn.Module, test_conf: float = 0.001, nms_thresh: float = 0.5,
                 use_l1: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.test_conf = test_conf
        self.nms_thresh = nms_thresh
        self.use_l1 = use_l1

    def forward(self, batch: Sequence[Any]) -> dict[str, Tensor]:
        """Training: the losses of a list of :class:`~megavod.data.vid_dataset.TrainSample` (letterboxed key
        frames; the authors' ``get_losses`` with SimOTA, :func:`~megavod.models.yolox_losses.yolox_losses`)."""
        if not self.training:
            raise ValueError("forward computes training losses; call model.train() first")
        return yolox_training_losses(self, batch, use_l1=self.use_l1)

    def predictions(self, images: Tensor) -> AnchorPredictions:
        """Decoded per-anchor outputs of ``images`` [B, 3, S, S] (BGR 0-255, letterboxed)."""
        dtype = next(self.parameters()).dtype
        return self.head(self.backbone(images.to(dtype)))

    # -- the detector contract ------------------------------------------------------------------------

    def new_stream_cache(self) -> None:
        return None

    @torch.no_grad()
    def frame_features(self, image: Tensor, index: int, original_size: tuple[int, int]) -> AnchorFrame:
        return self.frame_features_batch(image[None], [index], [original_size])[0]

    @torch.no_grad()
    def frame_features_batch(self, images: Tensor, indices: Sequence[int],
                             original_sizes: Sequence[tuple[int, int]]) -> list[AnchorFrame]:
        p = self.predictions(images)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        return [AnchorFrame(index, p.boxes[i], p.objectness[i], p.class_scores[i], size, original)
                for i, (index, original) in enumerate(zip(indices, original_sizes))]

    @torch.no_grad()
    def detect_key(self, inputs: KeyFrameInputs[AnchorFrame], cache: None = None) -> KeyFrameOutput:
        key = inputs.key
        det = yolox_detections(key.boxes.float(), key.objectness.float(), key.class_scores.float(),
                               self.test_conf, self.nms_thresh)
        return KeyFrameOutput(to_frame_pixels(det, key.image_size, key.original_size))


class YOLOVDetector(YOLOXDetector):
    """YOLOV: YOLOX with the video classification branch ``head.cls_convs2``, the aggregation
    ``head.trans`` and the refined classifier ``head.linear_pred`` (the authors' keys)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, *, proposals: int = 30, pre_top: int = 750,
                 pre_nms_thresh: float = 0.75, base_below: int = 4, test_conf: float = 0.001,
                 nms_thresh: float = 0.5, use_l1: bool = False):
        super().__init__(backbone, head, test_conf, nms_thresh, use_l1)
        if not isinstance(getattr(head, "trans", None), YOLOVAggregation):
            raise ValueError("YOLOVDetector needs a head with the aggregation `trans` and the classifier `linear_pred`")
        self.proposals = proposals
        self.pre_top = pre_top
        self.pre_nms_thresh = pre_nms_thresh
        self.base_below = base_below

    @property
    def aggregation(self) -> YOLOVAggregation:
        return self.head.trans

    def forward(self, batch: Sequence[Any]) -> dict[str, Tensor]:
        """Training: each sample is frames of one video (the key and its ``frames`` references, every one
        with its ground truth), run as the authors' batch: selection, aggregation over the sample's
        proposals, the YOLOX losses plus the refined class loss
        (:func:`~megavod.models.yolox_losses.yolov_training_losses`); the mean over samples."""
        if not self.training:
            raise ValueError("forward computes training losses; call model.train() first")
        return yolov_training_losses(self, batch, use_l1=self.use_l1)

    def new_stream_cache(self) -> ChunkLogits:
        return ChunkLogits()

    @torch.no_grad()
    def frame_features_batch(self, images: Tensor, indices: Sequence[int],
                             original_sizes: Sequence[tuple[int, int]]) -> list[ProposalFrame]:
        p = self.predictions(images)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        frames = []
        for i, (index, original) in enumerate(zip(indices, original_sizes)):
            keep = select_proposals(p.boxes[i], p.objectness[i], p.class_scores[i], self.pre_top,
                                    self.pre_nms_thresh, self.proposals)
            frames.append(ProposalFrame(index, p.boxes[i][keep], p.objectness[i][keep], p.class_scores[i][keep],
                                        p.cls_features[i][keep], p.reg_features[i][keep], size, original))
        return frames

    def chunk_logits(self, frames: Sequence[ProposalFrame], queries: slice | None = None) -> Tensor:
        """Refined class logits [Q, C + 1] of the rows ``queries`` of the frames' proposals stacked in
        order (all rows when None), every row a reference: the authors' head on a batch of frames."""
        rows = lambda name: torch.cat([getattr(f, name) for f in frames])  # noqa: E731
        features = self.aggregation(rows("cls_features"), rows("reg_features"),
                                    torch.cat([f.class_confidence for f in frames]), rows("objectness"),
                                    queries=queries)
        return self.head.linear_pred(features)

    @torch.no_grad()
    def detect_key(self, inputs: KeyFrameInputs[ProposalFrame], cache: ChunkLogits | None = None) -> KeyFrameOutput:
        key = inputs.key
        if gives_base_output(inputs, self.base_below):
            det = base_detections(key.boxes.float(), key.objectness.float(), key.class_scores.float(),
                                  self.test_conf, self.nms_thresh)
            return KeyFrameOutput(to_frame_pixels(det, key.image_size, key.original_size))
        logits = (cache if cache is not None else ChunkLogits()).key_logits(inputs.local, inputs.key_index,
                                                                            self.chunk_logits)
        det = refined_detections(key.boxes.float(), key.objectness.float(), logits[:, :-1].float(),
                                 self.test_conf, self.nms_thresh)
        return KeyFrameOutput(to_frame_pixels(det, key.image_size, key.original_size))


class YOLOVOnlineDetector(YOLOVDetector):
    """The authors' online YOLOV (``exps/yolov/yolov_*_online.py``, ``tools/yolov_demo_online.py``): the
    same network and weights as YOLOV; each frame's proposals are aggregated with 31 frames drawn from a
    bank of earlier frames and blended with the last 20 (:mod:`megavod.models.yolov_online`). The bank is
    the stream's cache (:class:`~megavod.models.yolov_online.OnlineBank`); the schedule gives the key
    alone, in frame order, so offline and online are the same."""

    def __init__(self, backbone: nn.Module, head: nn.Module, *, bank_seed: int = 42, bank_frames: int = 600,
                 chosen_frames: int = 31, local_frames: int = 20, **kwargs: Any):
        super().__init__(backbone, head, **kwargs)
        self.bank_settings = dict(seed=bank_seed, keep=bank_frames, chosen=chosen_frames, local=local_frames)

    def new_stream_cache(self) -> OnlineBank:
        return OnlineBank(**self.bank_settings)

    @torch.no_grad()
    def detect_key(self, inputs: KeyFrameInputs[ProposalFrame], cache: OnlineBank | None = None) -> KeyFrameOutput:
        """Frame k's detections from the bank of frames 0..k-1 (their loop: the base output while the bank
        holds fewer than 2 frames), then frame k enters the bank. Every frame takes its turn, in order."""
        if cache is None:
            raise ValueError("the online YOLOV key step needs its stream's bank (new_stream_cache())")
        key = inputs.key
        step = online_key_logits(self.aggregation, self.head.linear_pred, key, cache)
        if step is None:
            det = base_detections(key.boxes.float(), key.objectness.float(), key.class_scores.float(),
                                  self.test_conf, self.nms_thresh)
        else:
            det = refined_detections(key.boxes.float(), key.objectness.float(), step.logits.float(),
                                     self.test_conf, self.nms_thresh)
        cache.push(key, None if step is None else step.features)
        return KeyFrameOutput(to_frame_pixels(det, key.image_size, key.original_size))


def build_yolox_detector(cfg: Any) -> YOLOXDetector:
    """YOLOX from a config with a ``yolox`` section (:class:`megavod.methods.yolo_sections.YOLOXConfig`)."""
    s = cfg.section
    model = build_yolox(s.depth, s.width, s.num_classes, video_branch=False, prior_prob=s.prior_prob)
    return YOLOXDetector(model.backbone, model.head, s.test_conf, s.nms_thresh, s.use_l1)


def _yolov_network(s: Any) -> nn.Module:
    """The YOLOX network with ``cls_convs2``, then the aggregation and ``linear_pred`` on its head (the
    authors' ``yolovp_msa.py::YOLOXHead`` holds them there, hence their keys ``head.trans.*``,
    ``head.linear_pred.*``)."""
    model = build_yolox(s.depth, s.width, s.num_classes, video_branch=True, prior_prob=s.prior_prob)
    model.head.trans = YOLOVAggregation(s.channels, heads=s.heads, scale=s.scale, sim_thresh=s.sim_thresh,
                                        affinity=s.affinity)
    model.head.linear_pred = nn.Linear(4 * s.channels, s.num_classes + 1)
    return model


def _yolov_settings(s: Any) -> dict[str, Any]:
    return dict(proposals=s.proposals, pre_top=s.pre_top, pre_nms_thresh=s.pre_nms_thresh, base_below=s.base_below,
                test_conf=s.test_conf, nms_thresh=s.nms_thresh, use_l1=s.use_l1)


def build_yolov_detector(cfg: Any) -> YOLOVDetector:
    """YOLOV from a config with a ``yolov`` section (:class:`megavod.methods.yolo_sections.YOLOVConfig`), with
    the parts the authors' ``get_model`` freezes frozen (backbone, stems, cls_convs, reg_convs, reg_preds)."""
    model = _yolov_network(cfg.section)
    detector = YOLOVDetector(model.backbone, model.head, **_yolov_settings(cfg.section))
    freeze_yolov_base(detector)
    return detector


def build_yolov_online_detector(cfg: Any) -> YOLOVOnlineDetector:
    """Online YOLOV from a config with a ``yolov_online`` section
    (:class:`megavod.methods.yolo_sections.YOLOVOnlineConfig`)."""
    s = cfg.section
    model = _yolov_network(s)
    detector = YOLOVOnlineDetector(model.backbone, model.head, bank_seed=s.bank_seed, bank_frames=s.bank_frames,
                                   chosen_frames=s.chosen_frames, local_frames=s.local_frames, **_yolov_settings(s))
    freeze_yolov_base(detector)
    return detector
