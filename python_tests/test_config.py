"""Config: validation on construction, YAML loading, unknown keys, precedence."""
import pytest

from s2meta_fast.config import (OPTIONS, SECTIONS, Config, ConfigError, build_config, load_config,
                                section_fields)


def _write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_are_valid_and_every_field_is_an_option():
    cfg = Config()
    assert cfg.data.dataset == "ml100k" and cfg.eval.ks == (10, 20, 50) and cfg.meta.stop == "sample"
    for section in SECTIONS:
        for name in section_fields(section):
            assert OPTIONS[name] == section
    # seed and quiet are run options that the trainer section copies, not options of its own
    assert OPTIONS["seed"] == "run" and "seed" not in section_fields("train")


def test_nested_and_flat_yaml(tmp_path):
    path = _write(tmp_path, "data:\n  dataset: ml20m\n  min_items: 50\nmeta_steps: 7\nks: [5, 10]\ninner_lr: 1\n")
    cfg = load_config(path)
    assert (cfg.data.dataset, cfg.data.min_items, cfg.train.meta_steps) == ("ml20m", 50, 7)
    assert cfg.eval.ks == (5, 10) and cfg.meta.inner_lr == 1.0 and isinstance(cfg.meta.inner_lr, float)


def test_unknown_top_level_key_lists_valid_keys(tmp_path):
    path = _write(tmp_path, "dataset: ml100k\nmeta_stepz: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "meta_stepz" in message and path in message
    for valid in ("meta_steps", "dataset", "inner_lr", "ks", "data", "meta", "train", "eval", "run"):
        assert valid in message


def test_unknown_key_in_section_lists_that_sections_keys(tmp_path):
    path = _write(tmp_path, "meta:\n  meta_steps: 3\n")   # a train option under the wrong section
    with pytest.raises(ConfigError, match=r"unknown key 'meta_steps' in section 'meta'; valid keys: hidden_size"):
        load_config(path)


def test_flags_override_file(tmp_path):
    path = _write(tmp_path, "meta_batch: 3\nseed: 4\nstop: threshold\n")
    cfg = load_config(path, {"meta_batch": 5, "stop": "fixed"})
    assert (cfg.train.meta_batch, cfg.run.seed, cfg.meta.stop) == (5, 4, "fixed")
    assert cfg.train.seed == 4   # the trainer gets the run's seed


@pytest.mark.parametrize("options, fragment", [
    ({"stop": "never"}, "stop must be one of"),
    ({"min_items": 10, "max_items": 5}, "must not exceed"),
    ({"ks": [10, 10]}, "must not repeat"),
    ({"device": "tpu"}, "device must be one of"),
    ({"methods": ["s2meta", "bpr"]}, "methods must be"),
    ({"meta_batch": 0}, "meta_batch"),
    ({"model": "deep"}, "model must be one of"),
    ({"finetune_lrs": [0.1, -1]}, "finetune_lrs"),
    ({"init": "random", "warm_start": True}, "warm_start needs a learned initialisation"),
    ({"warm_start_data": "scenarios"}, "warm_start_data must be one of"),
    ({"warm_start": False, "warm_start_data": "source"}, "no effect without the warm start"),
])
def test_bad_values_raise_when_built(options, fragment):
    with pytest.raises(ConfigError, match=fragment):
        build_config(options)


def test_randinit_builds_without_the_warm_start():
    assert build_config({"init": "random", "warm_start": False}).meta.init == "random"


def test_round_trip_through_yaml(tmp_path):
    cfg = build_config({"meta_steps": 11, "ks": [20, 50]})
    path = _write(tmp_path, cfg.to_yaml())
    assert load_config(path) == cfg
    assert cfg.replace(seed=3).run.seed == 3 and cfg.replace(seed=3).train.seed == 3


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "data: [unclosed\n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(_write(tmp_path, "data: 3\n"))


def test_heldout_user_frac_is_validated_and_reaches_the_data_layer(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="heldout_user_frac"):
        load_config(_write(tmp_path, "heldout_user_frac: 1.5\n"))
    cfg = load_config(_write(tmp_path, "heldout_user_frac: 0\n"))
    assert cfg.data.heldout_user_frac == 0.0

    import s2meta_fast.data as data
    from s2meta_fast.app import stages as pipeline

    seen = {}

    class Prepared:
        name, train, valid, test = "fake", [], [], []

    def fake_prepare(name, data_dir, **kwargs):
        seen.update(kwargs)
        return Prepared()

    monkeypatch.setattr(data, "prepare", fake_prepare)
    pipeline.prepare_data(cfg)
    assert seen["heldout_user_frac"] == 0.0  # the paper's shared-user protocol, from the config


def test_one_train_config_with_one_set_of_defaults():
    from s2meta_fast.meta import MetaTrainer, TrainConfig
    from s2meta_fast.config import TrainConfig as ConfigTrainConfig

    assert ConfigTrainConfig is TrainConfig and SECTIONS["train"] is TrainConfig
    assert Config().train == TrainConfig(), "a bare Config trains exactly as MetaTrainer's default"
    assert MetaTrainer.__init__.__defaults__[0] == TrainConfig()


def test_presets_sit_between_the_defaults_and_the_file_and_flags(tmp_path):
    from s2meta_fast.config import DATASET_PRESETS, PRESETS

    assert build_config().preset is None and build_config().train.lr_init == 1e-4   # the bare defaults
    demo = build_config({"preset": "demo"})
    assert (demo.train.lr_init, demo.train.meta_batch, demo.train.meta_steps) == (1e-3, 8, 400)
    paper = build_config({"preset": "paper"})
    assert (paper.train.lr_init, paper.train.weight_decay, paper.train.meta_batch) == (1e-4, 1e-5, 1)
    assert (paper.meta.state_init, paper.meta.zero_hh_bias, paper.meta.inner_batch) == ("normal", True, 128)
    amazon = build_config({"preset": "paper", "dataset": "amazon"})   # per-dataset values
    assert amazon.train.weight_decay == 1e-6 and amazon.meta.inner_batch is None
    assert DATASET_PRESETS["paper"]["amazon"]["weight_decay"] == 1e-6 and set(DATASET_PRESETS) <= set(PRESETS)

    path = _write(tmp_path, "preset: paper\nmeta_batch: 4\n")
    cfg = load_config(path, {"weight_decay": 0.0})
    assert cfg.preset == "paper" and cfg.train.meta_batch == 4 and cfg.train.weight_decay == 0.0   # file, flag win
    assert cfg.train.lr_update == 1e-4 and cfg.meta.state_init == "normal"                       # the preset's
    assert load_config(_write(tmp_path, cfg.to_yaml())) == cfg                                    # round trip
    with pytest.raises(ConfigError, match="unknown preset 'fast'; valid presets: demo, paper"):
        build_config({"preset": "fast"})


def test_choice_lists_come_from_the_registries():
    from s2meta_fast.config import CHOICES
    from s2meta_fast.data import DATASETS
    from s2meta_fast.eval import METHODS
    from s2meta_fast.models import MODELS

    assert CHOICES["model"] == tuple(MODELS) and CHOICES["methods"] == tuple(METHODS)
    assert Config().eval.methods == tuple(METHODS)
    with pytest.raises(ConfigError, match="unknown dataset 'netflix'; valid datasets: .*ml100k"):
        build_config({"dataset": "netflix"})
    assert set(DATASETS) >= {"ml100k", "ml20m", "amazon", "taobao"}


def test_evaluation_stops_as_trained_unless_asked():
    assert build_config({"stop": "fixed", "steps": 7}).stop_at_evaluation == "fixed"
    assert build_config({"stop": "threshold"}).stop_at_evaluation == "threshold"
    assert build_config().stop_at_evaluation == "sample"
    assert build_config({"stop": "fixed", "eval_stop": "sample"}).stop_at_evaluation == "sample"


def test_the_authors_options_reach_the_learner():
    import torch

    from s2meta_fast.meta import MetaLearner
    from s2meta_fast.models import build_model

    cfg = build_config({"preset": "paper"})
    learner = MetaLearner(build_model("interaction", 8), torch.randn(5, 8), torch.randn(5, 8), cfg.meta)
    ctrl = learner.update_controller
    assert (ctrl.state_init, ctrl.zero_hh_bias, ctrl.forget_bias_fix) == ("normal", True, False)
