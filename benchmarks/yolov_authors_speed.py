"""YOLOX-S and YOLOV-S: megavod against the authors' own code, same frames, same weights, one thread.

    OMP_NUM_THREADS=1 PYTHONPATH=<pkgs>:<checkout> python benchmarks/yolov_authors_speed.py <checkout>

``<checkout>`` is a checkout of the authors' repository (YuHengsss/YOLOV: commit 28ff8b0, the code the
released YOLOV weights were trained with, or the current fe777cb); their imports need ``loguru``,
``scipy``, ``thop``, ``pycocotools`` (and ``timm`` for fe777cb) on ``PYTHONPATH`` (``pip install
--target <pkgs> ...``). Without a checkout the script says so in one line and exits 2.

For each model (``--models``: yolox, yolov):

* **theirs**: their exp's ``get_model()`` (``exps/yolov/yoloxs_vid.py``, ``exps/yolov/yolov_s.py``), in
  float32 on the CPU: the ``.to('cuda')`` calls in their attention (``yolox/models/post_trans.py``) are
  redirected to the CPU while their code runs (:func:`cuda_on_cpu`; their files are not edited). Their
  protocol, ``tools/vid_demo.py::imageflow_demo``: every frame through ``ValTransform`` (their
  ``preproc``), the frames shuffled by ``random.seed(41)``, chunks of ``gframe`` = 32 and the rest, one
  ``model(batch of a chunk)`` call per chunk, the results put back in frame order. YOLOV's call returns
  the refined and the base output; a chunk of at most 4 frames takes the base one (``val_to_imdb.py::
  Predictor.inference``). YOLOX's output goes through ``yolox/utils/boxes.py::postprocess`` (the exp's
  ``test_conf``, ``nmsthre``), chunk by chunk as their evaluator batches it.
* **megavod**: ``build_detector(load_config(preset))`` with their model's ``state_dict`` loaded strictly
  (the names are theirs), run as ``megavod.Detector(...).stream(frames, "offline")``: frame
  preprocessing, the per-frame passes one frame at a time, the key steps (YOLOV: the chunk's aggregation,
  cached for the chunk's other frames).

Weights are random (``torch.manual_seed(--seed)`` before their ``get_model``), with the objectness
biases raised from their prior (log(0.01/0.99) = -4.6) to ``--objectness-bias`` (0: objectness about
0.5) so that scores straddle the 0.001 threshold and the selection is not degenerate, as
``tests/test_yolov_detector.py::small_yolov`` does. Both sides get the same frames
(``megavod.apps.bench_frames.synthetic_frames``: moving objects, S x round(5S/3) pixels), each in its
own format (theirs BGR as ``cv2`` reads a video, megavod's RGB).

First megavod runs once (the warm-up) and its detections are compared frame by frame with theirs, in the
letterboxed input's pixels (megavod's boxes times the letterbox ratio r), paired by class and box: (1)
with their chunk's convolutions run one image at a time (:func:`per_image_convolutions`, so that they
round as megavod's one-frame passes do): every detection must pair within ``--box-tol`` px + 1e-6 |x|
and ``--score-tol`` (exit status 1 otherwise); (2) their code as it runs, batched: reported, within
``--loose-box-tol`` / ``--loose-score-tol``. Then ``--rounds`` timed rounds, the sides taking turns (a
different one first each round), each a whole run over the frames, preprocessing included; the figures
are medians of ms per frame; then YOLOX frame by frame (their one-frame call and megavod's next frame
alternating), and megavod's time by step (per-frame passes, key steps, YOLOV's chunk aggregation).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import megavod  # noqa: E402
from megavod.apps.bench_frames import synthetic_frames  # noqa: E402
from megavod.config import load_config  # noqa: E402
from megavod.data.transforms import letterbox_ratio  # noqa: E402
from megavod.methods import build_detector  # noqa: E402

# (megavod preset, their exp file, whether it is YOLOV) per model name
MODELS = {
    "yolox": ("yolox_s_vid", "exps/yolov/yoloxs_vid.py", False),
    "yolov": ("yolov_s", "exps/yolov/yolov_s.py", True),
}
GFRAME, SHUFFLE_SEED, BASE_BELOW = 32, 41, 4  # vid_demo.py: --gframe 32, random.seed(41); val_to_imdb.py: <= 4
# YOLOV's final NMS: vid_demo.py's --nms default, passed as model(batch, nms_thresh=...) (myolox.YOLOX.forward's
# default too); exps/yolov/yolov_s.py keeps yolox_base's nmsthre = 0.65, which their YOLOV path never reads
YOLOV_NMS = 0.5
# megavod's boxes are the input's divided by r in float32 (x float32(1 / r)) and multiplied back by r here:
# three float32 roundings of at most half an ulp each (relative 6e-8), so 1e-6 |x| bounds them with room;
# random weights make boxes of thousands of pixels (their exp(w) decode), where that is above 1e-3 px.
BOX_REL = 1e-6
# their batched convolutions against megavod's one-frame ones: the decode's exp(w) turns an absolute error
# of the regression logit into a relative one of the box (1e-5 seen on boxes of 30,000 px)
LOOSE_BOX_REL = 1e-4


class NeedsAuthorsCode(Exception):
    """The authors' checkout is missing or cannot be imported (one line for the user)."""


