"""CUDA: every method detects on the GPU as on the CPU, bench, bf16 training, resume with the CUDA random
state (a toy model, and single frame, RDN, MEGA and base with ``solver.deterministic``), torchvision's
RoIAlign backward under deterministic algorithms, torchrun (one process; NCCL with two GPUs).

The tests marked ``cuda`` are skipped without a CUDA device (tests/conftest.py); ``bash scripts/test.sh``
runs them where one is present, ``pytest -m cuda`` (scripts/gpu_check.sh) runs only them. Two tests run
on the CPU: the weight perturbation that justifies the CUDA-vs-CPU tolerances, and the real methods'
resume on the CPU. Small synthetic presets, tiny frames, random weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import megavod
from megavod.apps.bench import calibrate, format_report, run_bench, synthetic_frames
from megavod.structures import Detections
from megavod.train import checkpoint as ckpt
from megavod.train.engine import FINAL_NAME

cuda = pytest.mark.cuda

REPO = Path(__file__).resolve().parents[1]
DEVICE = "cuda"

# Detections are compared with nothing selected among near-equal scores, so that a difference in the last
# bits cannot keep one box on one device and another on the other: no NMS (threshold 1.0) in the RPN or the
# box head, no top-k (budgets above the ~180 anchors of a 48 x 80 frame), every proposal a reference of
# MEGA / RDN (no distillation). Each frame then has every (proposal, class) pair above the score threshold.
KEEP_ALL = {
    "input.min_size_test": 48, "input.max_size_test": 80,
    "model.rpn.nms_thresh": 1.0, "model.rpn.pre_nms_top_n_test": 1000, "model.rpn.post_nms_top_n_test": 1000,
    "model.rpn.ref_pre_nms_top_n": 1000, "model.rpn.ref_post_nms_top_n": 1000,
    "model.roi_head.nms_thresh": 1.0, "model.roi_head.detections_per_img": 100000,
}
METHODS = {
    "single": ("synthetic_single", {}),
    "dff": ("synthetic_single", {"method": "dff", "dff.key_interval": 2}),
    "fgfa": ("synthetic_single", {"method": "fgfa", "fgfa.min_offset": -1, "fgfa.max_offset": 1}),
    "rdn": ("synthetic_single", {"method": "rdn", "relation.num_heads": 8, "rdn.min_offset": -2,
                                 "rdn.max_offset": 2, "rdn.ratio": 1.0}),
    "mega": ("synthetic_mega", {"mega.T_l": 5, "mega.T_g": 3, "mega.T_m": 2, "mega.distill_ratio": 1.0}),
    "base": ("synthetic_base", {"mega.T_l": 5, "mega.T_g": 3, "mega.distill_ratio": 1.0}),
}
# CUDA vs CPU, float32 with TF32 off: boxes (pixels) within BOX_ATOL, scores (~0.02-0.06 here) within
# SCORE_ATOL. On the CPU, every method's detections with its weights perturbed by a relative 1e-5 (more than
# float32 differences between devices, ~1e-7 relative per operation) stay within these of the unperturbed
# ones: test_weight_perturbation_stays_within_the_cuda_tolerances measures it.
BOX_ATOL = 1e-2
SCORE_ATOL = 1e-4


def assert_same_detections(a: Detections, b: Detections, box_atol: float = BOX_ATOL,
                           score_atol: float = SCORE_ATOL) -> None:
    """Same number of detections, and each detection of either has one of the other with the same label,
    box and score within the tolerances (the order of near-equal scores may differ)."""
    assert len(a.scores) == len(b.scores)
    for x, y in ((a, b), (b, a)):
        for label in x.labels.unique():
            mx, my = x.labels == label, y.labels == label
            box_d = torch.cdist(x.boxes[mx].double(), y.boxes[my].double(), p=float("inf"))
            score_d = (x.scores[mx, None].double() - y.scores[None, my].double()).abs()
            matched = ((box_d <= box_atol) & (score_d <= score_atol)).any(1)
            assert bool(matched.all()), f"label {int(label)}: {int((~matched).sum())} detections without a match"


@pytest.fixture
def fp32_convs():
    """cuDNN convolutions in full float32 (PyTorch's default is TF32 on Ampere and later, ~1e-3 relative)."""
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=False):
        yield


