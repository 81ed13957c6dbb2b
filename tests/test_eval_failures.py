"""Evaluation failure paths: unreadable val/test splits, the linear-probe feature cache (content
keys, corrupt files, DDP agreement), where ``finetune --eval`` writes, figures of small splits."""

import json
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from mimkit.checkpoint import load_file
from mimkit.cli import main
from mimkit.config import load_config
from mimkit.data import ImageDataset, build_transform, compute_channel_stats, load_dataset
from mimkit.errors import DataError
from mimkit.eval.common import load_labelled_split
from mimkit.eval.features import cache_path, cached_features, file_fingerprint, path_fingerprint
from mimkit.eval.linprobe import LINPROBE_DEFAULTS, _cache_key
from mimkit.models.families import build_classifier_from_checkpoint
from mimkit.models.vit import MaskedViT
from mimkit.registry import create_model
from mimkit.viz import attention as viz_attention
from mimkit.viz import masks as viz_masks
from mimkit.viz import reconstruction as viz_reconstruction

TINY_VIT = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2)
FEATURES = dict(pool="cls", final_norm=True, n_last_blocks=1, avgpool=False)
SHORT_RUN = ["train.epochs=1", "train.warmup_epochs=0", "train.batch_size=8", "train.progress=false",
             "train.precision=fp32"]
RESULT_FILES = ("last.pt", "best.pt", "summary.json", "finetune_metrics.json", "linprobe_metrics.json")


def image_folder(root: Path, splits=("train", "val", "test"), per_class: int = 4, broken_in: str | None = None) -> Path:
    """ImageFolder-style 28x28 grey PNGs in classes a/ and b/ per split; ``broken_in`` adds a corrupt PNG there."""
    rng = np.random.default_rng(0)
    for split in splits:
        for c in "ab":
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    if broken_in:
        (root / broken_in / "a" / "broken.png").write_bytes(b"not a png")
    return root


def tiny_encoder() -> MaskedViT:
    torch.manual_seed(0)
    return MaskedViT(**TINY_VIT).eval()


@pytest.fixture(scope="module")
def encoder_checkpoint(tmp_path_factory) -> Path:
    """An encoder-only checkpoint in the official MAE layout (no training needed)."""
    path = tmp_path_factory.mktemp("enc") / "encoder.pth"
    torch.save({"model": tiny_encoder().state_dict()}, path)
    return path


# -- val / test splits ---------------------------------------------------------------------------
def test_a_missing_optional_split_is_skipped_but_an_unreadable_one_names_the_file(tmp_path):
    no_val = image_folder(tmp_path / "no_val", splits=("train", "test"))
    assert load_labelled_split(no_val, "val", required=False) is None
    with pytest.raises(DataError, match="Unknown split 'val'"):
        load_labelled_split(no_val, "val")  # required: the data layer's error
    broken = image_folder(tmp_path / "broken", broken_in="val")
    with pytest.raises(DataError, match=r"val/a/broken\.png"):
        load_labelled_split(broken, "val", required=False)  # the old code returned None here
    npz = tmp_path / "train_only.npz"
    np.savez(npz, train_images=np.zeros((4, 28, 28), np.uint8), train_labels=np.arange(4) % 2)
    assert load_labelled_split(npz, "val", required=False) is None


@pytest.mark.parametrize("split", ["val", "test"])
@pytest.mark.parametrize("command", ["finetune", "linprobe"])
def test_a_corrupt_evaluation_image_fails_before_the_first_step(tmp_path, encoder_checkpoint, command, split, capsys):
    """Old code: a bad val/ image silently dropped validation; a bad test/ image failed after training."""
    data = image_folder(tmp_path / "data", broken_in=split)
    out = tmp_path / "run"
    code = main([command, "--checkpoint", str(encoder_checkpoint), "--data", str(data), *SHORT_RUN,
                 f"output_dir={out}"])
    captured = capsys.readouterr()
    assert code == 2
    assert f"{split}/a/broken.png" in captured.err and "Traceback" not in captured.err
    assert "epoch 1/" not in captured.out  # not a single epoch ran
    assert not [name for name in RESULT_FILES if (out / name).exists()]


