"""Resume and DDP with the real detectors (``synthetic_single``, ``synthetic_mega``) on the CPU, through the CLI.

tests/test_train.py checks the engine's contracts on a toy model; here the same claims are checked on the
real detectors, each run a real ``python -m megavod train`` (or ``torchrun ... train``) subprocess on a tiny
synthetic dataset (64-pixel frames, 14 training images):

* **Exact resume** (README "Training": "``--resume`` continues bit-for-bit"): a run is killed with SIGKILL at
  a point the test chooses exactly (a ``-c`` wrapper around ``-m megavod`` patches the checkpoint writer or
  the lr scheduler to ``SIGKILL`` its own process), resumed with ``--resume``, killed again, resumed again;
  its final checkpoint must equal an uninterrupted run's in every field: weights, optimizer (momentum) state,
  scheduler, iteration, every random state, config (``torch.equal`` on every tensor).
* **DDP** (2 gloo processes, ``torch.distributed.run``): both ranks end with identical weights and momentum,
  and they equal a single-process reference that does, by hand, what the maths says 2-process DDP does.

Both are marked ``slow`` (deselect with ``-m "not slow"``): each starts several interpreters.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megavod.config import load_config
from megavod.data.synthetic import generate_synthetic_dataset
from megavod.data.vid_dataset import build_train_dataset
from megavod.methods import build_detector
from megavod.train import checkpoint as ckpt
from megavod.train.distributed import IterationSampler, mix_seed
from megavod.train.engine import FINAL_NAME
from megavod.train.solver import make_optimizer, make_scheduler, scaled_lr

REPO = Path(__file__).resolve().parents[1]

# Tiny inputs and a short run. The lr step at 4 puts a scheduler change inside the resumed stretch; the
# preset's lr (0.01, attention x10) makes MEGA's loss explode within 6 iterations on 64-pixel frames,
# hence the lower one (a non-finite loss stops the run).
TINY = [
    "input.min_size_train=[64]",
    "input.max_size_train=96",
    "solver.max_iter=6",
    "solver.checkpoint_period=2",
    "solver.warmup_iters=2",
    "solver.steps=[4]",
    "solver.base_lr=0.0025",
    "data.num_workers=0",
]

# One thread per process everywhere (torchrun's default for several processes), and never a GPU: the
# bit-for-bit claims are for the same hardware and thread count.
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "data"
    # 1 training video of 12 frames + 2 still (DET) images: 14 training images (12 key frames + 2 DET)
    generate_synthetic_dataset(root, 1, 0, frames=12, size=64, num_det_images=2)
    return root


def _train_args(preset: str, data: Path, out: Path, overrides: list[str]) -> list[str]:
    return ["train", "--config", preset, "--data", str(data), "--out", str(out), *overrides]


def _run(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout, check=False)


def _tail(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout[-2000:] + proc.stderr[-4000:]


def assert_identical(a, b, where: str = "checkpoint") -> None:
    """Recursive equality: same keys, same types, ``torch.equal`` tensors of the same dtype and shape."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: max |diff| {(a.double() - b.double()).abs().max().item():.3g}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# ----------------------------------------------------------------------------------------------
# Exact resume after SIGKILL

