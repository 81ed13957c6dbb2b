"""Image folders too large for memory: decoded per item, inside DataLoader workers.

:class:`LazyImageDataset` holds only a :class:`~mimkit.data.folder_index.FileIndex`. Items are
decoded when asked for, converted to the dataset's channel count, and handed on in their
storage dtype (uint8 for 8-bit files), so that workers do the least per image and the float
conversion and normalisation run batched on the training device (:mod:`mimkit.data.device`).

:class:`PretrainCrop` is the MAE pretraining crop for such items: RandomResizedCrop (scale, ratio
3/4..4/3, bicubic) drawn from torch's RNG, so the engine's per-sample seed fixes it whatever the
worker count. For 8-bit files it crops and resizes the decoded image with Pillow exactly as
torchvision does on PIL images in the official pipeline (same box, same pixels), but stops at
uint8: no ToTensor or Normalize per image. With
``draft=True`` a JPEG is decoded at a reduced scale (1/2, 1/4 or 1/8, Pillow's ``draft``) when
the crop box stays at least twice the output size at that scale, i.e. only large boxes of large
images: the crop is then resampled from a DCT-downscaled image, a slight low-pass the eye does
not see, in exchange for decoding a quarter (or fewer) of the pixels.

Unreadable files follow ``on_error``: ``raise`` (a DataError naming the file), or ``skip``: the
item is replaced by the next readable one (deterministically) and the bad path travels with the
batch so the engine can count it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import tifffile
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from mimkit.data.folder_index import FileIndex, PathTable, index_folder, merge_indices
from mimkit.data.sources import TIFF_EXTENSIONS, to_hwc
from mimkit.data.transforms import interpolation_mode
from mimkit.errors import DataError

_PIL_CHANNELS = {"1": 1, "L": 1, "LA": 1, "I": 1, "I;16": 1, "I;16B": 1, "I;16L": 1, "F": 1,
                 "P": 3, "RGB": 3, "RGBA": 3, "RGBX": 3, "CMYK": 3, "YCbCr": 3, "LAB": 3, "HSV": 3}
_PIL_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def _is_tiff(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in TIFF_EXTENSIONS


def header_info(path: str) -> tuple[int, str, int]:
    """(channel count, storage family "uint8" | "uint16" | "float", pixels per channel) from a file's header."""
    if _is_tiff(path):
        with tifffile.TiffFile(path) as tif:
            shape, dtype = tif.series[0].shape, np.dtype(tif.series[0].dtype)
        dims = [s for s in shape if s > 1]
        channels = 1 if len(dims) <= 2 else min(dims)
        return channels, "float" if dtype.kind == "f" else str(dtype), math.prod(dims) // channels
    with Image.open(path) as im:
        mode, (width, height) = im.mode, im.size
    if mode not in _PIL_CHANNELS:
        raise DataError(f"Image {path} has the unsupported mode {mode}: save it as greyscale or RGB.")
    family = "uint16" if mode.startswith("I") else "float" if mode == "F" else "uint8"
    return _PIL_CHANNELS[mode], family, width * height


def _pil_to_channels(im: Image.Image, channels: int) -> Image.Image:
    """Greyscale, palette, RGBA, CMYK, ... -> "L" (1 channel) or "RGB" (3); 16-bit grey stays 16-bit."""
    if channels == 1:
        if im.mode.startswith("I") or im.mode == "F":
            return im
        return im.convert("L")
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I"):  # 16-bit grey into a 3-channel set: 8-bit grey, then RGB
        im = Image.fromarray((np.asarray(im, dtype=np.uint32) >> 8).astype(np.uint8))
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # Pillow warns when converting transparent palettes straight to RGB
    return im.convert("RGB")


def _pil_array(im: Image.Image) -> np.ndarray:
    a = np.array(im)  # a writable copy: torch refuses to wrap read-only buffers safely
    if a.dtype.kind in "iu" and a.dtype.itemsize > 1:
        a = a.astype(np.uint16)  # Pillow gives 16-bit PNGs as int32 or uint16
    return a[..., None] if a.ndim == 2 else a


def _tiff_hwc(path: str, channels: int) -> np.ndarray:
    """A TIFF stack as [H, W, C] (:func:`mimkit.data.sources.to_hwc`: the smallest axis is the channel axis)."""
    a = to_hwc(np.asarray(tifffile.imread(path)), Path(path))
    if a.shape[-1] != channels:
        raise DataError(f"Image {path} has {a.shape[-1]} channels but the dataset has {channels}: give all TIFF "
                        f"stacks the same channel count.")
    return a


