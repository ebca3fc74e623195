"""YOLOV's schedule (the authors' test protocol: chunks of a seeded permutation) and YOLOX's letterbox input."""

from __future__ import annotations

import random

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from megavod.config import load_config
from megavod.data.transforms import LetterboxTransform, TransformDraw, build_transform, letterbox_array
from megavod.errors import ConfigError
from megavod.inference.schedules import ChunkSchedule, last_use, permutation_chunks


def authors_chunks(frame_len: int, gframe: int, seed: int) -> list[list[int]]:
    """tools/vid_demo.py::imageflow_demo's split, written as their loop is (index list instead of frames)."""
    index_list = list(range(frame_len))
    random.seed(seed)
    random.shuffle(index_list)
    res = []
    split_num = int(frame_len / gframe)
    for i in range(split_num):
        res.append(index_list[i * gframe:(i + 1) * gframe])
    res.append(index_list[(i + 1) * gframe:])  # noqa: F821 - fails for frame_len < gframe, as theirs does
    return [chunk for chunk in res if chunk != []]  # their inference loop skips the empty tail


@pytest.mark.parametrize("frames", [32, 33, 64, 70, 95, 300])
def test_chunks_are_the_authors_split(frames):
    assert permutation_chunks(frames, 32, 41) == authors_chunks(frames, 32, 41)


def test_chunk_composition_and_tail():
    chunks = permutation_chunks(70, 32, 41)
    assert [len(c) for c in chunks] == [32, 32, 6]
    assert sorted(t for c in chunks for t in c) == list(range(70))
    assert permutation_chunks(64, 32, 41) == permutation_chunks(64, 32, 41)  # seeded
    assert permutation_chunks(64, 32, 41) != permutation_chunks(64, 32, 42)
    # a video shorter than a chunk is one chunk (the authors' loop fails there)
    (only,) = permutation_chunks(5, 32, 41)
    assert sorted(only) == list(range(5))


def test_offline_plans_give_each_frame_its_chunk():
    schedule = ChunkSchedule(gframe=8, seed=3)
    plans = schedule.plan_offline(20)
    chunks = permutation_chunks(20, 8, 3)
    for k, plan in enumerate(plans):
        assert plan.key == k and plan.global_pool == ()
        assert plan.local[plan.key_index] == k
        assert list(plan.local) in chunks
    # a frame is released after the last key frame of its chunk (every frame of the chunk needs it)
    last = last_use(plans)
    for chunk in chunks:
        assert all(last[t] == max(chunk) for t in chunk)


def test_online_window_is_causal_and_bounded():
    planner = ChunkSchedule(gframe=4).online_planner()
    plans = [planner.plan(k) for k in range(7)]
    assert [p.local for p in plans] == [(0,), (0, 1), (0, 1, 2), (0, 1, 2, 3), (1, 2, 3, 4), (2, 3, 4, 5), (3, 4, 5, 6)]
    assert all(p.local[p.key_index] == p.key and max(p.local) == p.key for p in plans)
    assert planner.keep_after(6) == {4, 5, 6}  # frame 7's window without frame 7 itself
    with pytest.raises(ValueError):
        ChunkSchedule(gframe=0)


# -- the letterbox ---------------------------------------------------------------------------------------


def test_letterbox_is_the_authors_preproc():
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (90, 160, 3), dtype=np.uint8)
    tensor, r = letterbox_array(bgr, 64)
    assert r == pytest.approx(min(64 / 90, 64 / 160)) and tensor.shape == (3, 64, 64) and tensor.dtype == torch.float32
    # yolox/data/data_augment.py::preproc, spelled out
    expected = np.full((64, 64, 3), 114, dtype=np.uint8)
    expected[:int(90 * r), :int(160 * r)] = cv2.resize(bgr, (int(160 * r), int(90 * r)), interpolation=cv2.INTER_LINEAR)
    assert torch.equal(tensor, torch.from_numpy(expected.transpose(2, 0, 1).astype(np.float32)))
    assert int(90 * r) == 36 and bool((tensor[:, 36:, :] == 114).all())  # padding at the bottom only


def test_letterbox_transform_boxes_and_flip():
    rgb = np.zeros((100, 200, 3), dtype=np.uint8)
    rgb[:, :, 0] = 255  # red in RGB: channel 2 in BGR
    transform = LetterboxTransform(64, flip_prob=0.5)
    image, boxes = transform(Image.fromarray(rgb), torch.tensor([[10.0, 20.0, 50.0, 60.0]]))
    assert image[2, 0, 0] == 255 and image[0, 0, 0] == 0  # BGR 0-255
    assert torch.allclose(boxes, torch.tensor([[3.2, 6.4, 16.0, 19.2]]))
    _, flipped = transform(Image.fromarray(rgb), torch.tensor([[10.0, 20.0, 50.0, 60.0]]), TransformDraw(64, True))
    assert torch.allclose(flipped, torch.tensor([[150.0, 20.0, 190.0, 60.0]]) * 0.32)  # x1' = W - x2, no +1
    noise = np.random.default_rng(1).integers(0, 256, (100, 200, 3), dtype=np.uint8)
    mirrored, _ = transform(Image.fromarray(noise), None, TransformDraw(64, True))
    assert torch.equal(mirrored, letterbox_array(np.ascontiguousarray(noise[:, ::-1, ::-1]), 64)[0])


def test_letterbox_config():
    cfg = load_config("yolox_s_vid", ["input.letterbox=64", "input.letterbox_train=[32,64]"])
    assert isinstance(build_transform(cfg.input, train=False), LetterboxTransform)
    assert build_transform(cfg.input, train=True).sides == (32, 64)
    with pytest.raises(ConfigError, match="input.letterbox"):
        load_config("yolox_s_vid", ["input.letterbox=100"])
    with pytest.raises(ConfigError, match="input.letterbox_train"):
        load_config("single_R_101", ["input.letterbox_train=[64]"])
    # a Faster R-CNN method maps boxes back as a plain resize: letterboxed frames would come out wrong
    with pytest.raises(ConfigError, match="input.letterbox.*only the YOLOX family"):
        load_config("single_R_101", ["input.letterbox=64"])
    with pytest.raises(ConfigError, match="input.letterbox"):
        load_config("yolov_s", ["input.letterbox=0"])


def test_a_choice_spelt_in_digits_overrides():
    """`yolov.affinity=2023` on the command line: YAML reads 2023 as a number, the choice is the string."""
    assert load_config("yolov_s", ["yolov.affinity=2023"]).yolov.affinity == "2023"
    with pytest.raises(ConfigError, match="yolov.affinity"):
        load_config("yolov_s", ["yolov.affinity=2024"])
