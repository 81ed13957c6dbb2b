from pathlib import Path

import pytest

from mimkit.config import load_config, parse_override
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
    ("data.crop_scale=[0.5,0.2]", "data.crop_scale"),
    ("banana=1", "Unknown config key 'banana'"),
    ("trainepochs", "not of the form key=value"),
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
