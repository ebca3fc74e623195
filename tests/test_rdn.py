"""RDN-base and RDN (docs/conventions.md#rdn): state dicts against the authors' listings, the relation module
against their vector, the basic/advanced stages written out, the advanced ratio, two-phase training and
detection end to end on the synthetic set."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from megavod.checkpoints.loading import authors_to_megavod_keys, match_state_dict
from megavod.config import load_config
from megavod.data.predictions import read_predictions
from megavod.apps.detect import DetectOptions, run_detect
from megavod.api import Detector
from megavod.inference.schedules import build_schedule
from megavod.methods import build_detector, load_initial_weights
from megavod.models.contract import KeyFrameInputs
from megavod.models.rdn import RDNAggregator, RDNDetector
from megavod.models.relation import first_rows_index
from megavod.structures import FrameFeatures

from reference_data import authors_listing, load_relation_vector  # noqa: E402
EXTRACTOR = "roi_heads.box.feature_extractor."
# The synthetic preset's small detector at 64-pixel frames, RDN's window cut to 5 frames (tau = 2).
SMALL = ["relation.num_heads=8", "rdn.min_offset=-2", "rdn.max_offset=2", "input.min_size_train=[64]",
         "input.max_size_train=96", "input.min_size_test=64", "input.max_size_test=96",
         "data.train_sets=[DET_train_30classes, VID_train_15frames]"]


def small_aggregator(basic=2, advanced=1, adv_num=2, c=32, heads=4, embed=16, in_features=20) -> RDNAggregator:
    torch.manual_seed(0)
    agg = RDNAggregator(in_features, c, heads, embed, basic_stages=basic, advanced_stages=advanced,
                        advanced_num=adv_num)
    with torch.no_grad():  # weights large enough that every term moves the output
        for p in agg.parameters():
            p.normal_(std=0.2)
    return agg


def rows(n, seed, c=32):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 100
    return torch.randn(n, c, generator=g), torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=g) * 50], dim=1)


def record(module, seen, name):
    """Keep the positional arguments of ``module``'s first call under ``seen[name]``."""
    module.register_forward_hook(lambda m, args, out: seen.setdefault(name, args) and None)


# -- layout ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset, listing, stages", [
    ("rdn_base_R_101", "vid_R_101_C4_RDN_base_1x", (2, 2)),
    ("rdn_R_101", "vid_R_101_C4_RDN_1x", (3, 4)),
    ("rdn_base_R_50", "vid_R_50_C4_RDN_base_1x", (2, 2)),
])
def test_state_dict_maps_one_to_one_to_the_authors_listing(preset, listing, stages):
    n_keys, n_elements, authors = authors_listing(listing)
    with torch.device("meta"):  # shapes only: fcs.0 alone is 1024 x 100352
        model = build_detector(load_config(preset))
    assert isinstance(model, RDNDetector)
    sd = model.state_dict()
    assert (len(sd), sum(v.numel() for v in sd.values())) == (n_keys, n_elements)
    to_ours = authors_to_megavod_keys(model)
    ours_to_authors = {v: k for k, v in to_ours.items()}
    assert len(ours_to_authors) == len(to_ours)  # one to one
    assert {ours_to_authors.get(k, k): tuple(v.shape) for k, v in sd.items()} == authors
    agg = model.aggregator
    assert (len(agg.fcs), len(agg.relations)) == stages
    assert all(r.u is None and r.Wg is not None for r in agg.relations)  # location-based, no content bias
    # The loader accepts an authors' state dict key for key (a released checkpoint's layout).
    fake = {k: torch.empty(s, device="meta") for k, s in authors.items()}
    assert set(match_state_dict(model, fake)) == set(sd)


def test_presets_give_the_spec_numbers():
    base, full = load_config("rdn_base_R_101"), load_config("rdn_R_101")
    for cfg in (base, full):
        settings = build_schedule(cfg)
        assert (settings.T_l, settings.tau, settings.T_g, settings.memory_levels) == (37, 18, 0, 0)
        assert (cfg.rdn.min_offset, cfg.rdn.max_offset, cfg.rdn.train_refs) == (-18, 18, 2)
    with torch.device("meta"):
        agg = RDNAggregator.from_config(full, in_features=2048 * 49)
    assert (agg.basic_stages, agg.advanced_stages, agg.advanced_num) == (2, 1, 15)  # int(75 * 0.2)
    assert (full.solver.steps, full.solver.max_iter) == ((40000,), 60000)
    assert (base.solver.steps, base.solver.max_iter) == ((80000,), 120000)


