"""k-NN against a brute-force reference, and the user-facing commands on a tiny checkpoint."""

import json
import subprocess
import sys
from argparse import Namespace

import pytest
import torch

from mimkit.cli import main
from mimkit.config import load_config
from mimkit.engine.trainer import pretrain
from mimkit.eval.knn import weighted_knn
from tests.conftest import REPO, TINY_MAE


def brute_force_knn(train_x, train_y, test_x, k, t, num_classes):
    """One query at a time, straight from the DINO description."""
    train_x = train_x / train_x.norm(dim=1, keepdim=True)
    preds = []
    for q in test_x / test_x.norm(dim=1, keepdim=True):
        sims = train_x @ q
        order = sorted(range(len(sims)), key=lambda i: -sims[i].item())[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[train_y[i]] += torch.exp(sims[i] / t).item()
        preds.append(max(range(num_classes), key=lambda c: votes[c]))
    return torch.tensor(preds)


@pytest.mark.parametrize("num_test", [7, 99, 250])
def test_weighted_knn_matches_brute_force(num_test):
    g = torch.Generator().manual_seed(num_test)
    train_x, train_y = torch.randn(300, 16, generator=g), torch.randint(0, 4, (300,), generator=g)
    test_x, test_y = torch.randn(num_test, 16, generator=g), torch.randint(0, 4, (num_test,), generator=g)
    for k in (1, 5, 20):
        expected = (brute_force_knn(train_x, train_y, test_x, k, 0.07, 4) == test_y).float().mean().item() * 100
        got = weighted_knn(train_x, train_y, test_x, test_y, k=[k], temperature=0.07, num_classes=4, chunk_size=64)
        assert got[k]["top1"] == pytest.approx(expected)
        assert "top5" not in got[k]


def test_knn_top5_and_clamped_k():
    x = torch.eye(8)
    res = weighted_knn(x, torch.arange(8), x, torch.arange(8), k=[1, 100], num_classes=8)
    assert res[1]["top1"] == 100.0 and res[8]["top5"] == 100.0 and 100 not in res


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from tests.conftest import shared_file

    breast = shared_file("breastmnist.npz")
    out = tmp_path_factory.mktemp("tiny")
    pretrain(load_config(None, [*TINY_MAE, f"data.path={breast}", f"output_dir={out}", "train.epochs=1",
                                "train.warmup_epochs=0", "train.batch_size=64", "train.progress=false"]))
    return out / "last.pt", breast


def test_knn_command_prints_table_and_writes_json(tiny_checkpoint, tmp_path, capsys):
    ckpt, data = tiny_checkpoint
    assert main(["knn", "--checkpoint", str(ckpt), "--data", str(data), "--k", "5", "20",
                 "--out", str(tmp_path / "knn.json")]) == 0
    text = capsys.readouterr().out
    assert "546 train / 156 test" in text
    result = json.loads((tmp_path / "knn.json").read_text())
    assert set(result["accuracy"]) == {"5", "20"} and 0 <= result["accuracy"]["20"]["top1"] <= 100


def test_visualize_writes_png(tiny_checkpoint, tmp_path):
    ckpt, data = tiny_checkpoint
    out = tmp_path / "rec.png"
    assert main(["visualize", "--what", "reconstruction", "--checkpoint", str(ckpt), "--data", str(data),
                 "--out", str(out), "--num-images", "2"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reconstruction_panels_denormalise_norm_pix(tiny_checkpoint):
    from mimkit.loading import build_from_checkpoint
    from mimkit.viz.reconstruction import reconstruction_panels

    model, _ = build_from_checkpoint(tiny_checkpoint[0])
    images = torch.randn(2, 1, 28, 28)
    panels = reconstruction_panels(model, images, torch.rand(2, 49))
    visible = panels["mask"] == 0
    # visible pixels are pasted from the original; masked ones come from the (de-normalised) prediction
    assert torch.equal(panels["reconstruction + visible"][visible], images[visible])
    assert panels["mask"].sum() == 2 * (49 - 12) * 16


def test_pickled_checkpoint_needs_explicit_flag(tiny_checkpoint, tmp_path, capsys):
    ckpt, data = tiny_checkpoint
    legacy = tmp_path / "legacy.pth"
    obj = torch.load(ckpt, weights_only=True)
    obj["args"] = Namespace(lr=1.0)  # like official MAE training checkpoints
    torch.save(obj, legacy)
    assert main(["knn", "--checkpoint", str(legacy), "--data", str(data), "--k", "5"]) == 2
    err = capsys.readouterr().err
    assert "--allow-pickle" in err and "run code" in err
    assert main(["knn", "--checkpoint", str(legacy), "--data", str(data), "--k", "5", "--allow-pickle"]) == 0


@pytest.mark.parametrize("args,message", [
    (["pretrain", "train.epohcs=2"], "Did you mean train.epochs"),
    (["pretrain", "data.path=/no/such/folder"], "/no/such/folder"),
    (["knn", "--checkpoint", "/no/such.pt", "--data", "digits"], "does not exist"),
])
def test_cli_errors_are_one_line_and_exit_2(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "mimkit", *args, *([f"output_dir={tmp_path / 'o'}"] if args[0] == "pretrain" else [])],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_demo_runs_offline_and_reports_both_networks(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "1"]) == 0
    report = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert 0 < report["knn_top1_k20_untrained"] <= 100 and 0 < report["knn_top1_k20_pretrained"] <= 100
    assert (tmp_path / "demo" / "reconstruction.png").read_bytes()[:4] == b"\x89PNG"
    assert "untrained network" in capsys.readouterr().out


def test_knn_label_fraction_and_output_dir(tiny_checkpoint, tmp_path, capsys):
    ckpt, data = tiny_checkpoint
    assert main(["knn", "--checkpoint", str(ckpt), "--data", str(data), "--k", "5", "--pool", "mean",
                 "--no-final-norm", "data.labels_per_class=7", f"output_dir={tmp_path}"]) == 0
    text = capsys.readouterr().out
    assert "14 of 546 images" in text and "14 train / 156 test" in text
    result = json.loads((tmp_path / "knn_metrics.json").read_text())
    assert result["labels_per_class"] == 7 and result["pool"] == "mean" and result["final_norm"] is False


def _extract_in_two_processes(rank, world, port, out_dir):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch.distributed as dist

    from mimkit.eval.features import extract_features
    from mimkit.models.vit import MaskedViT

    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    enc = MaskedViT(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2)
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(11, 1, 8, 8, generator=g), torch.arange(11))
    feats, labels = extract_features(enc, data, batch_size=4)
    torch.save({"feats": feats, "labels": labels}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_features_are_all_gathered_in_dataset_order(tmp_path):
    """Under DDP each rank encodes every other image; all ranks end with the single-process bank (odd size)."""
    import socket

    import torch.multiprocessing as mp

    from mimkit.eval.features import extract_features
    from mimkit.models.vit import MaskedViT

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_extract_in_two_processes, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    enc = MaskedViT(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2)
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(11, 1, 8, 8, generator=g), torch.arange(11))
    ref, ref_labels = extract_features(enc, data, batch_size=4)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(got["labels"], ref_labels)
        assert torch.allclose(got["feats"], ref, atol=1e-5)
