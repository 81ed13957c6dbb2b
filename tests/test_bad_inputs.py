"""Bad inputs, one table: each row runs the real CLI (``mimkit.cli.main``, in-process) and must end in

* exit status 2,
* one line on stderr, ``mimkit CMD: error: <one sentence>``, no traceback, with the row's fragment
  (the problem and its fix),
* no new file that looks like a result (summary.json, *_metrics.json, checkpoints, figures, temp
  files), and every file that existed before (a previous result included) unchanged.

Rows whose fix lives in a file another engineer is changing now are marked xfail with the file
and the change they wait for (``strict=False``: they pass as XPASS once it lands).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import tifffile
import pytest
import torch
from PIL import Image

from mimkit.cli import main
from mimkit.config import load_config
from mimkit.engine.trainer import pretrain
from mimkit.models.vit import MaskedViT
from mimkit.registry import create_model
from mimkit.viz import save_figure
from tests.conftest import TINY_MAE

# A 2-block MAE on 8x8 grey images (2x2 patches of 4 px): a pretraining row takes about a second.
TINY = [*TINY_MAE, "model.img_size=8", "train.epochs=1", "train.warmup_epochs=0", "train.batch_size=8",
        "train.progress=false"]
RESULT_NAMES = {"summary.json", "last.pt", "best.pt", "knn.json", "config.yaml.tmp"}
RESULT_SUFFIXES = {".pt", ".pth", ".png", ".pdf", ".svg", ".tmp"}


class Evil:
    """Unpickling this runs ``touch PWNED`` in the working directory."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _npz_files(root: Path, rng: np.random.Generator) -> None:
    """good.npz (24 grey 8x8 images, 2 classes, three splits) and one broken twin per npz problem."""
    images = rng.integers(0, 256, (24, 8, 8), dtype=np.uint8)
    labels = (np.arange(24) % 2).reshape(-1, 1)
    splits = dict(train_images=images, train_labels=labels, val_images=images[:8], val_labels=labels[:8],
                  test_images=images[:8], test_labels=labels[:8])
    np.savez(root / "good.npz", **splits)
    floats = images.astype(np.float32) / 255
    floats[0, 0, :3] = np.nan  # three NaN pixels
    np.savez(root / "nan.npz", **{**splits, "train_images": floats, "test_images": floats[:8]})
    np.savez(root / "keys.npz", x_train=images, y_train=labels)
    np.savez(root / "float_labels.npz", **{**splits, "train_labels": labels + 0.5})
    np.savez(root / "str_labels.npz", **{**splits, "train_labels": np.array(["benign", "malignant"] * 12)})
    np.savez(root / "short_labels.npz", **{**splits, "train_labels": labels[:10]})
    np.savez(root / "tiny_images.npz", train_images=images[:, :2, :2], train_labels=labels,
             test_images=images[:8, :2, :2], test_labels=labels[:8])


