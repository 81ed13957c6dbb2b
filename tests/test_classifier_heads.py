"""Classifier heads shared by every family: DDMIM's MLP head (BN -> Linear -> GELU -> Linear) against a
hand computation, its optimiser groups, and ``finetune.head=mlp`` end to end on a ViT and a Swin checkpoint."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import timm
import torch

from mimkit.checkpoint import load_file, save_atomic
from mimkit.cli import main
from mimkit.config import load_config
from mimkit.errors import ConfigError
from mimkit.models.classifier import ViTClassifier
from mimkit.models.families import build_classifier_from_checkpoint
from mimkit.models.swin import SwinClassifier
from mimkit.registry import create_model

TINY_VIT = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2)
TINY_SWIN = dict(img_size=28, patch_size=2, in_chans=1, embed_dim=16, depths=(1, 2), num_heads=(1, 2), window_size=7)
CHECKPOINTS = {  # pretraining model_config of each family's tiny checkpoint
    "vit": {"name": "mae_vit_tiny_patch4", **TINY_VIT, "decoder_embed_dim": 16, "decoder_depth": 1,
            "decoder_num_heads": 2},
    "swin": {"name": "swin_tiny_patch2_window7_28", **{**TINY_SWIN, "depths": [1, 2], "num_heads": [1, 2]}},
}
MLP_HEAD_KEYS = {"head.norm.weight", "head.norm.bias", "head.norm.running_mean", "head.norm.running_var",
                 "head.norm.num_batches_tracked", "head.fc1.weight", "head.fc1.bias", "head.fc2.weight",
                 "head.fc2.bias"}


def _classifier(family: str, **kwargs):
    return ViTClassifier(**TINY_VIT, **kwargs) if family == "vit" else SwinClassifier(**TINY_SWIN, **kwargs)


def _hand_mlp_head(features: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """methods.md §3.6 written out, eval mode: BatchNorm1d with running stats (eps 1e-5), Linear, exact
    (erf) GELU, Linear."""
    x = (features - state["head.norm.running_mean"]) / torch.sqrt(state["head.norm.running_var"] + 1e-5)
    x = x * state["head.norm.weight"] + state["head.norm.bias"]
    x = x @ state["head.fc1.weight"].T + state["head.fc1.bias"]
    x = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    return x @ state["head.fc2.weight"].T + state["head.fc2.bias"]


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_mlp_head_is_bn_linear_gelu_linear_on_the_pooled_features(family):
    torch.manual_seed(0)
    clf = _classifier(family, num_classes=5, head="mlp", head_hidden_dim=12).eval()
    assert {k for k in clf.state_dict() if k.startswith("head.")} == MLP_HEAD_KEYS
    assert clf.head.fc1.weight.shape == (12, clf.head.norm.num_features) and clf.head.fc2.weight.shape == (5, 12)
    assert clf.head.fc2.weight.std() < 1e-4 and clf.head.fc1.weight.std() > 1e-2  # near-zero first logits
    with torch.no_grad():  # running stats and affine far from (0, 1) so an unused or train-mode norm shows
        for t in (clf.head.norm.running_mean, clf.head.norm.weight, clf.head.norm.bias, clf.head.fc2.weight):
            t.copy_(torch.randn(t.shape))
        clf.head.norm.running_var.uniform_(0.2, 3.0)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _hand_mlp_head(clf.features(x), clf.state_dict())
        torch.testing.assert_close(clf.logits(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_mlp_head_is_the_last_layer_and_only_its_matrices_decay(family):
    def groups(model):
        names = {id(p): n for n, p in model.named_parameters()}
        return {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in model.optimizer_param_groups(0.05)
                for p in g["params"]}

    mlp = groups(_classifier(family, num_classes=5, head="mlp", head_hidden_dim=8, layer_decay=0.5))
    linear = groups(_classifier(family, num_classes=5, layer_decay=0.5))
    assert {k: v for k, v in mlp.items() if not k.startswith("head.")} == \
        {k: v for k, v in linear.items() if not k.startswith("head.")}
    linear_head = [v for k, v in linear.items() if k.startswith("head.") and k.endswith("weight")]
    assert linear_head == [(1.0, 0.05)]  # today's linear head: the top layer, its matrix decayed
    assert {k: v for k, v in mlp.items() if k.startswith("head.")} == {
        "head.norm.weight": (1.0, 0.0), "head.norm.bias": (1.0, 0.0), "head.fc1.weight": (1.0, 0.05),
        "head.fc1.bias": (1.0, 0.0), "head.fc2.weight": (1.0, 0.05), "head.fc2.bias": (1.0, 0.0)}


def test_an_unknown_head_or_width_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^finetune\.head must be one of linear, mlp, got 'conv'\.$"):
        load_config(None, ["finetune.head=conv"])
    with pytest.raises(ConfigError, match="finetune.head_hidden_dim must be at least 1"):
        load_config(None, ["finetune.head=mlp", "finetune.head_hidden_dim=0"])
    assert load_config(None, []).finetune.head == "linear" and load_config(None, []).finetune.head_hidden_dim == 1024


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny 4-class grey npz and (randomly initialised) tiny ViT (MAE) and Swin pretraining checkpoints."""
    root = tmp_path_factory.mktemp("heads")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 96)
    images = (rng.integers(0, 100, (96, 28, 28)) + 40 * labels[:, None, None]).astype(np.uint8)
    np.savez(root / "tiny.npz", train_images=images[:64], train_labels=labels[:64, None],
             val_images=images[64:80], val_labels=labels[64:80, None],
             test_images=images[80:], test_labels=labels[80:, None])
    for family, config in CHECKPOINTS.items():
        torch.manual_seed(0)
        save_atomic({"format": "mimkit", "model_config": config, "model": create_model(**config).state_dict(),
                     "data_stats": {"mean": [0.4], "std": [0.25]}, "task": "pretrain", "epoch": 0},
                    root / f"{family}.pt")
    return root


