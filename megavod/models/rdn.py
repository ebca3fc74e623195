"""RDN, relation distillation networks (Deng et al. 2019; docs/conventions.md#rdn): RDN-base and RDN.

The key frame's proposals are enhanced by location-based relation modules (:mod:`megavod.models.relation`,
no content bias) over the supportive proposals of a window of T = 37 frames (the key at 18, ±18 frames):

* **basic stages** i < B (``rdn.basic_stages``, 2): X <- ReLU(fcs[i](X)) (fcs[0] is the raw RoI feature,
  fc6), then X <- X + Rel_i(X, S), where S are the raw features ReLU(fcs[0](.)) of the 75 supportive
  proposals of every window frame; S is not updated between basic stages.
* **advanced stage** (RDN, ``rdn.advanced_stages`` A = 1): the advanced set D is the first
  int(75 * ``rdn.ratio``) = 15 (highest-objectness) proposals of every frame; for a < A,
  D <- ReLU(fcs[B+a](D + Rel_{B+a}(D, S))); finally X <- X + Rel_{B+A}(X, D).

RDN-base (A = 0) has ``fcs[0..B-1]`` and relation modules 0..B-1; RDN (A > 0) has ``fcs[0..B+A-1]`` and
modules 0..B+A. Two-phase training as the authors': RDN-base for 120k iterations, then RDN from its
weights for 60k (``model.init_weights``: the new ``fcs.2`` and modules 2, 3 start random, nothing is
frozen, optimizer and iteration start afresh).

The detector holds weights only: it follows the detector contract (:mod:`megavod.models.contract`) like
MEGA without global pool or memory: :meth:`RDNDetector.frame_features` once per frame,
:meth:`RDNDetector.detect_key` per key frame with the window its schedule gives.
A frame's 75 supportive proposals are the first 75 of its 300 test proposals (one RPN pass, as MEGA).

Parameter names map one to one to the authors' ``roi_heads.box.feature_extractor.*`` keys
(:meth:`RDNAggregator.authors_key_mapping`): ``aggregator.fcs.{i}`` -> ``fcs.{i}``,
``aggregator.relations.{i}.W{g,q,k,v}`` -> ``W{g,q,k,v}s.{i}``. RDN-base R-101 has the authors' 551
entries (162,374,887 elements), RDN R-101 569 (169,724,167).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megavod.config import Config
from megavod.models.contract import KeyFrameInputs, KeyFrameOutput
from megavod.models.relation import RelationModule, first_rows_index, make_fc_init
from megavod.models.relation_detector import RelationDetector, build_relation_detector
from megavod.structures import FrameFeatures


class RDNAggregator(nn.Module):
    """RDN's relation distillation on RoI features (see the module docstring).

    Args:
        in_features: flattened pooled RoI size (2048*49 R-101, 256*49 with the reduce conv).
        feat_dim: C (1024).
        num_heads, embed_dim, wave_length: of every relation module (16, 64, 1000).
        basic_stages: B (2).
        advanced_stages: A (0: RDN-base; 1: RDN).
        advanced_num: rows per frame in the advanced set D (int(75 * 0.2) = 15).
    """

    def __init__(self, in_features: int, feat_dim: int = 1024, num_heads: int = 16, embed_dim: int = 64, *,
                 basic_stages: int = 2, advanced_stages: int = 0, advanced_num: int = 15,
                 wave_length: float = 1000.0) -> None:
        super().__init__()
        if basic_stages < 1:
            raise ValueError(f"basic_stages must be >= 1, got {basic_stages}")
        if advanced_stages < 0:
            raise ValueError(f"advanced_stages must be >= 0, got {advanced_stages}")
        if advanced_num < 1:
            raise ValueError(f"advanced_num must be >= 1, got {advanced_num}")
        self.basic_stages, self.advanced_stages = basic_stages, advanced_stages
        self.advanced_num = advanced_num
        self.feat_dim = feat_dim
        num_fcs = basic_stages + advanced_stages
        num_relations = basic_stages + (advanced_stages + 1 if advanced_stages else 0)
        self.fcs = nn.ModuleList(
            [nn.Linear(in_features, feat_dim)] + [nn.Linear(feat_dim, feat_dim) for _ in range(num_fcs - 1)]
        )
        for fc in self.fcs:
            make_fc_init(fc)
        self.relations = nn.ModuleList(
            RelationModule(feat_dim, num_heads, embed_dim, location_based=True, content_bias=False,
                           wave_length=wave_length)
            for _ in range(num_relations)
        )

    @classmethod
    def from_config(cls, cfg: Config, in_features: int) -> RDNAggregator:
        return cls(
            in_features,
            feat_dim=cfg.model.roi_head.representation_size,
            num_heads=cfg.relation.num_heads,
            embed_dim=cfg.relation.embed_dim,
            basic_stages=cfg.rdn.basic_stages,
            advanced_stages=cfg.rdn.advanced_stages,
            advanced_num=cfg.rdn.advanced_rows(cfg.model.rpn),
            wave_length=cfg.relation.wave_length,
        )

    def embed(self, pooled: Tensor) -> Tensor:
        """Raw RoI features ReLU(fcs[0](flatten(pooled))): [R, ...] -> [R, C] (the authors' ``_forward_ref``)."""
        return F.relu(self.fcs[0](pooled.flatten(1)))

    def advanced_stage(self, support: Tensor, support_boxes: Tensor, counts: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        """The advanced set D (first ``advanced_num`` rows of every frame) after the A distillation
        stages over all supportive rows: (features [D, C], boxes [D, 4])."""
        index = first_rows_index(counts, self.advanced_num, support.device)
        adv, adv_boxes = support[index], support_boxes[index]
        for a in range(self.advanced_stages):
            i = self.basic_stages + a
            adv = adv + self.relations[i](adv, support, adv_boxes, support_boxes)
            adv = F.relu(self.fcs[i](adv))
        return adv, adv_boxes

    def forward(self, key: Tensor, key_boxes: Tensor, support: Tensor, support_boxes: Tensor,
                counts: Sequence[int] | Tensor) -> Tensor:
        """Enhanced key features [K, C] for the box predictor. Traces to ONNX with the row counts as graph
        values (``counts`` a tensor): the exported key graph is this method (docs/architecture.md#export-and-onnx-runtime).

        Args:
            key: the key frame's raw RoI features [K, C] (:meth:`embed`); key_boxes: [K, 4].
            support: raw features [S, C] of the supportive proposals, frame by frame; support_boxes: [S, 4].
            counts: rows per supportive frame (sum = S), for the advanced set.
        """
        if not torch.jit.is_tracing() and sum(counts) != support.shape[0]:
            raise ValueError(f"counts sum to {sum(counts)} but there are {support.shape[0]} supportive rows")
        x = key
        for i in range(self.basic_stages):
            if i > 0:
                x = F.relu(self.fcs[i](x))
            x = x + self.relations[i](x, support, key_boxes, support_boxes)
        if self.advanced_stages:
            adv, adv_boxes = self.advanced_stage(support, support_boxes, counts)
            x = x + self.relations[-1](x, adv, key_boxes, adv_boxes)
        return x

    def authors_key_mapping(self) -> dict[str, str]:
        """{our parameter name: the authors' feature-extractor key}, e.g. ``relations.3.Wq.weight`` ->
        ``Wqs.3.weight`` (docs/conventions.md#state-dict-names)."""
        mapping = {}
        for name, _ in self.named_parameters():
            m = re.match(r"^relations\.(\d+)\.(W[gqkv])\.(.+)$", name)
            mapping[name] = f"{m.group(2)}s.{m.group(1)}.{m.group(3)}" if m else name
        return mapping


class RDNDetector(RelationDetector):
    """RDN-base / RDN detector: backbone, RPN and a box head whose aggregator is an :class:`RDNAggregator`.

    ``ref_proposals``: supportive proposals per frame (code 75, ``REF_POST_NMS_TOP_N``).
    """

    # -- inference: the relation streaming engine's entry point ----------------------------------------

    @torch.no_grad()
    def detect_key(self, inputs: KeyFrameInputs[FrameFeatures], cache: None = None) -> KeyFrameOutput:
        """Detections of the key frame (original-frame pixels) with the T window frames' supportive
        proposals (``inputs.local``, the key's own among them). RDN has no global pool and no memory:
        both must be empty, and nothing is pushed to memory.

        ``inputs.relation_inputs``: attach to the detections their query rows in the last relation
        module (for BLR, docs/departures.md#blr-as-megavod-reads-the-paper); the detections are the same."""
        if inputs.global_pool or inputs.memory is not None:
            raise ValueError("RDN uses neither a global pool nor a memory (its schedule has none)")
        if not inputs.local:
            raise ValueError("the local window must hold at least one frame")
        n, key = self.ref_proposals, inputs.key
        support = torch.cat([f.feats[:n] for f in inputs.local])
        support_boxes = torch.cat([f.boxes[:n] for f in inputs.local])
        counts = [min(n, len(f.boxes)) for f in inputs.local]
        with self.capture_relation_query(inputs.relation_inputs) as tap:
            feats = self.aggregator(key.feats, key.boxes, support, support_boxes, counts)
        return KeyFrameOutput(self.predict(key, feats, tap.inputs))

    def blr_relation_module(self) -> RelationModule:
        """The last relation module (RDN-base: basic stage B-1; RDN: the key over the advanced set);
        its queries are the key rows."""
        return self.aggregator.relations[-1]

    # -- training (docs/conventions.md#rdn) ------------------------------------------------------------

    def sample_losses(self, batch: Sequence[Any]) -> list[dict[str, Tensor]]:
        """The 4 losses of each :class:`~megavod.data.vid_dataset.TrainSample` of ``batch``, whose
        ``refs["ref"]`` holds its reference images (2 drawn from ±18, of its key's size and flip).

        The key frame is also a supportive frame: its first 75 proposals, with the references' 75 each,
        give 225 supportive rows (advanced set: 45). Keys and references of all samples share one backbone
        batch (:meth:`keys_and_references`); each key attends to its own sample's rows only (one
        aggregator call per sample, benchmarks/README.md#batched-training-relation-modules)."""
        parts = self.keys_and_references(batch, [sample.refs.get("ref", []) for sample in batch])
        return [self.losses(p, self.aggregator(p.key_feats, p.sampled.boxes[0], torch.cat(p.ref_feats),
                                               torch.cat(p.ref_boxes), [len(b) for b in p.ref_boxes]))
                for p in parts]


def build_rdn_detector(cfg: Config) -> RDNDetector:
    """RDN-base / RDN from a config (``rdn.advanced_stages`` 0 / 1); loads ``model.backbone.weights``."""
    return build_relation_detector(cfg, RDNDetector, lambda pooled: RDNAggregator.from_config(cfg, pooled))
