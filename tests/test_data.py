"""Tests for mimkit.data: loaders (npz, medmnist cache, digits, folders), stats, transforms.

Real MedMNIST files come from the shared datasets folder next to the repository (never copied
into it); tests needing them are skipped with a reason when it is absent, and fail under CI=true
(tests/conftest.py::shared_file). No network is used.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.data import (DataError, ImageDataset, TransformedDataset, build_transform,
                         compute_channel_stats, load_dataset)
from mimkit.data import medmnist

from tests.conftest import shared_file

# Names in the shared folder; tests.conftest.shared_file resolves them (skip, or fail under CI).
BLOOD, PNEUMONIA, BREAST = "bloodmnist.npz", "pneumoniamnist.npz", "breastmnist.npz"


def test_missing_shared_file_fails_under_ci_and_skips_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setenv("MIMKIT_SHARED_DATA", str(tmp_path))  # an empty folder: no data there
    for ci in ("true", "1"):
        monkeypatch.setenv("CI", ci)
        with pytest.raises(pytest.fail.Exception, match=r"breastmnist\.npz not found: .*\.\./shared/datasets "
                                                        r"beside the repository"):
            shared_file(BREAST)
    for ci in (None, "false", ""):
        if ci is None:
            monkeypatch.delenv("CI", raising=False)
        else:
            monkeypatch.setenv("CI", ci)
        with pytest.raises(pytest.skip.Exception, match=r"breastmnist\.npz not found"):
            shared_file(BREAST)
    np.savez(tmp_path / BREAST, train_images=np.zeros((1, 2, 2), np.uint8))
    monkeypatch.setenv("CI", "true")
    assert shared_file(BREAST) == tmp_path / BREAST  # present: the override folder is used


@pytest.fixture(scope="module")
def blood_train() -> ImageDataset:
    return load_dataset(shared_file(BLOOD), "train")


def _save_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


# --------------------------------------------------------------------------- MedMNIST .npz

def test_bloodmnist_splits_shapes_and_values(blood_train):
    ds = blood_train
    assert len(ds) == 11959
    assert (ds.num_channels, ds.num_classes, ds.image_size) == (3, 8, (28, 28))
    assert ds.class_names[0] == "basophil" and len(ds.class_names) == 8
    assert ds.labels.dtype == torch.long and ds.labels.shape == (11959,)
    assert int(ds.labels.min()) == 0 and int(ds.labels.max()) == 7
    assert [len(load_dataset(shared_file(BLOOD), s)) for s in ("val", "test")] == [1712, 3421]

    # stored in native uint8, converted to float [C,H,W] / 255 on access
    assert ds.raw(5).dtype == np.uint8
    with np.load(shared_file(BLOOD)) as z:
        ref_img, ref_lab = z["train_images"][5], int(z["train_labels"][5, 0])
    img, lab = ds[5]
    assert img.dtype == torch.float32 and img.shape == (3, 28, 28)
    torch.testing.assert_close(img, torch.from_numpy(ref_img).permute(2, 0, 1).float() / 255)
    assert lab == ref_lab


def test_pneumonia_is_one_channel():
    ds = load_dataset(shared_file(PNEUMONIA), "test")
    assert len(ds) == 624 and ds.num_channels == 1 and ds.num_classes == 2
    assert ds[0][0].shape == (1, 28, 28)
    assert ds.class_names == ["normal", "pneumonia"]


def test_npz_unknown_split_names_choices():
    with pytest.raises(DataError, match=r"Unknown split 'foo' for breastmnist.npz: choose one "
                                        r"of train, val, test\."):
        load_dataset(shared_file(BREAST), "foo")


def test_generic_npz_multilabel_first_column_and_class_count(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (6, 5, 5), dtype=np.uint8)
    labels = np.array([[0, 1], [2, 0], [1, 1], [0, 0], [1, 0], [0, 1]])
    np.savez(tmp_path / "toy.npz", train_images=imgs, train_labels=labels,
             val_images=imgs[:2], val_labels=np.array([[3], [0]]))
    ds = load_dataset(tmp_path / "toy.npz")
    assert ds.labels.tolist() == [0, 2, 1, 0, 1, 0]  # first column kept
    assert ds.num_classes == 4  # max over all splits, so train and val agree
    assert ds.num_channels == 1 and ds[0][0].shape == (1, 5, 5)


# --------------------------------------------------------------------------- channel stats

def test_channel_stats_match_numpy_and_are_plausible(blood_train):
    sub = blood_train.subset(np.arange(300))
    mean, std = compute_channel_stats(sub)
    ref = np.stack([blood_train.raw(i) for i in range(300)]).reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, ref.mean(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(std, ref.std(0), rtol=1e-7, atol=1e-9)
    # blood smears: bright background, red > green/blue; std well away from 0 and 0.5
    assert 0.7 < mean[0] < 0.9 and all(0.05 < s < 0.4 for s in std)

    # random subset: reproducible with the same seed, different with another
    a = compute_channel_stats(blood_train, max_images=64, seed=1)
    assert a == compute_channel_stats(blood_train, max_images=64, seed=1)
    assert a != compute_channel_stats(blood_train, max_images=64, seed=2)
    assert abs(a[0][0] - mean[0]) < 0.05


def test_channel_stats_mixed_sizes_and_std_floor():
    imgs = [np.full((4, 4, 2), 100, np.uint8), np.full((6, 3, 2), 100, np.uint8)]
    ds = ImageDataset(imgs)
    assert ds.image_size is None
    mean, std = compute_channel_stats(ds)
    np.testing.assert_allclose(mean, [100 / 255] * 2)
    assert std == [1e-6, 1e-6]  # constant channel: floored, never 0


# --------------------------------------------------------------------------- folders

def test_png_folder_with_class_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    arrs = {}
    for cls, n in (("dog", 2), ("cat", 3)):
        for k in range(n):
            a = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
            _save_png(tmp_path / cls / f"{k}.png", a)
            arrs[(cls, k)] = a
    (tmp_path / "notes.txt").write_text("not an image")  # ignored
    ds = load_dataset(tmp_path)
    assert ds.class_names == ["cat", "dog"] and ds.num_classes == 2
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]
    assert ds.num_channels == 3 and ds.image_size == (6, 7)
    torch.testing.assert_close(ds[3][0], torch.from_numpy(arrs[("dog", 0)]).permute(2, 0, 1) / 255)


def test_folder_unlabeled_mixed_sizes_rgba_and_split_rules(tmp_path):
    _save_png(tmp_path / "a.png", np.zeros((5, 5, 4), np.uint8))  # RGBA -> alpha dropped
    _save_png(tmp_path / "b.png", np.full((8, 6, 3), 255, np.uint8))
    ds = load_dataset(tmp_path)
    assert ds.num_channels == 3 and ds.image_size is None
    assert ds.num_classes == 0 and ds.labels.tolist() == [-1, -1]
    assert ds[1][0].shape == (3, 8, 6) and float(ds[1][0].min()) == 1.0
    with pytest.raises(DataError, match="only split 'train'"):
        load_dataset(tmp_path, "val")


def test_folder_split_layout_keeps_class_indices_consistent(tmp_path):
    g = np.zeros((4, 4), np.uint8)
    _save_png(tmp_path / "train" / "a" / "0.png", g)
    _save_png(tmp_path / "train" / "c" / "0.png", g)
    _save_png(tmp_path / "val" / "b" / "0.png", g)  # class only present in val
    tr, va = load_dataset(tmp_path, "train"), load_dataset(tmp_path, "val")
    assert tr.class_names == va.class_names == ["a", "b", "c"]
    assert tr.labels.tolist() == [0, 2] and va.labels.tolist() == [1]
    assert tr.num_channels == 1
    with pytest.raises(DataError, match="choose one of train, val"):
        load_dataset(tmp_path, "test")


@pytest.mark.parametrize("layout", ["chw", "hwc"])
def test_tiff_7_channel_uint16(tmp_path, layout):
    import tifffile
    rng = np.random.default_rng(1)
    hwc = [rng.integers(0, 65536, (10, 12, 7), dtype=np.uint16) for _ in range(2)]
    hwc[0][0, 0, 0] = 65535
    for k, a in enumerate(hwc):
        tifffile.imwrite(tmp_path / f"{k}.tif", a.transpose(2, 0, 1) if layout == "chw" else a)
    ds = load_dataset(tmp_path)
    assert ds.num_channels == 7 and ds.image_size == (10, 12) and ds.dtype == np.uint16
    img, label = ds[0]
    assert label == -1 and img.shape == (7, 10, 12)
    torch.testing.assert_close(img, torch.from_numpy(hwc[0].astype(np.float32)).permute(2, 0, 1) / 65535)
    assert float(img[0, 0, 0]) == 1.0


def test_16bit_png_keeps_16_bits(tmp_path):
    a = np.array([[0, 1000], [40000, 65535]], np.uint16)
    Image.fromarray(a).save(tmp_path / "x.png")
    ds = load_dataset(tmp_path)
    assert ds.dtype == np.uint16 and ds.num_channels == 1
    torch.testing.assert_close(ds[0][0][0], torch.from_numpy(a.astype(np.float32)) / 65535)


def test_a_greyscale_file_among_rgb_ones_is_converted_to_rgb(tmp_path):
    """ImageNet holds greyscale and CMYK JPEGs: they take the dataset's (most common) channel count."""
    grey = np.arange(16, dtype=np.uint8).reshape(4, 4) * 15
    _save_png(tmp_path / "a.png", np.zeros((4, 4, 3), np.uint8))
    _save_png(tmp_path / "b.png", np.zeros((4, 4, 3), np.uint8))
    _save_png(tmp_path / "c.png", grey)
    ds = load_dataset(tmp_path)
    assert ds.num_channels == 3 and np.array_equal(ds.raw(2), np.repeat(grey[..., None], 3, axis=2))