def test_a_missing_val_split_trains_with_a_note_and_reports_last(tmp_path, encoder_checkpoint, capsys):
    data = image_folder(tmp_path / "data", splits=("train", "test"))
    out = tmp_path / "run"
    assert main(["linprobe", "--checkpoint", str(encoder_checkpoint), "--data", str(data), *SHORT_RUN,
                 f"output_dir={out}"]) == 0
    assert "no 'val' split: best.pt is not kept" in capsys.readouterr().out
    result = json.loads((out / "linprobe_metrics.json").read_text())
    assert result["reported"] == "last" and result["metrics"]["num_images"] == 8 and not (out / "best.pt").exists()


# -- linear-probe feature cache --------------------------------------------------------------------
def _linprobe_cfg(data: Path, *overrides: str):
    return load_config(None, [f"data.path={data}", *overrides], defaults=LINPROBE_DEFAULTS)


def test_cache_key_follows_the_data_content_the_precision_and_the_checkpoint(tmp_path, encoder_checkpoint):
    stats = {"mean": [0.5], "std": [0.25]}
    npz = tmp_path / "data.npz"
    images = np.zeros((4096, 28, 28), np.uint8)  # ~3 MiB: the changed pixel is in neither hashed MiB
    np.savez(npz, train_images=images, train_labels=np.arange(4096) % 2)
    key = _cache_key(_linprobe_cfg(npz), str(encoder_checkpoint), FEATURES, stats)
    assert key == _cache_key(_linprobe_cfg(npz), str(encoder_checkpoint), FEATURES, stats)  # stable
    assert key["precision"] == "fp32"
    assert _cache_key(_linprobe_cfg(npz, "train.precision=bf16"), str(encoder_checkpoint), FEATURES, stats) != key

    # Same size and mtime (a `cp -p` of other content): the npz's zip directory CRC still changes it.
    st = os.stat(npz)
    images[2048, 14, 14] = 1
    np.savez(npz, train_images=images, train_labels=np.arange(4096) % 2)
    os.utime(npz, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(npz).st_size == st.st_size and os.stat(npz).st_mtime_ns == st.st_mtime_ns
    assert _cache_key(_linprobe_cfg(npz), str(encoder_checkpoint), FEATURES, stats)["data_fingerprint"] != \
        key["data_fingerprint"]

    # A folder: an added image, or a rewritten one, changes its fingerprint.
    folder = image_folder(tmp_path / "folder", splits=("train",), per_class=1)
    before = path_fingerprint(folder)
    Image.fromarray(np.ones((28, 28), np.uint8)).save(folder / "train" / "a" / "new.png")
    added = path_fingerprint(folder)
    os.utime(folder / "train" / "b" / "0.png", ns=(1, 1))
    assert len({before, added, path_fingerprint(folder)}) == 3

    ckpt = tmp_path / "other.pth"
    torch.save({"model": MaskedViT(**{**TINY_VIT, "embed_dim": 16}).state_dict()}, ckpt)
    assert file_fingerprint(ckpt) != file_fingerprint(encoder_checkpoint)


@pytest.fixture(scope="module")
def probe_inputs(tmp_path_factory):
    """A tiny encoder and 10 labelled images, with their stats."""
    root = tmp_path_factory.mktemp("probe")
    rng = np.random.default_rng(3)
    npz = root / "small.npz"
    np.savez(npz, test_images=rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), test_labels=np.arange(10) % 3)
    ds = load_dataset(npz, "test")
    mean, std = compute_channel_stats(ds)
    return npz, ds, {"mean": mean, "std": std}


def _features(ds, stats, cache_dir, key, log=print):
    return cached_features(tiny_encoder(), ds, stats, FEATURES, cache_key=key, cache_dir=cache_dir, device="cpu",
                           precision="fp32", log=log)


