"""The four-panel reconstruction figure: original, masked, reconstruction, reconstruction + visible.

Two kinds of method fill it. MAE predicts patch tokens [N, L, p*p*C]; predictions of a norm-pix
model are per-patch normalised and are mapped back to image space with the mean and variance of
each *original* patch (the only sensible de-normalisation, and what the official demo does
implicitly for its un-normalised visualisation models). Pixel-space methods (SimMIM, DDMIM: see
:func:`reconstructs_pixels`) predict the dataset-normalised image [N, C, H, W] directly. Both
give the same panel dict, which :func:`save_reconstruction_figure` draws after undoing the
dataset normalisation.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from mimkit.data import build_transform
from mimkit.methods.mae import MAE
from mimkit.models.patches import patchify, unpatchify
from mimkit.viz import save_figure


def _panels(images: torch.Tensor, recon: torch.Tensor, pixel_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """images, recon [N, C, H, W] (normalised), pixel_mask [N, C, H, W] (1 = masked) -> the figure's panels.

    "masked" is 0 (the dataset mean) on masked pixels; the figure paints them grey.
    """
    return {
        "original": images,
        "masked": images * (1 - pixel_mask),
        "reconstruction": recon,
        "reconstruction + visible": images * (1 - pixel_mask) + recon * pixel_mask,
        "mask": pixel_mask,
    }


@torch.no_grad()
def reconstruction_panels(model: MAE, images: torch.Tensor, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """MAE: images [N, C, H, W] (dataset-normalised) -> four [N, C, H, W] tensors in the same normalised space."""
    model.eval()
    rec = model.reconstruct(images, noise=noise)
    pred = rec.pred.float()
    if model.norm_pix_loss:
        target = patchify(images, model.patch_size)
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1.0e-6) ** 0.5 + mean
    recon = unpatchify(pred, model.patch_size, model.grid_size, model.in_chans)
    pixel_mask = unpatchify(
        rec.mask.unsqueeze(-1).expand(-1, -1, model.patch_size**2 * model.in_chans),
        model.patch_size, model.grid_size, model.in_chans,
    )
    return _panels(images, recon, pixel_mask)


def reconstructs_pixels(model: nn.Module) -> bool:
    """Whether ``model`` reconstructs in pixel space as SimMIM and DDMIM do.

    That is ``draw_mask(images, sample_seeds)`` and ``reconstruct(images, *, mask, sample_seeds)``
    returning ``pred`` [N, C, H, W] and ``pixel_mask`` [N, 1, H, W]. Checked on the signatures, not
    the class, so a new method with this interface draws without a change here; MAE's
    ``draw_mask(batch_size, ...)`` and ``reconstruct(images, *, noise, ...)`` do not match.
    """
    reconstruct, draw = getattr(model, "reconstruct", None), getattr(model, "draw_mask", None)
    if not (callable(reconstruct) and callable(draw)):
        return False
    draw_args = list(inspect.signature(draw).parameters)
    return {"mask", "sample_seeds"} <= inspect.signature(reconstruct).parameters.keys() and draw_args[:1] == ["images"]


@torch.no_grad()
def pixel_reconstruction_panels(model: nn.Module, images: torch.Tensor,
                                sample_seeds: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pixel-space methods (:func:`reconstructs_pixels`): images [N, C, H, W] (dataset-normalised),
    sample_seeds [N] (the masks) -> the panels of :func:`_panels`, [N, C, H, W] each."""
    model.eval()
    rec = model.reconstruct(images, sample_seeds=sample_seeds)
    return _panels(images, rec.pred.float(), rec.pixel_mask.float().expand_as(images))


def figure_seeds(idx: torch.Tensor, seed: int) -> torch.Tensor:
    """[N] per-image mask seeds of a figure: image index and --seed (a new --seed, new masks)."""
    return idx + seed * 1_000_003


def pick_images(dataset, num_images: int, generator: torch.Generator, log=print) -> torch.Tensor:
    """[min(num_images, len)] distinct indices of ``dataset``, seeded by ``generator``.

    A split smaller than ``num_images`` is drawn whole, with a note, so the figure's row count
    is never a silent surprise.
    """
    if num_images > len(dataset) and log:
        log(f"{getattr(dataset, 'source', 'the split')} has only {len(dataset)} images: the figure shows all of "
            f"them, not {num_images}")
    return torch.randperm(len(dataset), generator=generator)[:num_images]


def _to_display(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]):
    """[C, H, W] normalised -> HxW or HxWx3 array in [0, 1] (first three channels of N-channel data)."""
    m = torch.tensor(mean, dtype=x.dtype)[:, None, None]
    s = torch.tensor(std, dtype=x.dtype)[:, None, None]
    img = (x * s + m).clamp(0, 1)
    if img.shape[0] == 1:
        return img[0].numpy()
    if img.shape[0] == 2:
        img = torch.cat([img, torch.zeros_like(img[:1])])
    return img[:3].permute(1, 2, 0).numpy()


def save_reconstruction_figure(
    panels: dict[str, torch.Tensor], mean: Sequence[float], std: Sequence[float], path: str | Path, title: str = ""
) -> Path:
    """Write a PNG grid: one row per image, four columns. Masked pixels show as grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["original", "masked", "reconstruction", "reconstruction + visible"]
    n = panels["original"].shape[0]
    fig, axes = plt.subplots(n, 4, figsize=(8, 2 * n + 0.4), squeeze=False)
    for row in range(n):
        for col, name in enumerate(names):
            img = _to_display(panels[name][row].cpu(), mean, std)
            if name == "masked":
                keep = 1 - panels["mask"][row, 0].cpu().numpy()
                img = img * (keep[..., None] if img.ndim == 3 else keep) + 0.5 * (1 - (keep[..., None] if img.ndim == 3 else keep))
            ax = axes[row, col]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def load_images(dataset, img_size: int, mean: Sequence[float], std: Sequence[float], num_images: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx [N], images [N, C, img_size, img_size]): seeded picks of an ImageDataset, eval-transformed."""
    transform = build_transform("eval", img_size, mean, std)
    idx = pick_images(dataset, num_images, generator)
    return idx, torch.stack([transform(dataset[i][0]) for i in idx.tolist()])


def draw_reconstructions(
    model: nn.Module, dataset, mean: Sequence[float], std: Sequence[float], path: str | Path,
    *, num_images: int = 6, seed: int = 2, title: str = "",
) -> Path:
    """Pick ``num_images`` images of an ImageDataset (seeded), mask them at random and write the figure.

    ``model``: an MAE (masks from the same generator as the picks) or a pixel-space method
    (:func:`reconstructs_pixels`; masks seeded per image by :func:`figure_seeds`).
    """
    g = torch.Generator().manual_seed(seed)
    idx, images = load_images(dataset, model.img_size, mean, std, num_images, g)
    if isinstance(model, MAE):
        panels = reconstruction_panels(model, images, torch.rand(images.shape[0], model.num_patches, generator=g))
    else:
        panels = pixel_reconstruction_panels(model, images, figure_seeds(idx, seed))
    return save_reconstruction_figure(panels, mean, std, path, title)
