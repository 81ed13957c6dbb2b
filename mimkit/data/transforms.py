"""Per-channel statistics and the MAE pretraining / evaluation transforms, for any channel count.

All transforms take a float tensor ``[C, H, W]`` (as returned by :class:`ImageDataset`) and
return ``[C, img_size, img_size]`` normalised with the dataset's own mean and std. The
torchvision v2 functional ops used here work on float tensors with any ``C`` (1, 3, 7, ...).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from mimkit.errors import DataError


_INTERPOLATION = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}


def interpolation_mode(name: str) -> InterpolationMode:
    """torchvision's mode for ``data.interpolation`` (bicubic | bilinear | nearest); ValueError otherwise."""
    if name not in _INTERPOLATION:
        raise ValueError(f"Unknown interpolation '{name}': choose one of {', '.join(_INTERPOLATION)}.")
    return _INTERPOLATION[name]


def stats_for(dataset, recorded: dict[str, list[float]] | None = None,
              max_images: int = 10000) -> dict[str, list[float]]:
    """Normalisation statistics ``{"mean", "std"}``: ``recorded`` ones (a checkpoint's pretraining
    statistics) when their channel count fits ``dataset``, else computed from a seeded sample of
    at most ``max_images`` images of the data."""
    if recorded is not None and len(recorded["mean"]) == dataset.num_channels:
        return {"mean": list(recorded["mean"]), "std": list(recorded["std"])}
    mean, std = compute_channel_stats(dataset, max_images)
    return {"mean": mean, "std": std}


def _stored_pixels(ds, i: int) -> np.ndarray:
    """Image ``i`` as float64 ``[P, C]`` in [0, 1], from the stored pixels where the dataset keeps
    them (in memory: ``raw``; lazy folders: ``decode``), so both kinds give bit-identical sums."""
    for name in ("raw", "decode"):
        if hasattr(ds, name):
            x = getattr(ds, name)(i)
            return x.reshape(-1, x.shape[-1]).astype(np.float64) / ds.scale
    img = ds[i][0]  # any dataset: a float [C, H, W] image
    x = img.numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    return x.reshape(x.shape[0], -1).T.astype(np.float64)


def _image_sums(ds, i: int) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Per-channel sum, sum of squares and pixel count of image ``i``; None for a file the
    dataset's ``on_error=skip`` policy skips (it is counted by the training loop, not here)."""
    try:
        x = _stored_pixels(ds, i)
    except DataError:
        if getattr(ds, "on_error", "raise") == "skip":
            return None
        raise
    return x.sum(0), np.square(x).sum(0), x.shape[0]


