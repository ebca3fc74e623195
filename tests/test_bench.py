"""``megavod bench`` and the benchmark scripts: smoke runs on tiny configs, and the arithmetic of the
reported figures (no timing assertions)."""

from __future__ import annotations

import importlib.util
import mmap
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megavod.config import load_config
from megavod.apps import bench, bench_frames
from megavod.apps.bench import (
    BenchResult,
    VideoTiming,
    format_report,
    frame_shape,
    run_bench,
    synthetic_frames,
)
from megavod.apps.bench_scaling import PeakRSS, ScalingRow, format_scaling
from megavod.apps.cli import main as cli_main
from megavod.errors import MegavodError
from megavod.inference.schedules import RelationSchedule
from megavod.models.relation import RelationModule

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- frames --------------------------------------------------------------------------------------------


def test_frame_shape_is_5_by_3():
    assert frame_shape(600) == (600, 1000)
    assert frame_shape(300) == (300, 500)
    assert frame_shape(64) == (64, 107)


def test_synthetic_frames_span_scenes(monkeypatch):
    monkeypatch.setattr(bench_frames, "SCENE_FRAMES", 2)  # 5 frames = 3 scenes
    frames = synthetic_frames(5, 48)
    assert len(frames) == 5
    assert all(f.shape == (48, 80, 3) and f.dtype == np.uint8 for f in frames)
    assert not np.array_equal(frames[0], frames[1])  # objects move
    again = synthetic_frames(5, 48)
    assert all(np.array_equal(a, b) for a, b in zip(frames, again))  # seeded


# -- the reported figures, by hand ---------------------------------------------------------------------


MEGA = RelationSchedule(T_l=3, T_g=2, T_m=2, memory_levels=1)
BASE = RelationSchedule(T_l=3, T_g=2)


def test_steady_state_uses_keys_after_memory_is_full():
    # 4 frames, 1.0 s wall, key frames 0.1 0.1 0.2 0.2 s: memory is full from key frame T_m = 2, so
    # steady = (1.0 - 0.6) / 4 + mean(0.2, 0.2) = 0.3 s; video = 1.0 / 4.
    v = VideoTiming(4, 1.0, pass_s=[0.05] * 4, key_s=[0.1, 0.1, 0.2, 0.2])
    r = BenchResult("mega", "mega", MEGA, [v])
    assert r.video_ms == pytest.approx(250.0)
    assert r.steady_ms == pytest.approx(300.0)
    assert r.key_ms == pytest.approx(200.0)
    assert r.pass_ms == pytest.approx(50.0)
    assert r.ms == r.steady_ms


def test_base_model_is_steady_from_the_first_key_and_single_has_no_key():
    v = VideoTiming(4, 1.0, key_s=[0.1, 0.1, 0.2, 0.2])
    base = BenchResult("base", "mega", BASE, [v])
    assert base.steady_ms == pytest.approx(base.video_ms)  # no memory to fill
    single = BenchResult("single", "single", None, [VideoTiming(4, 0.4)])
    assert single.steady_ms == pytest.approx(100.0) and single.key_ms is None and single.pass_ms is None


def test_median_over_runs_and_no_steady_state_when_video_is_too_short():
    runs = [VideoTiming(2, w, key_s=[0.1, 0.1]) for w in (0.2, 0.4, 1.0)]
    r = BenchResult("mega", "mega", MEGA, runs)
    assert r.video_ms == pytest.approx(200.0)  # median of 100, 200, 500
    assert r.steady_ms is None and r.ms == r.video_ms  # 2 frames <= T_m = 2: memory never full


def test_report_ratios_and_notes():
    single = BenchResult("single_x", "single", None, [VideoTiming(4, 0.4)])
    mega = BenchResult("mega_x", "mega", MEGA, [VideoTiming(4, 1.0, key_s=[0.1, 0.1, 0.2, 0.2])])
    short = BenchResult("mega_short", "mega", MEGA, [VideoTiming(2, 0.4, key_s=[0.1, 0.1])])
    text = format_report([single, mega, short], 4, 300, "cpu", 1, 2)
    assert "300x500" in text
    assert "mega_x/single_x 3.00" in text  # 300 ms / 100 ms
    assert "mega_short/single_x 2.00" in text  # video ms/frame, no steady state
    assert "mega_short: no key frame at steady state" in text
    assert "shorter than" not in text  # 4 frames >= T_l = 3 and T_g = 2
    text = format_report([single, short], 2, 300, "cpu", 1, 2)
    assert "mega_short: the video is shorter than the local window (T_l = 3): frames repeat" in text