def _is_cuda(device: object) -> bool:
    return (isinstance(device, str) and device.startswith("cuda")) or (
        isinstance(device, torch.device) and device.type == "cuda")


@contextlib.contextmanager
def cuda_on_cpu() -> Iterator[None]:
    """While their code runs, ``tensor.to('cuda')`` (``post_trans.py::Attention_msa.forward``: the 0/1
    matrices of the 0.75 mask) returns the tensor on the CPU; restored on exit, so megavod never sees it."""
    original, own = torch.Tensor.to, "to" in vars(torch.Tensor)  # inherited from torch._C.TensorBase

    def to(self, *args, **kwargs):
        args = tuple("cpu" if _is_cuda(a) else a for a in args)
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return original(self, *args, **kwargs)

    torch.Tensor.to = to
    try:
        yield
    finally:
        if own:
            torch.Tensor.to = original
        else:
            del torch.Tensor.to


def import_authors(checkout: Path) -> None:
    """Put their checkout on ``sys.path`` and import their package, or raise :class:`NeedsAuthorsCode`."""
    if not (checkout / "yolox" / "models" / "yolovp_msa.py").is_file():
        raise NeedsAuthorsCode(f"the authors' YOLOV code is needed: {checkout} is not a checkout of YuHengsss/YOLOV "
                               "(no yolox/models/yolovp_msa.py); pass the path of one, e.g. commit 28ff8b0")
    sys.path.insert(0, str(checkout))
    try:
        importlib.import_module("yolox.exp")
        importlib.import_module("yolox.data.data_augment")
    except ImportError as error:
        raise NeedsAuthorsCode(f"the authors' code at {checkout} does not import ({error}): install what it needs "
                               "with `pip install --target DIR loguru scipy tabulate thop pycocotools timm` and run with "
                               f"PYTHONPATH=DIR:{checkout}") from None


def their_exp(checkout: Path, exp_file: str):
    from yolox.exp import get_exp  # their package (import_authors)

    return get_exp(str(checkout / exp_file), None)


def authors_affinity() -> str:
    """Their affinity, read from their ``post_trans.py::Attention_msa.forward``: "2022" where the regression
    branch's logits are multiplied by the references' objectness (28ff8b0: ``* self.scale * fg_score``),
    "2023" where that product is commented out (fe777cb)."""
    import inspect

    from yolox.models.post_trans import Attention_msa

    code = [line.split("#")[0] for line in inspect.getsource(Attention_msa.forward).splitlines()]
    weighted = any("attn_reg" in line and "fg_score" in line and "@" in line for line in code)
    return "2022" if weighted else "2023"