def test_tiff_stacks_with_other_channel_counts_raise(tmp_path):
    import tifffile
    for i in range(3):
        tifffile.imwrite(tmp_path / f"{i}.tif", np.zeros((7, 8, 8), np.uint16))
    tifffile.imwrite(tmp_path / "odd.tif", np.zeros((5, 8, 8), np.uint16))
    with pytest.raises(DataError, match=r"odd\.tif has 5 channels but the dataset has 7: give all TIFF stacks"):
        load_dataset(tmp_path)


def test_unreadable_image_raises(tmp_path):
    _save_png(tmp_path / "good.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "bad.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"Cannot read image .*bad\.png .*remove or replace it"):
        load_dataset(tmp_path)


def test_missing_path_empty_folder_and_unknown_kind_raise(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    with pytest.raises(DataError, match="No images found"):
        load_dataset(tmp_path)
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(DataError, match="Cannot load .*x.csv"):
        load_dataset(tmp_path / "x.csv")
    assert issubclass(DataError, ValueError)


# --------------------------------------------------------------------------- MedMNIST cache

def _forbid_network(monkeypatch):
    def no_net(url, *a, **k):
        raise AssertionError(f"unexpected download of {url}")
    monkeypatch.setattr(medmnist, "urlopen", no_net)


def test_medmnist_cache_hit_uses_local_file(tmp_path, monkeypatch):
    (tmp_path / "breastmnist.npz").symlink_to(shared_file(BREAST))
    monkeypatch.setenv("MIMKIT_DATA", str(tmp_path))
    _forbid_network(monkeypatch)
    ds = load_dataset("medmnist:breastmnist", "val")
    assert len(ds) == 78 and ds.num_channels == 1
    assert (tmp_path / "breastmnist.npz.md5").exists()  # verified once, stamped
    assert len(load_dataset("medmnist:breastmnist@28", "test")) == 156  # stamp path


def test_medmnist_cached_file_with_wrong_md5_raises(tmp_path, monkeypatch):
    (tmp_path / "bloodmnist_64.npz").write_bytes(b"truncated download")
    monkeypatch.setenv("MIMKIT_DATA", str(tmp_path))
    _forbid_network(monkeypatch)
    got = hashlib.md5(b"truncated download").hexdigest()
    with pytest.raises(DataError, match=rf"md5 {got} but the official file has "
                                        rf"2b94928a2ae4916078ca51e05b6b800b: delete it"):
        load_dataset("medmnist:bloodmnist@64")


def test_medmnist_bad_names():
    with pytest.raises(DataError, match="Unknown MedMNIST dataset 'foomnist'"):
        load_dataset("medmnist:foomnist")
    with pytest.raises(DataError, match="size '32'"):
        load_dataset("medmnist:bloodmnist@32")
    with pytest.raises(DataError, match="3-D volumes"):
        load_dataset("medmnist:organmnist3d")
    assert medmnist.MD5["bloodmnist"][28] == "7053d0359d879ad8a5505303e11de1dc"
    assert len(medmnist.MD5) == 12 and all(len(v) == 4 for v in medmnist.MD5.values())


def test_download_verifies_md5_and_leaves_no_partial_file(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 3000)
    good = hashlib.md5(b"x" * 3000).hexdigest()
    dest = tmp_path / "cache" / "pneumoniamnist.npz"
    out = medmnist.download(src.as_uri(), dest, good)  # file:// URL: offline
    assert out == dest and dest.read_bytes() == b"x" * 3000
    assert sorted(p.name for p in dest.parent.iterdir()) == ["pneumoniamnist.npz",
                                                             "pneumoniamnist.npz.md5"]
    dest2 = tmp_path / "cache2" / "x.npz"
    with pytest.raises(DataError, match=f"has md5 {good} but the official file has 0+: retry"):
        medmnist.download(src.as_uri(), dest2, "0" * 32)
    assert list(dest2.parent.iterdir()) == []  # temp file removed, nothing renamed into place


def test_download_without_network_says_download_by_hand(tmp_path, monkeypatch):
    def offline(url, *a, **k):
        raise URLError("Name or service not known")
    monkeypatch.setenv("MIMKIT_DATA", str(tmp_path))
    monkeypatch.setattr(medmnist, "urlopen", offline)
    with pytest.raises(DataError, match=r"Cannot download https://zenodo.org/records/10519652/"
                                        r"files/pneumoniamnist.npz.*download it by hand"):
        load_dataset("medmnist:pneumoniamnist")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- digits

def test_digits_split_sizes_and_stratification():
    splits = {s: load_dataset("digits", s) for s in ("train", "val", "test")}
    sizes = {s: len(d) for s, d in splits.items()}
    assert sizes == {"train": 1259, "val": 179, "test": 359} and sum(sizes.values()) == 1797
    tr = splits["train"]
    assert (tr.num_channels, tr.num_classes, tr.image_size, tr.dtype) == (1, 10, (8, 8), np.uint8)
    assert float(tr[0][0].max()) <= 1.0 and int(tr.raw(0).max()) > 200  # 16 -> 255 scaling
    from sklearn.datasets import load_digits
    per_class = np.bincount(load_digits().target, minlength=10)
    for s, frac in (("test", 0.2), ("val", 0.1)):
        counts = np.bincount(splits[s].labels.numpy(), minlength=10)
        assert np.all(np.abs(counts - frac * per_class) <= 1), (s, counts)
    # deterministic, and the splits are disjoint (compare the images themselves)
    assert torch.equal(load_dataset("digits", "val").labels, splits["val"].labels)
    keys = [{d.raw(i).tobytes() + bytes([int(d.labels[i])]) for i in range(len(d))}
            for d in splits.values()]
    assert not (keys[1] & keys[2])


def test_subset_keeps_classes():
    ds = load_dataset("digits", "val")
    sub = ds.subset([3, 0])
    assert len(sub) == 2 and sub.num_classes == 10 and sub.class_names == ds.class_names
    assert sub.labels.tolist() == [int(ds.labels[3]), int(ds.labels[0])]
    torch.testing.assert_close(sub[0][0], ds[3][0])


# --------------------------------------------------------------------------- transforms

@pytest.mark.parametrize("c", [1, 3, 7])
def test_transform_shapes_any_channel_count(c):
    mean, std = [0.5] * c, [0.25] * c
    x = torch.rand(c, 20, 30)
    torch.manual_seed(0)
    pre = build_transform("pretrain", 16, mean, std)
    out = pre(x)
    assert out.shape == (c, 16, 16) and out.dtype == torch.float32
    assert not torch.equal(pre(x), out)  # random crop/flip differ between calls
    ev = build_transform("eval", 16, mean, std)
    assert ev(x).shape == (c, 16, 16)
    torch.testing.assert_close(ev(x), ev(x))  # deterministic
    # already img_size: normalise only (no crop that would drop border pixels)
    y = torch.rand(c, 16, 16)
    torch.testing.assert_close(ev(y), (y - 0.5) / 0.25)


def test_eval_resize_center_crop_protocol():
    # 16 / 0.875 -> resize to 18, centre-crop 16: a 1-px border is cut
    x = torch.zeros(1, 36, 36)
    x[:, 2:34, 2:34] = 1.0
    out = build_transform("eval", 16, [0.0], [1.0], interpolation="nearest")(x)
    assert out.shape == (1, 16, 16) and float(out.min()) == 1.0  # zero border cropped away


def test_pretrain_crop_matches_official_pil_pipeline(blood_train):
    """Same RNG draws -> same box and flip as the official MAE data path (torchvision's classic
    RandomResizedCrop(bicubic) + flip on a uint8 PIL image, then ToTensor); pixels differ only
    by the official path's uint8 rounding and clipping (mean < 0.5/255 per image). Torch's
    non-antialiased bicubic (a = -0.75 instead of PIL's -0.5) misses that bound, so it discriminates."""
    from torchvision import transforms as T
    from torchvision.transforms import v2

    n = 20
    raw = np.load(shared_file(BLOOD))["train_images"][:n]
    ours = build_transform("pretrain", 28, [0.0] * 3, [1.0] * 3, crop_scale=(0.2, 1.0), hflip=True)
    official = T.Compose([
        T.RandomResizedCrop(28, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(), T.ToTensor(),
    ])
    sharper = v2.Compose([
        v2.RandomResizedCrop(28, scale=(0.2, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=False),
        v2.RandomHorizontalFlip(),
    ])
    sharper_diffs = []
    for k in range(n):
        image = blood_train[k][0]
        torch.manual_seed(k)
        a = ours(image)
        torch.manual_seed(k)
        b = official(Image.fromarray(raw[k]))
        torch.manual_seed(k)
        c = sharper(image)
        assert a.shape == b.shape == (3, 28, 28)
        assert float((a - b).abs().mean()) < 0.5 / 255, f"image {k}"
        sharper_diffs.append(float((c - b).abs().mean()))
    assert np.mean(sharper_diffs) > 0.5 / 255


def test_transform_errors():
    with pytest.raises(ValueError, match="Unknown transform kind 'train'"):
        build_transform("train", 16, [0.5], [0.5])
    with pytest.raises(ValueError, match="interpolation"):
        build_transform("eval", 16, [0.5], [0.5], interpolation="lanczos9")
    t = build_transform("pretrain", 16, [0.5] * 3, [0.5] * 3)
    with pytest.raises(ValueError, match="C=3"):
        t(torch.rand(1, 16, 16))


def test_transformed_dataset(blood_train):
    mean, std = compute_channel_stats(blood_train, max_images=200)
    tds = TransformedDataset(blood_train, build_transform("pretrain", 32, mean, std))
    img, label = tds[10]
    assert len(tds) == 11959 and img.shape == (3, 32, 32)
    assert label == int(blood_train.labels[10])
    assert tds.num_classes == 8 and tds.num_channels == 3  # attributes read through
    assert abs(float(img.mean())) < 3  # normalised around 0
