"""Training engine: solver schedule and groups, atomic checkpoints, exact resume, 2-process DDP (gloo)."""

from __future__ import annotations

import functools
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from megavod.config import Config, SolverConfig, load_config
from megavod.data.vid_dataset import TrainSample
from megavod.errors import MegavodError
from megavod.train import checkpoint as ckpt
from megavod.train.distributed import DistInfo, IterationSampler, SampleKey, sample_seed
from megavod.train.engine import FINAL_NAME, train
from megavod.train.solver import (
    WarmupMultiStepLR,
    make_optimizer,
    make_scheduler,
    scaled_lr,
    warmup_multistep_factor,
)

REPO = Path(__file__).resolve().parents[1]
CPU = DistInfo()  # bit-for-bit comparisons run on the CPU even where a GPU is present


# ----------------------------------------------------------------------------------------------
# A tiny method: what the engine sees of a detector (forward(batch) -> dict of losses)


class TinyDataset(torch.utils.data.Dataset):
    """Items whose content is a function of the key's seed; item 3 has no box (its iterations skip)."""

    def __init__(self, n: int = 7):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: SampleKey) -> TrainSample:
        g = torch.Generator().manual_seed(key.seed)
        image = torch.randn(3, 8, 8, generator=g) + 0.1 * key.index
        boxes = torch.zeros(0 if key.index == 3 else 2, 4)
        target = {"boxes": boxes, "labels": torch.ones(boxes.shape[0], dtype=torch.int64)}
        return TrainSample(image, target, {"local": [image.flip(-1)]}, f"v{key.index}", key.index)


class TinyModel(nn.Module):
    """Conv + linear with biases; dropout and python/numpy noise so that every RNG stream matters."""

    def __init__(self, fail_at_call: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)
        self.drop = nn.Dropout(0.5)
        self.calls = 0
        self.fail_at_call = fail_at_call

    def forward(self, batch: list[TrainSample]) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise KeyboardInterrupt("killed")
        x = torch.stack([s.image + s.refs["local"][0] for s in batch])
        feats = self.drop(self.conv(x)).mean(dim=(2, 3))
        out = self.fc(feats)
        noise = 1.0 + 0.01 * random.random() + 0.01 * float(np.random.rand())
        return {"loss_a": (out**2).mean() * noise, "loss_b": (out[:, 0] - 1).abs().mean()}


def tiny_cfg(**solver) -> Config:
    cfg = Config()
    cfg.seed = 3
    cfg.data.num_workers = 0
    base = dict(base_lr=0.01, reference_batch=1, steps=(5,), max_iter=9, warmup_iters=2, checkpoint_period=3)
    base.update(solver)
    cfg.solver = SolverConfig(**base)
    return cfg


def fresh_model(**kw) -> TinyModel:
    torch.manual_seed(0)
    return TinyModel(**kw)


def final_weights(path: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_checkpoint(path)["model"]


# ----------------------------------------------------------------------------------------------
# Solver


def test_warmup_factor_values_and_step():
    f = lambda it: warmup_multistep_factor(it, (80000,), 0.1, 1 / 3, 500)  # noqa: E731
    assert f(0) == pytest.approx(1 / 3)
    assert f(250) == pytest.approx(2 / 3)
    assert f(500) == pytest.approx(1.0)
    assert f(79999) == pytest.approx(1.0)
    assert f(80000) == pytest.approx(0.1)
    assert f(119999) == pytest.approx(0.1)


def test_scheduler_lr_per_iteration_and_groups():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 2, bias=False))
    model[0].bias.requires_grad_(False)  # frozen parameters take no part
    cfg = SolverConfig(base_lr=0.01, reference_batch=4, steps=(6,), warmup_iters=4, weight_decay=1e-4)
    opt = make_optimizer(cfg, model, world_size=2)
    weights, = (g for g in opt.param_groups if g["name"] == "weights")
    assert len(opt.param_groups) == 1 and len(weights["params"]) == 2
    model[0].bias.requires_grad_(True)
    opt = make_optimizer(cfg, model, world_size=2)
    by_name = {g["name"]: g for g in opt.param_groups}
    lr = 0.01 * 2 / 4
    assert scaled_lr(cfg, 2) == pytest.approx(lr)
    assert by_name["weights"]["lr"] == pytest.approx(lr) and by_name["weights"]["weight_decay"] == 1e-4
    assert by_name["biases"]["lr"] == pytest.approx(2 * lr) and by_name["biases"]["weight_decay"] == 0.0
    assert [p is model[0].bias for p in by_name["biases"]["params"]] == [True]
    sched = make_scheduler(cfg, opt)
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"] / lr)
        opt.step()
        sched.step()
    expected = [1 / 3, 1 / 2, 2 / 3, 5 / 6, 1, 1, 0.1, 0.1]
    assert seen == pytest.approx(expected)
    assert opt.param_groups[1]["lr"] == pytest.approx(2 * lr * 0.1)