# -- smoke runs -------------------------------------------------------------------------------------------


def test_run_bench_single_and_mega_on_the_same_frames():
    results = run_bench(["synthetic_single", "synthetic_mega"], num_frames=3, size=48, warmup=1)
    single, mega = results
    assert single.method == "single" and single.settings is None
    assert len(single.videos) == 1 and single.videos[0].frames == 3 and single.videos[0].wall_s > 0
    v = mega.videos[0]
    # the engine runs each frame's pass exactly once, and one key pass per frame
    assert len(v.pass_s) == 3 and len(v.key_s) == 3
    assert sum(v.pass_s) + sum(v.key_s) <= v.wall_s
    # 3 frames: memory never full
    assert mega.settings.T_m == load_config("synthetic_mega").mega.T_m and mega.steady_ms is None


def test_cli_bench_prints_table(capsys):
    assert cli_main(["bench", "--config", "synthetic_single", "--frames", "2", "--size", "48"]) == 0
    out = capsys.readouterr().out
    assert "synthetic_single" in out and "48x80" in out


def test_cli_bench_rejects_bad_input(capsys):
    assert cli_main(["bench", "--config", "synthetic_single", "--frames", "0", "--size", "48"]) != 0
    assert "--frames" in capsys.readouterr().err
    assert cli_main(["bench", "--config", "no_such_preset", "--frames", "2", "--size", "48"]) != 0
    assert "no_such_preset" in capsys.readouterr().err
    with pytest.raises(MegavodError):
        run_bench(["synthetic_single"], num_frames=2, size=48, repeats=0)


# -- benchmarks/ scripts -----------------------------------------------------------------------------------


def test_flop_count_of_a_relation_module_matches_the_closed_form():
    flops = _script("flops")
    n, m, c, heads, embed = 5, 7, 32, 4, 16
    g = torch.Generator().manual_seed(0)
    boxes = lambda k: torch.cat([torch.rand(k, 2, generator=g) * 50, 60 + torch.rand(k, 2, generator=g) * 50], 1)
    for geometry in (False, True):
        module = RelationModule(c, heads, embed, location_based=geometry, content_bias=True).eval()
        with torch.no_grad(), flops.counter() as fc:
            module(torch.randn(n, c), torch.randn(m, c), boxes(n), boxes(m))
        expected = flops.relation_macs(n, m, c, heads, geometry=geometry, embed=embed)
        assert fc.get_total_flops() / 2 == expected


def test_flops_script_counts_single_and_mega():
    flops = _script("flops")
    single = flops.measure("synthetic_single", 48, authors=False)
    mega = flops.measure("synthetic_mega", 48, authors=True)
    # the CNN parts do not depend on the proposals, so MEGA's per-frame pass counts them as single frame
    for group in ("backbone (C4)", "RPN head", "res5 (full map)", "reduce conv"):
        assert mega["groups"][group] == pytest.approx(single["groups"][group], rel=1e-9)
    assert "fc7" in single["groups"] and "fc7" not in mega["groups"]
    assert mega["total"] > single["total"]
    counted = sum(v for k, v in mega["groups"].items() if k.startswith(("global stage", "local stage")))
    # the projections of the rows met for the first time, the geometry of the pairs met for the first time
    counted += mega["groups"][flops.NEW_ROWS] + mega["groups"][flops.NEW_GEOMETRY]
    assert counted == pytest.approx(mega["ours_relation_closed_form"], rel=1e-6)
    assert mega["authors_relation"] > mega["ours_relation_closed_form"]


def test_memory_script_reads_peak_rss_on_an_online_stream():
    memory = _script("bench_memory")
    rows = memory.run("synthetic_mega", 48, [2, 4], log=lambda s: None)
    assert [r["frames"] for r in rows] == [2, 4]
    assert rows[1]["VmHWM"] >= rows[0]["VmHWM"] > 0 and rows[1]["VmRSS"] > 0