class StepTimes:
    """Seconds spent in some of megavod's detector methods during a run (:meth:`wrap`), per run."""

    STEPS = ("frame_features", "detect_key", "chunk_logits")

    def __init__(self) -> None:
        self.current: dict[str, float] = {}
        self.runs: list[dict[str, float]] = []

    def wrap(self, model: torch.nn.Module) -> None:
        for name in self.STEPS:
            if hasattr(model, name):
                setattr(model, name, self._timed(name, getattr(model, name)))

    def _timed(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.current[name] = self.current.get(name, 0.0) + time.perf_counter() - start
            return out

        return timed

    def start(self) -> None:
        self.current = {}

    def finish(self) -> None:
        self.runs.append(self.current)


# -- the two sides ---------------------------------------------------------------------------------------

@dataclass
class Pair:
    """One model on both sides: their network and megavod's detector with the same weights."""

    name: str
    preset: str
    yolov: bool
    side: int  # letterbox side
    theirs: torch.nn.Module
    test_conf: float
    nms_thresh: float
    ours: megavod.Detector
    times: dict[str, list[float]] = field(default_factory=dict)  # seconds of each timed run, by side
    steps: StepTimes = field(default_factory=lambda: StepTimes())


def their_inputs(frames_bgr: Sequence[np.ndarray], side: int) -> list[torch.Tensor]:
    """Their ``ValTransform`` (``preproc``: letterbox, pad 114, BGR 0-255, CHW float32) of every frame."""
    from yolox.data.data_augment import ValTransform

    preproc = ValTransform(legacy=False)
    return [torch.tensor(preproc(f, None, (side, side))[0]) for f in frames_bgr]


@torch.no_grad()
def calibrate_batch_norm(model: torch.nn.Module, batch: torch.Tensor) -> None:
    """Set every BatchNorm's statistics to those of ``batch`` (a random network's are mean 0, variance 1:
    its activations shrink through the layers until every anchor's class scores agree to 1e-6, and the
    top class is decided by rounding)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: exactly this batch's statistics
        m.train()
    with cuda_on_cpu():
        model(batch)  # the model itself stays in eval mode: its test-time path
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
        m.eval()


def build_pair(name: str, checkout: Path, seed: int, objectness_bias: float, side: int | None,
               calibration: Sequence[np.ndarray]) -> Pair:
    preset, exp_file, yolov = MODELS[name]
    exp = their_exp(checkout, exp_file)
    torch.manual_seed(seed)
    theirs = exp.get_model().eval()  # yolox_base.get_model ends with model.train()
    side = side or int(exp.test_size[0])
    calibrate_batch_norm(theirs, torch.stack(their_inputs(calibration, side)))
    with torch.no_grad():
        for conv in theirs.head.obj_preds:
            conv.bias.fill_(objectness_bias)
    cfg = load_config(preset, [f"input.letterbox={side}"])
    if yolov:
        # Set on the loaded section: a command-line override yolov.affinity=2023 is parsed as a number
        cfg.section.affinity = authors_affinity()
    model = build_detector(cfg)
    model.load_state_dict(theirs.state_dict())  # strict: the names are theirs
    ours = megavod.Detector(model, cfg, device="cpu")
    steps = StepTimes()
    steps.wrap(ours.model)  # megavod's per-frame passes, key steps and (YOLOV) chunk aggregations, timed
    nms_thresh = YOLOV_NMS if yolov else float(exp.nmsthre)  # yoloxs_vid.py: nmsthre 0.5, test_conf 0.001
    return Pair(name, preset, yolov, side, theirs, float(exp.test_conf), nms_thresh, ours, steps=steps)


@torch.no_grad()
def run_theirs(pair: Pair, frames_bgr: Sequence[np.ndarray]) -> list[torch.Tensor | None]:
    """``vid_demo.py::imageflow_demo``: preprocess, seeded shuffle, chunks of 32 (+ the rest), one call per
    chunk, back in frame order. Per frame [n, 7]: x1 y1 x2 y2 (input pixels), objectness, class score,
    class index; None where nothing passed."""
    from yolox.utils import postprocess

    frames = their_inputs(frames_bgr, pair.side)
    index_list = list(range(len(frames)))
    random.seed(SHUFFLE_SEED)
    random.shuffle(index_list)
    random.seed(SHUFFLE_SEED)
    random.shuffle(frames)
    split = len(frames) // GFRAME
    chunks = [frames[i * GFRAME:(i + 1) * GFRAME] for i in range(split)] + [frames[split * GFRAME:]]
    outputs: list[torch.Tensor | None] = []
    with cuda_on_cpu():
        for chunk in chunks:
            if not chunk:
                continue
            batch = torch.stack(chunk)
            if pair.yolov:
                refined, base = pair.theirs(batch, nms_thresh=pair.nms_thresh)
                outputs.extend(base if len(refined) <= BASE_BELOW else refined)
            else:
                outputs.extend(postprocess(pair.theirs(batch), pair.theirs.head.num_classes, pair.test_conf,
                                           pair.nms_thresh))
    return [out for _, out in sorted(zip(index_list, outputs), key=lambda item: item[0])]


@torch.no_grad()
def run_theirs_per_frame(pair: Pair, frames_bgr: Sequence[np.ndarray]) -> list[torch.Tensor | None]:
    """YOLOX one frame per call, as ``tools/demo.py::Predictor.inference`` runs it: ``preproc``, the model on
    a batch of one, ``postprocess``."""
    from yolox.utils import postprocess

    outputs: list[torch.Tensor | None] = []
    for image in their_inputs(frames_bgr, pair.side):
        outputs.extend(postprocess(pair.theirs(image[None]), pair.theirs.head.num_classes, pair.test_conf,
                                   pair.nms_thresh))
    return outputs


def frame_by_frame(pair: Pair, frames_bgr: Sequence[np.ndarray], frames_rgb: Sequence[np.ndarray]) -> tuple[float, float]:
    """YOLOX: their one-frame call (:func:`run_theirs_per_frame` on one frame) and megavod's next frame of its
    stream, alternating frame by frame; the medians of the per-frame seconds (a change in the machine's load
    lands on both within a second)."""
    from yolox.utils import postprocess

    theirs, ours = [], []
    pair.steps.start()  # not recorded: the step figures are those of the whole runs
    stream = iter(pair.ours.stream(frames_rgb, "offline"))
    for frame in frames_bgr:
        start = time.perf_counter()
        postprocess(pair.theirs(their_inputs([frame], pair.side)[0][None]), pair.theirs.head.num_classes,
                    pair.test_conf, pair.nms_thresh)
        middle = time.perf_counter()
        next(stream)
        ours.append(time.perf_counter() - middle)
        theirs.append(middle - start)
    return statistics.median(theirs), statistics.median(ours)


def sides(pair: Pair, frames_bgr: Sequence[np.ndarray], frames_rgb: Sequence[np.ndarray]) -> list[tuple[str, Callable]]:
    """The timed runs of a model: their protocol (chunks of 32 in one call each), for YOLOX also one frame
    per call (their YOLOV head aggregates over its batch: it has no one-frame path), and megavod."""
    runs = [(f"theirs, chunks of {GFRAME}", lambda: run_theirs(pair, frames_bgr))]
    if not pair.yolov:
        runs.append(("theirs, one frame per call", lambda: run_theirs_per_frame(pair, frames_bgr)))
    return runs + [("megavod", lambda: run_megavod(pair, frames_rgb, record=True))]


def run_megavod(pair: Pair, frames_rgb: Sequence[np.ndarray], record: bool = False) -> list[megavod.FrameResult]:
    pair.steps.start()
    results = list(pair.ours.stream(frames_rgb, "offline"))
    if record:
        pair.steps.finish()
    return results


# -- agreement ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def per_image_convolutions() -> Iterator[None]:
    """While active, every ``nn.Conv2d`` convolves a batch one image at a time: their chunk's convolutions
    then round as megavod's one-frame per-frame passes do (a batched convolution's kernel may sum in
    another order), so the comparison can be exact. Only for the check: their timed runs are unchanged."""
    original = torch.nn.Conv2d.forward

    def forward(self, x):
        return torch.cat([original(self, x[i:i + 1]) for i in range(x.shape[0])])

    torch.nn.Conv2d.forward = forward
    try:
        yield
    finally:
        torch.nn.Conv2d.forward = original


@dataclass
class Agreement:
    """Their detections against megavod's, frame by frame: pairs matched by class and box."""

    frames: int = 0
    theirs: int = 0  # their detections
    ours: int = 0
    matched: int = 0  # pairs within the tolerances
    max_box: float = 0.0  # over matched pairs, pixels of the letterboxed input
    max_score: float = 0.0
    frames_differing: list[int] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return self.matched == self.theirs == self.ours


