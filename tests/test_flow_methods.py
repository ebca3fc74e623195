"""FGFA and DFF (docs/conventions.md#fgfa-and-dff): warping by hand, FlowNetS and the detectors against the authors'
listings, FGFA's weights, the flow engine's schedules, training and detection on the synthetic set."""

from __future__ import annotations

import math

import pytest
import torch

from megavod.config import load_config
from megavod.data.predictions import read_predictions
from megavod.errors import ConfigError, MegavodError
from megavod.apps.detect import DetectOptions, run_detect
from megavod.api import Detector
from megavod.inference.engine import detect_offline, detect_online
from megavod.inference.schedules import FlowWindowSchedule, KeyFrameSchedule
from megavod.methods import build_detector
from megavod.models.dff import DFFDetector
from megavod.models.fgfa import FGFADetector, aggregation_weights
from megavod.models.flownet import FlowNetS, RAFTFlow, load_flownet_weights
from megavod.models.warp import flow_grid, warp
from reference_data import authors_listing

# The synthetic preset's small detector at 64-pixel frames.
SMALL = ["input.min_size_train=[64]", "input.max_size_train=96", "input.min_size_test=64",
         "input.max_size_test=96", "data.train_sets=[DET_train_30classes, VID_train_15frames]"]


def ramp(h, w):
    """[1, 1, h, w] with value 10 * row + column, so a sample's value says where it was taken."""
    return (10 * torch.arange(h, dtype=torch.float32)[:, None] + torch.arange(w, dtype=torch.float32))[None, None]


def constant_flow(h, w, dx, dy):
    return torch.tensor([dx, dy], dtype=torch.float32).view(1, 2, 1, 1).expand(1, 2, h, w)


# -- warping ---------------------------------------------------------------------------------------------


def test_grid_is_pixels_plus_flow_normalised_by_half_size_minus_one():
    grid = flow_grid(torch.zeros(1, 2, 2, 3))
    assert grid[0, ..., 0].tolist() == [[-1, 0, 1], [-1, 0, 1]]  # x / ((3 - 1) / 2) - 1
    assert grid[0, ..., 1].tolist() == [[-1, -1, -1], [1, 1, 1]]
    assert flow_grid(constant_flow(2, 3, 1, 0))[0, 0, :, 0].tolist() == [0, 1, 2]


def test_zero_flow_is_the_identity_and_constant_flow_a_shift():
    x = ramp(3, 4)
    zero = torch.zeros(1, 2, 3, 4)
    torch.testing.assert_close(warp(x, zero, align_corners=True), x, atol=1e-5, rtol=0)
    # flow (1, 0): output column c reads input column c + 1; the last column repeats (border padding)
    right = warp(x, constant_flow(3, 4, 1, 0), align_corners=True)
    assert torch.allclose(right[0, 0], torch.tensor([[1.0, 2, 3, 3], [11, 12, 13, 13], [21, 22, 23, 23]]), atol=1e-5)
    # flow (0, -1): output row r reads row r - 1
    up = warp(x, constant_flow(3, 4, 0, -1), align_corners=True)
    assert torch.allclose(up[0, 0], torch.tensor([[0.0, 1, 2, 3], [0, 1, 2, 3], [10, 11, 12, 13]]), atol=1e-5)
    # half a pixel: the mean of the two neighbours (bilinear)
    half = warp(x, constant_flow(3, 4, 0.5, 0), align_corners=True)
    assert torch.allclose(half[0, 0, 0], torch.tensor([0.5, 1.5, 2.5, 3.0]), atol=1e-5)


def test_the_authors_call_by_hand():
    # grid_sample without align_corners (False): column x reads x * W / (W - 1) - 1/2, clamped (border).
    x = ramp(1, 5)
    zero = warp(x, torch.zeros(1, 2, 1, 5))
    assert torch.allclose(zero[0, 0, 0], torch.tensor([0.0, 0.75, 2.0, 3.25, 4.0]), atol=1e-5)
    # ... so a constant integer flow shifts that: column x reads what zero flow gives at x + 1
    shifted = warp(x, constant_flow(1, 5, 1, 0))
    assert torch.allclose(shifted[0, 0, 0], torch.tensor([0.75, 2.0, 3.25, 4.0, 4.0]), atol=1e-5)
    # a 3-pixel-wide map happens to be exact: 0 -> -0.5 (clamped to 0), 1 -> 1, 2 -> 2.5 (clamped to 2)
    torch.testing.assert_close(warp(ramp(3, 3), torch.zeros(1, 2, 3, 3)), ramp(3, 3))
    # one pixel wide: no division by zero, the one column comes back
    torch.testing.assert_close(warp(ramp(2, 1), constant_flow(2, 1, 0.7, 0)), ramp(2, 1))
    with pytest.raises(ValueError, match="flow"):
        warp(x, torch.zeros(1, 2, 1, 4))


