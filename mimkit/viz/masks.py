"""Mask figures, one row per image.

DAMA (how student 1's reconstruction error decides student 2's mask), five columns: the image;
student 1's random mask (masked patches grey); student 1's per-patch reconstruction error on its
masked patches (heat map; visible patches blank); student 2's mask; and both masks together
(shared visible, seen by one student only, masked for both).

Pixel-space methods (SimMIM's cells, DDMIM's per-token mask), two columns: the image and its mask.
One drawer, :func:`save_mask_figure`, takes the columns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from mimkit.methods.dama import DAMA
from mimkit.viz import save_figure
from mimkit.viz.reconstruction import _to_display, figure_seeds, load_images

# Categories of the overlap column, in the order of their codes 0..3.
_OVERLAP_LABELS = ("visible to both", "student 1 only", "student 2 only", "masked for both")
_OVERLAP_COLOURS = ("#2ca02c", "#1f77b4", "#ff7f0e", "#d9d9d9")


@torch.no_grad()
def dama_mask_panels(model: DAMA, images: torch.Tensor, sample_seeds: torch.Tensor) -> dict[str, torch.Tensor]:
    """images [N, C, H, W] (dataset-normalised), sample_seeds [N] -> per-patch maps [N, gh, gw].

    Keys: ``mask1``, ``mask2`` (1 = masked), ``error1`` (NaN on student 1's visible patches),
    ``overlap`` (codes 0..3 of ``_OVERLAP_LABELS``).
    """
    model.eval()
    out = model.step(images, sample_seeds=sample_seeds)
    grid = model.student1.grid_size
    mask1, mask2 = out.mask1.float(), out.mask2.float()
    error1 = out.error1.float().masked_fill(mask1 < 0.5, float("nan"))
    # 0 both visible, 1 only student 1 sees it, 2 only student 2, 3 masked for both.
    overlap = mask1 + 2 * mask2
    overlap = torch.where(overlap == 1, torch.full_like(overlap, 2), torch.where(overlap == 2, 1.0, overlap))
    return {k: v.reshape(v.shape[0], *grid).cpu() for k, v in
            {"mask1": mask1, "mask2": mask2, "error1": error1, "overlap": overlap}.items()}


# save_mask_figure's columns: (title, kind, panel key). Kinds: "image"; "mask": a 0/1 patch map over the
# image, masked patches grey; "heat": a patch map as a heat map, one scale for the figure, NaN blank;
# "overlap": codes 0..3 of _OVERLAP_LABELS, with their legend.
DAMA_COLUMNS = (("image", "image", None), ("student 1 mask", "mask", "mask1"),
                ("student 1 error (masked)", "heat", "error1"), ("student 2 mask", "mask", "mask2"),
                ("both masks", "overlap", "overlap"))
PIXEL_COLUMNS = (("image", "image", None), ("mask", "mask", "mask"))


def _draw_column(ax, kind: str, img, patch_map: torch.Tensor | None, extent, vmax: float):
    """One cell of the mask figure: ``img`` HxW[x3] in [0, 1], ``patch_map`` [gh, gw] stretched over it."""
    from matplotlib.colors import ListedColormap

    if kind in ("image", "mask"):
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    if kind == "mask":
        grey = torch.stack([patch_map * 0.6] * 3 + [patch_map * 0.92], dim=-1).numpy()
        return ax.imshow(grey, extent=extent, interpolation="nearest")
    if kind == "heat":
        return ax.imshow(patch_map.numpy(), cmap="magma", vmin=0, vmax=vmax, extent=extent, interpolation="nearest")
    if kind == "overlap":
        return ax.imshow(patch_map.numpy(), cmap=ListedColormap(_OVERLAP_COLOURS), vmin=-0.5, vmax=3.5,
                         extent=extent, interpolation="nearest")
    return None


def save_mask_figure(
    images: torch.Tensor, panels: dict[str, torch.Tensor], mean: Sequence[float], std: Sequence[float],
    path: str | Path, title: str = "", columns: Sequence[tuple[str, str, str | None]] = DAMA_COLUMNS,
) -> Path:
    """Write the PNG (one row per image, one column per ``columns`` entry); returns its path.

    images [N, C, H, W] (normalised); panels: per-patch maps [N, gh, gw] named by ``columns``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    n = images.shape[0]
    h, w = images.shape[-2:]
    extent = (-0.5, w - 0.5, h - 0.5, -0.5)  # patch maps stretched over the image's pixel grid
    kinds = [kind for _, kind, _ in columns]
    fig, axes = plt.subplots(n, len(columns), figsize=(2.1 * len(columns), 2 * n + 0.9), squeeze=False,
                             layout="constrained")
    heat = [panels[key] for _, kind, key in columns if kind == "heat"]
    finite = [m[~m.isnan()] for m in heat]
    vmax = max((float(v.max()) for v in finite if v.numel()), default=1.0)
    for row in range(n):
        img = _to_display(images[row].cpu(), mean, std)
        for col, (name, kind, key) in enumerate(columns):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
            drawn = _draw_column(ax, kind, img, panels[key][row] if key else None, extent, vmax)
            if kind == "heat":
                heat_image, heat_col = drawn, col
    if "heat" in kinds:
        fig.colorbar(heat_image, ax=axes[:, heat_col].tolist(), shrink=0.5, location="left", pad=0.01,
                     label="squared error")
    if "overlap" in kinds:
        fig.legend(handles=[Patch(color=c, label=t) for c, t in zip(_OVERLAP_COLOURS, _OVERLAP_LABELS)],
                   loc="outside lower center", ncol=4, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def draw_dama_masks(
    model: DAMA, dataset, mean: Sequence[float], std: Sequence[float], path: str | Path,
    *, num_images: int = 6, seed: int = 2, title: str = "",
) -> Path:
    """Pick ``num_images`` images of an ImageDataset (seeded), run one DAMA step and write the figure."""
    idx, images = load_images(dataset, model.student1.img_size, mean, std, num_images,
                              torch.Generator().manual_seed(seed))
    panels = dama_mask_panels(model, images, sample_seeds=figure_seeds(idx, seed))
    return save_mask_figure(images, panels, mean, std, path, title)


@torch.no_grad()
def pixel_mask_panels(model: nn.Module, images: torch.Tensor, sample_seeds: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pixel-space methods (SimMIM, DDMIM: ``draw_mask(images, sample_seeds)`` -> [N, L] bool on the
    model's patch grid): images [N, C, H, W], sample_seeds [N] -> {"mask": [N, H / p, W / p] float, 1 = masked}."""
    grid = (images.shape[-2] // model.patch_size, images.shape[-1] // model.patch_size)
    mask = model.draw_mask(images, sample_seeds)
    return {"mask": mask.float().reshape(mask.shape[0], *grid).cpu()}


def draw_pixel_masks(
    model: nn.Module, dataset, mean: Sequence[float], std: Sequence[float], path: str | Path,
    *, num_images: int = 6, seed: int = 2, title: str = "",
) -> Path:
    """The image and its mask for a pixel-space method; the same images and masks as its reconstruction
    figure with the same ``seed`` (:func:`~mimkit.viz.reconstruction.draw_reconstructions`)."""
    idx, images = load_images(dataset, model.img_size, mean, std, num_images, torch.Generator().manual_seed(seed))
    panels = pixel_mask_panels(model, images, figure_seeds(idx, seed))
    return save_mask_figure(images, panels, mean, std, path, title, columns=PIXEL_COLUMNS)


__all__ = ["DAMA_COLUMNS", "PIXEL_COLUMNS", "dama_mask_panels", "draw_dama_masks", "draw_pixel_masks",
           "pixel_mask_panels", "save_mask_figure"]
