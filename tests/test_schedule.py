"""The multistep lr schedule (SimMIM 800 epochs, DDMIM): values by hand, config checks, and the lr a run logs."""

import json
import re

import numpy as np
import pytest
import torch

from mimkit.config import load_config
from mimkit.data import ImageDataset
from mimkit.engine.distributed import DistInfo
from mimkit.engine.schedule import warmup_multistep
from mimkit.engine.trainer import TrainingSetup, train_loop
from mimkit.errors import ConfigError
from mimkit.methods.simmim import SimMIMViT


@pytest.mark.parametrize("epoch,expected", [
    (0.0, 0.0), (2.5, 0.25), (10.0, 1.0),        # linear warmup over 10 epochs, then the peak
    (699.99, 1.0), (700.0, 0.1), (750.0, 0.1),   # one milestone at 700: lr x 0.1 from it on
    (900.0, 0.01), (1000.0, 0.01),               # a second at 900: lr x 0.1^2
])
def test_warmup_multistep_by_hand(epoch, expected):
    assert warmup_multistep(epoch, 1.0, 10, [700, 900], 0.1) == pytest.approx(expected)


def test_multistep_without_warmup_or_milestones():
    assert warmup_multistep(0.0, 4e-4, 0, [1], 0.5) == pytest.approx(4e-4)
    assert warmup_multistep(1.0, 4e-4, 0, [1], 0.5) == pytest.approx(2e-4)
    assert warmup_multistep(5.0, 4e-4, 1, [], 0.5) == pytest.approx(4e-4)  # constant after warmup


def _cfg(*extra):
    return load_config(None, ["train.epochs=10", "train.warmup_epochs=2", *extra])


def test_multistep_config_is_read_and_checked():
    t = _cfg("train.lr_schedule=multistep", "train.lr_milestones=[5,8]", "train.lr_gamma=0.5").train
    assert (t.lr_schedule, t.lr_milestones, t.lr_gamma) == ("multistep", [5.0, 8.0], 0.5)
    bad = {
        "train.lr_schedule=step": "must be one of cosine, multistep",
        "train.lr_milestones=[5]": "only apply to train.lr_schedule=multistep",
    }
    multistep = {
        "train.lr_milestones=[8,5]": "strictly increasing",
        "train.lr_milestones=[11]": "[11.0] lie outside the run",
        "train.lr_milestones=[1]": "[1.0] lie outside the run after warmup [2, 10]",  # inside the warmup
        "train.lr_gamma=0": "train.lr_gamma must lie in (0, 1]",
    }
    cases = [([o], m) for o, m in bad.items()] + [(["train.lr_schedule=multistep", o], m) for o, m in multistep.items()]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            _cfg(*overrides)


def test_two_epoch_run_logs_the_multistep_lr(tmp_path):
    """16 images, batch 4: 4 steps per epoch; warmup 0.5 epoch, lr 1e-3 x 0.1 from epoch 1 on."""
    torch.manual_seed(0)
    model = SimMIMViT(img_size=16, patch_size=4, in_chans=3, embed_dim=16, depth=1, num_heads=1, mask_patch_size=8)
    data = ImageDataset(np.random.RandomState(0).randint(0, 256, (16, 16, 16, 3), dtype=np.uint8))
    setup = TrainingSetup(model, data, lambda image: (image - 0.5) / 0.25, {"name": "simmim_vit_test"},
                          {"mean": [0.5] * 3, "std": [0.25] * 3}, "pretrain", "SimMIM multistep")
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "train.epochs=2", "train.warmup_epochs=0.5",
                             "train.batch_size=4", "train.lr=1e-3", "train.lr_schedule=multistep",
                             "train.lr_milestones=[1]", "train.lr_gamma=0.1", "train.progress=false",
                             "train.log_every=1", "data.num_workers=0"])
    train_loop(cfg, DistInfo(), torch.device("cpu"), setup)
    records = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    lrs = [r["lr"] for r in records if r["kind"] == "train"]
    # step i sets the lr at epoch i / 4: 0, 0.5 of the peak in warmup, the peak, the peak, then peak x 0.1
    assert lrs == pytest.approx([0.0, 5e-4, 1e-3, 1e-3, 1e-4, 1e-4, 1e-4, 1e-4])