def test_flow_batch_of_one_broadcasts_and_gradients_reach_the_flow():
    feats = torch.randn(3, 2, 4, 5)
    flow = (torch.randn(1, 2, 4, 5) * 0.3).requires_grad_()
    out = warp(feats, flow)
    torch.testing.assert_close(out[2:], warp(feats[2:], flow))
    out.square().sum().backward()
    assert flow.grad is not None and flow.grad.abs().sum() > 0


# -- FlowNetS and the detectors' layouts -----------------------------------------------------------------


@pytest.mark.parametrize("preset, listing, cls", [
    ("fgfa_R_101", "vid_R_101_C4_FGFA_1x", FGFADetector),
    ("fgfa_R_50", "vid_R_50_C4_FGFA_1x", FGFADetector),
    ("dff_R_101", "vid_R_101_C4_DFF_1x", DFFDetector),
    ("dff_R_50", "vid_R_50_C4_DFF_1x", DFFDetector),
])
def test_state_dict_equals_the_authors_listing(preset, listing, cls):
    n_keys, n_elements, authors = authors_listing(listing)
    with torch.device("meta"):  # shapes only
        model = build_detector(load_config(preset))
    assert isinstance(model, cls)
    sd = model.state_dict()
    assert (len(sd), sum(v.numel() for v in sd.values())) == (n_keys, n_elements)
    assert {k: tuple(v.shape) for k, v in sd.items()} == authors  # same names: no mapping needed
    # the extra modules come where the authors register them: after the backbone, before the RPN
    order = [k.split(".")[0] for k in sd]
    assert order.index("flownet") > order.index("backbone") and order.index("rpn") > max(
        i for i, name in enumerate(order) if name in ("flownet", "embednet"))


def test_flownet_output_lies_on_the_c4_grid_and_starts_at_zero_flow():
    net = FlowNetS(scale_channels=8)
    key, ref = torch.randn(1, 3, 37, 53) * 50, torch.randn(2, 3, 37, 53) * 50
    with torch.no_grad():
        out = net(key, ref)  # one key for both references
    assert out.flow.shape == (2, 2, 3, 4) and out.scale.shape == (2, 8, 3, 4)  # ceil(37/16), ceil(53/16)
    assert out.flow.abs().max() == 0 and torch.all(out.scale == 1)  # zero-init Convolution5 / scale conv
    torch.nn.init.normal_(net.Convolution5.weight, std=0.01)
    with torch.no_grad():
        assert net(key, ref[:1]).flow.abs().max() > 0


def test_flownet_weights_load_from_the_authors_layout(tmp_path):
    source = FlowNetS()
    torch.nn.init.normal_(source.Convolution5.weight)
    path = tmp_path / "flownet.ckpt"
    torch.save({"state_dict": {f"flownet.{k}": v for k, v in source.state_dict().items()}}, path)
    target = FlowNetS(scale_channels=16)  # DFF's: the scale layer is not in the file and keeps its init
    assert load_flownet_weights(target, path) == 46
    assert torch.equal(target.Convolution5.weight, source.Convolution5.weight)
    assert target.Convolution5_scale.weight.abs().max() == 0
    cfg = load_config("synthetic_single", ["method=fgfa", f"fgfa.flownet_weights={path}"])
    assert torch.equal(build_detector(cfg).flownet.conv2.weight, source.conv2.weight)
    with pytest.raises(ConfigError, match="fgfa.flownet_weights"):
        load_config("synthetic_single", ["method=fgfa", f"fgfa.flownet_weights={tmp_path / 'missing'}"])


