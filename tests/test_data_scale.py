"""Pretraining on image folders at scale, on small generated folders: lazy vs in-memory, every
file format, unreadable files, subsets, several roots, 7-channel 16-bit TIFFs, the input
pipeline against the official one, and a lazy dataset that holds no pixels.
(The 200 k-file case lives in ``benchmarks/data_scale.py``; kill -9 on a lazy folder is one of
the chains of ``tests/test_kill_anywhere.py``.)"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torchvision import transforms as T

from mimkit.checkpoint import load_file
from mimkit.config import load_config
from mimkit.data import collection
from mimkit.data.collection import open_pretrain_data
from mimkit.data.lazy import LazyImageDataset, PretrainCrop
from mimkit.engine.pretrain_data import prepare_data, pretrain_inputs, worker_count
from mimkit.engine.sampling import SeededTransformDataset, generator_seed
from mimkit.engine.trainer import pretrain
from mimkit.errors import DataError
from tests.conftest import TINY_MAE

TINY = [*TINY_MAE, "model.img_size=16", "model.embed_dim=32", "model.num_heads=2", "model.decoder_embed_dim=32",
        "model.decoder_num_heads=2", "train.warmup_epochs=0", "train.progress=false", "train.batch_size=8"]


def _rgb(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_folder(root: Path, per_class: int = 12, corrupt: int = 0, seed: int = 0) -> Path:
    """Two classes of JPEG/PNG files of mixed sizes: RGB, greyscale, CMYK, palette and RGBA among
    them, plus ``corrupt`` truncated files in class a."""
    rng = np.random.default_rng(seed)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            im = Image.fromarray(_rgb(rng, 20 + 3 * (i % 4), 24 + 2 * (i % 3)))
            kind = i % 6
            if kind == 1:
                im.convert("L").save(root / c / f"{i:03d}.jpg")
            elif kind == 2:
                im.convert("CMYK").save(root / c / f"{i:03d}.jpg")
            elif kind == 3:
                im.convert("P").save(root / c / f"{i:03d}.png")
            elif kind == 4:
                im.convert("RGBA").save(root / c / f"{i:03d}.png")
            else:
                im.save(root / c / f"{i:03d}.jpg", quality=90)
    for k in range(corrupt):
        (root / "a" / f"zz_broken{k}.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated JPEG")
    return root


def _run(tmp_path: Path, name: str, *overrides: str) -> tuple[dict, Path]:
    out = tmp_path / name
    summary = pretrain(load_config(None, [*TINY, f"output_dir={out}", *overrides]))
    return summary, out


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "last.pt")["model"]


def test_lazy_and_in_memory_folders_train_to_the_same_weights_with_any_worker_count(tmp_path):
    data = make_folder(tmp_path / "data")
    common = [f"data.path={data}", "train.epochs=2"]
    _, memory = _run(tmp_path, "memory", *common, "data.in_memory=true", "data.num_workers=0")
    _, lazy0 = _run(tmp_path, "lazy0", *common, "data.in_memory=false", "data.num_workers=0")
    _, lazy2 = _run(tmp_path, "lazy2", *common, "data.in_memory=false", "data.num_workers=2")
    reference = _weights(memory)
    for out in (lazy0, lazy2):
        for key, value in _weights(out).items():
            assert torch.equal(value, reference[key]), (out.name, key)
    assert load_file(memory / "last.pt")["data_stats"] == load_file(lazy2 / "last.pt")["data_stats"]


def test_unreadable_files_are_skipped_counted_per_epoch_and_reported(tmp_path, capsys):
    data = make_folder(tmp_path / "data", corrupt=1)
    bad = str(data / "a" / "zz_broken0.jpg")
    summary, out = _run(tmp_path, "run", f"data.path={data}", "data.in_memory=false", "train.epochs=2",
                        "data.max_bad_fraction=0.05")
    assert summary["unreadable_files"] == {"count": 1, "fraction": 1 / 25, "first": [bad]}
    assert json.loads((out / "summary.json").read_text())["unreadable_files"]["first"] == [bad]
    epochs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["unreadable_files"] for r in epochs if r["kind"] == "epoch"] == [1, 1]
    assert capsys.readouterr().out.count(f"1 unreadable image files skipped (4 %; first: {bad})") == 2


def test_more_unreadable_files_than_the_cap_stop_the_run_before_a_checkpoint(tmp_path):
    data = make_folder(tmp_path / "data", corrupt=3)
    with pytest.raises(DataError, match=r"[23] of 27 image files \([0-9.]+ %\) could not be read by epoch 1, more "
                                        r"than data.max_bad_fraction=0.05 \(first: .*zz_broken"):
        _run(tmp_path, "run", f"data.path={data}", "data.in_memory=false", "train.epochs=1",
             "data.max_bad_fraction=0.05", "train.log_every=1")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_the_lazy_input_equals_the_official_mae_transform_after_device_normalisation(tmp_path):
    """crop + flip in the worker, uint8 -> float and Normalize on the device == the official
    RandomResizedCrop(bicubic) + RandomHorizontalFlip + ToTensor + Normalize, sample by sample."""
    data = make_folder(tmp_path / "data")
    d = load_config(None, [f"data.path={data}", "data.in_memory=false"]).data
    opened = open_pretrain_data(d, "train", say=lambda _: None)
    cfg = load_config(None, [f"data.path={data}", "data.crop_scale=[0.2,1.0]"])
    stats = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}
    crop, on_device = pretrain_inputs(torch.nn.Module(), cfg, opened, 16, stats, torch.device("cpu"))
    items = SeededTransformDataset(opened.dataset, crop)
    official = T.Compose([T.RandomResizedCrop(16, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                          T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(stats["mean"], stats["std"])])
    for i in range(len(items)):
        ours = on_device(items[(i, 1000 + i)][0][None])[0]
        torch.manual_seed(generator_seed(1000 + i))
        with Image.open(opened.dataset.files[i]) as im:
            theirs = official(im.convert("RGB"))
        assert torch.allclose(ours, theirs, atol=1e-5), opened.dataset.files[i]


def test_seven_channel_uint16_tiffs_train_with_in_chans_7_and_statistics_from_the_data(tmp_path):
    rng = np.random.default_rng(0)
    stacks = []
    for i in range(10):
        level = (np.arange(7) * 9000 + 1000)[:, None, None]
        stack = (level + rng.integers(0, 4000, (7, 20, 18))).astype(np.uint16)  # channels first, one TIFF each
        tifffile.imwrite(tmp_path / f"cell{i:02d}.tif", stack)
        stacks.append(stack.astype(np.float64) / 65535)
    _, out = _run(tmp_path, "run", f"data.path={tmp_path}", "train.epochs=1", "data.in_memory=false")
    ckpt = load_file(out / "last.pt")
    pixels = np.stack(stacks).transpose(1, 0, 2, 3).reshape(7, -1)
    assert ckpt["model_config"]["in_chans"] == 7
    np.testing.assert_allclose(ckpt["data_stats"]["mean"], pixels.mean(1), rtol=1e-9)
    np.testing.assert_allclose(ckpt["data_stats"]["std"], pixels.std(1), rtol=1e-7)


def test_statistics_come_from_a_seeded_sample_of_data_stats_images(tmp_path):
    data = make_folder(tmp_path / "data")
    cfg = load_config(None, [*TINY, f"data.path={data}", "data.in_memory=false", "data.stats_images=5"])
    _, _, stats = prepare_data(cfg, lambda _: None)
    ds = LazyImageDataset(collection.folder_index([str(data)], "train"))
    picks = np.sort(np.random.default_rng(0).choice(len(ds), size=5, replace=False))
    pixels = np.concatenate([ds.decode(int(i)).reshape(-1, 3) for i in picks]).astype(np.float64) / 255
    np.testing.assert_allclose(stats["mean"], pixels.mean(0), rtol=1e-9)
    np.testing.assert_allclose(stats["std"], pixels.std(0), rtol=1e-7)


def _subset(data: Path, *overrides: str):
    d = load_config(None, [f"data.path={data}", "data.in_memory=false", *overrides]).data
    return open_pretrain_data(d, "train", say=lambda _: None).dataset


def test_first_per_class_keeps_exactly_the_first_20_percent_of_each_class_in_sorted_order(tmp_path):
    data = make_folder(tmp_path / "data", per_class=12)
    (data / "c").mkdir()
    for i in range(7):  # a third class of 7: ceil(0.2 * 7) = 2
        Image.fromarray(np.full((20, 20, 3), i, np.uint8)).save(data / "c" / f"{i}.png")
    ds = _subset(data, "data.subset=first_per_class", "data.subset_fraction=0.2")
    names = [str(Path(f).relative_to(data)) for f in ds.files]
    assert names == ["a/000.jpg", "a/001.jpg", "a/002.jpg", "b/000.jpg", "b/001.jpg", "b/002.jpg", "c/0.png", "c/1.png"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]


def test_random_subset_and_file_list_through_the_config(tmp_path):
    data = make_folder(tmp_path / "data", per_class=10)
    picked = _subset(data, "data.subset=random", "data.subset_fraction=0.25", "data.subset_seed=3")
    everything = sorted(str(p) for p in data.rglob("*") if p.is_file())
    expected = [everything[i] for i in np.sort(np.random.default_rng(3).choice(20, size=5, replace=False))]
    assert picked.files == expected
    listing = tmp_path / "list.txt"
    listing.write_text("# chosen by hand\nb/005.jpg\n\na/000.jpg\n")
    chosen = _subset(data, "data.subset=file_list", f"data.subset_file={listing}")
    assert chosen.files == [str(data / "b" / "005.jpg"), str(data / "a" / "000.jpg")] and chosen.labels.tolist() == [1, 0]


def test_several_roots_merge_their_classes_by_name(tmp_path):
    first = make_folder(tmp_path / "one", per_class=2)
    second = tmp_path / "two"
    for c in ("b", "z"):
        (second / c).mkdir(parents=True)
        Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(second / c / "x.png")
    ds = _subset(first, f"data.path=[{first},{second}]")
    assert ds.class_names == ["a", "b", "z"]
    assert ds.labels.tolist() == [0, 0, 1, 1, 1, 2]


def test_in_memory_auto_decides_from_the_estimate_and_says_so(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "data", per_class=4)
    d = load_config(None, [f"data.path={data}"]).data
    said = []
    decoded = LazyImageDataset(collection.folder_index([str(data)], "train")).decoded_bytes()
    monkeypatch.setattr(collection, "available_memory", lambda: 2 * decoded + 2)
    assert not open_pretrain_data(d, "train", said.append).lazy
    monkeypatch.setattr(collection, "available_memory", lambda: 2 * decoded - 2)
    assert open_pretrain_data(d, "train", said.append).lazy
    assert "loading them into memory" in said[0] and "decoding them per batch in the DataLoader workers" in said[1]
    sizes = [(20 + 3 * (i % 4)) * (24 + 2 * (i % 3)) for i in range(4)] * 2
    assert decoded == int(8 * np.mean(sizes) * 3)  # every header sampled: the estimate is exact


def test_a_lazy_dataset_holds_no_pixels_after_serving_every_item(tmp_path):
    """What a worker process holds of the dataset does not grow with the images it has read."""
    ds = LazyImageDataset(collection.folder_index([str(make_folder(tmp_path / "data"))], "train"))
    before = len(pickle.dumps(ds))
    items = SeededTransformDataset(ds, PretrainCrop(16))
    for i in range(len(ds)):
        items[(i, i)]
        ds[i]
    assert len(pickle.dumps(ds)) == before


def test_auto_worker_count(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(12)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert worker_count("auto", lazy=False) == 0 and worker_count(3, lazy=True) == 3
    assert worker_count("auto", lazy=True) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert worker_count("auto", lazy=True) == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda _: {0})
    assert worker_count("auto", lazy=True) == 1


def test_ibot_multi_crop_trains_the_same_from_a_lazy_folder_as_from_memory(tmp_path):
    """A method with its own augmentation gets the float image of a lazy file, as ImageDataset gives it."""
    data = make_folder(tmp_path / "data", per_class=8)
    ibot = ["model.name=ibot_vit_tiny_patch4", "model.img_size=16", "model.depth=1", "model.out_dim=64",
            "model.patch_out_dim=64", "model.head_hidden_dim=32", "model.head_bottleneck_dim=16",
            "model.num_local_crops=1", "model.local_crop_size=8", "train.warmup_epochs=0", "train.progress=false",
            "train.batch_size=8", "train.epochs=1", f"data.path={data}"]
    runs = {}
    for mode in ("true", "false"):
        out = tmp_path / f"ibot_{mode}"
        pretrain(load_config(None, [*ibot, f"data.in_memory={mode}", f"output_dir={out}"]))
        runs[mode] = _weights(out)
    assert runs["true"].keys() == runs["false"].keys()
    for key, value in runs["true"].items():
        assert torch.equal(value, runs["false"][key]), key


def test_the_log_reports_the_share_of_time_spent_waiting_for_data(tmp_path, monkeypatch):
    """A crop that sleeps s seconds per image makes every batch of B wait >= B s: the logged
    fraction must be at least s x images/s (and a fast pipeline's is far below that)."""
    import time

    data = make_folder(tmp_path / "data")
    real_call, pause = PretrainCrop.__call__, 0.01

    def slow(self, dataset, i):
        time.sleep(pause)
        return real_call(self, dataset, i)

    monkeypatch.setattr(PretrainCrop, "__call__", slow)
    _, out = _run(tmp_path, "run", f"data.path={data}", "data.in_memory=false", "data.num_workers=0",
                  "train.epochs=1", "train.log_every=1")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 3
    for r in train:
        assert pause * r["images_per_s"] <= r["data_wait_fraction"] <= 1.0