# -- the relation module and the stages -----------------------------------------------------------------


def test_basic_stage_reproduces_the_authors_rdn_vector():
    # Two heads kept (tests/data/reference/README.md): their rows in full-size weights, their columns compared.
    data = load_relation_vector("relation_rdn.npz")
    columns = data["columns"]
    agg = RDNAggregator(in_features=8, basic_stages=1)
    # Load the authors' tensors under their own names (Wgs.0.*, ...), through the module's mapping.
    to_ours = {theirs: ours for ours, theirs in agg.authors_key_mapping().items()}
    agg.load_state_dict({to_ours[f"{k.split('.')[0]}s.0.{k.split('.')[1]}"]: v
                         for k, v in data.items() if k[:2] in ("Wg", "Wq", "Wk", "Wv")}, strict=False)
    with torch.no_grad():
        out = agg(data["roi_feat"], data["rois"], data["ref_feat"], data["ref_rois"], counts=[9])
    # Stage 0: X + Rel_0(X, refs); the vector's output is the relation term before the residual.
    expected = data["roi_feat"][:, columns] + data["output"]
    assert (out[:, columns] - expected).abs().max() / data["output"].abs().max() < 1e-4


def test_stages_follow_the_spec_formulas():
    agg = small_aggregator(basic=2, advanced=1, adv_num=2)
    key, key_boxes = rows(4, 0)
    support, support_boxes = rows(9, 1)  # frames of 4, 3 and 2 rows
    counts = [4, 3, 2]
    rel, fcs = agg.relations, agg.fcs
    with torch.no_grad():
        x = key + rel[0](key, support, key_boxes, support_boxes)  # the FC comes before each basic relation
        x = F.relu(fcs[1](x))
        x = x + rel[1](x, support, key_boxes, support_boxes)  # the supportive rows are not updated
        adv_rows = torch.tensor([0, 1, 4, 5, 7, 8])  # the first 2 rows of every frame
        adv, adv_boxes = support[adv_rows], support_boxes[adv_rows]
        adv = F.relu(fcs[2](adv + rel[2](adv, support, adv_boxes, support_boxes)))
        expected = x + rel[3](x, adv, key_boxes, adv_boxes)
        out = agg(key, key_boxes, support, support_boxes, counts)
    torch.testing.assert_close(out, expected)
    base = small_aggregator(basic=2, advanced=0)
    with torch.no_grad():
        y = key + base.relations[0](key, support, key_boxes, support_boxes)
        y = F.relu(base.fcs[1](y))
        y = y + base.relations[1](y, support, key_boxes, support_boxes)
        torch.testing.assert_close(base(key, key_boxes, support, support_boxes, counts), y)


def test_advanced_stage_keeps_the_top_ratio_of_every_frame():
    assert first_rows_index([5, 3, 1], 2).tolist() == [0, 1, 5, 6, 8]
    agg = small_aggregator(adv_num=2)
    seen = {}
    record(agg.relations[2], seen, "adv")
    record(agg.relations[3], seen, "key")
    key, key_boxes = rows(3, 0)
    support, support_boxes = rows(15, 1)
    with torch.no_grad():
        agg(key, key_boxes, support, support_boxes, [5, 5, 5])
    top = torch.tensor([0, 1, 5, 6, 10, 11])
    queries, refs, q_boxes, r_boxes = seen["adv"][:4]
    assert torch.equal(queries, support[top]) and torch.equal(q_boxes, support_boxes[top])
    assert torch.equal(refs, support) and torch.equal(r_boxes, support_boxes)  # over all supportive rows
    assert seen["key"][1].shape == (6, 32) and torch.equal(seen["key"][3], support_boxes[top])
    with pytest.raises(ValueError, match="counts"):
        agg(key, key_boxes, support, support_boxes, [5, 5])