def test_share_weights_gives_the_same_proposals():
    from megavod.config import load_config
    from megavod.methods import build_detector

    torch.manual_seed(0)
    single = build_detector(load_config("synthetic_single")).eval()
    torch.manual_seed(1)
    mega = build_detector(load_config("synthetic_mega")).eval()
    assert bench.share_weights(single, mega) > 0
    image = torch.randn(3, 64, 96) * 40
    with torch.no_grad():
        expected = single.rpn.proposals(single.backbone(image[None]), [(64, 96)], "key")[0].boxes
        got = mega.frame_features(image, 0, (64, 96)).boxes
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_letterbox_configs_get_the_frames_size_rounded_to_32():
    # YOLOX / YOLOV letterbox to a square side: the frames' short side rounded to a multiple of 32
    assert [bench_frames.letterbox_side(s) for s in (8, 48, 300, 576, 600)] == [32, 64, 288, 576, 608]
    yolox, yolov = bench_frames.bench_config("yolox_s_vid", 576), bench_frames.bench_config("yolov_s", 576)
    assert yolox.input.letterbox == 576 and yolov.input.letterbox == 576  # yolov_s's preset is 512
    assert bench_frames.bench_config("yolox_s_vid", 600).input.letterbox == 608
    single = bench_frames.bench_config("single_R_101", 576)
    assert single.input.letterbox == 0 and (single.input.min_size_test, single.input.max_size_test) == (576, 960)


def test_run_bench_yolox_and_yolov_share_the_per_frame_network():
    from megavod.methods import build_detector

    torch.manual_seed(0)
    yolox = build_detector(load_config("yolox_s_vid", ["yolox.width=0.125"]))
    yolov = build_detector(load_config("yolov_s", ["yolov.width=0.125"]))
    # every YOLOX tensor has its name in YOLOV (the authors' names): the YOLOV row runs YOLOX's network
    assert bench.share_weights(yolox, yolov) == len(yolox.state_dict())
    results = run_bench(["yolox_s_vid", "yolov_s"], num_frames=6, size=64, warmup=0)  # one chunk of 6 > 4
    assert [r.method for r in results] == ["yolox", "yolov"]
    assert all(r.settings is None and r.videos[0].frames == 6 and r.video_ms > 0 for r in results)


def _authors_speed_script(monkeypatch):
    """benchmarks/yolov_authors_speed.py as a module (registered: its dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location("bench_yolov_authors_speed", BENCHMARKS / "yolov_authors_speed.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_authors_speed_script_needs_their_code(tmp_path, capsys, monkeypatch):
    script = _authors_speed_script(monkeypatch)
    assert script.main([]) == 2
    assert script.main([str(tmp_path)]) == 2  # not a checkout of their repository
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("yolov_authors_speed: the authors' YOLOV code is needed") for line in err)


def test_authors_speed_script_redirects_cuda_only_inside_and_matches_by_class_and_box(monkeypatch):
    script = _authors_speed_script(monkeypatch)
    before = torch.Tensor.to
    with script.cuda_on_cpu():
        assert torch.ones(2).to("cuda").device.type == "cpu"
        assert torch.ones(2).to(device=torch.device("cuda")).device.type == "cpu"
        assert torch.ones(2).to(torch.float64).dtype == torch.float64
    assert torch.Tensor.to is before  # restored
    boxes = torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20], [0, 0, 10, 10]])
    a = (boxes, torch.tensor([0.5, 0.4, 0.3]), torch.tensor([1, 1, 2]))
    # the same rows in another order, one box off by 2e-4 px, one score by 5e-7
    b = (boxes[[2, 1, 0]] + torch.tensor([[0.0] * 4, [2e-4, 0, 0, 0], [0.0] * 4]), torch.tensor([0.3, 0.4, 0.5 + 5e-7]),
         torch.tensor([2, 1, 1]))
    pairs, box, score = script.match_detections(a, b, box_tol=1e-3, score_tol=1e-6)
    # float32: within half an ulp of 5 (2.4e-7) and of 0.5 (3e-8)
    assert pairs == 3 and box == pytest.approx(2e-4, abs=3e-7) and score == pytest.approx(5e-7, abs=5e-8)
    assert script.match_detections(a, b, box_tol=1e-4, score_tol=1e-6)[0] == 2  # the shifted box no longer pairs
    c = (b[0], b[1], torch.tensor([2, 1, 3]))  # another class: no pair for it
    assert script.match_detections(a, c, box_tol=1e-3, score_tol=1e-6)[0] == 2


# -- interleaving and the scaling runs -----------------------------------------------------------------


class _FakeModel:
    """Records the order in which run_interleaved advances the models' videos."""

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log, self._current = name, log, None

    def start(self, frames):
        def video():
            for k in range(len(frames)):
                self.log.append((self.name, k))
                yield k
        return VideoTiming(len(frames), 0.0), video()