class LazyImageDataset(Dataset):
    """The images of a :class:`FileIndex`, decoded on access.

    ``ds[i]`` -> ``(image, label)`` as :class:`~mimkit.data.sources.ImageDataset` gives them: image
    float32 ``[C, H, W]`` in [0, 1] with ``num_channels`` channels, label an int (-1 = unlabeled), so
    any image transform (evaluation, iBOT's multi-crop) works on it unchanged. ``decode(i)`` gives
    the stored pixels; :class:`PretrainCrop` decodes files itself, so it can crop while decoding.

    ``num_channels`` defaults to the most common channel count among the headers of up to 256
    seeded sampled files (ImageNet's greyscale and CMYK JPEGs become RGB).
    """

    def __init__(self, index: FileIndex, num_channels: int | None = None, *, on_error: str = "raise",
                 sample_seed: int = 0):
        if on_error not in ("raise", "skip"):
            raise DataError(f"data.on_error is {on_error!r}: choose raise or skip.")
        self.index, self.on_error = index, on_error
        self.files = PathTable(index.files)  # not a list of str: see PathTable (forked workers)
        self.labels = torch.as_tensor(index.labels, dtype=torch.long)
        self.class_names = list(index.class_names)
        self.num_classes = len(self.class_names)
        self.image_size = None  # sizes may differ: transforms resize
        self.source = index.root
        self.num_channels, self.storage = self._probe(num_channels, sample_seed)
        self.scale = {"uint8": 255.0, "uint16": 65535.0}.get(self.storage, 1.0)

    def _probe(self, num_channels: int | None, seed: int) -> tuple[int, str]:
        """Channel count (most common) and storage from up to 256 seeded headers; also sets
        ``mean_pixels``, the mean pixel count per channel of those files (memory estimates)."""
        n = len(self.files)
        picks = np.random.default_rng(seed).choice(n, size=min(n, 256), replace=False)
        seen: list[tuple[int, str, int]] = []
        for i in picks:
            try:
                seen.append(header_info(self.files[i]))
            except Exception:  # noqa: BLE001 - a bad file is the error policy's business, not the probe's
                continue
        if not seen:
            raise DataError(f"None of the {len(picks)} sampled files under {self.source} could be opened: are they "
                            f"images?")
        counts = [c for c, _, _ in seen]
        channels = num_channels or max(set(counts), key=counts.count)
        families = {f for _, f, _ in seen}
        storage = "float" if "float" in families else "uint16" if "uint16" in families else "uint8"
        self.mean_pixels = float(np.mean([p for _, _, p in seen]))
        return channels, storage

    def decoded_bytes(self) -> int:
        """Estimated memory of every file decoded (storage dtype), from the sampled headers."""
        itemsize = {"uint8": 1, "uint16": 2}.get(self.storage, 4)
        return int(len(self.files) * self.mean_pixels * self.num_channels * itemsize)

    def __len__(self) -> int:
        return len(self.files)

    def decode(self, i: int) -> np.ndarray:
        """File ``i`` as ``[H, W, C]`` with ``num_channels`` channels; DataError if unreadable."""
        path = self.files[i]
        try:
            if _is_tiff(path):
                return _tiff_hwc(path, self.num_channels)
            with Image.open(path) as im:
                return _pil_array(_pil_to_channels(im, self.num_channels))
        except DataError:
            raise
        except Exception as exc:  # decoders raise many types; all mean "bad file"
            raise DataError(f"Cannot read image {path} ({exc}): remove or replace it, or set data.on_error=skip.") from exc

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        # the same conversion as ImageDataset.__getitem__, so a folder gives the same floats both ways
        image = torch.from_numpy(np.ascontiguousarray(self.decode(i).transpose(2, 0, 1), dtype=np.float32))
        if self.scale != 1.0:
            image.mul_(1.0 / self.scale)
        return image, int(self.labels[i])

    def readable(self, i: int, read) -> tuple[object, int, list[str]]:
        """``read(i)`` for item ``i``, or under ``on_error=skip`` for the next readable item.

        Returns (result, index used, paths that failed on the way). The replacement walks a fixed
        stride through the dataset, so it does not depend on worker count or timing.
        """
        failed: list[str] = []
        n = len(self.files)
        stride = 7919 % n or 1  # a prime stride visits other classes before neighbours
        j = i
        for _ in range(min(n, 64)):
            try:
                return read(j), j, failed
            except DataError:
                if self.on_error == "raise":
                    raise
                failed.append(self.files[j])
                j = (j + stride) % n
        raise DataError(f"64 files in a row could not be read under {self.source} (first: {failed[0]}): check the "
                        f"data.")

    def __repr__(self) -> str:
        return (f"LazyImageDataset({len(self)} files, {self.num_channels} ch, {self.storage}, "
                f"{self.num_classes} classes, source={self.source!r})")


