"""Build ``yolov_online.npz``: the online YOLOV's numbers from the authors' own code (YuHengsss/YOLOV).

    pip install --target PKGS loguru   # fe777cb's imports also need tabulate and pycocotools
    PYTHONPATH=PKGS:CHECKOUT python tests/data/reference/make_yolov_online_vectors.py CHECKOUT

CHECKOUT is an extracted copy of their repository (28ff8b0 or fe777cb: the online files are the same
in both, and so is the file written). Their files are not changed: this script redirects their
``.to('cuda')`` to the CPU by patching ``torch.Tensor.to`` in this process, stands in for ``thop``,
``scipy.optimize`` and ``timm`` (imported at module level by modules the online head imports, used only
for profiling, training and the Swin backbone) when they are not installed,
and replaces two methods of one head *instance* (the proposal selection and feature lookup, which need
a CNN) so that structured proposal rows enter their forward exactly where ``find_feature_score`` hands
them over. Everything after that is theirs: ``post_process.py::online_previous_selection``,
``yolov_msa_online.py::YOLOXHead.forward`` (concatenation with the bank, ``MSA_yolov_online`` with
``local_agg``, ``linear_pred``, ``postprocess_pure`` / ``postprocess_single_img``), driven by the loop
of ``tools/val_to_imdb_online.py::imageflow_demo`` (lines 224-250 at 28ff8b0), reproduced below.

Two cases (tests/data/reference/README.md#the-online-yolov-vectors):

* ``selection_*``: 650 frames through their bank with a frame-number list riding along (shuffled with
  the others: same seed, same length); which frames each step reads, and the local frames.
* ``stream_*``: 40 frames of 30 structured proposals (width 32: their head at ``width=0.125``) through
  their head: inputs, the weights, every step's refined logits (``linear_pred``'s output without the
  background logit, captured by a forward hook), the frames read, the detections.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import numpy as np
import torch

T_SELECTION = 650
T_STREAM = 40
ROWS = 30
WIDTH = 0.125  # C = int(256 * width) = 32
IMAGE = 256.0
CORNER = 224.0  # nothing enters [CORNER, IMAGE]^2 before NEW_CORNER_FRAME: a row there overlaps no local row
NEW_CORNER_FRAME = 36
OBJECTS = 4
#: Frames whose detections are stored: the base output (0, 1), a step without local rows (2), the first
#: blend (3, with NaN rows), a full local bank (22), the corner row (36), the last frame.
DETECTION_FRAMES = (0, 1, 2, 3, 22, 36, 39)
PER_OBJECT = 5


def import_authors(checkout: Path):
    sys.path.insert(0, str(checkout))
    # Imported at module level by modules the online head imports; used only for profiling, training and
    # the Swin backbone (timm, fe777cb).
    for name in ("thop", "scipy", "scipy.optimize", "timm", "timm.models", "timm.models.layers"):
        try:
            __import__(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)
    layers = sys.modules["timm.models.layers"]
    for attr in ("DropPath", "to_2tuple", "trunc_normal_"):
        if not hasattr(layers, attr):
            setattr(layers, attr, None)
    if not hasattr(sys.modules["thop"], "profile"):
        sys.modules["thop"].profile = None
    if not hasattr(sys.modules["scipy.optimize"], "linear_sum_assignment"):
        sys.modules["scipy.optimize"].linear_sum_assignment = None
        sys.modules["scipy"].optimize = sys.modules["scipy.optimize"]

    to = torch.Tensor.to

    def to_cpu(self, *args, **kwargs):  # their Attention_msa_online / local_agg: torch.ones(...).to('cuda')
        args = tuple("cpu" if a == "cuda" else a for a in args)
        if kwargs.get("device") == "cuda":
            kwargs["device"] = "cpu"
        return to(self, *args, **kwargs)

    torch.Tensor.to = to_cpu
    from yolox.models import yolov_msa_online
    from yolox.models.post_process import online_previous_selection
    return yolov_msa_online.YOLOXHead, online_previous_selection


def selection_case(online_previous_selection) -> dict[str, np.ndarray]:
    """Their bank over a long stream; rows are placeholders, list 4 carries the frame numbers."""
    tmp_bank = [[], [], [], [], []]
    local_bank = [[], [], [], []]
    local_frames: list[int] = []
    chosen = np.full((T_SELECTION, 31), -1, np.int16)
    local = np.full((T_SELECTION, 20), -1, np.int16)
    placeholder = torch.zeros(1, 1)
    for k in range(T_SELECTION):
        other = online_previous_selection(tmp_bank, local_bank=local_bank, local=True)
        stepped = other != []
        if stepped:
            picked = tmp_bank[4][:31]
            chosen[k, :len(picked)] = picked
            if other["local_results"] != []:
                last = local_frames[-20:]
                local[k, :len(last)] = last
        for i in range(4):
            tmp_bank[i].append(placeholder)
        tmp_bank[4].append(k)
        if stepped:  # their head sets res_dict['msa'] exactly when it aggregated
            for i in range(4):
                local_bank[i].append(placeholder)
            local_frames.append(k)
        for i in range(5):
            tmp_bank[i] = tmp_bank[i][-600:]
        for i in range(4):
            local_bank[i] = local_bank[i][-600:]
    return {"selection_chosen": chosen, "selection_local": local}


def half(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def structured_stream(rng: np.random.Generator, width: int) -> dict[str, np.ndarray]:
    """40 frames x 30 rows: 4 moving objects (one appearing at frame 12) with 5 proposals each, the rest
    background; features: a prototype per object plus noise, background random; scores high for
    objects, low for background; from NEW_CORNER_FRAME one background row in a corner nothing visited
    before (its blend weights are 0/0)."""
    protos_cls = rng.normal(size=(OBJECTS, width))
    protos_reg = rng.normal(size=(OBJECTS, width))
    start = rng.uniform(20, 120, size=(OBJECTS, 2))
    velocity = rng.uniform(-2.0, 2.0, size=(OBJECTS, 2))
    size = rng.uniform(30, 70, size=(OBJECTS, 2))
    classes = rng.choice(30, size=OBJECTS, replace=False)
    appear = [0, 0, 0, 12]
    boxes = np.zeros((T_STREAM, ROWS, 4))
    objectness = np.zeros((T_STREAM, ROWS))
    class_conf = np.zeros((T_STREAM, ROWS))
    class_pred = np.zeros((T_STREAM, ROWS), np.int64)
    cls_feat = np.zeros((T_STREAM, ROWS, width))
    reg_feat = np.zeros((T_STREAM, ROWS, width))
    for t in range(T_STREAM):
        r = 0
        for o in range(OBJECTS):
            if t < appear[o]:
                continue
            centre = np.clip(start[o] + velocity[o] * t, size[o] / 2, CORNER - 4 - size[o] / 2)
            for _ in range(PER_OBJECT):
                c = centre + rng.uniform(-4, 4, 2)
                s = size[o] * rng.uniform(0.85, 1.15, 2)
                boxes[t, r] = np.clip([c[0] - s[0] / 2, c[1] - s[1] / 2, c[0] + s[0] / 2, c[1] + s[1] / 2], 0, CORNER - 1)
                objectness[t, r] = rng.uniform(0.55, 0.95)
                class_conf[t, r] = rng.uniform(0.4, 0.9)
                class_pred[t, r] = classes[o]
                cls_feat[t, r] = protos_cls[o] + 0.25 * rng.normal(size=width)
                reg_feat[t, r] = protos_reg[o] + 0.25 * rng.normal(size=width)
                r += 1
        while r < ROWS:
            if t >= NEW_CORNER_FRAME and r == ROWS - 1:
                x1, y1 = rng.uniform(CORNER + 1, CORNER + 8, 2)
                w, h = rng.uniform(8, IMAGE - CORNER - 9, 2)
            else:
                w, h = rng.uniform(10, 60, 2)
                x1, y1 = rng.uniform(0, CORNER - 2 - w), rng.uniform(0, CORNER - 2 - h)
            boxes[t, r] = [x1, y1, x1 + w, y1 + h]
            objectness[t, r] = rng.uniform(0.001, 0.3)
            class_conf[t, r] = rng.uniform(0.01, 0.4)
            class_pred[t, r] = rng.integers(30)
            cls_feat[t, r] = rng.normal(size=width)
            reg_feat[t, r] = rng.normal(size=width)
            r += 1
    return {
        "stream_boxes": half(boxes), "stream_objectness": half(objectness),
        "stream_class_conf": half(class_conf), "stream_class_pred": class_pred.astype(np.int8),
        "stream_cls_features": half(cls_feat), "stream_reg_features": half(reg_feat),
    }


def prediction_rows(inputs: dict[str, np.ndarray], t: int) -> torch.Tensor:
    """Frame t as their ``postpro_woclass`` output rows: x1 y1 x2 y2, obj, class conf, class, 30 scores
    (the class's column holds the confidence; the scores do not reach the online outputs)."""
    conf = torch.from_numpy(inputs["stream_class_conf"][t].astype(np.float32))
    pred = torch.from_numpy(inputs["stream_class_pred"][t].astype(np.int64))
    scores = torch.zeros(ROWS, 30)
    scores[torch.arange(ROWS), pred] = conf
    return torch.cat([torch.from_numpy(inputs["stream_boxes"][t].astype(np.float32)),
                      torch.from_numpy(inputs["stream_objectness"][t].astype(np.float32))[:, None],
                      conf[:, None], pred.float()[:, None], scores], 1)


def stream_case(head_cls, online_previous_selection, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    head = head_cls(30, WIDTH, heads=4).eval()
    with torch.no_grad():
        # Calibrated so that the refined scores straddle postprocess_pure's 0.001 (random weights give
        # logits of +-0.4: every (row, class) would pass): linear_pred's weights x16, biases in [-9, -7].
        head.linear_pred.weight.mul_(16.0)
        head.linear_pred.bias.uniform_(-9.0, -7.0)
        for p in head.parameters():
            p.copy_(p.half().float())  # float16-exact weights, stored as float16
    width = head.width
    f32 = {k: torch.from_numpy(v.astype(np.float32)) for k, v in inputs.items() if k != "stream_class_pred"}
    frame = {"t": 0}

    def postpro_woclass(prediction, num_classes, nms_thre=0.75, topK=75, features=None):
        return [prediction_rows(inputs, frame["t"])], [torch.arange(ROWS)]

    def find_feature_score(features, idxs, reg_features, imgs=None, predictions=None, roi_features=None):
        t = frame["t"]
        return (f32["stream_cls_features"][t], f32["stream_reg_features"][t], f32["stream_class_conf"][t],
                f32["stream_objectness"][t], f32["stream_boxes"][t])

    head.postpro_woclass = postpro_woclass
    head.find_feature_score = find_feature_score
    captured = {}
    head.linear_pred.register_forward_hook(lambda m, i, o: captured.__setitem__("fc", o.detach().clone()))
    xin = [torch.zeros(1, int(c * WIDTH), 1, 1) for c in (256, 512, 1024)]

    logits = np.full((T_STREAM, ROWS, 30), np.nan, np.float32)
    stepped = np.zeros(T_STREAM, bool)
    chosen = np.full((T_STREAM, 31), -1, np.int16)
    local_count = np.zeros(T_STREAM, np.int16)
    dets, det_frame = [], []
    # tools/val_to_imdb_online.py::imageflow_demo, with a frame-number list (index 4) riding in tmp_bank.
    tmp_bank = [[], [], [], [], []]
    local_bank = [[], [], [], []]
    with torch.no_grad():
        for t in range(T_STREAM):
            frame["t"] = t
            captured.clear()
            other_result = online_previous_selection(tmp_bank, local_bank=local_bank, local=True)
            pred_result, res_dict = head(xin, other_result=other_result)  # YOLOX.forward: nms_thresh=0.5
            if other_result != []:
                stepped[t] = True
                chosen[t, :min(31, len(tmp_bank[4]))] = tmp_bank[4][:31]
                local_count[t] = 0 if other_result["local_results"] == [] else \
                    other_result["local_results"]["cls_scores"].shape[0] // ROWS
                logits[t] = captured["fc"][:, :-1].numpy()
            n = int(res_dict["cls_scores"].shape[0])
            tmp_bank[0].append(res_dict["cls_feature"][0, :n])
            tmp_bank[1].append(res_dict["reg_feature"][0, :n])
            tmp_bank[2].append(res_dict["cls_scores"][:n])
            tmp_bank[3].append(res_dict["reg_scores"][:n])
            tmp_bank[4].append(t)
            if res_dict["msa"] is not None:  # theirs: `!= None`, True for a tensor
                local_bank[0].append(res_dict["msa"][:n])
                local_bank[1].append(res_dict["boxes"][:n])
                local_bank[2].append(res_dict["cls_scores"][:n])
                local_bank[3].append(res_dict["reg_scores"][:n])
            for i in range(5):
                tmp_bank[i] = tmp_bank[i][-600:]
            for i in range(4):
                local_bank[i] = local_bank[i][-600:]
            if pred_result[0] is not None and t in DETECTION_FRAMES:
                dets.append(pred_result[0][:, :7].numpy().astype(np.float32))  # base rows carry the 30 scores too
                det_frame += [t] * len(pred_result[0])
    state = head.state_dict()
    names = ["trans.msa.qkv_cls.weight", "trans.msa.qkv_reg.weight", "trans.linear1.weight",
             "trans.linear1.bias", "trans.linear2.weight", "trans.linear2.bias", "linear_pred.weight",
             "linear_pred.bias"]
    out = {f"weight:{k}": state[k].numpy().astype(np.float16) for k in names}
    assert width == inputs["stream_cls_features"].shape[-1]
    out.update({
        "stream_logits": logits, "stream_stepped": stepped, "stream_chosen": chosen,
        "stream_local_frames": local_count,
        "stream_detections": np.concatenate(dets) if dets else np.zeros((0, 7), np.float32),
        "stream_detection_frame": np.asarray(det_frame, np.int16),
    })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="an extracted copy of YuHengsss/YOLOV")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "yolov_online.npz")
    args = parser.parse_args()
    head_cls, online_previous_selection = import_authors(args.checkout.resolve())
    arrays = selection_case(online_previous_selection)
    inputs = structured_stream(np.random.default_rng(23), int(256 * WIDTH))
    arrays.update(inputs)
    arrays.update(stream_case(head_cls, online_previous_selection, inputs))
    np.savez_compressed(args.out, **arrays)
    logits = arrays["stream_logits"]
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes): {arrays['stream_stepped'].sum()} steps, "
          f"{np.isnan(logits[arrays['stream_stepped']]).any(-1).sum()} NaN rows, "
          f"{len(arrays['stream_detections'])} detections")


if __name__ == "__main__":
    main()
