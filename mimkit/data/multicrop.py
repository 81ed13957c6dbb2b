"""Multi-crop augmentation (DINO / iBOT, methods.md §5.1) for any channel count.

``MultiCropTransform(img)`` maps one float image ``[C, H, W]`` in [0, 1] to a list of
``2 + num_local`` normalised tensors: two global crops ``[C, G, G]`` then ``num_local`` local
crops ``[C, S, S]``. The default collate turns a batch of such lists into a list of batched
tensors, which the engine moves to the device.

Photometric augmentation follows DINO where it means something for the channels:

* **3 channels (RGB)**: colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1)
  with p 0.8, grayscale p 0.2, Gaussian blur (p 1.0 first global, 0.1 second global, 0.5
  local), solarisation p 0.2 (second global crop).
* **1 channel (grey)**: brightness/contrast jitter (0.4, 0.4) with p 0.8, the same blur and
  solarisation (intensity operations; saturation, hue and grayscale do not exist).
* **any other count (e.g. multi-channel fluorescence)**: blur only. Channels there are
  separate stains or measurements, so jittering or inverting their intensities would mix
  up what they measure.

Blur sigma scales with the crop size (DINO: sigma 0.1-2.0 at 224 px).
Random draws use torch's global generator, which the engine seeds per sample.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torchvision.transforms import v2

from mimkit.data.transforms import interpolation_mode


def _clamp01(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0.0, 1.0)


def _reflect_index(size: int, r: int) -> torch.Tensor:
    """Indices of a length-``size`` axis padded by ``r`` on each side with reflection (no edge repeat)."""
    idx = torch.arange(-r, size + r).abs()
    return torch.where(idx >= size, 2 * (size - 1) - idx, idx)


class RandomGaussianBlur(torch.nn.Module):
    """Gaussian blur with probability p and sigma ~ U(sigma_range), for [C, H, W] float tensors.

    Separable, written with shifted slices instead of a convolution: on crops of a few dozen
    pixels a conv2d call spends far longer in thread-pool overhead than in arithmetic.
    Kernel radius ceil(2 * sigma_max), reflect padding (as torchvision).
    """

    def __init__(self, sigma_range: tuple[float, float], p: float) -> None:
        super().__init__()
        self.sigma_range, self.p = sigma_range, p
        self.radius = max(1, math.ceil(2 * sigma_range[1]))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return img
        sigma = float(torch.empty(()).uniform_(*self.sigma_range))
        r = min(self.radius, img.shape[-1] - 1, img.shape[-2] - 1)
        offsets = torch.arange(-r, r + 1, dtype=img.dtype)
        weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
        weights = (weights / weights.sum()).tolist()
        h, w = img.shape[-2:]
        x = img[:, _reflect_index(h, r)][:, :, _reflect_index(w, r)]  # reflect padding (F.pad is slow here)
        x = sum(wt * x[:, i:i + h, :] for i, wt in enumerate(weights))  # vertical pass
        return sum(wt * x[:, :, i:i + w] for i, wt in enumerate(weights))  # horizontal pass


def _blur(size: int, p: float) -> torch.nn.Module:
    """DINO's blur (sigma 0.1-2.0 at 224 px) with sigma scaled to the crop size (at least 0.5)."""
    return RandomGaussianBlur((0.1, max(0.5, 2.0 * size / 224)), p)


def _photometric(num_channels: int, size: int, blur_p: float, solarize_p: float) -> list[torch.nn.Module]:
    """The channel-count rule of the module docstring, for one crop type."""
    steps: list[torch.nn.Module] = []
    if num_channels == 3:
        steps += [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2)]
    elif num_channels == 1:
        steps += [v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4)], p=0.8)]
    if blur_p > 0:
        steps.append(_blur(size, blur_p))
    if num_channels in (1, 3) and solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=0.5, p=solarize_p))
    return steps


class MultiCropTransform:
    """Two global crops and ``num_local`` local crops of one image, each normalised.

    Args:
        num_channels: C of the images (picks the photometric rule above).
        global_size, local_size: output side of global / local crops (pixels).
        num_local: number of local crops (0 = only the two global ones).
        global_scale, local_scale: RandomResizedCrop area ranges (DINO/iBOT: (0.25, 1) and
            (0.05, 0.25) in the seed's recipe).
        mean, std: per-channel normalisation (dataset statistics).
        photometric: apply the colour/blur/solarise rule; False keeps crops and flips only.
        hflip: random horizontal flip on every crop.
        interpolation: "bicubic" | "bilinear" | "nearest".
    """

    def __init__(
        self,
        num_channels: int,
        global_size: int,
        local_size: int,
        num_local: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        global_scale: Sequence[float] = (0.25, 1.0),
        local_scale: Sequence[float] = (0.05, 0.25),
        photometric: bool = True,
        hflip: bool = True,
        interpolation: str = "bicubic",
    ) -> None:
        mode = interpolation_mode(interpolation)
        if len(mean) != num_channels or len(std) != num_channels:
            raise ValueError(f"mean and std need {num_channels} values (one per channel), got {len(mean)} and {len(std)}")
        if num_local < 0:
            raise ValueError(f"num_local must be >= 0, got {num_local}")
        self.num_channels, self.num_local = num_channels, num_local
        norm = v2.Normalize([float(m) for m in mean], [float(s) for s in std])

        def pipeline(size: int, scale: Sequence[float], blur_p: float, solarize_p: float) -> v2.Compose:
            steps: list[torch.nn.Module] = [
                v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=mode, antialias=True)
            ]
            if hflip:
                steps.append(v2.RandomHorizontalFlip())
            if photometric:
                # Bicubic resampling overshoots [0, 1] slightly; jitter and solarise expect [0, 1].
                steps.append(v2.Lambda(_clamp01))
                steps += _photometric(num_channels, size, blur_p, solarize_p)
            return v2.Compose(steps + [norm])

        self.global1 = pipeline(global_size, global_scale, 1.0, 0.0)
        self.global2 = pipeline(global_size, global_scale, 0.1, 0.2)
        self.local = pipeline(local_size, local_scale, 0.5, 0.0)

    def __call__(self, img: torch.Tensor) -> list[torch.Tensor]:
        """[C, H, W] float in [0, 1] -> [global1, global2, local_1, ..., local_n]."""
        if img.ndim != 3 or img.shape[0] != self.num_channels:
            raise ValueError(f"multi-crop expects [C={self.num_channels}, H, W] images, got shape {tuple(img.shape)}")
        # One thread: on crops this small torch's thread pool costs far more than it saves
        # (hue jitter and padding ran 10-100x slower with 2 threads on a busy CPU).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return [self.global1(img), self.global2(img)] + [self.local(img) for _ in range(self.num_local)]
        finally:
            torch.set_num_threads(threads)

    def __repr__(self) -> str:
        return (f"MultiCropTransform(C={self.num_channels}, 2 global + {self.num_local} local)\n"
                f"  global1: {self.global1}\n  global2: {self.global2}\n  local: {self.local}")


__all__ = ["MultiCropTransform", "RandomGaussianBlur"]