@cuda
@pytest.mark.parametrize("method", list(METHODS))
def test_detect_on_cuda_equals_cpu(method, fp32_convs):
    config, extra = METHODS[method]
    frames = synthetic_frames(4, 48)
    torch.manual_seed(0)
    cpu = megavod.load(config, device="cpu", **KEEP_ALL, **extra)
    calibrate(cpu.model, cpu.prepare(frames[0])[0])  # sane activations from a random deep ResNet (bench's)
    gpu = megavod.load(config, device=DEVICE, **KEEP_ALL, **extra)
    gpu.model.load_state_dict(cpu.model.state_dict())
    assert next(gpu.model.parameters()).device.type == DEVICE
    expected = list(cpu.stream(frames))
    got = list(gpu.stream(frames))
    assert [r.frame for r in got] == [r.frame for r in expected] == list(range(len(frames)))
    for g, e in zip(got, expected):
        assert g.boxes.device.type == DEVICE and g.boxes.dtype == g.scores.dtype == torch.float32
        assert len(e) > 0
        assert_same_detections(g.detections.to("cpu"), e.detections)


def _perturbed_copy(model: torch.nn.Module, relative: float, seed: int) -> dict[str, torch.Tensor]:
    """The model's state with every floating tensor (weights and FrozenBN statistics) times 1 + relative * r,
    r uniform in [-1, 1], drawn per element."""
    g = torch.Generator().manual_seed(seed)
    return {k: v * (1 + relative * (2 * torch.rand(v.shape, generator=g, dtype=v.dtype) - 1))
            if v.is_floating_point() else v for k, v in model.state_dict().items()}


def _largest_differences(a: Detections, b: Detections) -> tuple[float, float]:
    """Per detection of ``a``, its closest same-label detection of ``b`` (box and score differences in units
    of the tolerances); the largest box and score differences over these pairs."""
    worst_box = worst_score = 0.0
    for label in a.labels.unique():
        ma, mb = a.labels == label, b.labels == label
        box_d = torch.cdist(a.boxes[ma].double(), b.boxes[mb].double(), p=float("inf"))
        score_d = (a.scores[ma, None].double() - b.scores[None, mb].double()).abs()
        best = torch.maximum(box_d / BOX_ATOL, score_d / SCORE_ATOL).argmin(1, keepdim=True)
        worst_box = max(worst_box, float(box_d.gather(1, best).max()))
        worst_score = max(worst_score, float(score_d.gather(1, best).max()))
    return worst_box, worst_score


PERTURBATION = 1e-5


@pytest.mark.parametrize("method", list(METHODS))
def test_weight_perturbation_stays_within_the_cuda_tolerances(method):
    """On the CPU (no device needed): the CUDA-vs-CPU tolerances are wide enough for any difference of the
    order of float32 rounding between devices (~1e-7 relative per operation) yet far tighter than a model
    difference. Every method's detections (test_detect_on_cuda_equals_cpu's settings) with every weight
    perturbed by a relative 1e-5, about 100x float32 rounding, stay within BOX_ATOL / SCORE_ATOL of the
    unperturbed ones; printed: the largest differences measured."""
    config, extra = METHODS[method]
    frames = synthetic_frames(4, 48)
    torch.manual_seed(0)
    detector = megavod.load(config, device="cpu", **KEEP_ALL, **extra)
    calibrate(detector.model, detector.prepare(frames[0])[0])
    expected = [r.detections for r in detector.stream(frames)]
    detector.model.load_state_dict(_perturbed_copy(detector.model, PERTURBATION, seed=1))
    got = [r.detections for r in detector.stream(frames)]
    worst = [0.0, 0.0]
    for e, g in zip(expected, got, strict=True):
        assert len(e) > 0
        assert_same_detections(g, e)
        for x, y in ((e, g), (g, e)):
            box, score = _largest_differences(x, y)
            worst = [max(worst[0], box), max(worst[1], score)]
    print(f"{method}: weights x (1 +- {PERTURBATION:g}): {sum(len(e) for e in expected)} detections, largest "
          f"difference {worst[0]:.1e} px (limit {BOX_ATOL:g}), score {worst[1]:.1e} (limit {SCORE_ATOL:g})")


