import copy
import dataclasses
import pickle
import subprocess
import sys

import pytest
import yaml

from megavod.checkpoints.loading import config_from_record
from megavod.config import Config, available_presets, dump_config, load_config, to_dict
from megavod.errors import ConfigError
from megavod.methods.sections import MEGAConfig

REQUIRED_PRESETS = [
    "single_R_50", "single_R_101", "single_X_101", "mega_R_50", "mega_R_101", "mega_X_101",
    "mega_R_101_online", "base_R_101", "mega_R_101_no_global_Nl3", "mega_R_101_no_global_Nl4",
    "mega_R_101_no_local", "base_R_101_larger_local", "mega_R_101_location_global",
    "rdn_base_R_101", "rdn_R_101", "rdn_base_R_50", "fgfa_R_101", "fgfa_R_50", "dff_R_101", "dff_R_50",
    "synthetic_single", "synthetic_base", "synthetic_mega",
]


def test_every_required_preset_exists_and_loads():
    presets = set(available_presets())
    for name in REQUIRED_PRESETS:
        assert name in presets
    for name in presets:
        cfg = load_config(name)
        assert cfg.name == name


def test_defaults_equal_the_spec():
    cfg = Config(method="mega")  # the shared sections, and MEGA's own with its defaults
    rpn, head, m, s, i = cfg.model.rpn, cfg.model.roi_head, cfg.mega, cfg.solver, cfg.input
    assert rpn.anchor_sizes == (64, 128, 256, 512) and rpn.aspect_ratios == (0.5, 1.0, 2.0)
    assert (rpn.pre_nms_top_n_train, rpn.post_nms_top_n_train) == (6000, 300)
    assert (rpn.pre_nms_top_n_test, rpn.post_nms_top_n_test, rpn.nms_thresh) == (6000, 300, 0.7)
    assert (rpn.ref_pre_nms_top_n, rpn.ref_post_nms_top_n) == (6000, 75)
    assert (head.pooler_resolution, head.sampling_ratio, head.pooler_scale) == (7, 0, 1 / 16)
    assert (head.num_classes, head.batch_size_per_image, head.positive_fraction) == (31, 128, 0.25)
    assert (head.score_thresh, head.nms_thresh, head.detections_per_img) == (0.001, 0.5, 300)
    assert head.bbox_reg_weights == (10.0, 10.0, 5.0, 5.0)
    assert (m.T_l, m.T_g, m.T_m, m.N_g, m.N_l, m.global_res_stages) == (25, 10, 25, 1, 3, 1)
    assert m.tau == 12 and m.distilled_rows(rpn) == 15 and m.global_modules == 2
    assert (m.train_local_refs, m.train_global_refs, m.train_memory_refs) == (2, 2, 3)
    assert (cfg.relation.num_heads, cfg.relation.embed_dim, cfg.relation.wave_length) == (16, 64, 1000.0)
    assert (s.base_lr, s.momentum, s.weight_decay, s.bias_lr_factor) == (0.001, 0.9, 0.0001, 2.0)
    assert (s.steps, s.max_iter, s.warmup_iters, s.checkpoint_period) == ((80000,), 120000, 500, 2500)
    assert s.warmup_factor == pytest.approx(1 / 3)
    # ours: bf16 autocast on CUDA (the authors: fp32); deterministic algorithms off unless asked for
    assert s.bf16 is True and s.deterministic is False
    assert load_config("synthetic_single", ["solver.deterministic=true"]).solver.deterministic is True
    assert i.pixel_mean == (102.9801, 115.9465, 122.7717) and (i.min_size_test, i.max_size_test) == (600, 1000)
    rdn, fgfa, dff = (Config(method=name).section for name in ("rdn", "fgfa", "dff"))
    assert (rdn.min_offset, rdn.max_offset, fgfa.max_offset, dff.key_interval) == (-18, 18, 9, 10)
    assert Config().section is None  # the single-frame detector has no hyper-parameters of its own


def test_presets_carry_the_papers_settings():
    assert load_config("base_R_101").mega.memory is False
    r50 = load_config("mega_R_50")
    assert r50.model.backbone.arch == "R-50-C4" and r50.model.roi_head.reduce_channel
    assert r50.mega.global_res_stages == 0
    no_local = load_config("mega_R_101_no_local").mega
    assert (no_local.N_g, no_local.N_l, no_local.T_l, no_local.T_g) == (4, 0, 1, 25)
    assert load_config("mega_R_101_no_global_Nl4").mega.N_l == 4
    assert load_config("mega_R_101_online").mega.online
    x = load_config("mega_X_101").model.backbone
    assert (x.num_groups, x.width_per_group, x.stride_in_1x1) == (32, 8, False)
    paper = load_config("mega_R_101_paper_budget")
    assert paper.mega.distilled_rows(paper.model.rpn) == 20
    assert load_config("rdn_R_101").rdn.advanced_stages == 1


def test_overrides_use_dotted_keys():
    cfg = load_config("mega_R_101", ["mega.T_g=20", "model.rpn.anchor_sizes=[32, 64]", "solver.base_lr=2e-3"])
    assert cfg.mega.T_g == 20 and cfg.model.rpn.anchor_sizes == (32, 64)
    assert cfg.solver.base_lr == 0.002


