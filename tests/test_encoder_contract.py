"""The encoder contract: the same knn / linprobe / finetune / visualize commands on a Swin
checkpoint as on a ViT one, with evaluation that names no concrete encoder class."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mimkit.checkpoint import load_file, save_atomic
from mimkit.cli import main
from mimkit.registry import create_model
from tests.conftest import REPO
from tests.reference import numpy_weighted_knn

SWIN = {"name": "swin_tiny_patch2_window7_28", "in_chans": 1, "embed_dim": 16, "depths": [1, 2],
        "num_heads": [1, 2]}
STATS = {"mean": [0.4], "std": [0.25]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny 4-class grey npz and a mimkit checkpoint of a (randomly initialised) tiny Swin."""
    root = tmp_path_factory.mktemp("swin")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 96)
    images = (rng.integers(0, 100, (96, 28, 28)) + 40 * labels[:, None, None]).astype(np.uint8)
    np.savez(root / "tiny.npz", train_images=images[:64], train_labels=labels[:64, None],
             val_images=images[64:80], val_labels=labels[64:80, None],
             test_images=images[80:], test_labels=labels[80:, None])
    torch.manual_seed(0)
    model = create_model(**SWIN)
    save_atomic({"format": "mimkit", "model_config": SWIN, "model": model.state_dict(), "data_stats": STATS,
                 "task": "pretrain", "epoch": 0}, root / "swin.pt")
    return root, model.eval()