@cuda
def test_bench_on_cuda():
    results = run_bench(["synthetic_single", "synthetic_base", "synthetic_mega"], num_frames=3, size=48,
                        device=DEVICE)
    assert [r.name for r in results] == ["synthetic_single", "synthetic_base", "synthetic_mega"]
    assert all(r.video_ms > 0 and len(r.videos) == 1 and r.videos[0].frames == 3 for r in results)
    assert len(results[2].videos[0].pass_s) == 3 and len(results[2].videos[0].key_s) == 3  # timed per call
    report = format_report(results, 3, 48, DEVICE, repeats=1, warmup=2)
    assert DEVICE in report and "synthetic_mega" in report


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from megavod.data.synthetic import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("synth")
    generate_synthetic_dataset(root, num_train_videos=1, num_val_videos=0, frames=16, size=64, num_det_images=2)
    return root


MEGA_SMALL = {"mega.T_l": 5, "mega.T_g": 3, "mega.T_m": 4}  # MEGA's own section: its configs only
TRAIN = {**MEGA_SMALL, "model.rpn.post_nms_top_n_test": 40,
         "model.rpn.ref_post_nms_top_n": 10, "input.min_size_train": [64], "input.max_size_train": 96,
         "solver.max_iter": 3, "solver.warmup_iters": 1, "solver.steps": [2], "solver.checkpoint_period": 2}


@cuda
def test_mega_trains_under_bf16_autocast_on_cuda(data, tmp_path, monkeypatch):
    from megavod.train import engine

    real_build = engine.build_detector
    dtypes: dict[str, set[torch.dtype]] = {"conv": set(), "linear": set()}

    def build_detector(cfg):  # the real detector, with hooks recording the dtypes its layers compute in
        model = real_build(cfg)
        for module in model.modules():
            kind = {torch.nn.Conv2d: "conv", torch.nn.Linear: "linear"}.get(type(module))
            if kind is not None:
                module.register_forward_hook(lambda m, i, out, kind=kind: dtypes[kind].add(out.dtype))
        return model

    monkeypatch.setattr(engine, "build_detector", build_detector)
    final = megavod.train("synthetic_mega", data, tmp_path / "run", **TRAIN)  # raises on a non-finite loss
    state = ckpt.load_checkpoint(final)
    assert state["iteration"] == 3 and state["config"]["solver"]["bf16"] is True
    assert torch.bfloat16 in dtypes["conv"] and torch.bfloat16 in dtypes["linear"]  # autocast was on
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())
    assert len(state["rng"][0]["cuda"]) == torch.cuda.device_count()  # saved on CUDA: its random state too


# A fresh process, so that CUBLAS_WORKSPACE_CONFIG is set by the engine before the process's first cuBLAS
# call (tests/test_train.py's tiny model: its dropout draws from the CUDA generator on CUDA).
_RESUME_SCRIPT = textwrap.dedent(
    """
    import functools, json, shutil, sys, torch
    sys.path.insert(0, {tests!r})
    from test_train import TinyDataset, TinyModel, fresh_model, tiny_cfg
    from megavod.train import checkpoint as ckpt
    from megavod.train.distributed import DistInfo
    from megavod.train.engine import train

    out = {out!r}
    run = functools.partial(train, tiny_cfg(deterministic=True), dataset=TinyDataset(), progress=False,
                            info=DistInfo(device=torch.device({device!r})), log_period=2)
    ref = run(fresh_model(), out_dir=out + "/ref")
    try:  # killed during iteration 5; the checkpoint at 3 survives
        run(fresh_model(fail_at_call=5), out_dir=out + "/killed")
    except KeyboardInterrupt:
        pass
    shutil.copytree(out + "/killed", out + "/no_cuda_state")
    saved = out + "/no_cuda_state/model_0000003.pth"
    state = torch.load(saved, weights_only=True)
    cuda_states = len(state["rng"][0]["cuda"])
    state["rng"][0]["cuda"] = []
    torch.save(state, saved)
    results = {{"cuda_states": cuda_states}}
    for name in ("killed", "no_cuda_state"):
        torch.manual_seed(123)  # whatever happened to the global streams in between (CUDA's included)
        resumed = run(TinyModel(), out_dir=out + "/" + name, resume=True)
        a, b = (ckpt.load_checkpoint(p)["model"] for p in (ref, resumed))
        results[name] = all(torch.equal(a[k], b[k]) for k in a)
    print("RESULT " + json.dumps(results))
    """
)


