import dataclasses
import json
import math
import os
from pathlib import Path

import pytest

from mimkit.config import (Config, FinetuneConfig, TrainConfig, check_output_dir, check_output_file, config_keys, describe_keys,
                           load_config, parse_override, validate_knn)
from mimkit.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    cfg = load_config(path)
    assert cfg.model["name"] and cfg.train.epochs >= 1


def test_overrides_parse_and_apply():
    cfg = load_config(REPO / "configs/mae/vit_tiny_p4_28.yaml",
                      ["train.epochs=3", "train.warmup_epochs=1", "train.blr=3e-3", "train.clip_grad=1",
                       "data.path=123", "train.betas=[0.9,0.999]", "model.mask_ratio=0.6"])
    assert cfg.train.epochs == 3 and cfg.train.blr == pytest.approx(3e-3)
    assert cfg.train.clip_grad == 1.0 and isinstance(cfg.train.clip_grad, float)
    assert cfg.data.path == "123"  # paths stay strings
    assert cfg.train.betas == [0.9, 0.999] and cfg.model["mask_ratio"] == 0.6
    assert parse_override("a.b=null") == (["a", "b"], None)


@pytest.mark.parametrize("override,message", [
    ("train.epohcs=3", "Did you mean train.epochs"),
    ("train.epochs=three", "train.epochs must be of type int"),
    ("train.compile=maybe", "must be true or false"),
    ("model.mask_ratio=1.0", "mask_ratio must lie strictly between 0 and 1"),
    ("model.mask_ratio=0", "mask_ratio must lie strictly between 0 and 1"),
    ("model.img_size=30", "not divisible by the patch size 4"),
    ("model.decoder_width=3", "Unknown config key 'model.decoder_width'"),
    ("model.name=mae_vit_tiny_patch5", "Did you mean mae_vit_tiny_patch4"),
    ("train.precision=fp8", "must be one of fp32, bf16, fp16"),
    ("data.crop_scale=[0.5,0.2]", "data.crop_scale must be [min, max] with 0 < min <= max <= 1"),
    ("finetune.crop_scale=[0,1]", "finetune.crop_scale must be [min, max]"),
    ("banana=1", "Unknown config key 'banana'"),
    ("trainepochs", "not of the form key=value"),
    ("model.mask_ratio=1.5", "mask_ratio must lie strictly between 0 and 1, got 1.5"),
    ("data.label_fraction=0", "data.label_fraction must lie in (0, 1], got 0.0"),
    ("data.label_fraction=2", "data.label_fraction must lie in (0, 1], got 2.0"),
    ("data.label_fraction=.nan", "data.label_fraction must lie in (0, 1], got nan"),
    ("finetune.reprob=1.5", "finetune.reprob must lie in [0, 1], got 1.5"),
    ("finetune.smoothing=1", "finetune.smoothing must lie in [0, 1), got 1.0"),
    ("finetune.drop_path=-0.1", "finetune.drop_path must lie in [0, 1)"),
    ("data.std=[0.2]", "data.mean and data.std must be given together"),
])
def test_bad_configs_give_one_clear_sentence(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs/mae/vit_tiny_p4_28.yaml", [override])
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("mean,std,message", [
    ("[0.5]", "[0]", "data.std must be finite and greater than 0 for every channel, got [0.0]"),
    ("[0.5,0.5]", "[0.2,-0.1]", "data.std must be finite and greater than 0 for every channel, got [0.2, -0.1]"),
    ("[0.5]", "[.nan]", "data.std must be finite and greater than 0"),
    ("[0.5]", "[.inf]", "data.std must be finite and greater than 0"),
    ("[.nan]", "[0.2]", "data.mean must be finite"),
    ("[0.5,0.5]", "[0.2]", "need one value per channel each, got 2 and 1"),
])
def test_bad_normalisation_statistics(mean, std, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"data.mean={mean}", f"data.std={std}"])
    assert message in str(info.value)
    load_config(None, ["data.mean=[0.5]", "data.std=[1e-3]"])  # small but positive is fine


@pytest.mark.parametrize("k,temperature,message", [
    ([0], 0.07, "--k must be whole numbers of at least 1, got [0]"),
    ([10, -3], 0.07, "got [-3]"),
    ([], 0.07, "got []"),
    ([True], 0.07, "got [True]"),
    ([10], 0.0, "--temperature must be a finite number greater than 0, got 0.0"),
    ([10], -1.0, "got -1.0"),
    ([10], math.nan, "got nan"),
    ([10], math.inf, "got inf"),
])
def test_knn_settings_are_checked(k, temperature, message):
    with pytest.raises(ConfigError) as info:
        validate_knn(k, temperature)
    assert message in str(info.value)
    validate_knn([1, 200], 1e-3)