def test_attention_lr_factor_groups_exactly_the_attention_parameters():
    from megavod.models.relation import RelationModule

    relation = RelationModule(16, num_heads=2, embed_dim=8, location_based=True, content_bias=True)
    model = nn.ModuleDict({"fc": nn.Linear(16, 16), "relation": relation})
    cfg = SolverConfig(base_lr=0.01, reference_batch=1, warmup_iters=2, steps=(3,), attention_lr_factor=10.0)
    opt = make_optimizer(cfg, model)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert list(by_name) == ["weights", "biases", "attention_weights", "attention_biases"]
    ids = lambda group: {id(p) for p in by_name[group]["params"]}  # noqa: E731
    # Wv (the value projection) learns at the detector's lr with the other weights and biases.
    assert ids("weights") == {id(model["fc"].weight), id(relation.Wv.weight)}
    assert ids("biases") == {id(model["fc"].bias), id(relation.Wv.bias)}
    assert ids("attention_weights") == {id(p) for p in (relation.Wq.weight, relation.Wk.weight, relation.Wg.weight, relation.u)}
    assert ids("attention_biases") == {id(p) for p in (relation.Wq.bias, relation.Wk.bias, relation.Wg.bias)}
    assert by_name["attention_weights"]["lr"] == pytest.approx(0.1)
    assert by_name["attention_weights"]["weight_decay"] == cfg.weight_decay
    assert by_name["attention_biases"]["lr"] == pytest.approx(0.2) and by_name["attention_biases"]["weight_decay"] == 0
    sched = make_scheduler(cfg, opt)  # the schedule scales every group alike
    for _ in range(3):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.001, 0.002, 0.01, 0.02])
    # factor 1 (the authors): the two groups of before, whatever the model holds
    assert [g["name"] for g in make_optimizer(SolverConfig(), model).param_groups] == ["weights", "biases"]
    assert load_config("synthetic_mega").solver.attention_lr_factor == 10.0
    with pytest.raises(MegavodError, match="solver.attention_lr_factor"):
        load_config("synthetic_mega", ["solver.attention_lr_factor=0"])


def test_scheduler_rejects_unsorted_steps():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="increasing"):
        WarmupMultiStepLR(opt, (10, 5))


# ----------------------------------------------------------------------------------------------
# Checkpoints