def _timm_pooled(family: str, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """timm's model of the family without a head (num_classes=0: forward = pooled features), holding
    the fine-tuned encoder: an outside reference for the features the head sees."""
    if family == "vit":
        ref = timm.models.vision_transformer.VisionTransformer(num_classes=0, global_pool="avg", fc_norm=True,
                                                               **TINY_VIT)
    else:
        ref = timm.models.swin_transformer.SwinTransformer(num_classes=0, **TINY_SWIN)
    ref.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")}, strict=True)
    return ref.eval()


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_finetune_with_the_mlp_head_records_it_and_reloads_to_the_same_logits(world, family, tmp_path):
    data, out = world / "tiny.npz", tmp_path / "ft"
    assert main(["finetune", "--checkpoint", str(world / f"{family}.pt"), "--data", str(data), f"output_dir={out}",
                 "train.epochs=1", "train.warmup_epochs=0", "train.batch_size=16", "train.progress=false",
                 "finetune.head=mlp", "finetune.head_hidden_dim=16", "finetune.head_init_std=0.5"]) == 0
    obj = load_file(out / "last.pt")
    assert obj["model_config"]["head"] == "mlp" and obj["model_config"]["head_hidden_dim"] == 16
    state = obj["model"]
    assert {k for k in state if k.startswith("head.")} == MLP_HEAD_KEYS
    # 64 images / batch 16: four training steps moved the running stats; validation (eval mode) did not
    assert int(state["head.norm.num_batches_tracked"]) == 4 and state["head.norm.running_mean"].abs().sum() > 0

    model = build_classifier_from_checkpoint(obj, "last.pt")
    assert not model.training and model.head_kind == "mlp"
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = _hand_mlp_head(_timm_pooled(family, state)(x), state)
        logits = model.logits(x)
    assert expected.abs().max() > 1e-2  # logits well above the tolerance (head_init_std 0.5 for fc2)
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=1e-4)

    # --eval rebuilds the same head from the checkpoint alone and scores best.pt as the run did
    reported = json.loads((out / "finetune_metrics.json").read_text())["metrics"]
    assert main(["finetune", "--eval", "--checkpoint", str(out / "best.pt"), "--data", str(data),
                 f"output_dir={tmp_path / 'ev'}"]) == 0
    again = json.loads((tmp_path / "ev" / "eval_metrics.json").read_text())["metrics"]
    assert again["top1"] == pytest.approx(reported["top1"]) and again["auc"] == pytest.approx(reported["auc"])


def test_the_mlp_head_refuses_a_batch_of_one_in_one_sentence(world, tmp_path, capsys):
    code = main(["finetune", "--checkpoint", str(world / "swin.pt"), "--data", str(world / "tiny.npz"),
                 f"output_dir={tmp_path}", "train.batch_size=1", "train.progress=false", "finetune.head=mlp"])
    assert code == 2 and "finetune.head=mlp starts with a BatchNorm" in capsys.readouterr().err