def test_output_paths_that_cannot_be_written(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match=r"output_dir .*afile is a file, not a folder"):
        check_output_dir(afile)
    with pytest.raises(ConfigError, match=r"lies under the file .*afile"):
        check_output_dir(afile / "a" / "b")
    with pytest.raises(ConfigError, match=r"--out .* is a folder, not a file"):
        check_output_file(tmp_path)
    with pytest.raises(ConfigError, match=r"--out .*afile/x.png lies under the file"):
        check_output_file(afile / "x.png")
    check_output_dir(tmp_path / "new" / "deeper")  # created later, below a writable folder
    check_output_file(tmp_path / "new" / "fig.png")


def test_unwritable_output_dir(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user (root) can write into a 0o500 folder, so there is no unwritable folder to test")
        with pytest.raises(ConfigError, match=r"cannot be written .*locked is not writable"):
            check_output_dir(locked / "run")
    finally:
        locked.chmod(0o700)


def test_unwritable_output_dir_as_the_os_reports_it(tmp_path, monkeypatch):
    """The same refusal where the OS says "no" (os.access), which also covers a run as root."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    with pytest.raises(ConfigError, match=r"output_dir .*locked/run/x cannot be written \(.*locked is not writable"):
        check_output_dir(locked / "run" / "x")
    check_output_dir(tmp_path / "other")


def test_every_config_field_has_a_meaning():
    for cls in (Config, *(type(getattr(Config(), f.name)) for f in dataclasses.fields(Config)
                          if dataclasses.is_dataclass(getattr(Config(), f.name)))):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help", "").strip(), f"{cls.__name__}.{f.name} has no help text"


def test_config_reference_shows_the_real_defaults():
    assert describe_keys("train.epochs") == ["train.epochs (int, default 400): passes over the training split"]
    (crop,) = describe_keys("finetune.crop_scale")
    assert crop.startswith("finetune.crop_scale (list[float], default [0.08, 1.0]): ")
    assert FinetuneConfig().crop_scale == [0.08, 1.0]
    (precision,) = describe_keys("train.precision")
    assert precision.startswith('train.precision (fp32 | bf16 | fp16, default "fp32"): ')
    (std,) = describe_keys("data.std")
    assert std.startswith("data.std (list[float] or null, default null): ")
    # model keys: the preset's value (128), not the class default (512); meaning from the MAE docstring
    (dec,) = describe_keys("model.decoder_embed_dim")
    assert dec == "model.decoder_embed_dim (int, default 128): decoder size (official: 512, 8, 16)"
    (ratio,) = describe_keys("model.mask_ratio", "dama_vit_tiny_patch4")
    assert ratio.startswith("model.mask_ratio (float, default 0.8): ")  # the DAMA recipe's ratio
    assert len(describe_keys("train")) == len(dataclasses.fields(TrainConfig)) and describe_keys("train")[0].startswith("train.epochs ")


def test_every_listed_key_and_default_is_accepted_back():
    """Each listed key, set to its listed default, is a valid override that gives that default."""
    for info in config_keys():
        text = info.default if isinstance(info.default, str) else json.dumps(info.default)
        cfg = load_config(None, [f"{info.key}={text}"])
        section, _, name = info.key.rpartition(".")
        got = cfg.model[name] if section == "model" else getattr(getattr(cfg, section) if section else cfg, name)
        assert got == info.default, info.key


def test_unknown_config_show_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"No config key or section 'train.epohcs' \(did you mean train.epochs"):
        describe_keys("train.epohcs")


def test_warmup_longer_than_a_short_run_is_left_to_the_engine_to_clamp():
    """``train.epochs=1`` on a recipe with a longer warmup is valid (the engine clamps it with a note)."""
    cfg = load_config(REPO / "configs/mae/vit_tiny_p4_28.yaml", ["train.epochs=1"])
    assert cfg.train.epochs == 1 and cfg.train.warmup_epochs > 1
    for bad in ("-1", ".nan"):
        with pytest.raises(ConfigError, match="train.warmup_epochs must be 0 or more"):
            load_config(None, [f"train.warmup_epochs={bad}"])