@cuda
def test_resume_on_cuda_restores_the_cuda_random_state_bit_for_bit(tmp_path):
    script = tmp_path / "resume.py"
    script.write_text(_RESUME_SCRIPT.format(tests=str(REPO / "tests"), out=str(tmp_path), device=DEVICE))
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["cuda_states"] == torch.cuda.device_count()
    # solver.deterministic: resumed = uninterrupted, bit for bit, which needs the CUDA state restored
    assert result == {"cuda_states": torch.cuda.device_count(), "killed": True, "no_cuda_state": False}
    # the engine set CUBLAS_WORKSPACE_CONFIG in time: neither PyTorch nor megavod warned about it
    assert "CUBLAS_WORKSPACE_CONFIG" not in proc.stdout + proc.stderr, proc.stdout[-2000:] + proc.stderr[-4000:]


# README "Training": with solver.deterministic a resumed run gives the uninterrupted run's weights bit for
# bit, for single frame, RDN, MEGA and its base model (FGFA's and DFF's grid_sample backward has no
# deterministic CUDA kernel). In a fresh process for each method (CUBLAS_WORKSPACE_CONFIG is set by the
# engine before the process's first cuBLAS call): 5 iterations with checkpoints at 2 and 4, then the same
# run as if killed during iteration 3 (its folder up to the checkpoint at 2) resumed to the end.
RESUME_METHODS = {
    "single": ("synthetic_single", {}),
    "rdn": ("synthetic_single", {"method": "rdn", "relation.num_heads": 8, "rdn.min_offset": -2,
                                 "rdn.max_offset": 2}),
    "mega": ("synthetic_mega", MEGA_SMALL),
    "base": ("synthetic_base", MEGA_SMALL),
}
RESUME_TRAIN = {**{k: v for k, v in TRAIN.items() if k not in MEGA_SMALL}, "solver.max_iter": 5,
                "solver.steps": [3], "solver.checkpoint_period": 2,
                "data.num_workers": 0}

_REAL_RESUME_SCRIPT = textwrap.dedent(
    """
    import json, shutil, sys
    from pathlib import Path
    import torch
    import megavod
    from megavod.train import checkpoint as ckpt

    config, overrides, data, out = {config!r}, {overrides!r}, Path({data!r}), Path({out!r})
    ref = megavod.train(config, data, out / "ref", **overrides)
    killed = out / "resumed"
    shutil.copytree(out / "ref", killed)
    for name in ("model_final.pth", "model_0000004.pth"):  # killed during iteration 3: the checkpoint at 2 survives
        (killed / name).unlink()
    (killed / ckpt.LAST_CHECKPOINT).write_text("model_0000002.pth\\n")
    resumed = megavod.train(config, data, killed, resume=True, **overrides)
    a, b = (ckpt.load_checkpoint(p)["model"] for p in (ref, resumed))
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    largest = max((float((a[k].double() - b[k].double()).abs().max()) for k in differ), default=0.0)
    print("RESULT " + json.dumps({{"tensors": len(a), "differ": len(differ), "largest": largest,
                                  "iteration": ckpt.load_checkpoint(resumed)["iteration"],
                                  "device": "cuda" if torch.cuda.is_available() else "cpu"}}))
    """
)


def _real_resume(method: str, device: str, data: Path, out: Path) -> dict:
    config, extra = RESUME_METHODS[method]
    overrides = {**RESUME_TRAIN, **extra, "solver.deterministic": True}
    script = out / "resume.py"
    script.write_text(_REAL_RESUME_SCRIPT.format(config=config, overrides=overrides, data=str(data), out=str(out)))
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    if device == "cpu":  # training takes CUDA when it is present
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, str(script)], cwd=out, env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    print(f"{method} on {device}, solver.deterministic: resumed vs uninterrupted: {result['differ']} of "
          f"{result['tensors']} tensors differ, largest difference {result['largest']:.1e}")
    assert result["iteration"] == 5 and result["device"] == device
    return result