def compute_channel_stats(ds, max_images: int = 10000,
                          seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the pixels, in [0, 1] units.

    Uses a seeded random sample of at most ``max_images`` images (``np.random.default_rng(seed)``,
    so the result is reproducible). Sums and sums of squares are accumulated in float64 image by
    image, in index order (threads decode; the order of the sums is fixed), so an image folder
    gives the same statistics in memory and lazily. std is the population std, floored at 1e-6
    so that normalising a constant channel does not divide by zero.

    Args:
        ds: an :class:`ImageDataset`, a :class:`~mimkit.data.lazy.LazyImageDataset`, or any
            dataset whose items are ``(image [C, H, W], label)``.
    Returns:
        (mean, std): two lists of ``C`` floats.
    """
    n = len(ds)
    if n == 0:
        raise ValueError("cannot compute channel statistics of an empty dataset")
    if n > max_images:
        idx = np.sort(np.random.default_rng(seed).choice(n, size=max_images, replace=False))
    else:
        idx = np.arange(n)
    total = count = total_sq = 0
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for sums in pool.map(lambda i: _image_sums(ds, int(i)), idx):
            if sums is not None:
                total, total_sq, count = total + sums[0], total_sq + sums[1], count + sums[2]
    if not count:
        raise DataError(f"None of the {len(idx)} images sampled for channel statistics could be read: check the data.")
    mean = total / count
    var = np.maximum(total_sq / count - mean**2, 0.0)  # clamp tiny negative round-off
    std = np.maximum(np.sqrt(var), 1e-6)
    return [float(m) for m in mean], [float(s) for s in std]


class _ChannelTransform:
    """Callable ``[C, H, W]`` float -> ``[C, S, S]``: checks C, then runs the v2 pipeline(s)."""

    def __init__(self, kind: str, img_size: int, mean, std, resize_crop, normalize):
        self.kind, self.img_size = kind, img_size
        self.mean, self.std = mean, std
        self.resize_crop = resize_crop  # None for pretrain (crop is inside normalize pipeline)
        self.normalize = normalize

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if img.ndim != 3 or img.shape[0] != len(self.mean):
            raise ValueError(f"{self.kind} transform expects [C={len(self.mean)}, H, W] images "
                             f"(one mean/std per channel) but got shape {tuple(img.shape)}")
        if self.resize_crop is not None and tuple(img.shape[-2:]) != (self.img_size,) * 2:
            img = self.resize_crop(img)
        return self.normalize(img)

    def __repr__(self) -> str:
        parts = [repr(t) for t in (self.resize_crop, self.normalize) if t is not None]
        return f"{self.kind}Transform(\n  " + "\n  ".join(parts) + "\n)"


def build_transform(kind: str, img_size: int, mean: Sequence[float], std: Sequence[float], *,
                    crop_scale: tuple[float, float] = (0.2, 1.0), hflip: bool = True,
                    interpolation: str = "bicubic",
                    eval_crop_pct: float = 0.875) -> Callable[[torch.Tensor], torch.Tensor]:
    """Transform ``float [C, H, W] -> float [C, img_size, img_size]``, normalised.

    * ``"pretrain"`` (MAE recipe): RandomResizedCrop(img_size, scale=crop_scale,
      antialias=True) -> RandomHorizontalFlip (if ``hflip``) -> Normalize(mean, std).
    * ``"eval"`` (MAE eval protocol): an image already ``img_size x img_size`` is only
      normalised (no crop: MedMNIST-sized data keeps every pixel); any other image is
      Resize(int(img_size / eval_crop_pct)) on its short side -> CenterCrop(img_size) ->
      Normalize. ``eval_crop_pct=1.0`` gives a plain resize of square images.

    Bicubic interpolation can overshoot [0, 1] slightly; that is expected (official MAE too).
    ``len(mean) == len(std)`` must equal the image channel count; the transform raises
    ValueError on a mismatch. Unknown ``kind`` or ``interpolation`` -> ValueError.
    """
    mode = interpolation_mode(interpolation)
    mean = [float(m) for m in mean]
    std = [float(s) for s in std]
    if len(mean) != len(std) or not mean:
        raise ValueError(f"mean and std need one value per channel, got {len(mean)} and "
                         f"{len(std)}")
    norm = v2.Normalize(mean, std)
    if kind == "pretrain":
        steps = [v2.RandomResizedCrop(img_size, scale=tuple(crop_scale), interpolation=mode,
                                      antialias=True)]
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
        return _ChannelTransform(kind, img_size, mean, std, None, v2.Compose(steps + [norm]))
    if kind == "eval":
        if not 0 < eval_crop_pct <= 1:
            raise ValueError(f"eval_crop_pct must be in (0, 1], got {eval_crop_pct}")
        resize_crop = v2.Compose([
            v2.Resize(int(img_size / eval_crop_pct), interpolation=mode, antialias=True),
            v2.CenterCrop(img_size),
        ])
        return _ChannelTransform(kind, img_size, mean, std, resize_crop, norm)
    raise ValueError(f"Unknown transform kind '{kind}': choose 'pretrain' or 'eval'.")


class TransformedDataset(Dataset):
    """``(transform(image), label)`` for each item of ``ds``.

    Other attributes (``num_channels``, ``num_classes``, ``labels`` ...) are read through to
    ``ds``, so code written for :class:`ImageDataset` keeps working.
    """

    def __init__(self, ds: Dataset, transform: Callable[[torch.Tensor], torch.Tensor]):
        self.ds = ds
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        img, label = self.ds[i]
        return self.transform(img), label

    def __getattr__(self, name: str):
        # Only called for attributes not found normally. Guard "ds" itself: during unpickling
        # (DataLoader workers) __dict__ is empty and self.ds would recurse forever.
        if name == "ds" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.ds, name)
