"""Fine-tuning: layer-decay groups, position-table interpolation, channel adaptation, a tiny end-to-end run."""

import json

import pytest
import torch

from mimkit.cli import main
from mimkit.config import load_config
from mimkit.engine.trainer import pretrain
from mimkit.models.classifier import ViTClassifier, transfer_encoder_weights
from mimkit.models.pos_embed import interpolate_pos_embed, sincos_2d
from mimkit.models.vit import MaskedViT
from tests.conftest import TINY_MAE

TINY_VIT = dict(img_size=28, patch_size=4, embed_dim=32, depth=3, num_heads=2)


def _layer_id(name: str, depth: int) -> int:
    """methods.md §0.7: stem 0, blocks.k k+1, everything else depth+1."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


@pytest.mark.parametrize("global_pool", [True, False])
def test_layer_decay_scales_follow_formula(global_pool):
    decay, depth = 0.6, TINY_VIT["depth"]
    model = ViTClassifier(num_classes=5, global_pool=global_pool, layer_decay=decay, **TINY_VIT)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for group in model.optimizer_param_groups(weight_decay=0.05):
        for p in group["params"]:
            name = names[id(p)]
            seen.add(name)
            assert group["lr_scale"] == pytest.approx(decay ** (depth + 1 - _layer_id(name, depth))), name
            no_decay = p.ndim <= 1 or name in ("pos_embed", "cls_token")
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert seen == {n for n, p in model.named_parameters() if p.requires_grad}
    assert "head.weight" in seen and "pos_embed" in seen  # pos_embed is trained when fine-tuning


def test_pos_embed_interpolation_same_size_is_unchanged():
    table = torch.randn(1, 1 + 49, 16)
    assert interpolate_pos_embed(table, 7) is table
    assert interpolate_pos_embed(table, (7, 7)) is table


def test_pos_embed_interpolation_other_size():
    table = sincos_2d(16, 7)
    out = interpolate_pos_embed(table, 14)
    assert out.shape == (1, 1 + 196, 16)
    assert torch.equal(out[:, :1], table[:, :1])  # [CLS] row kept
    assert not torch.equal(out[:, 1:50], table[:, 1:])
    # a smooth table resampled up and back down again stays close to itself
    back = interpolate_pos_embed(out, 7)
    assert torch.allclose(back, table, atol=0.15)


def test_transfer_adapts_size_and_channels(capsys):
    torch.manual_seed(0)
    source = MaskedViT(**TINY_VIT, in_chans=3)
    target = ViTClassifier(num_classes=3, **{**TINY_VIT, "img_size": 56}, in_chans=1)
    transfer_encoder_weights(source, target)
    text = capsys.readouterr().out
    assert "7x7 to a 14x14" in text and "from 3 to 1 input channels" in text
    assert torch.allclose(target.patch_embed.proj.weight, source.patch_embed.proj.weight.sum(1, keepdim=True))
    assert torch.equal(target.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    assert target.pos_embed.shape == (1, 1 + 196, 32) and target.pos_embed.requires_grad
    # the head starts near zero (std 2e-5) so the first steps do not wreck the pretrained features
    assert target.head.weight.std() < 1e-4


def test_classifier_is_a_timm_vit():
    """A fine-tuned mimkit classifier's weights load strictly into timm's VisionTransformer."""
    import timm

    model = ViTClassifier(num_classes=4, **TINY_VIT, in_chans=3)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=4, embed_dim=32,
                            depth=3, num_heads=2, num_classes=4, global_pool="avg", fc_norm=True)
    vit.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 28, 28)
    model.eval(), vit.eval()
    assert torch.allclose(vit(x), model.logits(x), atol=1e-5)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from tests.conftest import shared_file

    breast = shared_file("breastmnist.npz")
    out = tmp_path_factory.mktemp("tiny_ft")
    pretrain(load_config(None, [*TINY_MAE, f"data.path={breast}", f"output_dir={out}", "train.epochs=1",
                                "train.warmup_epochs=0", "train.batch_size=64", "train.progress=false"]))
    return out / "last.pt", breast


def test_finetune_one_epoch_writes_metrics(tiny_checkpoint, tmp_path, capsys):
    ckpt, breast = tiny_checkpoint
    out = tmp_path / "ft"
    code = main(["finetune", "--checkpoint", str(ckpt), "--data", str(breast), f"output_dir={out}",
                 "train.epochs=1", "train.warmup_epochs=0", "train.batch_size=64", "train.progress=false",
                 "finetune.mixup=0.8", "finetune.cutmix=1.0"])
    assert code == 0
    result = json.loads((out / "finetune_metrics.json").read_text())
    m = result["metrics"]
    assert m["num_images"] == 156 and 0 <= m["top1"] <= 100 and 0 <= m["auc"] <= 1
    assert "top5" not in m  # two classes
    assert sum(map(sum, m["confusion_matrix"])) == 156
    assert len(m["per_class_accuracy"]) == 2 and m["class_names"] == list(m["per_class_accuracy"])
    assert (out / "finetune_metrics_confusion.png").stat().st_size > 1000
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()
    assert result["reported"] == "best"
    assert "test: top-1" in capsys.readouterr().out

    # --eval scores the fine-tuned checkpoint alone, with the same numbers
    code = main(["finetune", "--eval", "--checkpoint", str(out / "best.pt"), "--data", str(breast),
                 f"output_dir={tmp_path / 'ev'}"])
    assert code == 0
    again = json.loads((tmp_path / "ev" / "eval_metrics.json").read_text())["metrics"]
    assert again["top1"] == pytest.approx(m["top1"]) and again["auc"] == pytest.approx(m["auc"])

    # the fine-tuned classifier is also an encoder for k-NN
    assert main(["knn", "--checkpoint", str(out / "last.pt"), "--data", str(breast), "--k", "5"]) == 0


def test_finetune_label_fraction_random_init(tiny_checkpoint, tmp_path, capsys):
    ckpt, breast = tiny_checkpoint
    out = tmp_path / "ft"
    code = main(["finetune", "--checkpoint", str(ckpt), "--data", str(breast), f"output_dir={out}",
                 "finetune.init=random", "data.labels_per_class=10", "data.val_split=null", "train.epochs=1",
                 "train.warmup_epochs=0", "train.progress=false"])
    assert code == 0
    text = capsys.readouterr().out
    assert "20 of 546 images" in text and "init random" in text
    result = json.loads((out / "finetune_metrics.json").read_text())
    assert result["reported"] == "last" and not (out / "best.pt").exists()


def test_finetune_eval_refuses_a_pretraining_checkpoint(tiny_checkpoint, capsys):
    ckpt, breast = tiny_checkpoint
    assert main(["finetune", "--eval", "--checkpoint", str(ckpt), "--data", str(breast)]) == 2
    assert "not a fine-tuned mimkit classifier" in capsys.readouterr().err