@cuda
@pytest.mark.parametrize("method", list(RESUME_METHODS))
def test_deterministic_resume_on_cuda_is_bit_for_bit(method, data, tmp_path):
    result = _real_resume(method, DEVICE, data, tmp_path)
    assert result["differ"] == 0, result


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rdn", "base"])
def test_deterministic_resume_on_cpu_is_bit_for_bit(method, data, tmp_path):
    """The same script on the CPU (bit for bit there with or without solver.deterministic), for the two
    methods tests/test_train_real.py does not kill and resume (single frame, MEGA)."""
    result = _real_resume(method, "cpu", data, tmp_path)
    assert result["differ"] == 0, result


@cuda
def test_roi_align_backward_under_deterministic_algorithms(fp32_convs):
    """README "Training": under solver.deterministic (torch.use_deterministic_algorithms) torchvision's
    roi_align runs a torch.compile'd RoIAlign where triton is present, whose backward is deterministic;
    without triton its CUDA kernel's backward uses atomic adds. Many overlapping RoIs on one map, the
    backward repeated: with triton every gradient must be bit-identical; without, printed only."""
    from torch._dynamo.utils import has_triton
    from torchvision.ops import roi_align

    from megavod.train.engine import deterministic_algorithms

    g = torch.Generator(device=DEVICE).manual_seed(0)
    feats = torch.randn(2, 64, 38, 50, device=DEVICE, generator=g)
    xy = torch.rand(4000, 2, device=DEVICE, generator=g) * torch.tensor([700.0, 500.0], device=DEVICE)
    wh = 16 + torch.rand(4000, 2, device=DEVICE, generator=g) * 200
    rois = torch.cat([torch.randint(0, 2, (4000, 1), device=DEVICE, generator=g).float(), xy, xy + wh], 1)
    upstream = torch.randn(4000, 64, 14, 14, device=DEVICE, generator=g)
    grads = []
    with deterministic_algorithms(True, torch.device(DEVICE)):
        for _ in range(5):
            x = feats.clone().requires_grad_(True)
            roi_align(x, rois, (14, 14), 1 / 16, 0, True).backward(upstream)
            grads.append(x.grad)
    equal = all(torch.equal(grads[0], other) for other in grads[1:])
    largest = max(float((grads[0] - other).abs().max()) for other in grads[1:])
    print(f"roi_align backward under deterministic algorithms, triton {'present' if has_triton() else 'missing'}: "
          f"5 runs {'bit-identical' if equal else f'differ by up to {largest:.1e}'}")
    if has_triton():
        assert equal, largest


@cuda
def test_torchrun_one_process_trains_on_cuda(data, tmp_path):
    # One process under torchrun joins an NCCL process group of one (megavod/train/distributed.py) and
    # trains on cuda:LOCAL_RANK; NCCL across processes needs two GPUs (test below).
    out = tmp_path / "run"
    overrides = [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in TRAIN.items()]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "megavod",
         "train", "--config", "synthetic_mega", "--data", str(data), "--out", str(out), *overrides],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "process group nccl" in proc.stdout
    state = ckpt.load_checkpoint(out / FINAL_NAME)
    assert state["iteration"] == 3 and len(state["rng"]) == 1
    assert len(state["rng"][0]["cuda"]) == torch.cuda.device_count()  # CUDA was initialised: it trained there


_NCCL_SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from test_train import TinyDataset, fresh_model, tiny_cfg
    from megavod.train.distributed import cleanup, init_distributed
    from megavod.train.engine import train

    info = init_distributed()  # CUDA available: NCCL, device cuda:LOCAL_RANK
    model = fresh_model()
    if info.rank == 1:  # DDP starts every rank from rank 0's weights
        torch.nn.init.zeros_(model.fc.weight)
    train(tiny_cfg(max_iter=6), model, TinyDataset(), {out!r}, progress=False, info=info, log_period=2)
    torch.save({{k: v.cpu() for k, v in model.state_dict().items()}}, {out!r} + f"/rank{{info.rank}}.pt")
    sys.stdout.write(f"final {{info.rank}} {{dist.get_backend()}} {{info.device}}\\n")
    sys.stdout.flush()
    cleanup()
    """
)


@cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two CUDA devices (one per process)")
def test_two_process_nccl_ddp_keeps_ranks_identical(tmp_path):
    script = tmp_path / "nccl_run.py"
    out = tmp_path / "out"
    script.write_text(_NCCL_SCRIPT.format(tests=str(REPO / "tests"), out=str(out)))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "final 0 nccl cuda:0" in proc.stdout and "final 1 nccl cuda:1" in proc.stdout
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
