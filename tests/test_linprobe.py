"""Linear probing: LARS with a real trust ratio, DINO features, the probe command end to end."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from mimkit.cli import main
from mimkit.config import load_config
from mimkit.engine.optim import build_optimizer
from mimkit.engine.trainer import pretrain
from mimkit.eval import linprobe as linprobe_module
from mimkit.eval.features import probe_features
from mimkit.loading import build_from_checkpoint, load_encoder
from mimkit.models.vit import MaskedViT
from tests.conftest import TINY_MAE, shared_file
from tests.reference import cls_features, split_tensors


def test_lars_update_matches_hand_computation():
    torch.manual_seed(0)
    probe = nn.Sequential(nn.BatchNorm1d(4, affine=False), nn.Linear(4, 3))
    w0, b0 = probe[1].weight.detach().clone(), probe[1].bias.detach().clone()
    t_cfg = SimpleNamespace(optimizer="lars", weight_decay=0.0, momentum=0.9, betas=[0.9, 0.999])
    lr, trust = 0.5, 0.001
    opt = build_optimizer(probe, t_cfg, lr)
    grads = [(torch.randn(3, 4), torch.randn(3)) for _ in range(2)]
    w, b, mu_w, mu_b = w0.clone(), b0.clone(), torch.zeros(3, 4), torch.zeros(3)
    for gw, gb in grads:
        probe[1].weight.grad, probe[1].bias.grad = gw.clone(), gb.clone()
        opt.step()
        # official MAE LARS with weight decay 0: weights scaled by trust * |w| / |g|, 1-D params plain momentum SGD
        q = trust * w.norm() / gw.norm()
        mu_w = 0.9 * mu_w + q * gw
        mu_b = 0.9 * mu_b + gb
        w, b = w - lr * mu_w, b - lr * mu_b
    assert torch.allclose(probe[1].weight, w, atol=1e-7)
    assert torch.allclose(probe[1].bias, b, atol=1e-7)
    # the trust ratio really is applied (the MAE-priv copy skipped it at weight decay 0)
    assert not torch.allclose(probe[1].weight, w0 - lr * (grads[0][0] * 1.9 + grads[1][0]), atol=1e-4)


def test_dino_features_concatenate_last_blocks():
    torch.manual_seed(0)
    enc = MaskedViT(img_size=28, patch_size=4, embed_dim=16, depth=3, num_heads=2).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        f = probe_features(enc, x, n_last_blocks=2, avgpool=True)
        out = enc.encode(x, return_blocks=True)
        cls_last = probe_features(enc, x)
    assert f.shape == (2, 16 * 3)
    assert torch.allclose(f[:, :16], enc.norm(out.blocks[1])[:, 0], atol=1e-6)
    assert torch.allclose(f[:, 16:32], cls_last, atol=1e-6)  # last block [CLS] after the final norm
    assert torch.allclose(f[:, 32:], enc.norm(out.blocks[2])[:, 1:].mean(1), atol=1e-6)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    breast = shared_file("breastmnist.npz")
    out = tmp_path_factory.mktemp("tiny_lp")
    pretrain(load_config(None, [*TINY_MAE, f"data.path={breast}", f"output_dir={out}", "train.epochs=1",
                                "train.warmup_epochs=0", "train.batch_size=64", "train.progress=false"]))
    return out / "last.pt", breast


@torch.no_grad()
def hand_probe_features(encoder, images: torch.Tensor, protocol: str) -> torch.Tensor:
    """mae: [CLS] after the final norm; dino (2 last blocks): both blocks' [CLS], each after the final norm."""
    if protocol == "mae":
        return cls_features(encoder, images)
    blocks = encoder.encode(images, return_blocks=[0, 1]).blocks  # the tiny MAE has 2 blocks
    return torch.cat([encoder.norm(blocks[0])[:, 0], encoder.norm(blocks[1])[:, 0]], dim=1)