# -- the detector on the synthetic set --------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from megavod.data.synthetic import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("synth")
    generate_synthetic_dataset(root, 1, 1, frames=7, size=64, num_det_images=1)
    return root


def train_steps(cfg, root, out, steps=2):
    from megavod.data.vid_dataset import build_train_dataset
    from megavod.train.engine import train

    torch.manual_seed(0)
    model = build_detector(cfg)
    train(cfg, model, build_train_dataset(cfg, root), out, max_iter=steps, progress=False, log_period=1)
    return model


def test_two_phase_training_and_detection_end_to_end(synthetic, tmp_path):
    base_cfg = load_config("synthetic_single", ["method=rdn", *SMALL, "solver.warmup_iters=1"])
    base = train_steps(base_cfg, synthetic, tmp_path / "base")
    final = tmp_path / "base" / "model_final.pth"
    # Phase 2: RDN from RDN-base's weights, one advanced stage; only the new modules start random.
    full_cfg = load_config("synthetic_single", ["method=rdn", *SMALL, "rdn.advanced_stages=1",
                                                f"model.init_weights={final}"])
    full = build_detector(full_cfg)
    kept = load_initial_weights(build_detector(load_config("synthetic_single", ["method=rdn", *SMALL,
                                                                                  "rdn.advanced_stages=1"])), final)
    new = {re.sub(r"\.(weight|bias)$", "", k) for k in kept}
    agg = "roi_heads.box.feature_extractor.aggregator."
    assert new == {agg + "fcs.2"} | {f"{agg}relations.{i}.W{w}" for i in (2, 3) for w in "gqkv"}
    base_sd, full_sd = base.state_dict(), full.state_dict()
    assert all(torch.equal(base_sd[k], full_sd[k]) for k in base_sd)
    full = train_steps(full_cfg, synthetic, tmp_path / "full")  # the optimizer and iteration start afresh
    assert torch.load(tmp_path / "full" / "model_final.pth", weights_only=True)["iteration"] == 2

    # detect end to end, offline and online, on the val video; each frame's backbone runs once
    snippet = next((synthetic / "Data" / "VID" / "snippets" / "val").glob("*.mp4"))
    calls = []
    full.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    for mode in ("offline", "online"):
        calls.clear()
        out = tmp_path / f"det_{mode}"
        assert run_detect(Detector(full, full_cfg), [str(snippet)], out, DetectOptions(mode=mode, progress=False)) == 0
        (video,) = read_predictions(out / f"{snippet.stem}.json")
        assert [f.frame for f in video.frames] == list(range(7)) and sum(calls) == 7
        for f in video.frames:
            d = f.detections
            assert len(d) and d.labels.min() >= 1 and d.boxes[:, 2].max() <= video.width


def test_detect_key_uses_75_of_each_window_frame_and_no_global_or_memory():
    cfg = load_config("synthetic_single", ["method=rdn", *SMALL, "rdn.advanced_stages=1"])
    model = build_detector(cfg).eval()
    n, adv = cfg.model.rpn.ref_post_nms_top_n, model.aggregator.advanced_num
    assert (n, adv) == (25, 5)

    def frame(index, count):
        feats, boxes = rows(count, index, c=cfg.model.roi_head.representation_size)
        return FrameFeatures(index, boxes, feats.relu(), (64, 96), (48, 72))

    window = [frame(0, 40), frame(0, 40), frame(1, 30), frame(2, 10), frame(3, 40)]
    seen = {}
    record(model.aggregator.relations[0], seen, "support")
    record(model.aggregator.relations[-1], seen, "adv")
    out = model.detect_key(KeyFrameInputs(window[1], window))
    dets, push = out.detections, out.memory_push
    assert push == [] and seen["support"][1].shape[0] == 25 + 25 + 25 + 10 + 25
    assert seen["adv"][1].shape[0] == 5 * 5  # int(25 * 0.2) of each of the 5 frames
    assert dets.boxes[:, 2].max() <= 72 and dets.boxes[:, 3].max() <= 48  # original-frame pixels
    with pytest.raises(ValueError, match="global pool"):
        model.detect_key(KeyFrameInputs(window[1], window, global_pool=[window[0]]))