def test_failed_save_keeps_previous_file_and_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "model.pth"
    ckpt.atomic_torch_save({"a": torch.arange(3)}, path)
    before = path.read_bytes()

    with pytest.raises(Exception):
        ckpt.atomic_torch_save({"bad": lambda: 0}, path)  # cannot be pickled, fails mid-write
    real_save = torch.save

    def disk_full(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        ckpt.atomic_torch_save({"a": torch.arange(1000)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth"]


def test_checkpoint_loads_weights_only_and_refuses_pickled_code(tmp_path):
    model = TinyModel()
    opt = make_optimizer(tiny_cfg().solver, model)
    ckpt.save_checkpoint(
        tmp_path, "model_0000001.pth", model=model.state_dict(), optimizer=opt.state_dict(),
        scheduler=make_scheduler(tiny_cfg().solver, opt).state_dict(), iteration=1,
        rng=[ckpt.capture_rng_state()], config={"method": "single"},
    )
    assert ckpt.read_last_checkpoint(tmp_path) == tmp_path / "model_0000001.pth"
    raw = torch.load(tmp_path / "model_0000001.pth", weights_only=True)  # plain tensors and values only
    assert raw["iteration"] == 1 and torch.equal(raw["model"]["fc.weight"], model.fc.weight)

    torch.save({"format": ckpt.FORMAT, "x": TinyDataset()}, tmp_path / "evil.pth")
    with pytest.raises(MegavodError, match="evil.pth: cannot load checkpoint safely"):
        ckpt.load_checkpoint(tmp_path / "evil.pth")
    torch.save({"model": {}}, tmp_path / "other.pth")
    with pytest.raises(MegavodError, match="other.pth: not a megavod training checkpoint"):
        ckpt.load_checkpoint(tmp_path / "other.pth")


def test_rng_state_round_trip():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = ckpt.capture_rng_state()
    a = (random.random(), float(np.random.rand()), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.restore_rng_state(state)
    b = (random.random(), float(np.random.rand()), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


# ----------------------------------------------------------------------------------------------
# Sampler


def test_iteration_sampler_is_a_function_of_seed_and_iteration():
    n, world, ipp = 10, 2, 2
    ranks = [IterationSampler(n, 12, rank=r, world_size=world, images_per_process=ipp, seed=5) for r in range(world)]
    for it in range(5):  # one epoch = 10 / (2 ranks x 2 images) = 2.5 iterations: rank slices are disjoint
        a, b = (s.batch(it) for s in ranks)
        if it < 2:
            assert not {k.index for k in a} & {k.index for k in b}
    first_epoch = [k.index for it in range(3) for r in ranks for k in r.batch(it)][:n]
    assert sorted(first_epoch) == list(range(n))  # every item once per epoch
    resumed = IterationSampler(n, 12, start_iter=7, rank=1, world_size=world, images_per_process=ipp, seed=5)
    assert list(resumed) == [ranks[1].batch(it) for it in range(7, 12)]
    assert ranks[0].batch(0)[0].seed == sample_seed(5, 0, 0, 0) != ranks[1].batch(0)[0].seed
    other_seed = IterationSampler(n, 12, seed=6)
    assert [k.index for it in range(5) for k in other_seed.batch(it)] != [
        k.index for it in range(5) for k in IterationSampler(n, 12, seed=5).batch(it)
    ]


# ----------------------------------------------------------------------------------------------
# Engine


def test_resume_after_kill_matches_uninterrupted_run_bit_for_bit(tmp_path):
    cfg = tiny_cfg()
    run = functools.partial(train, cfg, dataset=TinyDataset(), progress=False, info=CPU, log_period=2)
    ref = run(fresh_model(), out_dir=tmp_path / "a")
    assert ref.name == FINAL_NAME

    with pytest.raises(KeyboardInterrupt):  # killed during iteration 5; checkpoint at 3 survives
        run(fresh_model(fail_at_call=5), out_dir=tmp_path / "b")
    assert (tmp_path / "b" / "last_checkpoint").read_text().strip() == "model_0000003.pth"
    with pytest.raises(MegavodError, match="pass --resume"):
        run(fresh_model(), out_dir=tmp_path / "b")
    torch.manual_seed(123)  # whatever happened to the global streams in between
    random.seed(123)
    resumed = run(TinyModel(), out_dir=tmp_path / "b", resume=True)

    a, b = final_weights(ref), final_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    init = fresh_model().state_dict()
    assert not torch.equal(a["fc.weight"], init["fc.weight"])  # it did train
    state_a, state_b = ckpt.load_checkpoint(ref), ckpt.load_checkpoint(resumed)
    assert state_a["iteration"] == state_b["iteration"] == 9
    assert state_b["scheduler"]["last_epoch"] == 9 and state_b["config"]["seed"] == 3
    # Both checkpoints keep 3 periodic files at most and point last_checkpoint at the final one.
    assert (tmp_path / "b" / "last_checkpoint").read_text().strip() == FINAL_NAME
    assert sorted(p.name for p in (tmp_path / "b").glob("model_*.pth")) == [
        "model_0000003.pth", "model_0000006.pth", FINAL_NAME]
    # Resuming a finished run returns its final checkpoint without training.
    assert run(TinyModel(fail_at_call=1), out_dir=tmp_path / "b", resume=True) == resumed


def test_iterations_without_boxes_are_skipped(tmp_path):
    class Counting(TinyModel):
        def __init__(self):
            super().__init__()
            self.seen: list[int] = []

        def forward(self, batch):
            self.seen.extend(s.frame for s in batch)
            return super().forward(batch)

    model = Counting()
    cfg = tiny_cfg(max_iter=14, checkpoint_period=100)
    train(cfg, model, TinyDataset(), tmp_path, progress=False, info=CPU)
    assert 3 not in model.seen and len(model.seen) == 12  # 2 epochs of 7, item 3 twice skipped
    assert sorted(set(model.seen)) == [0, 1, 2, 4, 5, 6]


def test_solver_deterministic_holds_for_the_run_and_is_restored(tmp_path, monkeypatch):
    class Recording(TinyModel):
        """Records the determinism settings each forward runs under."""

        def __init__(self):
            super().__init__()
            self.modes: set[tuple] = set()

        def forward(self, batch):
            cudnn = torch.backends.cudnn
            self.modes.add((torch.are_deterministic_algorithms_enabled(),
                            torch.is_deterministic_algorithms_warn_only_enabled(), cudnn.benchmark,
                            cudnn.deterministic, os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
            return super().forward(batch)

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")  # not a deterministic value: replaced (undone after)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
              torch.backends.cudnn.deterministic)
    assert before[0] is False
    runs = {}
    for deterministic in (True, False):
        torch.manual_seed(0)
        model = Recording()
        out = tmp_path / str(deterministic)
        final = train(tiny_cfg(max_iter=4, deterministic=deterministic), model, TinyDataset(), out, progress=False,
                      info=CPU)
        runs[deterministic] = (model.modes, final_weights(final))
        # the process-wide switches are the caller's again after the run
        assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
                torch.backends.cudnn.deterministic) == before
    assert runs[True][0] == {(True, True, False, True, ":4096:8")}  # warn_only; the cuBLAS setting stays set
    assert {mode[0] for mode in runs[False][0]} == {False}
    a, b = runs[True][1], runs[False][1]
    assert all(torch.equal(a[k], b[k]) for k in a)  # on the CPU the switch changes no number


_DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_train import TinyDataset, fresh_model, tiny_cfg
    from megavod.train.distributed import cleanup, init_distributed
    from megavod.train.engine import train

    info = init_distributed("cpu")
    torch.set_num_threads(1)
    model = fresh_model()
    if info.rank == 1:  # DDP starts every rank from rank 0's weights
        torch.nn.init.zeros_(model.fc.weight)
    path = train(tiny_cfg(max_iter=6), model, TinyDataset(), {out!r}, progress=False, info=info, log_period=2)
    torch.save(model.state_dict(), {out!r} + f"/rank{{info.rank}}.pt")
    # One write per line: both ranks share the pipe, and print's separate writes can interleave.
    sys.stdout.write(f"final {{info.rank}} {{info.world_size}} {{path}}\\n")
    sys.stdout.flush()
    cleanup()
    """
)


def test_two_process_gloo_ddp_keeps_ranks_identical(tmp_path):
    script = tmp_path / "ddp_run.py"
    out = tmp_path / "out"
    script.write_text(_DDP_SCRIPT.format(tests=str(REPO / "tests"), out=str(out)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "final 0 2" in proc.stdout and "final 1 2" in proc.stdout
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    saved = ckpt.load_checkpoint(out / FINAL_NAME)
    assert all(torch.equal(saved["model"][k], r0[k]) for k in r0)
    assert len(saved["rng"]) == 2 and not torch.equal(saved["rng"][0]["torch"], saved["rng"][1]["torch"])
    # lr scales with the world size: 2 processes x 1 image over a reference batch of 1.
    assert saved["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(2 * 0.01)


def test_run_training_builds_dataset_and_model(tmp_path, monkeypatch):
    from megavod.data.synthetic import generate_synthetic_dataset
    from megavod.train import engine as train_engine
    from megavod.train.engine import run_training

    generate_synthetic_dataset(tmp_path / "data", 1, 0, frames=16, size=64, num_det_images=2)
    cfg = load_config("synthetic_mega", ["solver.max_iter=3", "solver.warmup_iters=1", "solver.steps=[2]"])
    built = []

    def build_detector(c):
        built.append(c)
        return TinyModel()

    monkeypatch.setattr(train_engine, "build_detector", build_detector)
    final = run_training(cfg, tmp_path / "data", tmp_path / "run", resume=False)
    assert final == tmp_path / "run" / FINAL_NAME and built == [cfg]
    state = ckpt.load_checkpoint(final)
    assert state["iteration"] == 3 and state["config"]["method"] == "mega"
    assert load_config(str(tmp_path / "run" / "config.yaml")).mega == cfg.mega
