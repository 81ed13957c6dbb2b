"""DAMA mask figure: how student 1's reconstruction error decides student 2's mask.

One row per image, five columns: the image; student 1's random mask (masked patches grey);
student 1's per-patch reconstruction error on its masked patches (heat map; visible patches
blank); student 2's mask; and both masks together (shared visible, seen by one student only,
masked for both).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from mimkit.data import build_transform
from mimkit.methods.dama import DAMA
from mimkit.viz import save_figure
from mimkit.viz.reconstruction import _to_display, pick_images

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


def save_mask_figure(
    images: torch.Tensor, panels: dict[str, torch.Tensor], mean: Sequence[float], std: Sequence[float],
    path: str | Path, title: str = "",
) -> Path:
    """Write the PNG (one row per image, five columns); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    n = images.shape[0]
    h, w = images.shape[-2:]
    extent = (-0.5, w - 0.5, h - 0.5, -0.5)  # patch maps stretched over the image's pixel grid
    names = ["image", "student 1 mask", "student 1 error (masked)", "student 2 mask", "both masks"]
    fig, axes = plt.subplots(n, 5, figsize=(10.5, 2 * n + 0.9), squeeze=False, layout="constrained")
    err = panels["error1"]
    vmax = float(err[~err.isnan()].max()) if (~err.isnan()).any() else 1.0
    for row in range(n):
        img = _to_display(images[row].cpu(), mean, std)
        cmap_img = "gray" if img.ndim == 2 else None
        for col, ax in enumerate(axes[row]):
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(names[col], fontsize=9)
        axes[row, 0].imshow(img, cmap=cmap_img, vmin=0, vmax=1, interpolation="nearest")
        for col, key in ((1, "mask1"), (3, "mask2")):
            axes[row, col].imshow(img, cmap=cmap_img, vmin=0, vmax=1, interpolation="nearest")
            grey = torch.stack([panels[key][row] * 0.6] * 3 + [panels[key][row] * 0.92], dim=-1).numpy()
            axes[row, col].imshow(grey, extent=extent, interpolation="nearest")
        im = axes[row, 2].imshow(err[row].numpy(), cmap="magma", vmin=0, vmax=vmax, extent=extent,
                                 interpolation="nearest")
        axes[row, 4].imshow(panels["overlap"][row].numpy(), cmap=ListedColormap(_OVERLAP_COLOURS), vmin=-0.5,
                            vmax=3.5, extent=extent, interpolation="nearest")
    fig.colorbar(im, ax=axes[:, 2].tolist(), shrink=0.5, location="left", pad=0.01, label="squared error")
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
    transform = build_transform("eval", model.student1.img_size, mean, std)
    idx = pick_images(dataset, num_images, torch.Generator().manual_seed(seed))
    images = torch.stack([transform(dataset[i][0]) for i in idx.tolist()])
    panels = dama_mask_panels(model, images, sample_seeds=idx + seed * 1_000_003)
    return save_mask_figure(images, panels, mean, std, path, title)


__all__ = ["dama_mask_panels", "draw_dama_masks", "save_mask_figure"]
