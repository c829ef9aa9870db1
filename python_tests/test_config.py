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
    assert cfg.train.trainer_config().seed == 4   # the trainer gets the run's seed


@pytest.mark.parametrize("options, fragment", [
    ({"stop": "never"}, "stop must be one of"),
    ({"min_items": 10, "max_items": 5}, "must not exceed"),
    ({"ks": [10, 10]}, "must not repeat"),
    ({"device": "tpu"}, "device must be one of"),
    ({"methods": ["s2meta", "neumf"]}, "methods must be"),
    ({"meta_batch": 0}, "meta_batch"),
    ({"model": "deep"}, "model must be one of"),
    ({"finetune_lrs": [0.1, -1]}, "finetune_lrs"),
])
def test_bad_values_raise_when_built(options, fragment):
    with pytest.raises(ConfigError, match=fragment):
        build_config(options)


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
    from s2meta_fast.eval import pipeline

    seen = {}

    class Prepared:
        name, train, valid, test = "fake", [], [], []

    def fake_prepare(name, data_dir, **kwargs):
        seen.update(kwargs)
        return Prepared()

    monkeypatch.setattr(data, "prepare", fake_prepare)
    pipeline.prepare_data(cfg)
    assert seen["heldout_user_frac"] == 0.0  # the paper's shared-user protocol, from the config