def test_config_file_round_trip(tmp_path):
    cfg = load_config("synthetic_mega", ["mega.T_m=5"])
    path = tmp_path / "my.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(str(path))
    again.name = cfg.name
    assert again == cfg
    # the section is written under its key, after the shared sections it follows today
    written = yaml.safe_load(dump_config(cfg))
    assert list(written)[:4] == ["method", "model", "relation", "mega"] and written["mega"]["T_m"] == 5
    assert not {"rdn", "fgfa", "dff", "section"} & set(written)


def test_a_config_holds_its_methods_section_only():
    mega = load_config("synthetic_mega")
    assert isinstance(mega.section, MEGAConfig) and mega.mega is mega.section
    with pytest.raises(AttributeError, match="a config of method 'mega' has no section 'rdn'"):
        mega.rdn
    mega.mega = dataclasses.replace(mega.mega, T_g=7)  # assigning under the key replaces the section
    assert mega.section.T_g == 7
    # copies, pickles and dataclasses.replace keep the section
    for twin in (copy.deepcopy(mega), pickle.loads(pickle.dumps(mega)), dataclasses.replace(mega, seed=3)):
        assert twin.mega.T_g == 7 and twin.mega == mega.mega
    single = load_config("synthetic_single")
    assert single.section is None and "mega" not in dump_config(single)
    # the final method picks the section (synthetic_mega sets method: mega on top of synthetic_single)
    assert load_config("synthetic_single", ["method=rdn", "rdn.ratio=0.5"]).rdn.ratio == 0.5
    with pytest.raises(ConfigError, match="config key 'mega.T_g': method 'single' has no section 'mega'"):
        load_config("synthetic_single", ["mega.T_g=3"])


def test_files_written_with_every_methods_section_still_load(tmp_path):
    # dump_config wrote every method's section before a config held its own only; those at their
    # defaults are left out, one that says something fails
    old = to_dict(load_config("synthetic_mega", ["mega.T_m=5"]))
    old.update(rdn=dataclasses.asdict(Config(method="rdn").rdn), fgfa={"max_offset": 9}, dff={})
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(old))
    assert load_config(str(path)).mega.T_m == 5
    old["rdn"]["ratio"] = 0.3
    path.write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match="config key 'rdn.ratio': method 'mega' has no section 'rdn'"):
        load_config(str(path))


def test_switching_the_method_leaves_the_previous_methods_section_behind(tmp_path):
    cfg = load_config("synthetic_mega", ["method=dff", "dff.key_interval=3"])
    assert cfg.method == "dff" and cfg.dff.key_interval == 3
    path = tmp_path / "rdn_on_mega.yaml"
    path.write_text("_base_: mega_R_101\nmethod: rdn\nrdn: {ratio: 0.5}\n")
    assert load_config(str(path)).rdn.ratio == 0.5


def test_recorded_configs_with_every_methods_section_still_load():
    # checkpoints written before each method had its own section record all four
    record = to_dict(load_config("synthetic_mega"))
    record.update(rdn={"ratio": 0.2}, fgfa={"max_offset": 9}, dff={"key_interval": 10})
    assert config_from_record(record) == load_config("synthetic_mega")


@pytest.mark.parametrize(
    "override, message",
    [
        ("mega.T_x=3", "unknown config key 'mega.T_x' (allowed here:"),
        ("mega.T_m=-1", "config key 'mega.T_m': must be >= 0 (got -1)"),
        ("mega.T_g=ten", "config key 'mega.T_g': expected int, got 'ten'"),
        ("mega.T_l=24", "config key 'mega.T_l': must be an odd number >= 1"),
        ("mega.N_l=0", "config key 'mega.N_l': must be >= 1 when mega.memory is on"),
        ("method=yolo", "config key 'method': expected one of 'single', 'mega', 'rdn', 'fgfa', 'dff', 'yolox', 'yolov', 'yolov_online', got 'yolo'"),
        ("model.rpn.nms_thresh=1.5", "config key 'model.rpn.nms_thresh': must be in (0, 1] (got 1.5)"),
        ("mega.memory=maybe", "config key 'mega.memory': expected bool, got 'maybe'"),
        ("solver.steps=[5, 3]", "config key 'solver.steps': must be increasing positive iterations"),
        ("model.backbone.weights=/nonexistent.pkl", "model.backbone.weights': file not found"),
        ("T_l=3", "unknown config key 'T_l'"),
        ("rdn.ratio=0.3", "config key 'rdn.ratio': method 'mega' has no section 'rdn'"),
        ("fgfa=3", "config key 'fgfa': method 'mega' has no section 'fgfa'"),
        ("nodots", "expected KEY=VALUE"),
    ],
)
def test_bad_values_are_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("mega_R_101", [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert err.value.exit_code == 2


def test_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown config 'mega_R_1000'"):
        load_config("mega_R_1000")
    bad = tmp_path / "bad.yaml"
    bad.write_text("mega: {T_l: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"_base_: {loop}\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(str(loop))


def test_cli_config_error_exit_code_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "megavod", "train", "--config", "mega_R_101", "--data", str(tmp_path),
         "mega.T_m=-3"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "mega.T_m" in lines[0]