# ``python -c`` with this code + train arguments is ``python -m megavod`` + the same arguments, except that
# the process SIGKILLs itself at the point MEGAVOD_TEST_KILL names:
#   save:N  right after checkpoint N is on disk and last_checkpoint names it;
#   step:N  right after iteration N (1-based) has updated the weights and the lr, before any checkpoint of
#           it: the iterations since the last checkpoint are lost and must be redone identically.
_KILLED_RUN = textwrap.dedent(
    """
    import os, runpy, signal, sys
    from megavod.train import checkpoint, solver

    when, at = os.environ["MEGAVOD_TEST_KILL"].split(":")
    at = int(at)

    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    if when == "save":
        real_save = checkpoint.save_checkpoint

        def save_checkpoint(*args, **kwargs):
            path = real_save(*args, **kwargs)
            if kwargs["iteration"] == at:
                die()
            return path

        checkpoint.save_checkpoint = save_checkpoint
    else:
        assert when == "step", when
        real_step = solver.WarmupMultiStepLR.step

        def step(self, *args, **kwargs):
            real_step(self, *args, **kwargs)
            if self.last_epoch == at:  # the engine steps the scheduler once per iteration
                die()

        solver.WarmupMultiStepLR.step = step
    sys.argv[0] = "megavod"
    runpy.run_module("megavod", run_name="__main__", alter_sys=True)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset, kills",
    [
        # (kill point, checkpoint the next run resumes from): resumed at iterations 2 and 4 in both presets,
        # once right after the checkpoint was written and once with finished iterations lost.
        ("synthetic_single", [("save:2", 2), ("step:5", 4)]),
        ("synthetic_mega", [("step:3", 2), ("save:4", 4)]),
    ],
)
def test_killed_and_resumed_run_matches_uninterrupted_run_bit_for_bit(tmp_path, data, preset, kills):
    cli = [sys.executable, "-m", "megavod"]
    ref_out, out = tmp_path / "uninterrupted", tmp_path / "killed"
    ref = _run(cli + _train_args(preset, data, ref_out, TINY), tmp_path)
    assert ref.returncode == 0, _tail(ref)

    resume_from = None
    for kill, checkpoint_iter in kills:
        argv = [sys.executable, "-c", _KILLED_RUN] + _train_args(preset, data, out, TINY)
        if resume_from is not None:
            argv.append("--resume")
        proc = subprocess.run(argv, cwd=tmp_path, env={**ENV, "MEGAVOD_TEST_KILL": kill},
                              capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == -signal.SIGKILL, _tail(proc)
        if resume_from is not None:
            assert f"resuming from {out / ckpt.checkpoint_name(resume_from)} at iteration {resume_from}" in proc.stdout
        assert not (out / FINAL_NAME).exists()
        assert ckpt.read_last_checkpoint(out) == out / ckpt.checkpoint_name(checkpoint_iter), kill
        resume_from = checkpoint_iter

    proc = _run(cli + _train_args(preset, data, out, TINY) + ["--resume"], tmp_path)
    assert proc.returncode == 0, _tail(proc)
    assert f"resuming from {out / ckpt.checkpoint_name(resume_from)} at iteration {resume_from}" in proc.stdout

    a, b = ckpt.load_checkpoint(ref_out / FINAL_NAME), ckpt.load_checkpoint(out / FINAL_NAME)
    assert a["iteration"] == 6 and a["scheduler"]["last_epoch"] == 6 and a["config"]["method"] == preset[10:]
    assert a["optimizer"]["state"], "SGD momentum buffers are part of the comparison"
    assert_identical(a, b)  # model, optimizer, scheduler, iteration, random states, config
    # It did train: biases (no weight decay, so only a loss gradient moves them) changed between the
    # checkpoints at 2 and 6.
    early = ckpt.load_checkpoint(ref_out / ckpt.checkpoint_name(2))["model"]
    moved = [k for k in a["model"] if k.endswith(".bias") and not torch.equal(a["model"][k], early[k])]
    assert len(moved) >= 5, moved


# ----------------------------------------------------------------------------------------------
# Two-process DDP (gloo)

# Runs ``megavod train`` through the CLI's main() in each torchrun process, then saves this rank's own model
# and optimizer state (the checkpoint holds rank 0's only).
_DDP_RUN = textwrap.dedent(
    """
    import os, sys, torch
    from megavod.apps.cli import main
    from megavod.train import engine

    captured = {}
    real_build, real_optimizer = engine.build_detector, engine.make_optimizer

    def build_detector(cfg):
        captured["model"] = real_build(cfg)
        return captured["model"]

    def make_optimizer(*args, **kwargs):
        captured["optimizer"] = real_optimizer(*args, **kwargs)
        return captured["optimizer"]

    engine.build_detector, engine.make_optimizer = build_detector, make_optimizer
    rc = main(sys.argv[1:])
    state = {"model": captured["model"].state_dict(), "optimizer": captured["optimizer"].state_dict()}
    torch.save(state, os.path.join(os.environ["MEGAVOD_TEST_RANKS"], f"rank{os.environ['RANK']}.pt"))
    sys.exit(rc)
    """
)


def reference_ddp_run(cfg, data: Path, world_size: int, iterations: int) -> list[dict]:
    """What ``world_size``-process DDP computes, in one process: the states after each iteration.

    Per iteration ``i``: each rank ``r`` draws ``IterationSampler(rank=r, world_size)``'s sample of ``i``
    and runs forward/backward with its own global random streams (seeded as the engine seeds rank ``r``,
    then carried on from its previous iteration: RPN and RoI sampling draw from them); DDP's allreduce
    averages the gradients; one SGD step at the lr scaled for ``world_size`` processes; one scheduler step.
    Every trainable parameter gets a gradient here (asserted), so DDP's unused-parameter handling (which
    would leave a parameter no rank used without a gradient) does not come in. Each rank's sample runs
    on its own, with that rank's random streams: ``images_per_process=2`` in one process (allowed for
    every method) is not the same run, since a sample's seed (flip, references) includes its rank and
    both samples would draw their anchors and RoIs from one stream instead of one per rank.
    """
    dataset = build_train_dataset(cfg, data)
    ckpt.seed_all(cfg.seed)  # as run_training: the same initial weights on every rank
    model = build_detector(cfg)
    model.train()
    optimizer = make_optimizer(cfg.solver, model, world_size)
    scheduler = make_scheduler(cfg.solver, optimizer)
    samplers = [IterationSampler(len(dataset), cfg.solver.max_iter, rank=r, world_size=world_size, seed=cfg.seed,
                                 images_per_process=cfg.solver.images_per_process)
                for r in range(world_size)]
    streams = []
    for r in range(world_size):
        ckpt.seed_all(mix_seed(cfg.seed, r, 0))
        streams.append(ckpt.capture_rng_state())
    states = []
    for it in range(iterations):
        optimizer.zero_grad(set_to_none=True)
        for r in range(world_size):
            ckpt.restore_rng_state(streams[r])
            batch = [dataset[key] for key in samplers[r].batch(it)]
            assert all(s.target["boxes"].shape[0] > 0 for s in batch), "a skipped iteration: choose another seed"
            losses = model(batch)
            loss = sum(losses.values())
            assert torch.isfinite(loss)
            loss.backward()  # accumulates: after the last rank, grad = sum over ranks
            streams[r] = ckpt.capture_rng_state()
        for p in model.parameters():
            if p.requires_grad:
                assert p.grad is not None
                p.grad.div_(world_size)
        optimizer.step()
        scheduler.step()
        states.append({"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict())})
    return states


def _max_diffs(ours: dict, theirs: dict) -> tuple[float, float]:
    """(max |diff|, max |diff| / max(1, |weight| scale)) over the float tensors of two state dicts."""
    worst_abs, worst_rel = 0.0, 0.0
    for k, v in ours.items():
        if not v.is_floating_point():
            continue
        d = (v.double() - theirs[k].double()).abs().max().item() if v.numel() else 0.0
        scale = max(1.0, v.double().abs().max().item() if v.numel() else 0.0)
        worst_abs, worst_rel = max(worst_abs, d), max(worst_rel, d / scale)
    return worst_abs, worst_rel


@pytest.mark.slow
def test_two_process_ddp_mega_matches_ranks_and_single_process_reference(tmp_path, data):
    """2 gloo processes train ``synthetic_mega`` 2 iterations through the CLI; ranks identical, and equal to
    :func:`reference_ddp_run` after each iteration (:func:`_check_ddp_against_reference`)."""
    _check_ddp_against_reference(tmp_path, data, images_per_process=1)


@pytest.mark.slow
def test_two_process_ddp_with_two_key_frames_per_process_matches_the_reference(tmp_path, data):
    """As above with ``solver.images_per_process=2``: each rank trains on a batch of two key frames."""
    _check_ddp_against_reference(tmp_path, data, images_per_process=2)


def _check_ddp_against_reference(tmp_path, data, images_per_process: int) -> None:
    """2 gloo processes train ``synthetic_mega`` 2 iterations through the CLI with ``images_per_process``
    key frames each; ranks identical, and equal to :func:`reference_ddp_run` after each iteration.

    Tolerance: the reference is exact by construction up to float summation order. DDP sums ``g0/2 + g1/2``
    over ranks, the reference ``(g0 + g1)/2``; halving is exact in binary floating point and a two-term sum
    is commutative, so the gradients, hence the weights, agree bit for bit when each rank's forward/backward
    reproduces bit for bit in the reference (one thread both sides). The assertion allows
    ``1e-6 x max(1, max|w|)`` per tensor so that an allreduce that sums in another order (more ranks, another
    backend) would not fail it; any modelling difference (wrong sample, random stream, lr, unused-parameter
    handling) is orders of magnitude larger.
    """
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    out = tmp_path / "out"
    script = tmp_path / "ddp_run.py"
    script.write_text(_DDP_RUN)
    overrides = TINY + ["solver.max_iter=2", "solver.checkpoint_period=1",
                        f"solver.images_per_process={images_per_process}"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         *_train_args("synthetic_mega", data, out, overrides)],
        cwd=tmp_path, env={**ENV, "MEGAVOD_TEST_RANKS": str(ranks)}, capture_output=True, text=True, timeout=300,
        check=False,
    )
    assert proc.returncode == 0, _tail(proc)
    assert f"2 process(es) x {images_per_process} image(s)" in proc.stdout

    r0, r1 = (torch.load(ranks / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert_identical(r0, r1, "rank 0 vs rank 1")
    final = ckpt.load_checkpoint(out / FINAL_NAME)
    assert_identical(final["model"], r0["model"], "checkpoint vs rank 0")
    assert len(final["rng"]) == 2 and final["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(
        2 * images_per_process * 0.0025)  # the linear rule counts images

    cfg = load_config("synthetic_mega", overrides)
    assert scaled_lr(cfg.solver, 2) == pytest.approx(2 * scaled_lr(cfg.solver, 1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process
    try:
        expected = reference_ddp_run(cfg, data, world_size=2, iterations=2)
    finally:
        torch.set_num_threads(threads)

    def momentum(optimizer_state: dict) -> dict[str, torch.Tensor]:
        return {str(i): s["momentum_buffer"] for i, s in optimizer_state["state"].items()}

    after = [ckpt.load_checkpoint(out / ckpt.checkpoint_name(1)), final]
    for it, (ddp, ref) in enumerate(zip(after, expected), start=1):
        pairs = {"weights": (ddp["model"], ref["model"]),
                 "momentum": (momentum(ddp["optimizer"]), momentum(ref["optimizer"]))}
        for part, (got, want) in pairs.items():
            assert got and got.keys() == want.keys(), (it, part)
            worst_abs, worst_rel = _max_diffs(got, want)
            print(f"iteration {it} {part}: max |diff| {worst_abs:.3g}, relative to max(1, |w|) {worst_rel:.3g}")
            assert worst_rel <= 1e-6, (it, part, worst_abs)
        assert [g["lr"] for g in ddp["optimizer"]["param_groups"]] == [g["lr"] for g in ref["optimizer"]["param_groups"]]
    ckpt.seed_all(cfg.seed)
    init = build_detector(cfg).state_dict()  # the weights did move
    assert not all(torch.equal(final["model"][k], init[k]) for k in init)


@pytest.mark.slow
def test_torchrun_with_one_process_uses_a_process_group_and_trains_the_same(tmp_path, data):
    """Under torchrun even one process joins a process group (gloo here, NCCL on a GPU), so a 1-process
    run takes the many-process path; its weights equal a plain `megavod train` run's, bit for bit."""
    overrides = [*TINY[:2], "solver.max_iter=2", "solver.checkpoint_period=2", "solver.warmup_iters=1",
                 "solver.steps=[1]", "data.num_workers=0"]
    plain = _run([sys.executable, "-m", "megavod", *_train_args("synthetic_single", data, tmp_path / "plain",
                                                                   overrides)], tmp_path)
    assert plain.returncode == 0, _tail(plain)
    assert "1 process(es) x" in plain.stdout and "process group" not in plain.stdout
    launched = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                     "-m", "megavod", *_train_args("synthetic_single", data, tmp_path / "torchrun", overrides)],
                    tmp_path)
    assert launched.returncode == 0, _tail(launched)
    assert "process group gloo" in launched.stdout
    a = ckpt.load_checkpoint(tmp_path / "plain" / FINAL_NAME)
    b = ckpt.load_checkpoint(tmp_path / "torchrun" / FINAL_NAME)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
