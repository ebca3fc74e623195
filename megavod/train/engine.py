"""The training loop shared by every method (``megavod train``, :func:`megavod.api.train`;
docs/conventions.md#training-forward).

The loop knows nothing about the method: the model's ``forward(batch)`` in train mode takes a list of
:class:`~megavod.data.vid_dataset.TrainSample` (one per image of this process, already on the device)
and returns a dict of losses, which are summed (all weights 1, docs/conventions.md#training-forward).

What one iteration does, as the authors' ``do_train``: skip it when a sample has no box left
(docs/departures.md#skipped-iterations); forward under bf16 autocast on CUDA (the authors train in fp32,
``apex O0``; bf16 is our speed choice, ``solver.bf16``); backward; SGD step; learning-rate schedule step
(docs/conventions.md#solver).

**Resuming is exact**: the samples of iteration ``i`` are a function of (seed, i, rank)
(:class:`~megavod.train.distributed.IterationSampler`), their random choices come from a seed of the
same (flip, reference frames), and a checkpoint stores the model, optimizer, scheduler, iteration and
every rank's global random states. A run killed at any moment and restarted with ``--resume`` ends
with the same weights, bit for bit, as one that was never interrupted (same hardware and world size):
on the CPU (tests/test_train_real.py); on CUDA that is the aim of ``solver.deterministic``
(:func:`deterministic_algorithms`), since cuBLAS/cuDNN algorithm choices and atomic-add kernels otherwise
differ from run to run in the last bits, but it has not yet run on a GPU (``bash scripts/gpu_check.sh``
measures it: tests/test_cuda.py).

Checkpoints go to ``OUT/model_XXXXXXX.pth`` every ``solver.checkpoint_period`` iterations and
``OUT/model_final.pth`` at the end, each written atomically, then ``OUT/last_checkpoint`` is pointed
at it. TensorBoard scalars go to ``OUT/tb``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from megavod.config import Config, dump_config, to_dict
from megavod.data.vid_dataset import build_train_dataset
from megavod.errors import MegavodError
from megavod.train import checkpoint as ckpt
from megavod.train.distributed import (
    DistInfo,
    IterationSampler,
    all_gather_objects,
    any_rank,
    barrier,
    cleanup,
    get_rank,
    get_world_size,
    init_distributed,
    mix_seed,
    reduce_mean,
    unwrap,
    wrap_ddp,
)
from megavod.methods import build_detector
from megavod.train.solver import make_optimizer, make_scheduler, scaled_lr

FINAL_NAME = "model_final.pth"
CUBLAS_WORKSPACE_ENV = "CUBLAS_WORKSPACE_CONFIG"
# The two values PyTorch accepts as deterministic (at::Context::checkCuBLASConfigDeterministic).
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")


def _collate(samples: list[Any]) -> list[Any]:
    """A batch is the list of samples (images of different sizes are not stacked)."""
    return samples


def _num_boxes(sample: Any) -> int:
    return int(sample.target["boxes"].shape[0])


def _to_device(sample: Any, device: torch.device) -> Any:
    return sample.to(device) if hasattr(sample, "to") else sample


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def _current_dist_info() -> DistInfo:
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    local = device.index or 0
    return DistInfo(get_rank(), get_world_size(), local, device)


def set_cublas_workspace_config() -> None:
    """Set ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless it already holds a deterministic value.

    PyTorch reads the variable once per process, at the first cuBLAS call (the workspace size and the
    determinism check are both cached then); where it was not deterministic then, every cuBLAS call in
    deterministic mode raises (warn_only: warns, naming the variable). So it is set before CUDA is
    initialised (:func:`run_training`, :func:`train`); a process that ran CUDA matmuls before should
    export it before starting."""
    if os.environ.get(CUBLAS_WORKSPACE_ENV) not in CUBLAS_DETERMINISTIC:
        os.environ[CUBLAS_WORKSPACE_ENV] = CUBLAS_DETERMINISTIC[0]


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool, device: torch.device, announce: bool = False) -> Iterator[None]:
    """``solver.deterministic``: inside, ``torch.use_deterministic_algorithms(True, warn_only=True)``,
    ``CUBLAS_WORKSPACE_CONFIG`` (:func:`set_cublas_workspace_config`; it stays set), cuDNN
    ``benchmark=False`` and ``deterministic=True``; the previous settings are restored on exit. Nothing
    changes when ``enabled`` is false.

    ``warn_only``: a few kernels megavod may use have no deterministic CUDA version, and strict mode would
    make those methods untrainable: ``grid_sample``'s backward (FGFA's and DFF's warp, RAFT) and
    torchvision's ``roi_align`` backward where torch.compile has no triton (with triton, torchvision runs
    a compiled RoIAlign, whose backward is expected to be deterministic: not yet measured on a GPU,
    tests/test_cuda.py checks it). They run as before, with a PyTorch warning.
    ``announce`` prints a one-line note of this (CUDA only)."""
    if not enabled:
        yield
        return
    set_cublas_workspace_config()
    cudnn = torch.backends.cudnn
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             cudnn.benchmark, cudnn.deterministic)
    torch.use_deterministic_algorithms(True, warn_only=True)
    cudnn.benchmark, cudnn.deterministic = False, True
    if announce and device.type == "cuda":
        print("note: solver.deterministic: deterministic algorithms on (warn_only); grid_sample's backward (FGFA, "
              "DFF, RAFT) and roi_align's without triton stay non-deterministic, with a PyTorch warning", flush=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.benchmark, cudnn.deterministic = saved[2], saved[3]


class _Log:
    """Scalars to TensorBoard (main process only) and a tqdm bar with the loss, lr and ETA."""

    def __init__(self, out_dir: Path, start: int, total: int, enabled: bool, progress: bool):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if not enabled:
            return
        # TensorBoard's writer pulls in tensorboard and protobuf (~1 s): only on the logging rank.
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed run wrote after its last checkpoint.
        self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=start)
        if progress:
            self.bar = tqdm(total=total, initial=start, desc="train", unit="it", dynamic_ncols=True)

    def scalars(self, iteration: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, iteration)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{values.get('loss/total', float('nan')):.4f}", lr=f"{values['lr']:.2e}")

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def train(
    cfg: Config,
    model: nn.Module,
    dataset: Dataset,
    out_dir: str | Path,
    resume: bool = False,
    max_iter: int | None = None,
    progress: bool = True,
    *,
    info: DistInfo | None = None,
    log_period: int = 20,
    keep_checkpoints: int = 3,
) -> Path:
    """Train ``model`` on ``dataset`` as ``cfg.solver`` says; return the final checkpoint's path.

    ``dataset[SampleKey]`` gives a sample with ``.target["boxes"]`` and ``.to(device)``.
    ``max_iter`` (default ``cfg.solver.max_iter``) is where the run ends. ``resume`` continues from
    ``out_dir/last_checkpoint``; without it, an ``out_dir`` that already holds a run is refused.
    ``info`` is this process's place in the process group (default: the current group, or a single
    process). The last ``keep_checkpoints`` periodic checkpoints are kept (0 keeps all). Under DDP,
    unused parameters are searched for each iteration unless the model sets
    ``find_unused_parameters = False`` (a model whose every trainable parameter gets a gradient).
    With ``solver.deterministic`` the run is inside :func:`deterministic_algorithms`.
    """
    if cfg.solver.deterministic:
        set_cublas_workspace_config()  # before _current_dist_info() initialises CUDA
    info = info or _current_dist_info()
    with deterministic_algorithms(cfg.solver.deterministic, info.device, announce=info.is_main):
        return _train(cfg, model, dataset, out_dir, resume, max_iter, progress, info=info, log_period=log_period,
                      keep_checkpoints=keep_checkpoints)


def _train(cfg: Config, model: nn.Module, dataset: Dataset, out_dir: str | Path, resume: bool, max_iter: int | None,
           progress: bool, *, info: DistInfo, log_period: int, keep_checkpoints: int) -> Path:
    """The body of :func:`train`."""
    out_dir = Path(out_dir)
    solver = cfg.solver
    max_iter = solver.max_iter if max_iter is None else max_iter
    device = info.device
    out_dir.mkdir(parents=True, exist_ok=True)

    model.to(device)
    model.train()
    optimizer = make_optimizer(solver, model, info.world_size)
    scheduler = make_scheduler(solver, optimizer)

    start_iter, rng_state = 0, None
    last = ckpt.read_last_checkpoint(out_dir)
    if last is not None and not resume:
        raise MegavodError(
            f"{out_dir}: already holds a training run ({ckpt.LAST_CHECKPOINT} names {last.name}); "
            "pass --resume to continue it or choose another --out"
        )
    if last is not None:
        state = ckpt.load_checkpoint(last)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_iter = int(state["iteration"])
        rngs = state["rng"]
        changed = _changed_keys(state["config"], to_dict(cfg))
        if changed and info.is_main:
            print(f"note: the config differs from the checkpoint's at {', '.join(changed)}", flush=True)
        rng_state = rngs[info.rank] if len(rngs) == info.world_size else None
        if info.is_main:
            note = "" if rng_state is not None else f" (saved with {len(rngs)} processes: random streams reseeded)"
            print(f"resuming from {last} at iteration {start_iter}{note}", flush=True)
        if start_iter >= max_iter:
            return last
    elif resume and info.is_main:
        print(f"no checkpoint in {out_dir}: starting from iteration 0", flush=True)
    if info.is_main:
        ckpt.atomic_write_text(out_dir / "config.yaml", dump_config(cfg))
        print(
            f"training {cfg.name} ({cfg.method}): {len(dataset)} images, {info.world_size} process(es) x "
            f"{solver.images_per_process} image(s), lr {scaled_lr(solver, info.world_size):g}, "
            f"iterations {start_iter}..{max_iter}"
            f"{f', process group {dist.get_backend()}' if dist.is_available() and dist.is_initialized() else ''}",
            flush=True,
        )

    ddp_model = wrap_ddp(model, info, find_unused_parameters=getattr(model, "find_unused_parameters", True))
    sampler = IterationSampler(
        len(dataset),
        max_iter,
        start_iter=start_iter,
        images_per_process=solver.images_per_process,
        rank=info.rank,
        world_size=info.world_size,
        seed=cfg.seed,
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=_collate,
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        # Its own generator, so creating the loader draws nothing from the global torch stream.
        generator=torch.Generator(),
    )
    batches = iter(loader)
    # The global streams (model-side randomness: RPN / RoI sampling, dropout) start here, identically
    # in a fresh run and in a resumed one.
    if rng_state is not None:
        ckpt.restore_rng_state(rng_state)
    else:
        ckpt.seed_all(mix_seed(cfg.seed, info.rank, start_iter))

    use_bf16 = device.type == "cuda" and solver.bf16
    log = _Log(out_dir, start_iter, max_iter, info.is_main, progress)
    final = out_dir / FINAL_NAME
    started, skipped = time.perf_counter(), 0
    config = to_dict(cfg)

    def save(iteration: int, name: str) -> Path:
        rngs = all_gather_objects(ckpt.capture_rng_state())  # every rank takes part
        if info.is_main:
            ckpt.save_checkpoint(
                out_dir,
                name,
                model=unwrap(ddp_model).state_dict(),
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                iteration=iteration,
                rng=rngs,
                config=config,
            )
            if name != FINAL_NAME:
                ckpt.prune_checkpoints(out_dir, keep_checkpoints)
        barrier()
        return out_dir / name

    try:
        for iteration in range(start_iter, max_iter):
            batch = [_to_device(s, device) for s in next(batches)]
            if any_rank(any(_num_boxes(s) == 0 for s in batch), device):
                skipped += 1  # docs/departures.md#skipped-iterations: a sample without boxes skips the whole iteration
            else:
                with torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext():
                    losses = ddp_model(batch)
                loss = sum(losses.values())
                if any_rank(not bool(torch.isfinite(loss.detach())), device):
                    raise FloatingPointError(
                        f"iteration {iteration}: non-finite loss "
                        + ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if (iteration + 1) % log_period == 0 or iteration + 1 == max_iter:
                    values = {f"loss/{k}": float(v.detach()) for k, v in losses.items()}
                    values["loss/total"] = float(loss.detach())
                    values = reduce_mean(values, device)
                    values["lr"] = optimizer.param_groups[0]["lr"]
                    values["time/iter_s"] = (time.perf_counter() - started) / (iteration + 1 - start_iter)
                    values["skipped"] = float(skipped)
                    log.scalars(iteration + 1, values)
            scheduler.step()
            log.step()
            done = iteration + 1
            if done == max_iter:
                final = save(done, FINAL_NAME)
            elif done % solver.checkpoint_period == 0:
                save(done, ckpt.checkpoint_name(done))
    finally:
        log.close()
    return final


def run_training(cfg: Config, data_dir: Path, out_dir: Path, resume: bool) -> Path:
    """Build the dataset (``cfg.data.train_sets`` under ``data_dir``) and the detector, then train.

    Under ``torchrun`` every process runs this; the process group is created from the environment.
    """
    if cfg.solver.deterministic:
        set_cublas_workspace_config()  # before CUDA is initialised (init_distributed), see its docstring
    info = init_distributed()
    try:
        dataset = build_train_dataset(cfg, data_dir)
        ckpt.seed_all(cfg.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
        model = build_detector(cfg)
        return train(cfg, model, dataset, out_dir, resume, info=info)
    finally:
        cleanup()