def test_raft_small_switch():
    cfg = load_config("synthetic_single", ["method=dff", "dff.flow_network=raft_small"])
    model = build_detector(cfg)
    assert isinstance(model.flownet, RAFTFlow) and not any("Convolution5_scale" in k for k in model.state_dict())
    image = torch.randn(1, 3, 40, 56) * 40
    model.flownet.num_flow_updates = 2  # (12 by default) keeps the test fast
    with torch.no_grad():
        out = model.flownet.eval()(image, image)
    assert out.flow.shape == (1, 2, 3, 4) and out.scale is None


def test_raft_small_weights_load_from_a_local_file(tmp_path):
    """torchvision's RAFT-small weights (a state dict saved by torch.save) fill the flow network, and
    the flow megavod computes equals torchvision's RAFT-small with those weights on the same frames."""
    from torchvision.models.optical_flow import raft_small

    torch.manual_seed(5)
    reference = raft_small(weights=None, progress=False).eval()
    torch.save(reference.state_dict(), tmp_path / "raft_small.pth")
    cfg = load_config("synthetic_single", ["method=fgfa", "fgfa.flow_network=raft_small",
                                           f"fgfa.flownet_weights={tmp_path / 'raft_small.pth'}"])
    model = build_detector(cfg).eval()
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.flownet.raft.state_dict().items())
    flow = model.flownet
    flow.num_flow_updates = 2
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(1, 3, 128, 128, generator=g) * 40 for _ in range(2))
    with torch.no_grad():
        ours = flow(a, b).flow
        rgb = [flow._rgb(t) for t in (a, b)]
        theirs = reference(*rgb, num_flow_updates=2)[-1]
        theirs = torch.nn.functional.avg_pool2d(theirs, 16, stride=16, ceil_mode=True) / 16
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # A file that is not RAFT-small is refused in one line, loading nothing.
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(MegavodError, match="other.pth: not torchvision RAFT-small weights"):
        build_detector(load_config("synthetic_single", ["method=fgfa", "fgfa.flow_network=raft_small",
                                                        f"fgfa.flownet_weights={tmp_path / 'other.pth'}"]))


# -- FGFA's aggregation ----------------------------------------------------------------------------------


def test_fgfa_weights_sum_to_one_per_position_by_hand():
    embeds = torch.randn(5, 6, 3, 4)
    w = aggregation_weights(embeds, embeds[2:3])
    assert w.shape == (5, 1, 3, 4)
    torch.testing.assert_close(w.sum(0), torch.ones(1, 3, 4))
    assert torch.all(w.argmax(0) == 2)  # cosine 1 with itself: the largest weight
    # key (1, 0); frame A (2, 0): cosine 1; frame B (0, 3): cosine 0 -> e / (e + 1), 1 / (e + 1)
    pair = torch.tensor([[2.0, 0.0], [0.0, 3.0]]).view(2, 2, 1, 1)
    w = aggregation_weights(pair, torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)).flatten()
    torch.testing.assert_close(w, torch.tensor([math.e / (math.e + 1), 1 / (math.e + 1)]))


@pytest.fixture(scope="module")
def fgfa():
    cfg = load_config("synthetic_single", ["method=fgfa", "fgfa.min_offset=-1", "fgfa.max_offset=1", *SMALL])
    torch.manual_seed(0)
    return cfg, build_detector(cfg).eval()


def test_fgfa_aggregates_aligned_copies_to_the_key(fgfa):
    _, model = fgfa
    image = torch.randn(3, 64, 96) * 40
    frame = model.frame_features(image, 0, (64, 96))
    model.warp_align_corners = True  # zero flow (zero-init FlowNet) is then exactly the identity
    try:
        feats, weights = model.aggregate([frame, frame, frame], key_index=1)
    finally:
        model.warp_align_corners = False
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / 3))
    torch.testing.assert_close(feats[0], frame.c4, atol=1e-4, rtol=1e-4)


