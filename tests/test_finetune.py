"""Fine-tuning: layer-decay groups, position-table interpolation, channel adaptation, a tiny end-to-end run."""

import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from mimkit.cli import main
from mimkit.config import load_config
from mimkit.engine.trainer import pretrain
from mimkit.models.classifier import ViTClassifier, transfer_encoder_weights
from mimkit.models.pos_embed import interpolate_pos_embed, sincos_2d
from mimkit.models.vit import MaskedViT
from tests.conftest import TINY_MAE, shared_file
from tests.reference import split_tensors

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


def _reference_resample(table: torch.Tensor, old: int, new: tuple[int, int]) -> torch.Tensor:
    """methods.md §0.11 written out: [CLS] row kept; patch rows as a [1, D, old, old] grid (row-major),
    bicubic with align_corners=False to ``new`` = (rows, columns), flattened row-major again."""
    d = table.shape[-1]
    grid = table[0, 1:].reshape(old, old, d).permute(2, 0, 1).unsqueeze(0)
    out = F.interpolate(grid, size=new, mode="bicubic", align_corners=False)
    return torch.cat([table[:, :1], out[0].permute(1, 2, 0).reshape(1, new[0] * new[1], d)], dim=1)


@pytest.mark.parametrize("old,new", [(7, (5, 9)), (7, (14, 14)), (6, (4, 9)), (4, (3, 2))])
def test_pos_embed_interpolation_equals_bicubic_on_the_grid(old, new):
    """A random table (so every resampling choice shows) against the reference, non-square grids included;
    (6, (4, 9)) keeps the number of patches, so only the grid shape says that resampling is due."""
    table = torch.randn(1, 1 + old * old, 16, generator=torch.Generator().manual_seed(old))
    out = interpolate_pos_embed(table, new)
    expected = _reference_resample(table, old, new)
    assert out.shape == expected.shape == (1, 1 + new[0] * new[1], 16)
    assert torch.equal(out[:, :1], table[:, :1])  # [CLS] row kept
    assert torch.allclose(out, expected, atol=1e-5)
    # The reference tells a transposed grid and nearest-neighbour resampling apart from the intended one.
    swapped = _reference_resample(table, old, new[::-1])
    swapped = swapped[:, 1:].reshape(new[1], new[0], 16).transpose(0, 1).reshape(1, -1, 16)
    nearest = F.interpolate(table[0, 1:].reshape(old, old, 16).permute(2, 0, 1)[None], size=new, mode="nearest")
    assert not torch.allclose(expected[:, 1:], swapped, atol=1e-2)
    assert not torch.allclose(expected[:, 1:], nearest[0].permute(1, 2, 0).reshape(1, -1, 16), atol=1e-2)


def test_pos_embed_interpolation_int_grid_is_square():
    table = sincos_2d(16, 7)
    assert torch.allclose(interpolate_pos_embed(table, 14), _reference_resample(table, 7, (14, 14)), atol=1e-5)


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
    model = ViTClassifier(num_classes=4, **TINY_VIT, in_chans=3)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=4, embed_dim=32,
                            depth=3, num_heads=2, num_classes=4, global_pool="avg", fc_norm=True)
    vit.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 28, 28)
    model.eval(), vit.eval()
    assert torch.allclose(vit(x), model.logits(x), atol=1e-5)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    breast = shared_file("breastmnist.npz")
    out = tmp_path_factory.mktemp("tiny_ft")
    pretrain(load_config(None, [*TINY_MAE, f"data.path={breast}", f"output_dir={out}", "train.epochs=1",
                                "train.warmup_epochs=0", "train.batch_size=64", "train.progress=false"]))
    return out / "last.pt", breast


def timm_top1_and_auc(checkpoint, data) -> tuple[float, float]:
    """Test-split top-1 % and AUC of a fine-tuned checkpoint, recomputed outside mimkit's model code: its
    weights in timm's VisionTransformer, images normalised by hand, accuracy by numpy, AUC by scikit-learn."""
    obj = torch.load(checkpoint, weights_only=True)
    mc = obj["model_config"]
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=mc["img_size"],
                            patch_size=mc["patch_size"], embed_dim=mc["embed_dim"], depth=mc["depth"],
                            num_heads=mc["num_heads"], mlp_ratio=mc["mlp_ratio"], in_chans=mc["in_chans"],
                            num_classes=mc["num_classes"], global_pool="avg" if mc["global_pool"] else "token",
                            fc_norm=mc["global_pool"]).eval()
    vit.load_state_dict(obj["model"], strict=True)
    images, labels = split_tensors(data, "test", obj["data_stats"]["mean"], obj["data_stats"]["std"])
    with torch.no_grad():
        logits = vit(images).double()
    top1 = 100.0 * float(np.mean(logits.argmax(1).numpy() == labels.numpy()))
    return top1, float(roc_auc_score(labels.numpy(), logits.softmax(1)[:, 1].numpy()))


def test_finetune_reports_the_accuracy_of_its_saved_checkpoints(tiny_checkpoint, tmp_path, capsys):
    ckpt, breast = tiny_checkpoint
    out = tmp_path / "ft"
    code = main(["finetune", "--checkpoint", str(ckpt), "--data", str(breast), f"output_dir={out}",
                 "train.epochs=2", "train.warmup_epochs=0", "train.batch_size=64", "train.progress=false",
                 "finetune.mixup=0.8", "finetune.cutmix=1.0"])
    assert code == 0
    result = json.loads((out / "finetune_metrics.json").read_text())
    assert result["reported"] == "best" and (out / "best.pt").is_file() and (out / "last.pt").is_file()
    for name in ("best", "last"):
        top1, auc = timm_top1_and_auc(out / f"{name}.pt", breast)
        m = result[name]["metrics"]
        # AUC to 1e-3 (~5 of the 42 x 114 pairs): near-equal probabilities may order differently in float32
        assert m["top1"] == pytest.approx(top1) and m["auc"] == pytest.approx(auc, abs=1e-3), name
        assert m["num_images"] == 156 and sum(map(sum, m["confusion_matrix"])) == 156
    m = result["metrics"]
    assert m == result["best"]["metrics"]  # the reported numbers are best.pt's
    assert "top5" not in m  # two classes
    assert len(m["per_class_accuracy"]) == 2 and m["class_names"] == list(m["per_class_accuracy"])
    assert (out / "finetune_metrics_confusion.png").stat().st_size > 1000
    assert f"test: top-1 {m['top1']:.2f} %" in capsys.readouterr().out

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