CORRUPTIONS = {
    "truncated": lambda path, x, y, key: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
    "not a torch file": lambda path, x, y, key: path.write_text("hello"),
    "missing keys": lambda path, x, y, key: torch.save({"features": torch.zeros_like(x)}, path),
    "wrong shape": lambda path, x, y, key: torch.save({"features": x[:, :-1], "labels": y, "key": key}, path),
    "wrong dtype": lambda path, x, y, key: torch.save({"features": x.double(), "labels": y, "key": key}, path),
    "other key": lambda path, x, y, key: torch.save(
        {"features": torch.zeros_like(x), "labels": y, "key": {**key, "split": "val"}}, path),
    "other labels": lambda path, x, y, key: torch.save({"features": torch.zeros_like(x), "labels": y + 1, "key": key},
                                                       path),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_or_stale_cache_is_rebuilt_with_a_note(tmp_path, probe_inputs, corruption, capsys):
    _, ds, stats = probe_inputs
    key = {"run": "test", "split": "test"}
    ref_x, ref_y = _features(ds, stats, None, None)  # no cache
    _features(ds, stats, tmp_path, key)
    path = cache_path(tmp_path, key)
    assert path.is_file()
    capsys.readouterr()
    CORRUPTIONS[corruption](path, ref_x, ref_y, key)

    x, y = _features(ds, stats, tmp_path, key)
    note = capsys.readouterr().out
    assert f"feature cache {path}" in note and "extracting the features again" in note
    assert torch.equal(x, ref_x) and torch.equal(y, ref_y)  # extracted, not the poisoned zeros
    x2, _ = _features(ds, stats, tmp_path, key)  # the rebuilt file is whole again
    assert f"features read from {path}" in capsys.readouterr().out and torch.equal(x2, ref_x)


def _cache_worker(rank: int, world: int, port: int, npz: str, root: str) -> None:
    """One DDP rank: per-rank cache folders ``root/CASE/rankR`` (no shared filesystem)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=20))
    ds = load_dataset(npz, "test")
    mean, std = compute_channel_stats(ds)
    for case in ("rank0_hit", "rank1_hit", "both_miss"):
        x, y = _features(ds, {"mean": mean, "std": std}, f"{root}/{case}/rank{rank}", {"case": "ddp"}, log=None)
        torch.save({"x": x, "y": y}, f"{root}/{case}/out{rank}.pt")
    dist.destroy_process_group()


def test_ddp_ranks_agree_on_a_cache_only_one_of_them_can_see(tmp_path, probe_inputs):
    """Old code: rank 0 loaded its file while rank 1 extracted and waited in all_gather forever."""
    npz, ds, stats = probe_inputs
    key = {"case": "ddp"}
    ref_x, ref_y = _features(ds, stats, None, None)
    planted = ref_x + 1.0  # a valid file with other numbers: whoever returns them read rank 0's file
    for case, holder in (("rank0_hit", 0), ("rank1_hit", 1)):
        folder = tmp_path / case / f"rank{holder}"
        folder.mkdir(parents=True)
        torch.save({"features": planted, "labels": ref_y, "key": key}, cache_path(folder, key))
    (tmp_path / "both_miss").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.spawn(_cache_worker, args=(2, port, str(npz), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two ranks did not finish: they took different collective paths")
    out = {case: [torch.load(tmp_path / case / f"out{r}.pt", weights_only=True) for r in range(2)]
           for case in ("rank0_hit", "rank1_hit", "both_miss")}
    assert all(torch.equal(o["x"], planted) for o in out["rank0_hit"])  # rank 0's hit, shared with rank 1
    assert all(torch.allclose(o["x"], ref_x, atol=1e-6) for o in out["rank1_hit"])  # only rank 0 decides
    assert all(torch.allclose(o["x"], ref_x, atol=1e-6) for o in out["both_miss"])
    assert all(torch.equal(o["y"], ref_y) for case in out.values() for o in case)
    assert cache_path(tmp_path / "both_miss" / "rank0", key).is_file()  # only rank 0 writes
    assert not (tmp_path / "both_miss" / "rank1").exists() and not (tmp_path / "rank0_hit" / "rank1").exists()


# -- finetune --eval output ------------------------------------------------------------------------
def test_finetune_eval_writes_beside_the_checkpoint_one_file_each(tmp_path, encoder_checkpoint, monkeypatch, capsys):
    data = image_folder(tmp_path / "cells")
    run = tmp_path / "run"
    assert main(["finetune", "--checkpoint", str(encoder_checkpoint), "--data", str(data), *SHORT_RUN,
                 f"output_dir={run}"]) == 0
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    for name, split in (("best", "test"), ("last", "test"), ("best", "val")):
        assert main(["finetune", "--eval", "--checkpoint", str(run / f"{name}.pt"), "--data", str(data),
                     f"data.test_split={split}"]) == 0
        written = run / f"eval_{name}_cells_{split}.json"
        assert f"metrics in {written}" in capsys.readouterr().out
        assert json.loads(written.read_text())["checkpoint"] == str(run / f"{name}.pt")
    assert not list(cwd.iterdir())  # nothing in the working directory

    # The numbers are the checkpoint's own: top-1 by hand from its logits on the test images.
    obj = load_file(run / "best.pt")
    model = build_classifier_from_checkpoint(obj, "best.pt").eval()
    test = load_dataset(data, "test")
    transform = build_transform("eval", 28, obj["data_stats"]["mean"], obj["data_stats"]["std"])
    with torch.no_grad():
        pred = model.logits(torch.stack([transform(test[i][0]) for i in range(len(test))])).argmax(1)
    expected = 100.0 * float((pred == test.labels).float().mean())
    assert json.loads((run / "eval_best_cells_test.json").read_text())["metrics"]["top1"] == pytest.approx(expected)


# -- figures ---------------------------------------------------------------------------------------
def _capture_figures(monkeypatch, module):
    """Record the figures ``module`` saves (row count = axes / columns), then save them as usual."""
    figures = []
    real = module.save_figure

    def spy(fig, path, *args, **kwargs):
        figures.append(fig)
        return real(fig, path, *args, **kwargs)

    monkeypatch.setattr(module, "save_figure", spy)
    return figures


def test_figures_of_a_split_smaller_than_num_images_draw_every_image_with_a_note(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    ds = ImageDataset(rng.integers(0, 256, (3, 28, 28), dtype=np.uint8), np.arange(3), source="tiny [test]")
    mean, std = [0.5], [0.25]
    torch.manual_seed(0)
    mae = create_model("mae_vit_tiny_patch4", in_chans=1, depth=1, decoder_depth=1)
    dama = create_model("dama_vit_tiny_patch4", in_chans=1, depth=1, decoder_depth=1)
    draws = [
        (viz_reconstruction, 4, lambda n, p: viz_reconstruction.draw_reconstructions(mae, ds, mean, std, p, num_images=n)),
        (viz_masks, 5, lambda n, p: viz_masks.draw_dama_masks(dama, ds, mean, std, p, num_images=n)),
        (viz_attention, 5, lambda n, p: viz_attention.draw_attention(tiny_encoder(), ds, mean, std, p, num_images=n)),
    ]
    for module, columns, draw in draws:
        figures = _capture_figures(monkeypatch, module)
        for asked, rows in ((6, 3), (2, 2)):
            path = draw(asked, tmp_path / f"{module.__name__}_{asked}.png")
            note = capsys.readouterr().out
            image_axes = [ax for ax in figures[-1].axes if ax.get_images()]
            assert path.is_file() and len(image_axes) == rows * columns, module.__name__
            assert ("tiny [test] has only 3 images" in note) == (asked > 3), note


def test_auc_ranks_large_logit_margins_that_softmax_rounds_to_one():
    from mimkit.eval.metrics import classification_metrics, log_odds

    # margins 40..50: softmax gives exactly 1.0 for all four in float32 and float64, so AUC would tie at 0.5
    logits = torch.tensor([[0.0, 40.0], [0.0, 45.0], [0.0, 50.0], [0.0, 42.0]])
    assert classification_metrics(logits, torch.tensor([0, 1, 1, 0]))["auc"] == 1.0
    x = torch.randn(6, 4, dtype=torch.float64)
    p = x.softmax(dim=1)
    assert torch.allclose(log_odds(x), (p / (1 - p)).log())