def test_run_interleaved_takes_turns_frame_by_frame():
    log: list = []
    models = [_FakeModel("a", log), _FakeModel("b", log), _FakeModel("c", log)]
    timings = bench.run_interleaved(models, [None] * 3, "cpu")
    assert log == [(m, k) for k in range(3) for m in "abc"]
    assert [t.frames for t in timings] == [3, 3, 3] and all(t.wall_s > 0 for t in timings)
    assert all(m._current is None for m in models)


def test_scaling_rows_and_table_arithmetic():
    rows = [ScalingRow(1, 10, 10, 5.0, 100.0), ScalingRow(4, 40, 10, 8.0, 300.0)]
    assert rows[0].per_second == 2.0 and rows[1].per_second == 5.0
    assert rows[0].ms_per_step == 500.0 and rows[1].ms_per_step == 800.0
    table = format_scaling(rows, "streams", "header")
    lines = table.splitlines()
    assert lines[0] == "header"
    assert lines[3].split() == ["4", "5", "800.0", "200.0", "2.50", "300"]  # 1000 / 5 ms/frame, 5 / 2 speed-up


def test_peak_rss_sees_an_allocation():
    # 64 MiB of fresh anonymous pages, each touched: resident whatever memory the allocator already holds
    # (an np.ones of 64 MiB can be served from memory freed by earlier tests, raising no RSS: seen once).
    size = 64 * 2**20
    with PeakRSS("cpu") as peak:
        block = mmap.mmap(-1, size)
        for offset in range(0, size, mmap.PAGESIZE):
            block[offset] = 1
        time.sleep(0.05)
        block.close()
    assert peak.mib >= 48


def test_cli_bench_streams_and_batch(capsys):
    assert cli_main(["bench", "--config", "synthetic_mega", "--streams", "1", "2", "--frames", "2", "--size", "48",
                     "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("synthetic_mega: N streams of 2 synthetic frames of 48x80")
    assert [line.split()[0] for line in out[2:4]] == ["1", "2"]
    assert cli_main(["bench", "--config", "synthetic_single", "--batch", "1", "2", "--iterations", "1",
                     "--size", "48", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("synthetic_single: training, B images per iteration (48x80 frames)")
    assert [line.split()[0] for line in out[2:4]] == ["1", "2"]


def test_cli_bench_rejects_a_zero_stream_count(capsys):
    with pytest.raises(SystemExit) as caught:
        cli_main(["bench", "--streams", "0"])
    assert caught.value.code == 2 and "--streams" in capsys.readouterr().err


def test_batched_key_script_times_both_variants():
    rows = _script("bench_batched_key").measure("synthetic_single", 48, [2, 3], repeats=1)
    assert [b for b, _, _ in rows] == [2, 3] and all(loop > 0 and batched > 0 for _, loop, batched in rows)


def test_calibrate_gives_a_random_yolox_detections():
    """`megavod bench`'s calibration sets YOLOX's BatchNorm statistics too: with their defaults (mean 0,
    variance 1) a random YOLOX's scores all fall under 0.001 and its rows would time no post-processing."""
    import warnings

    import megavod
    from megavod.apps.bench_frames import bench_config, calibrate, synthetic_frames
    from megavod.methods import build_detector

    cfg = bench_config("yolox_s_vid", 96)
    torch.manual_seed(0)
    model = build_detector(cfg).eval()
    detector = megavod.Detector(model, cfg, device="cpu")
    frames = synthetic_frames(2, 96)
    before = sum(len(r) for r in detector.stream(frames))
    calibrate(model, detector.prepare(frames[0])[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        after = sum(len(r) for r in detector.stream(frames))
    assert before == 0 < after
