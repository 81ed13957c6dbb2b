"""Lazy folders: decoding of every real file format, the uint8 crop against the official
torchvision pipeline, the skip policy for broken files, device-side normalisation, and
worker-count independence."""

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from mimkit.data import ImageDataset
from mimkit.data.device import DeviceNormalize, prefetch_to_device
from mimkit.data.folder_index import index_folder
from mimkit.data.lazy import LazyImageDataset, PretrainCrop, load_lazy_folder
from mimkit.engine.sampling import SeededSampler, SeededTransformDataset
from mimkit.errors import DataError


def _rgb(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def jpeg_folder(tmp_path):
    root = tmp_path / "jpegs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(_rgb(90 + 7 * i, 120 - 5 * i, seed=i + (c == "b") * 10)).save(root / c / f"{i}.jpg",
                                                                                          quality=90)
    return root


def test_crop_equals_the_official_torchvision_pil_pipeline_pixel_for_pixel(jpeg_folder):
    ds = load_lazy_folder(jpeg_folder)
    crop = PretrainCrop(32, scale=(0.2, 1.0))
    official = T.RandomResizedCrop(32, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC)
    for i in range(len(ds)):
        torch.manual_seed(100 + i)
        ours = crop(ds, i)
        torch.manual_seed(100 + i)
        with Image.open(ds.files[i]) as im:
            theirs = np.asarray(official(im.convert("RGB")))
        assert ours.dtype == torch.uint8 and ours.shape == (3, 32, 32)
        assert np.array_equal(ours.permute(1, 2, 0).numpy(), theirs)


def test_greyscale_palette_rgba_and_cmyk_files_become_the_dataset_channel_count(tmp_path):
    rgb = _rgb(20, 24, seed=3)
    variants = {
        "grey.jpg": Image.fromarray(rgb).convert("L"),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full((20, 24), 7, np.uint8)]), "RGBA"),
        "rgb.png": Image.fromarray(rgb),
    }
    for name, im in variants.items():
        im.save(tmp_path / name)
    ds = load_lazy_folder(tmp_path)
    assert ds.num_channels == 3  # the majority of the headers
    for i, path in enumerate(ds.files):
        with Image.open(path) as im:
            expected = np.asarray(im.convert("RGB"))
        decoded = ds.decode(i)
        assert decoded.shape == (20, 24, 3) and np.array_equal(decoded, expected), path
    grey = LazyImageDataset(ds.index, num_channels=1)
    with Image.open(ds.files[0]) as im:
        assert np.array_equal(grey.decode(0)[..., 0], np.asarray(im.convert("L")))


@pytest.mark.parametrize("layout", ["chw", "hwc"])
def test_seven_channel_uint16_tiff_stacks_decode_and_crop_as_float(tmp_path, layout):
    stack = np.random.default_rng(0).integers(0, 65536, (7, 30, 26), dtype=np.uint16)
    for i in range(2):
        tifffile.imwrite(tmp_path / f"{i}.tif", stack if layout == "chw" else stack.transpose(1, 2, 0))
    ds = load_lazy_folder(tmp_path)
    assert (ds.num_channels, ds.storage, ds.scale) == (7, "uint16", 65535.0)
    assert np.array_equal(ds.decode(0), stack.transpose(1, 2, 0))
    crop = PretrainCrop(16, scale=(0.5, 1.0))
    torch.manual_seed(5)
    ours = crop(ds, 0)
    torch.manual_seed(5)
    source = torch.from_numpy(stack.astype(np.float32) / 65535.0)
    box = T.RandomResizedCrop.get_params(source, [0.5, 1.0], [3 / 4, 4 / 3])
    reference = T.functional.resized_crop(source, *box, [16, 16], T.InterpolationMode.BICUBIC, antialias=True)
    assert ours.dtype == torch.float32 and torch.allclose(ours, reference, atol=1e-6)


def test_skip_replaces_a_corrupt_file_deterministically_and_reports_it(jpeg_folder):
    bad = jpeg_folder / "a" / "1.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    ds = load_lazy_folder(jpeg_folder, on_error="skip")
    items = SeededTransformDataset(ds, PretrainCrop(16))
    index = ds.files.index(str(bad))
    image, label, seed, failed = items[(index, 42)]
    assert failed == str(bad) and image.shape == (3, 16, 16)
    again = items[(index, 42)]
    assert torch.equal(again[0], image) and again[1] == label  # same replacement every time
    strict = SeededTransformDataset(load_lazy_folder(jpeg_folder), PretrainCrop(16))
    with pytest.raises(DataError, match=r"Cannot read image .*1\.jpg.*data.on_error=skip"):
        strict[(index, 42)]


def test_device_normalize_equals_the_per_image_formula():
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    mean, std = [0.1, 0.5, 0.9], [0.2, 0.3, 0.4]
    out = DeviceNormalize(mean, std, 255.0, torch.device("cpu"))(x)
    reference = T.Normalize(mean, std)(x.float() / 255.0)
    assert out.dtype == torch.float32 and torch.allclose(out, reference, atol=1e-5)
    batches = list(prefetch_to_device([(x, torch.arange(4))], torch.device("cpu")))
    assert torch.equal(batches[0][0], x)


def test_batches_do_not_depend_on_the_worker_count(jpeg_folder):
    ds = load_lazy_folder(jpeg_folder)
    items = SeededTransformDataset(ds, PretrainCrop(24, hflip=True))

    def epoch(workers):
        sampler = SeededSampler(len(ds), seed=3)
        sampler.set_epoch(1)
        loader = DataLoader(items, batch_size=2, sampler=sampler, num_workers=workers)
        return [batch[0] for batch in loader]

    for a, b in zip(epoch(0), epoch(2)):
        assert torch.equal(a, b)


def test_index_labels_travel_with_items(jpeg_folder):
    ds = LazyImageDataset(index_folder(jpeg_folder))
    assert ds.class_names == ["a", "b"] and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    image, label = ds[4]
    assert label == 1 and image.dtype == torch.float32 and image.shape[0] == 3
    assert torch.equal(image, ImageDataset([ds.decode(4)])[0][0])  # the floats ImageDataset gives
