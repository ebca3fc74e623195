"""Checks of a config that its types cannot express: ranges and combinations of the shared sections
(:mod:`megavod.config`), then the active method's own section (its ``validate``, brought by its row of the
method table). Every failure is one line naming the key (:func:`require`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megavod.errors import ConfigError
from megavod.registry import get_method


def is_file(path: str) -> bool:
    """Whether ``path`` names an existing file (a name the file system refuses names none)."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):  # a name the file system refuses (too long, a NUL byte): no such file
        return False


def require(ok: bool, key: str, allowed: str, value: Any) -> None:
    """``ConfigError("config key 'KEY': must be ALLOWED (got VALUE)")`` unless ``ok``; config sections of
    methods validate with it too."""
    if not ok:
        raise ConfigError(f"config key '{key}': must be {allowed} (got {value!r})")


def validate(cfg: Any) -> None:
    """Check a :class:`~megavod.config.Config` (``ConfigError`` naming the first bad key)."""
    spec = get_method(cfg.method)  # a method of the table (megavod.registry)
    b, r, h = cfg.model.backbone, cfg.model.rpn, cfg.model.roi_head
    require(1 <= b.freeze_at <= 5 or b.freeze_at == 0, "model.backbone.freeze_at", "between 0 and 5", b.freeze_at)
    require(b.res5_dilation in (1, 2), "model.backbone.res5_dilation", "1 or 2", b.res5_dilation)
    require(b.num_groups >= 1, "model.backbone.num_groups", ">= 1", b.num_groups)
    require(b.width_per_group >= 1, "model.backbone.width_per_group", ">= 1", b.width_per_group)
    require(len(b.small_blocks) == 4 and min(b.small_blocks) >= 1, "model.backbone.small_blocks",
             "4 block counts >= 1 (res2..res5)", list(b.small_blocks))
    require(b.small_stem_channels >= 1, "model.backbone.small_stem_channels", ">= 1", b.small_stem_channels)
    if b.weights is not None and not is_file(b.weights):
        raise ConfigError(f"config key 'model.backbone.weights': file not found: {b.weights}")
    if cfg.model.init_weights is not None and not is_file(cfg.model.init_weights):
        raise ConfigError(f"config key 'model.init_weights': file not found: {cfg.model.init_weights}")

    require(len(r.anchor_sizes) >= 1 and min(r.anchor_sizes) > 0, "model.rpn.anchor_sizes", "positive sizes", list(r.anchor_sizes))
    require(len(r.aspect_ratios) >= 1 and min(r.aspect_ratios) > 0, "model.rpn.aspect_ratios", "positive ratios", list(r.aspect_ratios))
    require(r.anchor_stride == 16, "model.rpn.anchor_stride", "16 (the C4 stride)", r.anchor_stride)
    for name in ("pre_nms_top_n_train", "post_nms_top_n_train", "pre_nms_top_n_test",
                 "post_nms_top_n_test", "ref_pre_nms_top_n", "ref_post_nms_top_n", "batch_size_per_image"):
        require(getattr(r, name) >= 1, f"model.rpn.{name}", ">= 1", getattr(r, name))
    for name in ("nms_thresh", "fg_iou_thresh", "bg_iou_thresh", "positive_fraction"):
        require(0.0 < getattr(r, name) <= 1.0, f"model.rpn.{name}", "in (0, 1]", getattr(r, name))
    require(r.bg_iou_thresh <= r.fg_iou_thresh, "model.rpn.bg_iou_thresh", "<= model.rpn.fg_iou_thresh", r.bg_iou_thresh)

    require(h.pooler_resolution >= 1, "model.roi_head.pooler_resolution", ">= 1", h.pooler_resolution)
    require(h.sampling_ratio >= 0, "model.roi_head.sampling_ratio", ">= 0 (0 = adaptive)", h.sampling_ratio)
    require(h.num_classes >= 2, "model.roi_head.num_classes", ">= 2 (background included)", h.num_classes)
    require(h.representation_size >= 1, "model.roi_head.representation_size", ">= 1", h.representation_size)
    require(len(h.bbox_reg_weights) == 4, "model.roi_head.bbox_reg_weights", "4 numbers", list(h.bbox_reg_weights))
    for name in ("fg_iou_thresh", "bg_iou_thresh", "positive_fraction", "nms_thresh"):
        require(0.0 < getattr(h, name) <= 1.0, f"model.roi_head.{name}", "in (0, 1]", getattr(h, name))
    require(0.0 <= h.score_thresh < 1.0, "model.roi_head.score_thresh", "in [0, 1)", h.score_thresh)
    require(h.detections_per_img >= 1, "model.roi_head.detections_per_img", ">= 1", h.detections_per_img)
    require(h.batch_size_per_image >= 1, "model.roi_head.batch_size_per_image", ">= 1", h.batch_size_per_image)

    rel = cfg.relation
    require(rel.num_heads >= 1, "relation.num_heads", ">= 1", rel.num_heads)
    require(h.representation_size % rel.num_heads == 0, "relation.num_heads",
             f"a divisor of model.roi_head.representation_size ({h.representation_size})", rel.num_heads)
    require(rel.embed_dim >= 8 and rel.embed_dim % 8 == 0, "relation.embed_dim", "a positive multiple of 8", rel.embed_dim)
    require(rel.wave_length > 1.0, "relation.wave_length", "> 1", rel.wave_length)

    if spec.config_type is not None:  # the method's own section checks itself
        if not isinstance(cfg.section, spec.config_type):
            raise ConfigError(f"config key '{spec.config_key}': method {cfg.method!r} takes a "
                              f"{spec.config_type.__name__} section, got {type(cfg.section).__name__}")
        cfg.section.validate(cfg, spec.config_key)

    i = cfg.input
    require(len(i.min_size_train) >= 1 and min(i.min_size_train) >= 16, "input.min_size_train", "sizes >= 16", list(i.min_size_train))
    require(i.max_size_train >= max(i.min_size_train), "input.max_size_train", ">= input.min_size_train", i.max_size_train)
    require(i.min_size_test >= 16, "input.min_size_test", ">= 16", i.min_size_test)
    require(i.max_size_test >= i.min_size_test, "input.max_size_test", ">= input.min_size_test", i.max_size_test)
    require(len(i.pixel_mean) == 3, "input.pixel_mean", "3 numbers (B, G, R)", list(i.pixel_mean))
    require(len(i.pixel_std) == 3 and min(i.pixel_std) > 0, "input.pixel_std", "3 positive numbers", list(i.pixel_std))
    require(0.0 <= i.flip_prob <= 1.0, "input.flip_prob", "in [0, 1]", i.flip_prob)
    require(i.letterbox >= 0 and i.letterbox % 32 == 0, "input.letterbox",
            "0 (off) or a positive multiple of 32 (the stride of YOLOX's coarsest level)", i.letterbox)
    require(all(t > 0 and t % 32 == 0 for t in i.letterbox_train), "input.letterbox_train",
            "positive multiples of 32", list(i.letterbox_train))
    require(not i.letterbox_train or i.letterbox > 0, "input.letterbox_train", "empty unless input.letterbox is set",
            list(i.letterbox_train))
    require(0.0 <= i.pad_value <= 255.0, "input.pad_value", "in [0, 255]", i.pad_value)
    require(not i.letterbox or getattr(spec.config_type, "letterbox_input", False), "input.letterbox",
            f"0 for method {cfg.method!r} (only the YOLOX family reads letterboxed frames)", i.letterbox)

    s = cfg.solver
    require(s.base_lr > 0, "solver.base_lr", "> 0", s.base_lr)
    require(s.reference_batch >= 1, "solver.reference_batch", ">= 1", s.reference_batch)
    require(0.0 <= s.momentum < 1.0, "solver.momentum", "in [0, 1)", s.momentum)
    require(s.weight_decay >= 0, "solver.weight_decay", ">= 0", s.weight_decay)
    require(s.weight_decay_bias >= 0, "solver.weight_decay_bias", ">= 0", s.weight_decay_bias)
    require(s.attention_lr_factor > 0, "solver.attention_lr_factor", "> 0", s.attention_lr_factor)
    require(s.max_iter >= 1, "solver.max_iter", ">= 1", s.max_iter)
    require(list(s.steps) == sorted(s.steps) and all(0 < x for x in s.steps), "solver.steps",
             "increasing positive iterations", list(s.steps))
    require(0.0 < s.gamma <= 1.0, "solver.gamma", "in (0, 1]", s.gamma)
    require(s.warmup_iters >= 0, "solver.warmup_iters", ">= 0", s.warmup_iters)
    require(0.0 < s.warmup_factor <= 1.0, "solver.warmup_factor", "in (0, 1]", s.warmup_factor)
    require(s.images_per_process >= 1, "solver.images_per_process", ">= 1", s.images_per_process)
    limit = spec.max_images_per_process
    if limit is not None:
        require(s.images_per_process <= limit, "solver.images_per_process",
                 f"<= {limit} for {cfg.method} (its method table entry's max_images_per_process)",
                 s.images_per_process)
    require(s.checkpoint_period >= 1, "solver.checkpoint_period", ">= 1", s.checkpoint_period)
    require(cfg.data.num_workers >= 0, "data.num_workers", ">= 0", cfg.data.num_workers)
    require(len(cfg.data.train_sets) >= 1, "data.train_sets", "at least one image set", list(cfg.data.train_sets))