def _crop_box(width: int, height: int, scale: Sequence[float], ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """(top, left, h, w) of torchvision's RandomResizedCrop, drawn from torch's global RNG."""
    return v2.RandomResizedCrop.get_params(torch.empty(1, height, width), list(scale), list(ratio))  # type: ignore[arg-type]


class PretrainCrop:
    """RandomResizedCrop(size, scale, ratio) + optional flip of a lazily decoded file -> [C, S, S].

    Called as ``crop(dataset, i)`` (``reads_files``): it opens file ``i`` itself. 8-bit data stays
    uint8 (normalised later, batched, on the device: :meth:`output_scale` is 255); 16-bit and
    float files are cropped as float32 in [0, 1] (scale 1; Pillow cannot resize multi-channel
    16-bit stacks).
    """

    reads_files = True

    def __init__(self, size: int, scale: Sequence[float] = (0.2, 1.0), *, ratio=(3 / 4, 4 / 3),
                 interpolation: str = "bicubic", hflip: bool = False, draft: bool = False):
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)
        self.mode, self.resample = interpolation_mode(interpolation), _PIL_RESAMPLE[interpolation]
        self.hflip, self.draft = hflip, draft

    def __call__(self, dataset, i: int) -> torch.Tensor:
        """Crop of item ``i`` of a :class:`LazyImageDataset` or an in-memory ``ImageDataset``
        (the same pixels either way, unless ``draft`` reduces a lazily decoded JPEG)."""
        lazy = isinstance(dataset, LazyImageDataset)
        where = dataset.files[i] if lazy else f"{i} of {dataset.source}"
        try:
            if lazy and dataset.storage == "uint8" and not _is_tiff(where):
                out = self._crop_file(where, dataset.num_channels)
            else:
                out = self._crop_pixels(dataset.decode(i) if lazy else dataset.raw(i), dataset.storage, dataset.scale)
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - decoders raise many types; all mean "bad file"
            raise DataError(f"Cannot read image {where} ({exc}): remove or replace it, or set data.on_error=skip.") from exc
        if self.hflip and torch.rand(()) < 0.5:
            out = out.flip(-1)
        return out

    def _crop_file(self, path: str, channels: int) -> torch.Tensor:
        """Open, (draft-)decode and crop an 8-bit file: the box is drawn on the full-size image."""
        with Image.open(path) as im:
            width, height = im.size
            top, left, h, w = _crop_box(width, height, self.scale, self.ratio)
            reduce = self._draft_factor(im, h, w)
            if reduce > 1:
                im.draft(im.mode, (math.ceil(width / reduce), math.ceil(height / reduce)))
                fx, fy = im.size[0] / width, im.size[1] / height
                top, left, h, w = top * fy, left * fx, h * fy, w * fx
            return self._resize_pil(_pil_to_channels(im, channels), top, left, h, w)

    def _resize_pil(self, im: Image.Image, top: float, left: float, h: float, w: float) -> torch.Tensor:
        # crop, then resize: torchvision's resized_crop on PIL images, so the pixels equal the official path's
        box = (round(left), round(top), round(left + w), round(top + h))
        out = im.crop(box).resize((self.size, self.size), self.resample)
        return torch.from_numpy(_pil_array(out)).permute(2, 0, 1).contiguous()

    def _crop_pixels(self, hwc: np.ndarray, storage: str, scale: float) -> torch.Tensor:
        """Crop decoded pixels ``[H, W, C]``: grey/RGB 8-bit through Pillow (as a file would be), the
        rest (TIFF stacks, 16-bit, float) as tensors."""
        if storage == "uint8" and hwc.shape[2] in (1, 3):
            im = Image.fromarray(np.ascontiguousarray(hwc[..., 0] if hwc.shape[2] == 1 else hwc))
            top, left, h, w = _crop_box(im.size[0], im.size[1], self.scale, self.ratio)
            return self._resize_pil(im, top, left, h, w)
        return self._crop_array(hwc, storage, scale)

    def _draft_factor(self, im: Image.Image, h: int, w: int) -> int:
        """Largest JPEG reduction (1, 2, 4, 8) that keeps the box at least 2 x size on its short side."""
        if not self.draft or im.format != "JPEG":
            return 1
        reduce = 1
        while reduce < 8 and min(h, w) / (reduce * 2) >= 2 * self.size:
            reduce *= 2
        return reduce

    @staticmethod
    def output_scale(dataset) -> float:
        """The value of 1.0 in this crop's output for ``dataset``: 255 (uint8) or 1 (float)."""
        return 255.0 if dataset.storage == "uint8" else 1.0

    def _crop_array(self, hwc: np.ndarray, storage: str, scale: float) -> torch.Tensor:
        """Crop decoded pixels (TIFF stacks, 16-bit files): uint8 stays uint8, the rest -> float in [0, 1]."""
        if storage == "uint8":
            x = torch.from_numpy(np.ascontiguousarray(hwc, dtype=np.uint8)).permute(2, 0, 1)
        else:
            x = torch.from_numpy(hwc.astype(np.float32)).permute(2, 0, 1)
            if scale != 1.0:
                x = x / scale
        top, left, h, w = _crop_box(x.shape[2], x.shape[1], self.scale, self.ratio)
        return v2.functional.resized_crop(x, top, left, h, w, [self.size, self.size], interpolation=self.mode,
                                          antialias=True)


def load_lazy_folder(paths: str | os.PathLike | Sequence[str | os.PathLike], split: str = "train", *,
                     num_channels: int | None = None, on_error: str = "raise",
                     cache: Path | None = None) -> LazyImageDataset:
    """A :class:`LazyImageDataset` over one folder or several roots (classes merged by name)."""
    roots = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    index = merge_indices([index_folder(r, split, cache) for r in roots])
    return LazyImageDataset(index, num_channels, on_error=on_error)