def match_detections(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...], box_tol: float,
                     score_tol: float, box_rel: float = 0.0) -> tuple[int, float, float]:
    """Pairs of (boxes [N,4], scores [N], labels [N]) rows of ``a`` and ``b`` with the same label, matched
    greedily, nearest first; a pair counts when every coordinate is within ``box_tol + box_rel * |x|``
    and the scores within ``score_tol``. Returns (pairs, largest box and score difference of the pairs)."""
    pairs, max_box, max_score = 0, 0.0, 0.0
    for label in torch.unique(torch.cat([a[2], b[2]])):
        ia, ib = torch.nonzero(a[2] == label).flatten(), torch.nonzero(b[2] == label).flatten()
        if not len(ia) or not len(ib):
            continue
        boxes_a, boxes_b = a[0][ia, None, :], b[0][None, ib, :]
        difference = (boxes_a - boxes_b).abs()
        distance = (difference / (box_tol + box_rel * torch.maximum(boxes_a.abs(), boxes_b.abs()))).amax(-1)
        for _ in range(min(len(ia), len(ib))):
            i, j = divmod(int(torch.argmin(distance)), len(ib))
            if float(distance[i, j]) > 1.0:
                break
            score = float((a[1][ia[i]] - b[1][ib[j]]).abs())
            if score <= score_tol:
                pairs += 1
                max_box, max_score = max(max_box, float(difference[i, j].max())), max(max_score, score)
            distance[i, :] = float("inf")
            distance[:, j] = float("inf")
    return pairs, max_box, max_score


