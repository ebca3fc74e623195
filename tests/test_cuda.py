"""CUDA: every method detects on the GPU as on the CPU, bench, bf16 training, resume with the CUDA random
state, torchrun (one process; NCCL with two GPUs).

Every test here is marked ``cuda`` and skipped without a CUDA device (tests/conftest.py); ``bash
scripts/test.sh`` runs them where one is present, ``pytest -m cuda`` (scripts/gpu_check.sh) runs only
them. Small synthetic presets, tiny frames, random weights.
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

pytestmark = pytest.mark.cuda

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
# float32 differences between devices) stay within these of the unperturbed ones.
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


TRAIN = {"mega.T_l": 5, "mega.T_g": 3, "mega.T_m": 4, "model.rpn.post_nms_top_n_test": 40,
         "model.rpn.ref_post_nms_top_n": 10, "input.min_size_train": [64], "input.max_size_train": 96,
         "solver.max_iter": 3, "solver.warmup_iters": 1, "solver.steps": [2], "solver.checkpoint_period": 2}


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