def _folders(root: Path, rng: np.random.Generator) -> None:
    """Image folders: empty, with a corrupt file, with TIFF stacks of two channel counts, unlabelled."""
    (root / "empty").mkdir()
    grey = lambda: rng.integers(0, 256, (8, 8), dtype=np.uint8)  # noqa: E731
    for i in range(16):
        _png(root / "corrupt" / f"a{i:02d}.png", grey())
    (root / "corrupt" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not the rest of a PNG")
    (root / "mixed_stacks").mkdir()
    for name in ("a", "c"):
        tifffile.imwrite(root / "mixed_stacks" / f"{name}.tif", np.zeros((7, 8, 8), np.uint16))
    tifffile.imwrite(root / "mixed_stacks" / "b.tif", np.zeros((5, 8, 8), np.uint16))
    for i in range(4):
        _png(root / "unlabelled" / f"{i}.png", grey())
    for name, broken in (("bad_test", "test"), ("bad_val", "val")):  # train/val/test, one broken file
        for split, count in (("train", 4), ("val", 2), ("test", 2)):
            for c in ("a", "b"):
                for i in range(count):
                    _png(root / name / split / c / f"{i}.png", grey())
        (root / name / broken / "a" / "0.png").write_bytes(b"not an image")


def _checkpoints(root: Path) -> None:
    """A real tiny run, and checkpoints that are wrong in every way the table needs."""
    pretrain(load_config(None, [*TINY, f"data.path={root / 'good.npz'}", f"output_dir={root / 'run'}"]))
    ckpt = (root / "run" / "last.pt").read_bytes()
    (root / "truncated.pt").write_bytes(ckpt[: len(ckpt) // 2])
    (root / "text.pt").write_text("these are my notes, not a checkpoint\n")
    torch.save({"model": Evil()}, root / "evil.pt")
    (root / "evil_run").mkdir()
    shutil.copy(root / "evil.pt", root / "evil_run" / "last.pt")  # a planted last.pt in a run folder
    rgb = {"name": "mae_vit_tiny_patch4", "in_chans": 3, "img_size": 8, "depth": 2, "decoder_depth": 1}
    torch.save({"format": "mimkit", "model_config": rgb, "model": create_model(**rgb).state_dict()}, root / "rgb.pt")
    small = MaskedViT(img_size=8, patch_size=4, in_chans=1, embed_dim=64, depth=2, num_heads=2)
    torch.save(small.state_dict(), root / "small_vit.pt")  # a ViT 64 wide, loaded as ViT-Ti (192)
    torch.save(create_model("vit_tiny_patch4").state_dict(), root / "vit_tiny.pt")  # an encoder, no decoder


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    rng = np.random.default_rng(0)
    _npz_files(root, rng)
    _folders(root, rng)
    _checkpoints(root)
    (root / "afile.txt").write_text("a file where a folder is expected\n")
    (root / "list.yaml").write_text("- train\n- epochs\n")
    (root / "broken.yaml").write_text("train: [1, 2\n")
    return root


@dataclass
class Row:
    """argv: words with {placeholders} (world files, {run} = this row's run folder, {T} = the tiny-MAE
    overrides); fragment: text the message must contain (``re:`` prefix = a regex); setup: may patch
    things and return a reason to skip, or a callable that undoes its change."""

    id: str
    argv: str
    fragment: str
    setup: Callable | None = None


def _no_gpu(monkeypatch, run: Path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _disk_full(monkeypatch, run: Path):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)


def _locked(monkeypatch, run: Path):
    locked = run / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):
        locked.chmod(0o700)
        return "this user (root) can write into a 0o500 folder, so it is not unwritable here"
    return lambda: locked.chmod(0o700)


KNN = "knn --checkpoint {world}/run/last.pt --data {world}/good.npz"
VIZ = "visualize --checkpoint {world}/run/last.pt --data {world}/good.npz"
PRE = "pretrain {T} data.path={world}/good.npz"

ROWS = [
    # --- paths
    Row("data-file-not-folder", "pretrain {T} data.path={world}/afile.txt output_dir={run}",
        "Cannot load {world}/afile.txt: pass a folder of images, a .npz file"),
    Row("data-empty-folder", "pretrain {T} data.path={world}/empty output_dir={run}", "No images found under"),
    Row("data-missing", "knn --checkpoint {world}/run/last.pt --data {world}/nope", "Data path {world}/nope does not exist"),
    Row("config-file-missing", "pretrain --config {world}/nope.yaml {T} output_dir={run}",
        "Config file {world}/nope.yaml does not exist: pass an existing YAML file"),
    Row("config-file-not-a-mapping", "pretrain --config {world}/list.yaml output_dir={run}",
        "holds a list, not a mapping: write it as key: value lines with the keys output_dir, model"),
    Row("config-file-invalid-yaml", "pretrain --config {world}/broken.yaml output_dir={run}",
        "is not valid YAML (while parsing a flow sequence): fix its syntax"),
    Row("output-dir-is-a-file", PRE + " output_dir={world}/afile.txt", "is a file, not a folder: choose another output_dir"),
    Row("output-dir-under-a-file", PRE + " output_dir={world}/afile.txt/run",
        "lies under the file {world}/afile.txt: choose another output_dir"),
    Row("output-dir-unwritable", PRE + " output_dir={run}/locked/run", "is not writable for this user", _locked),
    Row("linprobe-output-dir-is-a-file",
        "linprobe --checkpoint {world}/run/last.pt --data {world}/good.npz output_dir={world}/afile.txt",
        "output_dir {world}/afile.txt is a file, not a folder"),
    Row("knn-out-is-a-folder", KNN + " --out {run}", "--out {run} is a folder, not a file"),
    Row("knn-output-dir-under-a-file", KNN + " output_dir={world}/afile.txt/knn", "lies under the file {world}/afile.txt"),
    Row("visualize-out-is-a-folder", VIZ + " --out {run}", "--out {run} is a folder, not a file: pass a file path"),
    Row("visualize-out-not-an-image", VIZ + " --out {run}/figure.txt", "end it in .png, .pdf or .svg"),
    # --- images
    Row("corrupt-image-raise", "pretrain {T} data.path={world}/corrupt data.on_error=raise output_dir={run}",
        "Cannot read image {world}/corrupt/b.png"),
    Row("corrupt-image-over-the-cap", "pretrain {T} data.path={world}/corrupt output_dir={run}",
        "1 of 17 image files (5.9 %) could not be read while loading, more than data.max_bad_fraction=0.001 "
        "(first: {world}/corrupt/b.png): check the data"),
    Row("corrupt-image-lazy-over-the-cap", "pretrain {T} data.path={world}/corrupt data.in_memory=false "
        "output_dir={run}", "1 of 17 image files (5.9 %) could not be read by epoch 1, more than"),
    Row("mixed-channel-stacks", "pretrain {T} data.path={world}/mixed_stacks data.on_error=raise output_dir={run}",
        "mixed_stacks/b.tif has 5 channels but the dataset has 7: give all TIFF stacks the same channel count"),
    Row("images-smaller-than-patch-knn", "knn --checkpoint {world}/run/last.pt --data {world}/tiny_images.npz",
        "images of 2x2 pixels, smaller than one 4x4 patch"),
    Row("images-smaller-than-patch-pretrain", "pretrain {T} data.path={world}/tiny_images.npz output_dir={run}",
        "images of 2x2 pixels, smaller than one 4x4 patch"),
    Row("corrupt-test-image-finetune", "finetune --checkpoint {world}/run/last.pt --data {world}/bad_test "
        "output_dir={run} train.epochs=1 train.warmup_epochs=0 train.batch_size=4 train.progress=false",
        "Cannot read image {world}/bad_test/test/a/0.png"),  # found before training, not after it
    Row("corrupt-val-image-linprobe", "linprobe --checkpoint {world}/run/last.pt --data {world}/bad_val "
        "output_dir={run} train.epochs=1 train.warmup_epochs=0 train.batch_size=4 train.progress=false",
        "Cannot read image {world}/bad_val/val/a/0.png"),
    Row("medmnist-unknown-name", "knn --checkpoint {world}/run/last.pt --data medmnist:bloodmnst",
        "Unknown MedMNIST dataset 'bloodmnst': choose one of pathmnist"),
    Row("knn-unlabelled-folder", "knn --checkpoint {world}/run/last.pt --data {world}/unlabelled --test-split train",
        "has unlabelled images: k-NN needs class sub-folders"),
    # --- npz files
    Row("nan-pixels-pretrain", "pretrain {T} data.path={world}/nan.npz output_dir={run}",
        "have 3 NaN or infinite pixel values: replace them"),
    Row("nan-pixels-knn", "knn --checkpoint {world}/run/last.pt --data {world}/nan.npz", "3 NaN or infinite pixel values"),
    Row("npz-wrong-keys", "pretrain {T} data.path={world}/keys.npz output_dir={run}",
        "has no '<split>_images' array (it has ['x_train', 'y_train']): use the MedMNIST layout"),
    Row("npz-float-labels", "knn --checkpoint {world}/run/last.pt --data {world}/float_labels.npz",
        "has 24 labels that are not whole numbers (e.g. 0.5): store integer class indices"),
    Row("npz-string-labels", "knn --checkpoint {world}/run/last.pt --data {world}/str_labels.npz",
        "has labels of type <U9 (e.g. 'benign'): store integer class indices"),
    Row("npz-label-count", "knn --checkpoint {world}/run/last.pt --data {world}/short_labels.npz",
        "has 24 images but 10 labels: give one label per image"),
    # --- config values
    Row("unknown-key", PRE + " output_dir={run} train.epohcs=3", "Unknown config key 'train.epohcs': Did you mean train.epochs"),
    Row("wrong-type", PRE + " output_dir={run} train.epochs=three", "train.epochs must be of type int, got 'three'"),
    Row("mask-ratio-0", PRE + " output_dir={run} model.mask_ratio=0", "model.mask_ratio must lie strictly between 0 and 1, got 0"),
    Row("mask-ratio-1", PRE + " output_dir={run} model.mask_ratio=1", "model.mask_ratio must lie strictly between 0 and 1, got 1"),
    Row("mask-ratio-1.5", PRE + " output_dir={run} model.mask_ratio=1.5", "got 1.5: e.g. model.mask_ratio=0.75"),
    Row("label-fraction-0", KNN + " data.label_fraction=0", "data.label_fraction must lie in (0, 1], got 0.0"),
    Row("label-fraction-2", "linprobe --checkpoint {world}/run/last.pt --data {world}/good.npz output_dir={run} "
        "data.label_fraction=2", "data.label_fraction must lie in (0, 1], got 2.0"),
    Row("crop-scale-reversed", PRE + " output_dir={run} data.crop_scale=[0.9,0.2]",
        "data.crop_scale must be [min, max] with 0 < min <= max <= 1, got [0.9, 0.2]"),
    Row("std-zero", PRE + " output_dir={run} data.mean=[0.5] data.std=[0]",
        "data.std must be finite and greater than 0 for every channel, got [0.0]"),
    Row("cuda-without-gpu", PRE + " output_dir={run} train.device=cuda",
        "Device 'cuda' needs a GPU, but PyTorch sees none on this machine: use train.device=cpu", _no_gpu),
    Row("knn-cuda-without-gpu", KNN + " --device cuda", "use train.device=cpu (or --device cpu)", _no_gpu),
    Row("pretrain-has-no-allow-pickle", PRE + " --allow-pickle", "unrecognized arguments: --allow-pickle; see mimkit --help"),
    Row("knn-missing-data", "knn --checkpoint {world}/run/last.pt",
        "the following arguments are required: --data; see mimkit knn --help"),
    Row("config-show-unknown-key", "config show train.epohcs", "No config key or section 'train.epohcs' (did you mean train.epochs"),
    Row("demo-zero-epochs", "demo --out {run}/demo --epochs 0",
        "argument --epochs: must be a whole number of at least 1, got '0'; see mimkit demo --help"),
    Row("demo-out-is-a-file", "demo --out {world}/afile.txt", "--out {world}/afile.txt is a file, not a folder"),
    # --- k-NN and visualize flags
    Row("knn-k-0", KNN + " --k 0", "--k must be whole numbers of at least 1, got [0]"),
    Row("knn-k-negative", KNN + " --k 10 -3", "--k must be whole numbers of at least 1, got [-3]"),
    Row("knn-k-not-a-number", KNN + " --k ten", "argument --k: takes whole numbers such as --k 10 20, got 'ten'"),
    Row("knn-temperature-0", KNN + " --temperature 0", "--temperature must be a finite number greater than 0, got 0.0"),
    Row("knn-temperature-nan", KNN + " --temperature nan", "--temperature must be a finite number greater than 0, got nan"),
    Row("knn-temperature-negative", KNN + " --temperature -0.5", "greater than 0, got -0.5: e.g. --temperature 0.07"),
    Row("visualize-zero-images", VIZ + " --out {run}/fig.png --num-images 0",
        "argument --num-images: must be a whole number of at least 1, got '0'"),
    Row("knn-batch-size-0", KNN + " --batch-size 0", "argument --batch-size: must be a whole number of at least 1"),
    Row("visualize-mask-ratio-1", VIZ + " --out {run}/fig.png --what attention --mask-ratio 1",
        "--mask-ratio must lie strictly between 0 and 1, got 1.0"),
    Row("visualize-missing-layer", VIZ + " --out {run}/fig.png --what attention --layer 9",
        "--layer 9 does not exist: the encoder has blocks 0 to 1"),
    # --- checkpoints
    Row("checkpoint-other-architecture", "knn --checkpoint {world}/small_vit.pt --model vit_tiny_patch4 --data {world}/good.npz",
        "does not fit the model: shape mismatch for cls_token (1, 1, 64) vs model (1, 1, 192)"),
    Row("resume-of-another-model", "pretrain {T} data.path={world}/good.npz output_dir={world}/run model.depth=1",
        "holds a run of another model"),
    Row("checkpoint-truncated", KNN.replace("run/last.pt", "truncated.pt"), "re:Cannot read checkpoint .*truncated\\.pt \\(.*\\): pass a complete PyTorch"),
    Row("checkpoint-text-file", KNN.replace("run/last.pt", "text.pt"), "Cannot read checkpoint {world}/text.pt"),
    Row("malicious-pickle", KNN.replace("run/last.pt", "evil.pt"),
        "contains pickled Python objects that a safe load refuses (loading them can run code from the file)"),
    Row("malicious-pickle-allowed-knn", KNN.replace("run/last.pt", "evil.pt") + " --allow-pickle",
        "holds no tensors: it is not a model checkpoint"),
    Row("malicious-pickle-allowed-visualize", VIZ.replace("run/last.pt", "evil.pt") + " --allow-pickle --out {run}/f.png",
        "was not written by mimkit (no model_config)"),
    Row("planted-pickle-in-pretrain-run", "pretrain {T} data.path={world}/good.npz output_dir={world}/evil_run",
        "re:last\\.pt contains pickled Python objects(?!.*--allow-pickle).*choose another output_dir"),
    Row("three-channel-checkpoint-on-grey-data", KNN.replace("run/last.pt", "rgb.pt"),
        "trained on 3-channel images but {world}/good.npz has 1-channel images: k-NN cannot change the channels "
        "of frozen features, so use data with 3 channels, or mimkit finetune"),
    Row("visualize-reconstruction-without-decoder",
        "visualize --checkpoint {world}/vit_tiny.pt --model vit_tiny_patch4 --data {world}/good.npz --out {run}/f.png",
        "has no pixel decoder, so it cannot reconstruct images: the figure needs an MAE, SimMIM or DDMIM checkpoint"),
    Row("disk-full-during-checkpoint", PRE + " output_dir={run}", "No disk space left in {run} to write", _disk_full),
]


def _files(*roots: Path) -> dict[Path, tuple[int, int, int]]:
    """Every file under ``roots`` -> (size, mtime_ns, inode): a rewrite or a rename changes it."""
    return {p: (s.st_size, s.st_mtime_ns, s.st_ino) for r in roots for p in r.rglob("*")
            if p.is_file() and (s := p.stat())}


def _looks_like_a_result(path: Path) -> bool:
    return (path.name in RESULT_NAMES or path.name.endswith("_metrics.json") or path.suffix in RESULT_SUFFIXES
            or ".tmp" in path.name)


def _previous_results(run: Path) -> None:
    """A finished run's outputs, which a failing command must leave as they are."""
    run.mkdir()
    (run / "summary.json").write_text('{"final_loss": 0.5}')
    (run / "knn_metrics.json").write_text('{"accuracy": {}}')
    (run / "fig.png").write_bytes(b"\x89PNG previous figure")


def _argv(row: Row, world: Path, run: Path) -> list[str]:
    words = []
    for word in row.argv.split():
        words += TINY if word == "{T}" else [word.format(world=world, run=run)]
    return words


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id) for r in ROWS])
def test_bad_input_gives_one_sentence_and_no_result(row, world, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _previous_results(run)
    monkeypatch.chdir(tmp_path)  # PWNED, and anything written to a relative path, would land here
    undo = row.setup(monkeypatch, run) if row.setup else None
    if isinstance(undo, str):
        pytest.skip(undo)
    before = _files(world, tmp_path)
    try:
        code = main(_argv(row, world, run))
    finally:
        if callable(undo):
            undo()
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    prefix = re.match(r"mimkit( \w+)?: error: ", err)
    assert prefix, err
    message = err[prefix.end():]
    assert not re.search(r"[.!?] [A-Z]", message), f"more than one sentence: {message}"
    fragment = row.fragment.format(world=world, run=run)
    if fragment.startswith("re:"):
        assert re.search(fragment[3:], message), message
    else:
        assert fragment in message
    after = _files(world, tmp_path)
    assert not (tmp_path / "PWNED").exists() or "allow-pickle" in row.argv  # only an explicit flag unpickles
    changed = [str(p) for p, stat in before.items() if after.get(p) != stat]
    assert not changed, f"files changed or removed: {changed}"
    new_results = [str(p) for p in after.keys() - before.keys() if _looks_like_a_result(p)]
    assert not new_results, f"result-like files written: {new_results}"


def test_the_table_has_thirty_distinct_inputs():
    assert len({r.id for r in ROWS}) == len(ROWS) >= 30
    assert len({r.argv for r in ROWS}) == len(ROWS)


def test_mixed_image_sizes_pretrain_and_evaluate(tmp_path, capsys):
    """Sizes may differ: the pretraining crop and the evaluation resize give every image the model's size."""
    rng = np.random.default_rng(1)
    for i, size in enumerate((8, 12, 16, 9, 8, 12, 16, 9)):
        _png(tmp_path / "cells" / f"class{i % 2}" / f"{i}.png", rng.integers(0, 256, (size, size + i % 3), dtype=np.uint8))
    run = tmp_path / "run"
    assert main(["pretrain", *TINY, f"data.path={tmp_path / 'cells'}", f"output_dir={run}", "train.batch_size=4"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_epoch"] == 1 and np.isfinite(summary["final_loss"])
    assert main(["knn", "--checkpoint", str(run / "last.pt"), "--data", str(tmp_path / "cells"),
                 "--test-split", "train", "--k", "1", "--out", str(tmp_path / "knn.json")]) == 0
    # bank == queries: each image's nearest neighbour is itself, so k=1 is exact
    assert json.loads((tmp_path / "knn.json").read_text())["accuracy"]["1"]["top1"] == 100.0


def _knn_json(world: Path, out: Path, *words: str) -> dict:
    assert main(["knn", "--checkpoint", str(world / "run" / "last.pt"), "--data", str(world / "good.npz"), *words,
                 "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_knn_k_values_stop_at_the_overrides(world, tmp_path, capsys):
    """README order: ``--k 1 3 data.labels_per_class=4 output_dir=DIR`` (overrides after --k) works,
    and gives what the same overrides give before --k."""
    after = _knn_json(world, tmp_path / "a.json", "--k", "1", "3", "data.labels_per_class=4",
                      f"output_dir={tmp_path / 'knn_dir'}")
    assert "label subset (4 per class, seed 0): 8 of 24 images" in capsys.readouterr().out
    before = _knn_json(world, tmp_path / "b.json", "data.labels_per_class=4", "--k", "1", "3")
    assert after["num_train"] == 8 and after["labels_per_class"] == 4 and list(after["accuracy"]) == ["1", "3"]
    assert after["accuracy"] == before["accuracy"]
    assert json.loads((tmp_path / "knn_dir" / "knn_metrics.json").read_text())["accuracy"] == after["accuracy"]


def test_knn_k_above_the_bank_is_clamped_with_a_note(world, tmp_path, capsys):
    big = _knn_json(world, tmp_path / "big.json", "--k", "3", "50", "1000")
    assert "note: k = 50, 1000 exceeds the 24 images of the bank; reported as k = 24" in capsys.readouterr().out
    exact = _knn_json(world, tmp_path / "exact.json", "--k", "24")
    assert list(big["accuracy"]) == ["3", "24"] and big["accuracy"]["24"] == exact["accuracy"]["24"]


def test_save_figure_uses_a_unique_temp_file_and_removes_it_on_failure(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    real_savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, fname, **kw: (written.append(Path(fname)), real_savefig(self, fname, **kw)))
    for _ in range(2):
        assert save_figure(plt.figure(), tmp_path / "fig.png") == tmp_path / "fig.png"
    assert written[0] != written[1] and all(p.parent == tmp_path for p in written)
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "taken").mkdir()
    with pytest.raises(OSError):
        save_figure(plt.figure(), tmp_path / "taken")  # renaming onto a folder fails ...
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png", "taken"]  # ... and leaves no temp file