def compare(pair: Pair, theirs: Sequence[torch.Tensor | None], ours: Sequence[megavod.FrameResult],
            frame_size: tuple[int, int], box_tol: float, score_tol: float, box_rel: float = 0.0) -> Agreement:
    """Their per-frame outputs ([n, 7]: box, objectness, class score, class index) against megavod's
    (frame pixels x r = the letterboxed input's pixels; labels = class index + 1; score = obj x class)."""
    r = letterbox_ratio(frame_size[0], frame_size[1], pair.side)
    agreement = Agreement(frames=len(ours))
    for t, (out, result) in enumerate(zip(theirs, ours)):
        out = torch.zeros(0, 7) if out is None else out.float()
        a = (out[:, :4], out[:, 4] * out[:, 5], out[:, 6].long() + 1)
        b = (result.boxes.float() * r, result.scores.float(), result.labels)
        pairs, box, score = match_detections(a, b, box_tol, score_tol, box_rel)
        agreement.theirs += len(a[0])
        agreement.ours += len(b[0])
        agreement.matched += pairs
        agreement.max_box, agreement.max_score = max(agreement.max_box, box), max(agreement.max_score, score)
        if not pairs == len(a[0]) == len(b[0]):
            agreement.frames_differing.append(t)
    return agreement


def describe(agreement: Agreement, box_tol: float, score_tol: float, verdict: bool = True,
             box_rel: float = 0.0) -> str:
    box_rel = f" + {box_rel:g} |x|" if box_rel else ""
    verdict = ("equal: " if agreement.equal else "DIFFERENT: ") if verdict else ""
    differing = (f"; frames with unmatched detections: {agreement.frames_differing[:12]}"
                 f"{' ...' if len(agreement.frames_differing) > 12 else ''}") if agreement.frames_differing else ""
    return (f"{verdict}{agreement.frames} frames, {agreement.theirs} detections (theirs), {agreement.ours} (megavod), "
            f"{agreement.matched} matched within {box_tol:g} px{box_rel} and {score_tol:g} in score, largest differences "
            f"{agreement.max_box:.1e} px and {agreement.max_score:.1e}{differing}")


# -- timing ------------------------------------------------------------------------------------------------