def test_fgfa_engine_windows_and_each_backbone_once(fgfa):
    _, model = fgfa
    frames = [torch.randn(3, 64, 96) * 40 for _ in range(3)]
    assert FlowWindowSchedule().offline(0, 100) == ([0] * 10 + list(range(1, 10)), 9)  # the code's 19, key at 9
    assert FlowWindowSchedule().online(30) == (list(range(12, 31)), 18)
    windows, calls = [], []
    original = model.detect_key
    def spy(inputs, cache=None):
        windows.append(([f.index for f in inputs.local], inputs.key_index))
        return original(inputs, cache)

    model.detect_key = spy
    hook = model.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        offline = list(detect_offline(model, lambda t: (frames[t], (64, 96)), 3, FlowWindowSchedule(-1, 1)))
        assert windows == [([0, 0, 1], 1), ([0, 1, 2], 1), ([1, 2, 2], 1)] and sum(calls) == 3
        windows.clear()
        log = []

        def source():
            for t, f in enumerate(frames):
                log.append(("read", t))
                yield f, (64, 96)

        for k, _ in detect_online(model, source(), FlowWindowSchedule(-1, 1)):
            log.append(("emit", k))
    finally:
        del model.detect_key
        hook.remove()
    assert windows == [([0, 0, 0], 2), ([0, 0, 1], 2), ([0, 1, 2], 2)]
    assert all(log.index(("emit", k)) < log.index(("read", k + 1)) for k in range(2))
    assert [k for k, _ in offline] == [0, 1, 2]


def test_dff_key_frames_and_causality():
    cfg = load_config("synthetic_single", ["method=dff", "dff.key_interval=2", *SMALL])
    torch.manual_seed(0)
    model = build_detector(cfg).eval()
    assert load_config("dff_R_101").dff.key_interval == 10
    keys, log = [], []
    model.backbone.register_forward_hook(lambda m, i, o: keys.append(i[0].shape[0]))
    frames = [torch.randn(3, 64, 96) * 40 for _ in range(5)]
    seen_keys = []
    original = model.detect_key
    model.detect_key = lambda inputs, cache=None: seen_keys.append(inputs.local[0].index) or original(inputs, cache)

    def source():
        for t, f in enumerate(frames):
            log.append(("read", t))
            yield f, (64, 96)

    for k, dets in detect_online(model, source(), KeyFrameSchedule(model.key_interval)):
        log.append(("emit", k))
    assert seen_keys == [0, 0, 2, 2, 4] and sum(keys) == 3  # the backbone on key frames only
    assert all(log.index(("emit", k)) < log.index(("read", k + 1)) for k in range(4))


# -- training and detection on the synthetic set ----------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from megavod.data.synthetic import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("synth")
    generate_synthetic_dataset(root, 1, 1, frames=5, size=64, num_det_images=1)
    return root


@pytest.mark.parametrize("method, extra", [
    ("fgfa", ["fgfa.min_offset=-1", "fgfa.max_offset=1"]),  # offline (online: the engine test)
    ("dff", ["dff.key_interval=2"]),
])
def test_trains_and_detects_end_to_end(synthetic, tmp_path, method, extra):
    from megavod.data.vid_dataset import build_train_dataset
    from megavod.train.engine import train

    cfg = load_config("synthetic_single", [f"method={method}", *extra, *SMALL, "solver.warmup_iters=1"])
    torch.manual_seed(0)
    model = build_detector(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items() if "flownet" in k or "embednet" in k}
    final = train(cfg, model, build_train_dataset(cfg, synthetic), tmp_path / "run", max_iter=2, progress=False)
    assert torch.load(final, weights_only=True)["iteration"] == 2
    after = model.state_dict()
    assert any(not torch.equal(v, after[k]) for k, v in before.items())  # the flow network trains too
    snippet = next((synthetic / "Data" / "VID" / "snippets" / "val").glob("*.mp4"))
    out = tmp_path / "detect"
    assert run_detect(Detector(model, cfg), [str(snippet)], out, DetectOptions(progress=False)) == 0
    (video,) = read_predictions(out / f"{snippet.stem}.json")
    assert [f.frame for f in video.frames] == list(range(5))
    assert all(len(f.detections) and f.detections.boxes[:, 2].max() <= video.width for f in video.frames)


def test_training_needs_its_references():
    cfg = load_config("synthetic_single", ["method=dff", *SMALL])
    model = build_detector(cfg).train()
    from megavod.data.vid_dataset import TrainSample

    target = {"boxes": torch.tensor([[4.0, 4, 30, 30]]), "labels": torch.tensor([1])}
    sample = TrainSample(torch.zeros(3, 64, 96), target, {"ref": []}, "v", 0)
    with pytest.raises(ValueError, match="one reference"):
        model([sample])
    with pytest.raises(ValueError, match="flow engine"):
        model.eval()([sample])
