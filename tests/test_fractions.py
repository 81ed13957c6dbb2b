"""Label fractions: stratified, seeded, at least one image per class, counts as documented."""

import numpy as np
import pytest
import torch

from mimkit.config import load_config
from mimkit.data import apply_label_fraction, load_dataset, stratified_indices
from mimkit.errors import ConfigError


def _labels():
    # 5 classes with very different sizes: 3, 10, 50, 200, 1
    return torch.cat([torch.full((n,), c) for c, n in enumerate([3, 10, 50, 200, 1])])[torch.randperm(264)]


def test_labels_per_class_counts():
    y = _labels()
    idx = stratified_indices(y, labels_per_class=5, seed=1)
    counts = torch.bincount(y[idx], minlength=5).tolist()
    assert counts == [3, 5, 5, 5, 1]  # min(N, class size)
    assert len(set(idx.tolist())) == len(idx)


def test_label_fraction_counts_keep_every_class():
    y = _labels()
    idx = stratified_indices(y, label_fraction=0.1, seed=0)
    counts = torch.bincount(y[idx], minlength=5).tolist()
    assert counts == [1, 1, 5, 20, 1]  # max(1, round(0.1 * n_c))


def test_fraction_is_seeded():
    y = _labels()
    a = stratified_indices(y, label_fraction=0.2, seed=3)
    assert torch.equal(a, stratified_indices(y, label_fraction=0.2, seed=3))
    assert not torch.equal(a, stratified_indices(y, label_fraction=0.2, seed=4))


def test_one_of_the_two_options():
    with pytest.raises(ConfigError):
        stratified_indices(_labels())
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, ["data.labels_per_class=3", "data.label_fraction=0.1"])
    with pytest.raises(ConfigError, match="label_fraction"):
        load_config(None, ["data.label_fraction=1.5"])


def test_bloodmnist_one_percent(blood, capsys):
    train = load_dataset(blood, "train")
    cfg = load_config(None, [f"data.path={blood}", "data.label_fraction=0.01"])
    subset = apply_label_fraction(train, cfg.data)
    full = np.bincount(train.labels.numpy(), minlength=8)
    got = np.bincount(subset.labels.numpy(), minlength=8)
    assert got.tolist() == np.maximum(1, np.rint(0.01 * full)).astype(int).tolist()
    assert 100 <= len(subset) <= 140 and subset.num_classes == 8
    assert "label subset (fraction 0.01, seed 0): %d of 11959 images" % len(subset) in capsys.readouterr().out
