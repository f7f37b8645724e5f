"""Typed configs: YAML + dotted overrides; unknown or mistyped keys are errors naming the key and the source."""

import dataclasses

import pytest

from detailfusion.library.config import ConfigError, JobConfig, load_config, save_config


def write(tmp_path, text, name="job.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_and_overrides_build_a_typed_frozen_config(tmp_path):
    path = write(tmp_path, "name: t\noptim:\n  lr: 1e-3\ntrain:\n  stage: 1\n  precision: fp32\n")
    config = load_config(JobConfig, path, ["train.epochs=3", "loss.gamma=1.5", "model.static_weights=[1, 0]"])
    assert config.name == "t"
    assert config.optim.lr == pytest.approx(1e-3)  # YAML 1.1 reads "1e-3" as a string: coerced
    assert config.train.stage == 1 and config.train.precision == "fp32" and config.train.epochs == 3
    assert config.loss.gamma == 1.5 and config.model.static_weights == (1.0, 0.0)
    assert config.optim.betas == (0.9, 0.98)  # untouched default
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.epochs = 5


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "train:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(JobConfig, path)
    assert "train.epoch" in str(err.value) and str(path) in str(err.value) and "epochs" in str(err.value)


def test_unknown_override_key_names_the_override(tmp_path):
    with pytest.raises(ConfigError, match=r"--set optim\.learning_rate=1.*unknown key 'optim\.learning_rate'"):
        load_config(JobConfig, None, ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="unknown key 'nosuch'"):
        load_config(JobConfig, None, ["nosuch.x=1"])


@pytest.mark.parametrize(
    "text, key",
    [
        ("train:\n  epochs: three\n", "train.epochs"),
        ("train:\n  epochs: 2.5\n", "train.epochs"),
        ("train:\n  precision: fp8\n", "train.precision"),
        ("loss:\n  reference_negative: 1\n", "loss.reference_negative"),
        ("optim:\n  betas: [0.9]\n", "optim.betas"),
        ("model: tiny\n", "model"),
    ],
)
def test_mistyped_values_name_the_key(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(JobConfig, path)
    assert f"'{key}'" in str(err.value) and str(path) in str(err.value)


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(JobConfig, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(JobConfig, write(tmp_path, "train: [1,\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(JobConfig, write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(JobConfig, None, ["train.epochs"])


def test_saved_config_loads_back_equal(tmp_path):
    config = load_config(JobConfig, None, ["model.compositor=static", "data.holdout_fraction=0.25"])
    save_config(config, tmp_path / "resolved.yaml")
    assert load_config(JobConfig, tmp_path / "resolved.yaml") == config


@pytest.mark.parametrize("text, message", [
    ("model:\n  compositor: mean\n", "model.compositor: unknown compositor 'mean'; registered: afc, concat_linear, static"),
    ("model:\n  fusion_score: best_max\n", "model.fusion_score: unknown fusion rule 'best_max'; registered: branch_max"),
    ("model:\n  static_weights: [0, 0]\n", "model.static_weights must be two non-negative numbers, not both 0"),
    ("data:\n  dataset: mnist\n", "data.dataset: unknown dataset 'mnist'; registered: cirr, fashioniq, ipr2pr"),
])
def test_names_are_checked_against_the_registries_naming_the_file(tmp_path, text, message):
    """A section's own checks (the registries, the static weights) name the file too, and list what is registered."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(JobConfig, path)
    assert str(err.value).startswith(str(path)) and message in str(err.value)