def hand_top1_and_auc(probe_checkpoint, features: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """The saved head applied by hand: BN (running stats, eps 1e-6, no affine) when present, then x W^T + b."""
    state = torch.load(probe_checkpoint, weights_only=True)["model"]
    x = features.double().numpy()
    if "bn.running_mean" in state:
        x = (x - state["bn.running_mean"].double().numpy()) / np.sqrt(state["bn.running_var"].double().numpy() + 1e-6)
    logits = x @ state["head.weight"].double().numpy().T + state["head.bias"].double().numpy()
    y = labels.numpy()
    probs = np.exp(logits - logits.max(1, keepdims=True))
    return 100.0 * float(np.mean(logits.argmax(1) == y)), float(roc_auc_score(y, probs[:, 1] / probs.sum(1)))


@pytest.mark.parametrize("protocol", ["mae", "dino"])
def test_linprobe_metrics_equal_a_recomputation_and_cached_features_are_reused(tiny_checkpoint, tmp_path, protocol,
                                                                               capsys):
    ckpt, breast = tiny_checkpoint
    args = ["linprobe", "--checkpoint", str(ckpt), "--data", str(breast), f"linprobe.protocol={protocol}",
            "linprobe.n_last_blocks=2", f"linprobe.cache_dir={tmp_path / 'cache'}", "train.epochs=3",
            "train.warmup_epochs=1", "train.batch_size=128", "train.progress=false",
            f"train.lr={0.05 if protocol == 'mae' else 5e-4}"]  # each protocol's default lr at batch 128
    assert main([*args, f"output_dir={tmp_path / 'a'}"]) == 0
    result = json.loads((tmp_path / "a" / "linprobe_metrics.json").read_text())
    assert result["protocol"] == protocol and result["metrics"]["num_images"] == 156
    ckpt_obj = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    assert ckpt_obj["model_config"]["feature_dim"] == (64 if protocol == "dino" else 32) * 6  # tiny MAE width 192
    # The reference: the pretrained encoder rebuilt from its checkpoint, the test images normalised by hand
    # with the pretraining statistics, features taken by hand, the saved heads applied by hand.
    model, obj = build_from_checkpoint(ckpt)
    images, labels = split_tensors(breast, "test", obj["data_stats"]["mean"], obj["data_stats"]["std"])
    features = hand_probe_features(model.encoder, images, protocol)
    for name in ("best", "last"):
        top1, auc = hand_top1_and_auc(tmp_path / "a" / f"{name}.pt", features, labels)
        m = result[name]["metrics"]
        # AUC to 1e-3 (~5 of the 42 x 114 pairs): near-equal probabilities may order differently in float32
        assert m["top1"] == pytest.approx(top1) and m["auc"] == pytest.approx(auc, abs=1e-3), name
    assert result["reported"] == "best" and result["metrics"] == result["best"]["metrics"]
    text = capsys.readouterr().out
    assert ("lars" if protocol == "mae" else "sgd") in text
    # a second run (an lr sweep) reads the features instead of re-encoding the images
    assert main([*args, f"output_dir={tmp_path / 'b'}", "train.lr=0.01"]) == 0
    assert "features read from" in capsys.readouterr().out


def test_linprobe_reaches_100_percent_on_linearly_separable_features(tiny_checkpoint, tmp_path, monkeypatch):
    """With the encoder's features replaced by separable ones (class c: +3 on feature c, -3 on the
    other, plus N(0, 0.5^2) noise), the probe trained and scored by the command must classify the
    test split perfectly: labels out of order with their features, an untrained or unsaved head,
    or BN statistics applied wrongly would all show (the initial head scores about 50 %).

    SGD instead of LARS: LARS (trust 0.001) moves a weight by ~lr/1000 of its norm per step, far too
    slow for a few steps; its update rule is checked by test_lars_update_matches_hand_computation."""
    ckpt, breast = tiny_checkpoint

    def separable(encoder, dataset, stats, kwargs, **_):
        labels = torch.as_tensor(dataset.labels).long()
        g = torch.Generator().manual_seed(len(labels))
        x = 0.5 * torch.randn(len(labels), 192, generator=g)
        x[:, :2] += 3.0 * (2 * torch.nn.functional.one_hot(labels, 2) - 1)
        return x, labels

    monkeypatch.setattr(linprobe_module, "cached_features", separable)
    assert main(["linprobe", "--checkpoint", str(ckpt), "--data", str(breast), "train.epochs=3",
                 "train.warmup_epochs=1", "train.batch_size=64", "train.optimizer=sgd", "train.lr=0.1",
                 "train.progress=false", f"output_dir={tmp_path}"]) == 0
    metrics = json.loads((tmp_path / "linprobe_metrics.json").read_text())["metrics"]
    assert metrics["top1"] == 100.0 and metrics["auc"] == 1.0 and metrics["num_images"] == 156


def test_an_override_does_not_leak_into_the_next_run_of_the_same_process(tiny_checkpoint, tmp_path, capsys):
    """Two probes in one Python process (a notebook, an lr sweep): the second, without overrides, runs
    the recipe (blr 0.1 at batch 16 -> lr 0.00625), not the first one's train.lr."""
    ckpt, breast = tiny_checkpoint
    common = ["linprobe", "--checkpoint", str(ckpt), "--data", str(breast), "data.labels_per_class=8",
              "data.val_split=null", "train.epochs=1", "train.warmup_epochs=0", "train.progress=false"]
    assert main([*common, "train.lr=0.5", f"output_dir={tmp_path / 'a'}"]) == 0
    assert "lars lr 0.5," in capsys.readouterr().out
    assert main([*common, f"output_dir={tmp_path / 'b'}"]) == 0
    assert "lars lr 0.00625," in capsys.readouterr().out


def test_linprobe_random_encoder_and_label_fraction(tiny_checkpoint, tmp_path, capsys):
    ckpt, breast = tiny_checkpoint
    assert main(["linprobe", "--checkpoint", str(ckpt), "--data", str(breast), "linprobe.init=random",
                 "data.labels_per_class=8", "data.val_split=null", "train.epochs=2", "train.warmup_epochs=0",
                 "train.progress=false", f"output_dir={tmp_path}"]) == 0
    text = capsys.readouterr().out
    assert "16 of 546 images" in text and "batch_size lowered" in text and "randomly initialised" in text
    assert json.loads((tmp_path / "linprobe_metrics.json").read_text())["reported"] == "last"


def test_linprobe_without_cache_keeps_encoder_frozen(tiny_checkpoint, tmp_path):
    ckpt, breast = tiny_checkpoint
    assert main(["linprobe", "--checkpoint", str(ckpt), "--data", str(breast), "linprobe.cache_features=false",
                 "data.labels_per_class=32", "data.val_split=null", "train.epochs=1", "train.warmup_epochs=0",
                 "train.batch_size=32", "train.progress=false", f"output_dir={tmp_path}"]) == 0
    saved = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    encoder, _ = load_encoder(ckpt)
    # the augmented path trains only the head: the encoder weights in the probe checkpoint are untouched
    assert torch.equal(saved["encoder.blocks.0.attn.qkv.weight"], encoder.blocks[0].attn.qkv.weight)
    assert not torch.equal(saved["head.weight"], torch.zeros_like(saved["head.weight"]))
    assert json.loads((tmp_path / "linprobe_metrics.json").read_text())["metrics"]["num_images"] == 156


def test_linprobe_channel_mismatch_is_a_clear_error(tiny_checkpoint, blood, tmp_path, capsys):
    ckpt, _ = tiny_checkpoint
    assert main(["linprobe", "--checkpoint", str(ckpt), "--data", str(blood), f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "takes 1 channels" in err and "has 3" in err and "fine-tune instead" in err