def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkout", nargs="?", type=Path, help="a checkout of the authors' YOLOV repository")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["yolox", "yolov"])
    parser.add_argument("--frames", type=int, default=64, help="frames of the video (default 64: two chunks)")
    parser.add_argument("--frame-size", type=int, default=576,
                        help="short side S of the synthetic frames, S x round(5S/3) (default 576: 576 x 960)")
    parser.add_argument("--size", type=int, default=None,
                        help="letterbox side for both sides (default: their exp's test_size)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per side (default 3)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--objectness-bias", type=float, default=-3.0,
                        help="the objectness convs' bias (their prior: -4.6; default -3: about 9%% of YOLOX-S's anchors pass 0.001)")
    parser.add_argument("--box-tol", type=float, default=1e-3,
                        help="pixels of the letterboxed input, same rounding (default 1e-3)")
    parser.add_argument("--score-tol", type=float, default=1e-6, help="same rounding (default 1e-6)")
    parser.add_argument("--loose-box-tol", type=float, default=0.5,
                        help="pixels, their batched convolutions against megavod's one-frame ones (default 0.5)")
    parser.add_argument("--loose-score-tol", type=float, default=1e-4, help="likewise (default 1e-4)")
    args = parser.parse_args(argv)

    try:
        if args.checkout is None:
            raise NeedsAuthorsCode("the authors' YOLOV code is needed: pass the path of a checkout of "
                                   "YuHengsss/YOLOV (e.g. commit 28ff8b0) as the first argument")
        checkout = args.checkout.resolve()
        import_authors(checkout)
    except NeedsAuthorsCode as error:
        print(f"yolov_authors_speed: {error}", file=sys.stderr)
        return 2

    torch.set_num_threads(args.threads)
    frames_rgb = synthetic_frames(args.frames, args.frame_size, seed=args.seed)
    frames_bgr = [np.ascontiguousarray(f[:, :, ::-1]) for f in frames_rgb]  # as cv2 reads a video
    frame_size = frames_rgb[0].shape[:2]
    pairs = [build_pair(name, checkout, args.seed, args.objectness_bias, args.size, frames_bgr[:8])
             for name in args.models]
    print(f"authors' code: {checkout} (YOLOV affinity {authors_affinity()}); {args.frames} synthetic frames "
          f"of {frame_size[0]}x{frame_size[1]}; torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}; float32, CPU", flush=True)

    failed = False
    with torch.inference_mode():
        for pair in pairs:
            ours = run_megavod(pair, frames_rgb)  # also the warm-up
            with per_image_convolutions():
                same_rounding = compare(pair, run_theirs(pair, frames_bgr), ours, frame_size, args.box_tol,
                                        args.score_tol, BOX_REL)
            as_is = compare(pair, run_theirs(pair, frames_bgr), ours, frame_size, args.loose_box_tol,
                            args.loose_score_tol, LOOSE_BOX_REL)
            print(f"{pair.name} ({pair.preset}, letterbox {pair.side}):\n"
                  f"  their code, convolutions one image at a time, vs megavod: "
                  f"{describe(same_rounding, args.box_tol, args.score_tol, box_rel=BOX_REL)}\n"
                  f"  their code as it runs (chunks of {GFRAME} batched; a batched convolution rounds otherwise, which "
                  f"can flip a near-tie in the selection) vs megavod: "
                  f"{describe(as_is, args.loose_box_tol, args.loose_score_tol, False, LOOSE_BOX_REL)}", flush=True)
            failed |= not same_rounding.equal

        for r in range(args.rounds):
            for pair in pairs:
                runs = sides(pair, frames_bgr, frames_rgb)
                for side, run in runs[r % len(runs):] + runs[:r % len(runs)]:  # a different side first each round
                    seconds = timed(run)
                    pair.times.setdefault(side, []).append(seconds)
                    print(f"round {r + 1}/{args.rounds} {pair.name} {side}: {1000 * seconds / args.frames:.1f} "
                          "ms/frame", flush=True)

        by_frame = [(pair, *frame_by_frame(pair, frames_bgr, frames_rgb)) for pair in pairs if not pair.yolov]

    if args.rounds < 1:
        return 1 if failed else 0

    def ms(pair: Pair, side: str) -> float:
        return 1000 * statistics.median(pair.times[side]) / args.frames

    print(f"\nms per frame, median of {args.rounds} round(s), the sides taking turns:")
    for pair in pairs:
        ours = ms(pair, "megavod")
        theirs = "; ".join(f"{side} {ms(pair, side):.1f} (megavod/theirs {ours / ms(pair, side):.3f})"
                           for side in pair.times if side != "megavod")
        print(f"{pair.name} (letterbox {pair.side}): megavod {ours:.1f}; {theirs}")
    for pair, theirs_s, ours_s in by_frame:
        print(f"{pair.name}, frame by frame (their one-frame call and megavod's next frame alternating, median of "
              f"{args.frames} frames): theirs {1000 * theirs_s:.1f}, megavod {1000 * ours_s:.1f} "
              f"(megavod/theirs {ours_s / theirs_s:.3f})")
    print("\nmegavod's run by step, ms per frame (median over the rounds): per-frame passes (network, decode, "
          "YOLOV's selection), key steps (post-processing; YOLOV: with the chunk aggregation, of which "
          "chunk_logits is the attention and linear_pred), the rest (reading, letterbox, engine)")
    for pair in pairs:
        def per_frame(step: str) -> float:
            return 1000 * statistics.median(run.get(step, 0.0) for run in pair.steps.runs) / args.frames

        total = ms(pair, "megavod")
        passes, keys, aggregation = per_frame("frame_features"), per_frame("detect_key"), per_frame("chunk_logits")
        aggregated = f", chunk_logits {aggregation:.2f} ({100 * aggregation / total:.2f}%)" if pair.yolov else ""
        print(f"{pair.name}: per-frame passes {passes:.1f}, key steps {keys:.2f} ({100 * keys / total:.2f}%)"
              f"{aggregated}, rest {total - passes - keys:.1f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