def _normalised(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    npz = np.load(root / "tiny.npz")
    x = torch.from_numpy(npz[f"{split}_images"]).float()[:, None] / 255
    return (x - STATS["mean"][0]) / STATS["std"][0], torch.from_numpy(npz[f"{split}_labels"][:, 0]).long()


def test_knn_on_swin_mean_pools_by_default_and_equals_a_numpy_twin(world, capsys):
    root, model = world
    out = root / "knn.json"
    assert main(["knn", "--checkpoint", str(root / "swin.pt"), "--data", str(root / "tiny.npz"), "--k", "5",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["pool"] == "mean" and "mean token" in capsys.readouterr().out
    (train_x, train_y), (test_x, test_y) = _normalised(root, "train"), _normalised(root, "test")
    with torch.no_grad():  # the mean of the last stage's tokens after the final norm, by hand
        bank = model.encode(train_x).tokens.mean(1)
        queries = model.encode(test_x).tokens.mean(1)
    expected = numpy_weighted_knn(bank, train_y, queries, test_y, 5, 0.07)
    assert result["accuracy"]["5"]["top1"] == pytest.approx(expected)


def test_cls_pooling_on_swin_is_refused_in_one_sentence(world, capsys):
    root, _ = world
    code = main(["knn", "--checkpoint", str(root / "swin.pt"), "--data", str(root / "tiny.npz"), "--pool", "cls"])
    err = capsys.readouterr().err
    assert code == 2 and "needs a [CLS] token, which this swin encoder does not have: use mean pooling" in err


@pytest.mark.parametrize("protocol", ["mae", "dino"])
def test_linprobe_on_swin_runs_both_protocols(world, protocol, tmp_path):
    root, _ = world
    extra = ["linprobe.n_last_blocks=2"] if protocol == "dino" else []
    assert main(["linprobe", "--checkpoint", str(root / "swin.pt"), "--data", str(root / "tiny.npz"),
                 f"output_dir={tmp_path}", f"linprobe.protocol={protocol}", "train.epochs=1", "train.warmup_epochs=0",
                 "train.batch_size=16", "train.progress=false", *extra]) == 0
    metrics = json.loads((tmp_path / "linprobe_metrics.json").read_text())
    assert metrics["task"] == "linprobe"
    head = load_file(tmp_path / "last.pt")
    width = 32 * (2 if protocol == "dino" else 1)  # last stage 32 wide; DINO: the last 2 blocks concatenated
    assert any(v.shape[-1] == width for k, v in head["model"].items() if k.endswith("weight") and v.ndim == 2)


def test_finetune_on_swin_transfers_every_stage_and_gives_a_timm_swin(world, tmp_path):
    """lr 0: the fine-tuned classifier holds exactly the pretrained stages; its state dict is timm's."""
    import timm

    root, model = world
    assert main(["finetune", "--checkpoint", str(root / "swin.pt"), "--data", str(root / "tiny.npz"),
                 f"output_dir={tmp_path}", "train.epochs=1", "train.warmup_epochs=0", "train.batch_size=16",
                 "train.lr=0", "train.min_lr=0", "train.progress=false"]) == 0
    ckpt = load_file(tmp_path / "last.pt")
    assert ckpt["model_config"]["family"] == "swin"
    pretrained = model.state_dict()
    stages = [k for k in pretrained if k.startswith(("patch_embed.", "layers.", "norm."))]
    assert stages and all(torch.equal(ckpt["model"][k], pretrained[k]) for k in stages)
    timm_swin = timm.models.swin_transformer.SwinTransformer(
        img_size=28, patch_size=2, in_chans=1, embed_dim=16, depths=(1, 2), num_heads=(1, 2), window_size=7,
        num_classes=4)
    timm_swin.load_state_dict(ckpt["model"], strict=True)
    assert (tmp_path / "finetune_metrics.json").is_file()


def test_finetune_on_swin_at_another_size_and_window_resamples_the_bias_tables(world, tmp_path, capsys):
    """28 px / window 7 -> 56 px / window 14 (as SimMIM's 192 px / 6 -> 224 px / 7): bias tables 13x13 -> 27x27,
    timm's resize_rel_pos_bias_table of the pretrained table; a window that does not tile is one sentence."""
    from timm.layers import resize_rel_pos_bias_table

    root, model = world
    args = ["finetune", "--checkpoint", str(root / "swin.pt"), "--data", str(root / "tiny.npz"),
            "train.epochs=1", "train.warmup_epochs=0", "train.batch_size=16", "train.lr=0", "train.min_lr=0",
            "train.progress=false", "finetune.img_size=56"]
    assert main([*args, f"output_dir={tmp_path / 'a'}", "finetune.window_size=14"]) == 0
    assert "relative position bias tables resampled" in capsys.readouterr().out
    ckpt = load_file(tmp_path / "a" / "last.pt")
    assert (ckpt["model_config"]["img_size"], ckpt["model_config"]["window_size"]) == (56, 14)
    key = "layers.1.blocks.0.attn.relative_position_bias_table"
    expected = resize_rel_pos_bias_table(model.state_dict()[key], new_window_size=(14, 14), new_bias_shape=(27 ** 2, 2))
    assert torch.equal(ckpt["model"][key], expected)
    assert main([*args, f"output_dir={tmp_path / 'b'}", "finetune.img_size=32"]) == 2  # 16x16 grid, window 7
    err = capsys.readouterr().err
    assert "window_size 7 does not divide" in err and "finetune.window_size" in err and "Traceback" not in err
    assert not (tmp_path / "b" / "last.pt").exists()


def test_attention_figures_on_swin_say_what_is_missing(world, capsys, tmp_path):
    root, _ = world
    code = main(["visualize", "--what", "attention", "--checkpoint", str(root / "swin.pt"), "--data",
                 str(root / "tiny.npz"), "--out", str(tmp_path / "a.png")])
    assert code == 2 and "needs global attention, which this swin encoder does not have" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()


def test_evaluation_checkpoints_and_figures_name_no_concrete_encoder_class():
    classes = re.compile(r"\b(MaskedViT|SwinEncoder|ViTClassifier|SwinClassifier)\b")
    files = [*(REPO / "mimkit/eval").glob("*.py"), *(REPO / "mimkit/viz").glob("*.py"), REPO / "mimkit/checkpoint.py"]
    offenders = [f"{f.name}:{i + 1}" for f in files for i, line in enumerate(f.read_text().splitlines())
                 if classes.search(line)]
    assert not offenders, offenders


@pytest.mark.parametrize("preset,extra", [
    ("simmim_vit_tiny_patch4", ["model.depth=1", "model.embed_dim=32", "model.num_heads=2"]),
    ("simmim_swin_tiny_28", ["model.embed_dim=16", "model.depths=[1,1]", "model.num_heads=[1,2]"]),
])
def test_simmim_pretrains_through_the_engine_and_its_encoder_is_evaluated_unchanged(world, tmp_path, preset, extra):
    from mimkit.config import load_config
    from mimkit.engine.trainer import pretrain
    from mimkit.loading import load_encoder

    root, _ = world
    summary = pretrain(load_config(None, [f"model.name={preset}", *extra, f"data.path={root / 'tiny.npz'}",
                                          f"output_dir={tmp_path}", "train.epochs=1", "train.warmup_epochs=0",
                                          "train.batch_size=16", "train.progress=false"]))
    assert summary["final_epoch"] == 1
    encoder, _ = load_encoder(tmp_path / "last.pt")
    saved = load_file(tmp_path / "last.pt")["model"]
    assert all(torch.equal(v, saved["encoder." + k]) for k, v in encoder.state_dict().items())
    out = tmp_path / "knn.json"
    assert main(["knn", "--checkpoint", str(tmp_path / "last.pt"), "--data", str(root / "tiny.npz"), "--k", "5",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["pool"] == ("cls" if "vit" in preset else "mean")
