"""Training on B key frames per process (docs/conventions.md#key-frames-per-process), every method.

Each method's training forward takes a list of samples; its losses are the mean over the samples of each
sample's 4 losses (docs/departures.md#batch-loss-normalisation). What is checked, for single, FGFA, DFF,
RDN, MEGA and the base model, with the synthetic presets' small random-weight detectors on 64-pixel frames:

* **B = 1 is the code before batching, bit for bit**: losses and every parameter's gradient equal
  (``torch.equal``) those of the pre-batching forward, written out below from the model's parts
  (``*_reference``: the bodies the methods' ``forward`` had, one sample at a time).
* **a batch is the mean of its samples**: for B = 3 samples of one size (different key frames, hence
  different references, and both flips), the batch's losses and gradients equal the mean of the three
  one-sample runs' to 1e-5 of their magnitude. The backbone, RPN head and box head run on the batch at
  once, so their sums are taken in another order; in float32 that alone moves some gradients by more
  than 1e-5 of their largest entry (measured: up to ~1e-6 for the CNN parts, and up to half the
  magnitude of the relation modules' small ``Wg`` gradients, whose terms nearly cancel), while in
  float64 every difference is below ~1e-12. So these comparisons run in float64, where 1e-5 tells
  a wrong batch from rounding; the bit-for-bit one above runs in float32, the training dtype.
* **padding**: for 2 samples of different sizes, each sample's losses in the batch
  (``model.sample_losses``) equal the pre-batching forward on that sample's images zero-padded at the
  bottom/right to the batch's largest size, with the sample's own image size passed to the RPN and box
  head: the largest sample is unpadded, so that is its own losses; the smaller one's are *not* its
  unpadded losses (the convolutions see the zero border, so its maps near the bottom/right edge differ,
  and proposals with them), which is what the authors' ``to_image_list`` batches give too. Gradients:
  the batch's equal the mean of those references' to 1e-5 (float64, as above).

Random sampling: the RPN's 256 anchors and the box head's 128 RoIs per image are drawn from the global
torch stream. The batched forward draws them sample by sample in sample order (RPN, then RoIs, per
sample; :func:`megavod.models.training_batch.sample_key_rois`), so seeding the stream once before the
batch and once before the run of single-sample references makes both draw exactly the same choices; the
draws depend only on the counts of candidate anchors/RoIs, which equal inputs give equally.

And end to end: ``megavod train`` with ``solver.images_per_process=2`` on the synthetic set (~5 s).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megavod.config import load_config
from megavod.data.sampling import SampleKey
from megavod.data.synthetic import generate_synthetic_dataset
from megavod.data.vid_dataset import build_train_dataset
from megavod.errors import ConfigError
from megavod.methods import build_detector
from megavod.models.fgfa import aggregation_weights
from megavod.models.mega_head import RoiRows
from megavod.models.relation_detector import KeyAndReferences
from megavod.models.warp import warp
from megavod.registry import MethodSpec, get_method, register_method, unregister_method

REPO = Path(__file__).resolve().parents[1]

SMALL = ["input.min_size_train=[64]", "input.max_size_train=96",
         "data.train_sets=[DET_train_30classes, VID_train_15frames]", "model.rpn.ref_post_nms_top_n=10"]
MEGA_SMALL = ["mega.T_l=5", "mega.T_g=3", "mega.T_m=4"]  # each method's keys go to its own configs only
PRESETS = {
    "single": ("synthetic_single", []),
    "fgfa": ("synthetic_single", ["method=fgfa", "fgfa.min_offset=-2", "fgfa.max_offset=2"]),
    "dff": ("synthetic_single", ["method=dff"]),
    "rdn": ("synthetic_single", ["method=rdn", "relation.num_heads=8", "rdn.advanced_stages=1",
                                 "rdn.min_offset=-2", "rdn.max_offset=2"]),
    "mega": ("synthetic_mega", MEGA_SMALL),
    "base": ("synthetic_base", MEGA_SMALL),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # every test (tests/conftest.py): small tensors


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "data"
    generate_synthetic_dataset(root, 2, 0, frames=10, size=64, seed=0, num_det_images=1)
    return root


def config(method: str, *extra: str):
    preset, overrides = PRESETS[method]
    return load_config(preset, [*SMALL, *overrides, *extra])


def model_and_samples(method: str, data: Path, sizes: list[int], dtype: torch.dtype = torch.float32):
    """The method's detector (seed 0) in train mode and one video sample per entry of ``sizes`` (its short
    side; long side at most twice that), each a different key frame, flipped and not in turn; model and images in ``dtype``."""
    torch.manual_seed(0)
    model = build_detector(config(method)).train().to(dtype)
    samples = []
    for i, size in enumerate(sizes):
        dataset = build_train_dataset(config(method, f"input.min_size_train=[{size}]", f"input.max_size_train={2 * size}"),
                                      data)
        videos = [k for k in range(len(dataset)) if dataset.records[k].is_video]
        # The first seed from 11 on whose flip alternates with the sample's position.
        seed = next(seed for seed in range(11, 100) if dataset.transform.draw(random.Random(seed)).flip == bool(i % 2))
        sample = dataset[SampleKey(videos[3 * i + 1], seed)]
        samples.append(replace(sample, image=sample.image.to(dtype),
                               refs={role: [im.to(dtype) for im in images] for role, images in sample.refs.items()}))
    return model, samples


# -- the forward before batching, one sample, written out from the model's parts ------------------------


def padded(images: list[torch.Tensor], size: tuple[int, int] | None) -> torch.Tensor:
    """The images stacked; with ``size``, each zero-padded at the bottom/right to it first."""
    if size is not None:
        images = [F.pad(im, (0, size[1] - im.shape[-1], 0, size[0] - im.shape[-2])) for im in images]
    return torch.stack(images)


def plain_head_losses(model, c4, size, target):
    proposals, rpn_losses = model.rpn(c4, [size], [target])
    return {**rpn_losses, **model.box_head(c4, proposals, [size], [target])}


def single_reference(model, sample, pad=None):
    return plain_head_losses(model, model.backbone(padded([sample.image], pad)), sample.image_size, sample.target)


def fgfa_reference(model, sample, pad=None):
    images = padded([sample.image, *sample.refs["ref"]], pad)
    c4 = model.backbone(images)
    flow = model.flownet(images[:1], images[1:]).flow
    warped = warp(c4[1:], flow, model.warp_align_corners)
    embeds = model.embednet(torch.cat([c4[:1], warped]))
    feats = (aggregation_weights(embeds[1:], embeds[:1]) * warped).sum(dim=0, keepdim=True)
    return plain_head_losses(model, feats, sample.image_size, sample.target)


def dff_reference(model, sample, pad=None):
    ref = padded(sample.refs["ref"][:1], pad)
    feats = model.propagate(padded([sample.image], pad), ref, model.backbone(ref))
    return plain_head_losses(model, feats, sample.image_size, sample.target)


def key_and_references(model, sample, ref_images, pad=None) -> KeyAndReferences:
    size, target = sample.image_size, sample.target
    c4 = model.backbone(padded([sample.image, *ref_images], pad))
    key_props, rpn_losses = model.rpn(c4[:1], [size], [target])
    key_boxes = key_props[0].boxes
    n_own = len(key_boxes) - len(target["boxes"])
    ref_boxes = [key_boxes[: min(model.ref_proposals, n_own)]]
    if ref_images:
        ref_boxes += [p.boxes for p in model.rpn.proposals(c4[1:], [size] * len(ref_images), "ref")]
    sampled = model.box_head.loss_computation.subsample([key_boxes], [target])
    n_key = len(sampled.boxes[0])
    raw = model.box_head.feature_extractor.raw_features(
        c4, [torch.cat([sampled.boxes[0], ref_boxes[0]]), *ref_boxes[1:]])
    key_feats, *ref_feats = raw.split([n_key] + [len(b) for b in ref_boxes])
    return KeyAndReferences(sampled, key_feats, ref_boxes, list(ref_feats), rpn_losses)


def rdn_reference(model, sample, pad=None):
    parts = key_and_references(model, sample, sample.refs.get("ref", []), pad)
    feats = model.aggregator(parts.key_feats, parts.sampled.boxes[0], torch.cat(parts.ref_feats),
                             torch.cat(parts.ref_boxes), [len(b) for b in parts.ref_boxes])
    return model.losses(parts, feats)


def mega_reference(model, sample, pad=None):
    size = sample.image_size
    extractor = model.box_head.feature_extractor

    def ref_rows(images):
        if not images:
            return []
        c4 = model.backbone(padded(list(images), pad))
        props = [p.boxes for p in model.rpn.proposals(c4, [size] * len(images), "ref")]
        feats = extractor.raw_features(c4, props).split([len(p) for p in props])
        return [RoiRows(f, b) for f, b in zip(feats, props)]

    global_rows = ref_rows(sample.refs.get("global", []))
    global_pool = RoiRows.cat(global_rows) if global_rows else RoiRows(
        sample.image.new_zeros(0, model.aggregator.feat_dim), sample.image.new_zeros(0, 4))
    memory = None
    if sample.refs.get("memory"):
        with torch.no_grad():
            memory_rows = ref_rows(sample.refs["memory"])
        memory = model.aggregator.memory_from_frames(memory_rows, global_pool)
    parts = key_and_references(model, sample, sample.refs.get("local", []), pad)
    out = model.aggregator(
        key=RoiRows(parts.key_feats, parts.sampled.boxes[0]),
        local_frames=[RoiRows(f, b) for f, b in zip(parts.ref_feats, parts.ref_boxes)],
        global_pool=global_pool,
        memory=memory,
    )
    return model.losses(parts, out.features)


REFERENCE = {"single": single_reference, "fgfa": fgfa_reference, "dff": dff_reference, "rdn": rdn_reference,
             "mega": mega_reference, "base": mega_reference}


# -- comparisons ---------------------------------------------------------------------------------------


def losses_and_grads(model, run) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``run()``'s losses (a dict, or a list of per-sample dicts whose mean is taken) after seeding the
    global stream, and the gradients of their sum: each per-sample dict's backward is its own, / B."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    out = run()
    per_sample = out if isinstance(out, list) else [out]
    for losses in per_sample:
        (sum(losses.values()) / len(per_sample)).backward()
    mean = {k: sum(d[k].detach() for d in per_sample) / len(per_sample) for k in per_sample[0]}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return mean, grads


def assert_close_to(actual: dict, expected: dict, rel: float = 1e-5) -> None:
    """Each tensor within ``rel`` of its largest entry. A gradient that is zero in exact arithmetic (the
    relation modules' ``Wk.bias``: adding a constant to every key of a query shifts all its logits alike,
    which the softmax ignores) is rounding noise both ways; the floor, 1e-10 of the largest entry of all
    tensors, lets it pass."""
    assert actual.keys() == expected.keys()
    overall = max(float(want.abs().max()) for want in expected.values() if want.numel())
    for name, want in expected.items():
        if not want.numel():
            continue
        scale, diff = float(want.abs().max()), float((actual[name] - want).abs().max())
        assert diff <= rel * scale + 1e-10 * overall, f"{name}: max |diff| {diff:.3g}, magnitude {scale:.3g}"


@pytest.mark.parametrize("method", list(PRESETS))
def test_one_sample_is_the_forward_before_batching_bit_for_bit(method, data):
    model, (sample,) = model_and_samples(method, data, [64])
    losses, grads = losses_and_grads(model, lambda: model([sample]))
    want_losses, want_grads = losses_and_grads(model, lambda: REFERENCE[method](model, sample))
    assert losses.keys() == want_losses.keys() and grads.keys() == want_grads.keys()
    for name in want_losses:
        assert torch.equal(losses[name], want_losses[name]), name
    for name in want_grads:
        assert torch.equal(grads[name], want_grads[name]), name


@pytest.mark.parametrize("method", list(PRESETS))
def test_a_batch_is_the_mean_of_its_samples(method, data):
    model, samples = model_and_samples(method, data, [64, 64, 64], torch.float64)
    assert {s.flipped for s in samples} == {False, True} and len({(s.video, s.frame) for s in samples}) == 3
    losses, grads = losses_and_grads(model, lambda: model(samples))
    want_losses, want_grads = losses_and_grads(model, lambda: [model([s]) for s in samples])
    assert_close_to(losses, want_losses)
    assert_close_to(grads, want_grads)
    assert len(grads) > 10


@pytest.mark.parametrize("method", list(PRESETS))
def test_samples_of_different_sizes_are_zero_padded_to_the_largest(method, data):
    model, samples = model_and_samples(method, data, [80, 64], torch.float64)
    big, small = (s.image_size for s in samples)
    assert big[0] > small[0] and big[1] > small[1]
    reference = REFERENCE[method]
    with torch.no_grad():
        torch.manual_seed(5)
        each = model.sample_losses(samples)
        torch.manual_seed(5)
        want_each = [reference(model, s, big) for s in samples]
    for got, want in zip(each, want_each):
        assert_close_to(got, want)
    _, grads = losses_and_grads(model, lambda: model(samples))
    _, want_grads = losses_and_grads(model, lambda: [reference(model, s, big) for s in samples])
    assert_close_to(grads, want_grads)


def test_every_method_accepts_several_images_per_process():
    for method in PRESETS:
        assert config(method, "solver.images_per_process=4").solver.images_per_process == 4
    # A method of one's own can still ask for one key frame per process.
    spec = get_method("single")
    register_method(MethodSpec("one_at_a_time", "toy", spec.build, spec.schedule, max_images_per_process=1))
    try:
        with pytest.raises(ConfigError, match=r"solver\.images_per_process.*<= 1 for one_at_a_time"):
            load_config("synthetic_single", ["method=one_at_a_time", "solver.images_per_process=2"])
    finally:
        unregister_method("one_at_a_time")


def test_megavod_train_with_two_images_per_process(tmp_path):
    data = tmp_path / "data"
    generate_synthetic_dataset(data, 1, 0, frames=8, size=64, num_det_images=1)
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "megavod", "train", "--config", "synthetic_mega", "--data", str(data), "--out",
         str(out), "solver.images_per_process=2", "solver.max_iter=2", "solver.warmup_iters=1",
         "solver.base_lr=0.0025", "input.min_size_train=[64]", "input.max_size_train=96", "data.num_workers=0"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "1 process(es) x 2 image(s)" in proc.stdout
    assert (out / "model_final.pth").is_file() and (out / "last_checkpoint").read_text().strip() == "model_final.pth"
