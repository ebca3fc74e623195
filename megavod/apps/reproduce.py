"""``megavod reproduce synthetic``: the paper's Table 3 comparison on the synthetic benchmark, end to end.

One run generates the benchmark (``megavod synth``'s defaults: 80 train + 20 val videos of 90 frames at
192 px, 15 DET images per train video), pre-trains the single-frame detector from scratch (12000
iterations: the paper's methods all start from ImageNet weights, which the CPU backbone does not have,
and learning the classes' cues from scratch is most of the work), then trains the single-frame
detector, the base model (MEGA without memory) and MEGA from that same starting point with the presets
``synthetic_single`` / ``synthetic_base`` / ``synthetic_mega`` and the same iteration budget, schedule
and seed, detects on every val video (offline, the paper's setting), evaluates each with the ImageNet
VID protocol (mAP and mAP by motion speed) and times each. It writes under ``--out``::

    data/                   the benchmark (reused when its settings match)
    runs/pretrain/          the shared single-frame pre-training
    runs/<method>/          training checkpoints, config.yaml, TensorBoard scalars
    pred/<method>.json      prediction files (megavod.predictions); timing in <method>.timing.json
    eval/<method>/          eval.json and result.txt
    weights/<preset>.*      each trained model as megavod/weights/ ships it (safetensors + config)
    results.json            every figure of the table, the settings and the machine
    table.md, table.png     the Table-3-style table and a plot of it

Every stage is resumable: training continues from its last checkpoint (``megavod train --resume``), a
method whose predictions exist is not detected again, so an interrupted reproduction is finished by
running the same command again. A folder holding a reproduction with other settings is refused.
How the runs are scored and tabulated: :mod:`megavod.reproduce_report`.

``megavod reproduce synthetic-yolo`` is the same pipeline for the one-stage family
(:func:`reproduce_synthetic_yolo`): YOLOX trained from scratch (``synthetic_yolox``), then YOLOV from it
(``synthetic_yolov`` with ``model.init_weights`` = YOLOX's final checkpoint and the authors' frozen
parts), each detected, evaluated, timed and exported as above, into its own folder and table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import random
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from safetensors.torch import save_file
from torchvision.ops import FrozenBatchNorm2d
from tqdm import tqdm

from megavod.errors import MegavodError
from megavod.apps.reproduce_report import CUE_SPLIT_CAPTION, CUE_WINDOW, evaluate_method, fmt, format_table, plot_table
from megavod.api import Detector
from megavod.atomic import atomic_write_text
from megavod.checkpoint_files import read_checkpoint, state_dict_of
from megavod.checkpoints.loading import load_model_weights
from megavod.config import dump_config
from megavod.config import load_config
from megavod.data.predictions import FramePrediction, VideoPredictions, write_predictions
from megavod.data.synthetic import generate_synthetic_dataset
from megavod.data.vid_dataset import build_train_dataset
from megavod.data.video import FrameFolderSource
from megavod.methods import build_detector
from megavod.methods import convert
from megavod.models.backbone import calibrate_frozen_bn
from megavod.train import checkpoint as ckpt
from megavod.train.engine import train

# (key, preset, name in the table). Same detector, input and solver: only the method/memory differ.
METHODS: tuple[tuple[str, str, str], ...] = (
    ("single", "synthetic_single", "Single-frame baseline"),
    ("base", "synthetic_base", "Base model (MEGA, no memory)"),
    ("mega", "synthetic_mega", "MEGA"),
)
# The one-stage family (``megavod reproduce synthetic-yolo``): YOLOX, then YOLOV trained from it.
YOLO_METHODS: tuple[tuple[str, str, str], ...] = (
    ("yolox", "synthetic_yolox", "YOLOX"),
    ("yolov", "synthetic_yolov", "YOLOV"),
)
DET_IMAGES_PER_TRAIN_VIDEO = 15  # as `megavod synth`


PRETRAIN_PRESET = "synthetic_single"
PRETRAIN_ITERATIONS = 12000
CALIBRATION_IMAGES = 8


@dataclass
class BenchmarkSettings:
    """The synthetic benchmark a reproduction runs on (``megavod synth``'s defaults)."""

    videos: int = 100  # 80% train, 20% val, as `megavod synth`
    frames: int = 90
    size: int = 192
    seed: int = 0

    @property
    def num_val(self) -> int:
        return max(1, round(0.2 * self.videos))

    @property
    def num_train(self) -> int:
        return self.videos - self.num_val

    def check(self) -> None:
        if self.videos < 2:
            raise MegavodError(f"reproduce: --videos must be >= 2 (train and val), got {self.videos}")
        if self.frames < 2:
            raise MegavodError(f"reproduce: --frames must be >= 2, got {self.frames}")


def _check_budget(name: str, iterations: int | None) -> None:
    if iterations is not None and iterations < 1:
        raise MegavodError(f"reproduce: --{name.replace('_', '-')} must be >= 1, got {iterations}")


@dataclass
class ReproduceSettings(BenchmarkSettings):
    """What a synthetic reproduction of the MEGA family depends on.

    ``pretrain_iterations``: the shared single-frame pre-training every method starts from (our stand-in
    for the paper's ImageNet pre-training, 0: every method starts from random weights);
    ``iterations``: each method's own training budget (None: the presets' ``solver.max_iter``).
    """

    iterations: int | None = None
    pretrain_iterations: int = PRETRAIN_ITERATIONS

    def check(self) -> None:
        super().check()
        _check_budget("iterations", self.iterations)
        if self.pretrain_iterations < 0:
            raise MegavodError(f"reproduce: --pretrain-iterations must be >= 0, got {self.pretrain_iterations}")


@dataclass
class YoloReproduceSettings(BenchmarkSettings):
    """What a synthetic reproduction of the one-stage family depends on: YOLOX's budget
    (``yolox_iterations``, from scratch) and YOLOV's (``yolov_iterations``, from the trained YOLOX; an
    iteration reads ``yolov.train_frames`` frames of one video). None: the presets' ``solver.max_iter``."""

    yolox_iterations: int | None = None
    yolov_iterations: int | None = None

    def check(self) -> None:
        super().check()
        _check_budget("yolox_iterations", self.yolox_iterations)
        _check_budget("yolov_iterations", self.yolov_iterations)


def budget_overrides(iterations: int | None) -> list[str]:
    """Config overrides that scale the presets' schedule (step at 3/4, warm-up <= 1/10) to ``iterations``."""
    if iterations is None:
        return []
    step = max(1, (3 * iterations) // 4)
    return [
        f"solver.max_iter={iterations}",
        f"solver.steps=[{step}]",
        f"solver.warmup_iters={max(1, min(100, iterations // 10))}",
        f"solver.checkpoint_period={max(1, min(500, iterations // 4))}",
    ]


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------


def _check_settings(out: Path, settings: ReproduceSettings) -> None:
    """Remember the settings in ``out``; refuse a folder that holds a reproduction with other ones."""
    path = out / "settings.json"
    current = asdict(settings)
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except ValueError:
            previous = None
        if previous != current:
            raise MegavodError(
                f"{out}: holds a reproduction with other settings ({path}: {previous}); "
                "choose another --out or delete it"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(current, indent=1) + "\n")


def prepare_data(out: Path, settings: ReproduceSettings, progress: bool = True) -> Path:
    """Generate the benchmark under ``out/data`` unless a complete one with these settings is there."""
    data = out / "data"
    wanted = {
        "num_train_videos": settings.num_train, "num_val_videos": settings.num_val,
        "frames": [settings.frames, settings.frames], "size": [settings.size, settings.size],
        "seed": settings.seed, "num_det_images": DET_IMAGES_PER_TRAIN_VIDEO * settings.num_train,
    }
    try:
        meta = json.loads((data / "dataset.json").read_text())
        if meta.get("complete") and meta.get("arguments") == wanted:
            print(f"[data] reusing {data}", flush=True)
            return data
    except (OSError, ValueError):
        pass
    print(f"[data] generating {settings.num_train} train + {settings.num_val} val videos into {data}", flush=True)
    stats = generate_synthetic_dataset(
        data, settings.num_train, settings.num_val, frames=settings.frames, size=settings.size,
        seed=settings.seed, num_det_images=wanted["num_det_images"], progress=progress,
    )
    print(f"[data] {stats.frames} frames, {stats.boxes} boxes, {stats.det_images} DET images, "
          f"{stats.seconds:.0f} s", flush=True)
    return data


def pretrain_overrides(iterations: int) -> list[str]:
    """The pre-training schedule: warm-up, then the presets' base learning rate to the end (no step:
    each method's own training anneals)."""
    return [
        f"solver.max_iter={iterations}",
        f"solver.steps=[{iterations}]",
        f"solver.warmup_iters={max(1, min(100, iterations // 10))}",
        f"solver.checkpoint_period={max(1, min(1000, iterations // 4))}",
    ]


@torch.no_grad()
def calibrate_model(model: torch.nn.Module, dataset, count: int = CALIBRATION_IMAGES, seed: int = 0) -> None:
    """Set the FrozenBN statistics of a randomly initialised backbone and res5 from training images.

    The CPU backbone has no ImageNet weights, and with identity FrozenBN a random ResNet's activations
    are badly scaled, which slows training from scratch several times over (synthetic benchmark, 1500
    iterations: 6.8 vs 1.7 mAP). ``count`` images of the first sampled image's size, drawn by ``seed``.
    """
    order = random.Random(seed).sample(range(len(dataset)), len(dataset))
    images, shape = [], None
    for index in order:
        image = dataset[index].image
        shape = shape or image.shape
        if image.shape == shape:
            images.append(image)
        if len(images) == count:
            break
    batch = torch.stack(images)
    calibrate_frozen_bn(model.backbone, batch)
    calibrate_frozen_bn(model.box_head.feature_extractor.head, model.backbone(batch))


# The single-frame box head's fc6/fc7 are MEGA's first two aggregator FCs (the embedding and the FC
# between local stages); the relation modules start near zero (value weights std 0.01), so a MEGA built
# from the pre-trained single-frame detector starts close to it.
_SINGLE_TO_MEGA = {
    "roi_heads.box.feature_extractor.fc6.": "roi_heads.box.feature_extractor.aggregator.fcs.0.",
    "roi_heads.box.feature_extractor.fc7.": "roi_heads.box.feature_extractor.aggregator.fcs.1.",
}


def load_pretrained(model: torch.nn.Module, checkpoint: Path) -> list[str]:
    """Copy the pre-trained single-frame detector's tensors into ``model`` (renamed for MEGA's head);
    returns the model keys left at their initialisation. Every pre-trained tensor must find its place."""
    state = model.state_dict()
    rename = _SINGLE_TO_MEGA if any(k.startswith("roi_heads.box.feature_extractor.aggregator.") for k in state) else {}
    filled = set()
    for key, value in state_dict_of(read_checkpoint(checkpoint), checkpoint).items():
        target = key
        for old, new in rename.items():
            target = target.replace(old, new)
        if target not in state or state[target].shape != value.shape:
            raise MegavodError(f"{checkpoint}: pre-trained tensor {key} has no place in {type(model).__name__}")
        state[target] = value
        filled.add(target)
    model.load_state_dict(state)
    return [k for k in state if k not in filled]


def _has_frozen_bn(model: torch.nn.Module) -> bool:
    return any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())


def _train(cfg, data: Path, run_dir: Path, init: Path | None, progress: bool = True) -> Path:
    """Train ``cfg`` into ``run_dir`` (resuming), starting from ``init``, from ``model.init_weights``
    (:func:`~megavod.methods.build_detector` loads it), or from random weights (FrozenBN calibrated; a
    model with trainable BatchNorm, YOLOX, needs none)."""
    dataset = build_train_dataset(cfg, data)
    ckpt.seed_all(cfg.seed)
    model = build_detector(cfg)
    if ckpt.read_last_checkpoint(run_dir) is None:  # a resumed run loads everything from its checkpoint
        if init is not None:
            fresh = load_pretrained(model, init)
            print(f"initialised from {init} ({len(fresh)} tensors of the method's own modules start fresh)", flush=True)
        elif cfg.model.init_weights is None and _has_frozen_bn(model):
            calibrate_model(model, dataset, seed=cfg.seed)
    return train(cfg, model, dataset, run_dir, resume=True, progress=progress)


def pretrain(data: Path, run_dir: Path, settings: ReproduceSettings) -> Path | None:
    """The shared single-frame pre-training (None when ``settings.pretrain_iterations`` is 0)."""
    if settings.pretrain_iterations == 0:
        return None
    cfg = load_config(PRETRAIN_PRESET, pretrain_overrides(settings.pretrain_iterations))
    return _train(cfg, data, run_dir, None)


def train_method(
    preset: str, data: Path, run_dir: Path, settings: ReproduceSettings, init: Path | None, progress: bool = True,
    *, iterations: int | None = None, overrides: Sequence[str] = (),
):
    """Train (or finish training) one preset from ``init`` for ``iterations`` (default
    ``settings.iterations``), with ``overrides`` on top of the preset; returns (config, final checkpoint,
    seconds now)."""
    iterations = settings.iterations if iterations is None else iterations
    cfg = load_config(preset, list(overrides))
    if iterations != cfg.solver.max_iter:  # the preset's own schedule when its budget is asked for
        cfg = load_config(preset, [*overrides, *budget_overrides(iterations)])
    started = time.perf_counter()
    final = _train(cfg, data, run_dir, init, progress)
    return cfg, final, time.perf_counter() - started


def _train_method_worker(preset: str, data: Path, run_dir: Path, settings: ReproduceSettings,
                         init: Path | None, threads: int) -> float:
    torch.set_num_threads(threads)
    return train_method(preset, data, run_dir, settings, init, progress=False)[2]


def train_methods_concurrently(data: Path, out: Path, settings: ReproduceSettings, init: Path | None,
                               jobs: int) -> None:
    """Train the methods side by side, ``jobs`` processes at a time, the CPU threads split between them.

    The synthetic models are small, and small operators gain little from a second thread (and lose
    much when threads spin-wait on busy cores, benchmarks/README.md "CPU threads"), so on a 2-core
    machine one single-threaded process per method keeps both cores doing useful work; the video
    methods' longer runs start first. Each run is the same as a sequential one (same seed, same
    samples; resumable; tested bit for bit); the main loop then finds them finished.
    """
    threads = max(1, torch.get_num_threads() // jobs)
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    print(f"[train] {len(METHODS)} methods, {jobs} at a time, {threads} thread(s) each "
          f"(progress: TensorBoard scalars under {out / 'runs'})", flush=True)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {
            pool.submit(_train_method_worker, preset, data, out / "runs" / key, settings, init, threads): key
            # The video methods cost several times a single-frame iteration: they start first.
            for key, preset, _ in reversed(METHODS)
        }
        for future in as_completed(futures):
            print(f"[{futures[future]}] trained ({future.result():.0f} s)", flush=True)


def export_weights(cfg, checkpoint: Path, dst_dir: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write the model weights of a training checkpoint as ``<dst_dir>/<cfg.name>.safetensors`` plus the
    config as ``<cfg.name>.yaml`` (what ``megavod/weights/`` ships).

    Floating-point tensors are stored in ``dtype`` (float16 halves the file; loading casts back to the
    model's float32, and the detections are the same to the table's precision, see weights/README.md).
    """
    state = state_dict_of(read_checkpoint(checkpoint), checkpoint)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    dst_dir.mkdir(parents=True, exist_ok=True)
    path = dst_dir / f"{cfg.name}.safetensors"
    tmp = path.with_name(f".{path.name}.tmp")
    # megavod's converted format (``megavod convert``): the whole config travels in the file, so
    # ``megavod detect --weights FILE`` needs no --config.
    metadata = {"format": convert.FORMAT, "version": str(convert.VERSION), "config": dump_config(cfg),
                "iterations": str(cfg.solver.max_iter)}
    save_file(tensors, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o644)  # a file to ship, readable like the package's other files
    os.replace(tmp, path)
    atomic_write_text(dst_dir / f"{cfg.name}.yaml", dump_config(cfg))
    return path


def _val_videos(data: Path) -> list[Path]:
    videos = sorted(p for p in (data / "Data" / "VID" / "val").iterdir() if p.is_dir() and p.name != "snippets")
    if not videos:
        raise MegavodError(f"{data}: no val videos under Data/VID/val")
    return videos


def detect_method(cfg, weights: Path, data: Path, pred_file: Path, progress: bool = True) -> dict:
    """Detect offline on every val video; write ``pred_file``; return the timing.

    Frames are decoded before the clock starts, so ms/frame is the detector's own time (transform,
    backbone, RPN, aggregation, post-processing), as the paper's runtime column.
    """
    model = build_detector(cfg)
    load_model_weights(model, weights, cfg)
    detector = Detector(model, cfg, "cpu")
    videos, seconds, frames = [], 0.0, 0
    for folder in tqdm(_val_videos(data), desc=f"detect {cfg.name}", unit="video", disable=not progress):
        source = FrameFolderSource(folder)
        images = list(source)
        started = time.perf_counter()
        records = [FramePrediction(r.frame, source.files[r.frame].name, r.detections.to("cpu"))
                   for r in detector.stream(images, "offline")]
        seconds += time.perf_counter() - started
        frames += len(records)
        videos.append(VideoPredictions(f"val/{folder.name}", source.width, source.height, records))
    write_predictions(pred_file, videos)
    return {"frames": frames, "seconds": seconds, "ms_per_frame": 1000.0 * seconds / max(frames, 1),
            "threads": torch.get_num_threads()}


def _machine() -> dict:
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


def reproduce_synthetic(
    out: str | Path, settings: ReproduceSettings | None = None, progress: bool = True, jobs: int = 1
) -> dict:
    """Run (or resume) the whole synthetic reproduction under ``out``; return ``results.json``'s content.

    ``jobs`` > 1 trains the methods in that many processes at once (:func:`train_methods_concurrently`);
    the results are the same as with 1."""
    settings = settings or ReproduceSettings()
    settings.check()
    if settings.iterations is None:  # resolved, so that settings.json notices a preset's budget changing
        settings = ReproduceSettings(**{**asdict(settings), "iterations": load_config(METHODS[0][1]).solver.max_iter})
    out = Path(out)
    _check_settings(out, settings)
    started = time.perf_counter()
    data = prepare_data(out, settings, progress)
    print(f"[pretrain] {PRETRAIN_PRESET}, {settings.pretrain_iterations} iterations", flush=True)
    init = pretrain(data, out / "runs" / "pretrain", settings)
    if jobs > 1:
        train_methods_concurrently(data, out, settings, init, jobs)
    rows = []
    for key, preset, name in METHODS:
        print(f"[{key}] training {preset}", flush=True)
        cfg, final, train_s = train_method(preset, data, out / "runs" / key, settings, init)
        rows.append(_method_row(key, preset, name, cfg, final, train_s, data, out, progress))

    budget = rows[0]["iterations"]
    header = (
        f"Synthetic benchmark: {settings.num_train} train + {settings.num_val} val videos x {settings.frames} "
        f"frames at {settings.size} px (seed {settings.seed}). Every method starts from the same single-frame "
        f"detector pre-trained {settings.pretrain_iterations} iterations from scratch (our stand-in for "
        f"ImageNet pre-training), then trains {budget} iterations (1 key frame each, same schedule); "
        f"offline inference; authors' evaluation protocol (cue hidden / visible: mAP on the boxes whose class "
        f"cue is hidden / visible, each evaluated as a motion bucket); runtime on CPU with "
        f"{torch.get_num_threads()} thread(s)."
    )
    return _write_report(out, "synthetic", settings, rows, header, started)


def reproduce_synthetic_yolo(
    out: str | Path, settings: YoloReproduceSettings | None = None, progress: bool = True
) -> dict:
    """``megavod reproduce synthetic-yolo``: YOLOX trained from scratch on the synthetic benchmark
    (``synthetic_yolox``), then YOLOV from it (``synthetic_yolov`` with ``model.init_weights`` = YOLOX's
    final checkpoint, the authors' frozen parts), each detected offline on the val videos (YOLOV: the
    authors' chunks), evaluated, timed and exported as :func:`reproduce_synthetic` does, under ``out``
    (its own folder: the same layout, no pre-training stage). Resumable; a folder with other settings is
    refused. Returns ``results.json``'s content."""
    settings = settings or YoloReproduceSettings()
    settings.check()
    budgets = {"yolox_iterations": settings.yolox_iterations, "yolov_iterations": settings.yolov_iterations}
    for (_, preset, _), field in zip(YOLO_METHODS, budgets):  # resolved: settings.json sees preset changes
        if budgets[field] is None:
            budgets[field] = load_config(preset).solver.max_iter
    settings = YoloReproduceSettings(**{**asdict(settings), **budgets})
    out = Path(out)
    _check_settings(out, settings)
    started = time.perf_counter()
    data = prepare_data(out, settings, progress)
    rows, init = [], None
    for (key, preset, name), iterations in zip(YOLO_METHODS, budgets.values()):
        # YOLOX starts from random weights; YOLOV from the YOLOX just trained, as the authors' recipe.
        overrides = [] if init is None else [f"model.init_weights={init}"]
        print(f"[{key}] training {preset}, {iterations} iterations", flush=True)
        cfg, final, train_s = train_method(preset, data, out / "runs" / key, settings, None, progress,
                                           iterations=iterations, overrides=overrides)
        rows.append(_method_row(key, preset, name, cfg, final, train_s, data, out, progress))
        init = final
    yolox, yolov = (load_config(preset) for _, preset, _ in YOLO_METHODS)
    header = (
        f"Synthetic benchmark: {settings.num_train} train + {settings.num_val} val videos x {settings.frames} "
        f"frames at {settings.size} px (seed {settings.seed}). YOLOX (depth {yolox.yolox.depth}, width "
        f"{yolox.yolox.width}) trained from scratch {settings.yolox_iterations} iterations of "
        f"{yolox.solver.images_per_process} image(s); YOLOV trained from it {settings.yolov_iterations} "
        f"iterations of {yolov.yolov.train_frames} frames of one video (the authors' frozen parts); offline "
        f"inference (YOLOV: chunks of {yolov.yolov.gframe} frames of a seeded permutation of each video); "
        f"authors' evaluation protocol (cue hidden / visible: mAP on the boxes whose class cue is hidden / "
        f"visible, each evaluated as a motion bucket); runtime on CPU with {torch.get_num_threads()} thread(s)."
    )
    caption = (
        f"Cue hidden, by the distance to the nearest frame where the same object's cue is visible: within "
        f"{CUE_WINDOW} frames or further (MEGA's local window reaches the first; a YOLOV chunk draws its "
        f"{yolov.yolov.gframe} frames from the whole video, so its reach does not depend on the distance)."
    )
    return _write_report(out, "synthetic-yolo", settings, rows, header, started, caption)


def _method_row(key: str, preset: str, name: str, cfg, final: Path, train_s: float, data: Path, out: Path,
                progress: bool) -> dict:
    """Detect (unless its predictions exist), evaluate and export one trained method; its table row."""
    pred_file = out / "pred" / f"{key}.json"
    timing_file = out / "pred" / f"{key}.timing.json"
    if pred_file.is_file() and timing_file.is_file():
        timing = json.loads(timing_file.read_text())
        print(f"[{key}] predictions exist: {pred_file}", flush=True)
    else:
        timing = detect_method(cfg, final, data, pred_file, progress)
        atomic_write_text(timing_file, json.dumps(timing, indent=1) + "\n")
    maps = evaluate_method(data, pred_file, out / "eval" / key)
    export_weights(cfg, final, out / "weights")
    print(f"[{key}] mAP {fmt(maps['all'])} (slow {fmt(maps.get('slow'))}, medium {fmt(maps.get('medium'))}, "
          f"fast {fmt(maps.get('fast'))}), {timing['ms_per_frame']:.1f} ms/frame", flush=True)
    return {"key": key, "preset": preset, "name": name, "iterations": cfg.solver.max_iter,
            "map": maps, "timing": timing, "checkpoint": str(final), "train_seconds_this_run": train_s}


def _write_report(out: Path, experiment: str, settings: BenchmarkSettings, rows: list[dict], header: str,
                  started: float, split_caption: str = CUE_SPLIT_CAPTION) -> dict:
    """Write ``results.json``, ``table.md`` and ``table.png`` under ``out``; return the results."""
    results = {"experiment": experiment, "settings": asdict(settings), "rows": rows, "machine": _machine(),
               "seconds_this_run": time.perf_counter() - started,
               "command": f"megavod reproduce {experiment} --out {out}"}
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    table = format_table(rows, header, split_caption)
    atomic_write_text(out / "table.md", table)
    plot_table(rows, out / "table.png")
    print("\n" + table, flush=True)
    print(f"wrote {out / 'table.md'}, {out / 'table.png'}, {out / 'results.json'}", flush=True)
    return results


EXPERIMENTS = ("synthetic", "synthetic-yolo")


def main(args: argparse.Namespace) -> int:
    """``megavod reproduce synthetic|synthetic-yolo [--out DIR]``. Optional settings, as flags where the CLI
    has them (``args.<name>``) or as ``MEGAVOD_REPRODUCE_<NAME>`` environment variables: ``videos`` (100),
    ``frames`` (90), ``size`` (192), ``seed`` (0), ``threads`` (torch's default); for ``synthetic``:
    ``iterations`` (each method's budget, default the presets'), ``pretrain_iterations`` (12000), ``jobs``
    (methods trained at once, default 1); for ``synthetic-yolo``: ``yolox_iterations``,
    ``yolov_iterations`` (default the presets')."""
    if args.experiment not in EXPERIMENTS:
        raise MegavodError(f"reproduce: unknown experiment {args.experiment!r} (available: {', '.join(EXPERIMENTS)})")

    def option(name: str, default):
        value = getattr(args, name, None)
        if value is None:
            value = os.environ.get(f"MEGAVOD_REPRODUCE_{name.upper()}")
        if value is None:
            return default
        try:
            return int(value)
        except ValueError:
            raise MegavodError(f"reproduce: {name} must be an integer, got {value!r}") from None

    threads = option("threads", None)
    if threads is not None:
        if threads < 1:
            raise MegavodError(f"reproduce: threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    defaults = BenchmarkSettings()
    benchmark = dict(videos=option("videos", defaults.videos), frames=option("frames", defaults.frames),
                     size=option("size", defaults.size), seed=option("seed", defaults.seed))
    if args.experiment == "synthetic-yolo":
        if option("jobs", 1) != 1:
            raise MegavodError("reproduce synthetic-yolo: --jobs does not apply (YOLOV trains from the trained YOLOX)")
        settings = YoloReproduceSettings(**benchmark, yolox_iterations=option("yolox_iterations", None),
                                         yolov_iterations=option("yolov_iterations", None))
        reproduce_synthetic_yolo(args.out, settings)
        return 0
    settings = ReproduceSettings(
        **benchmark,
        iterations=option("iterations", None),
        pretrain_iterations=option("pretrain_iterations", PRETRAIN_ITERATIONS),
    )
    jobs = option("jobs", 1)
    if jobs < 1:
        raise MegavodError(f"reproduce: jobs must be >= 1, got {jobs}")
    reproduce_synthetic(args.out, settings, jobs=min(jobs, len(METHODS)))
    return 0
