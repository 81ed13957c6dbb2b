"""Attention figures: [CLS] attention of one block or attention rollout, and the masks they give.

One row per image: the image, the saliency map over it (JET colour map), then the
attention-guided masks the same saliency produces (AttMask high / hint / low, masked patches
shown grey). Saliency is [CLS]->patch attention with heads fused (mean/max/min), or the [CLS]
row of the attention rollout (methods.md §0.12) with optional discarding of weak entries;
both divided by their maximum for display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from mimkit.attention import attention_rollout, discard_lowest, fuse_heads, normalise_by_max
from mimkit.data import TransformedDataset, build_transform
from mimkit.masking import attmask, sample_uniform
from mimkit.models.encoder import require_cls_token, require_global_attention
from mimkit.viz import save_figure
from mimkit.viz.reconstruction import _to_display, pick_images


@torch.no_grad()
def saliency_maps(
    encoder: torch.nn.Module,
    images: torch.Tensor,
    what: str = "attention",
    *,
    layer: int = -1,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
) -> torch.Tensor:
    """images [N, C, H, W] (normalised) -> [N, L] saliency in [0, 1] (max = 1 per image).

    ``"attention"``: [CLS]->patch attention of block ``layer`` with heads fused;
    ``"rollout"``: [CLS] row of the rollout over all blocks.
    """
    require_global_attention(encoder, f"--what {what}")
    require_cls_token(encoder, f"--what {what} ([CLS] attention)")
    encoder.eval()
    if what == "attention":
        block = layer % encoder.depth
        attn = encoder.encode(images, return_attention=[block]).attentions[block]
        fused = fuse_heads(attn.float(), head_fusion)
        if discard_ratio > 0:
            fused = discard_lowest(fused, discard_ratio)
        saliency = fused[:, 0, 1:]
    elif what == "rollout":
        attentions = encoder.encode(images, return_attention=True).attentions
        rollout = attention_rollout([attentions[i] for i in sorted(attentions)], head_fusion, discard_ratio)
        saliency = rollout[:, 0, 1:]
    else:
        raise ValueError(f"unknown saliency {what!r}: use 'attention' or 'rollout'")
    return normalise_by_max(saliency)


def draw_attention(
    encoder: torch.nn.Module,
    dataset,
    mean: Sequence[float],
    std: Sequence[float],
    path: str | Path,
    what: str = "attention",
    *,
    layer: int = -1,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    mask_ratio: float = 0.4,
    num_images: int = 6,
    seed: int = 2,
    title: str = "",
) -> Path:
    """Write the PNG described in the module docstring for ``num_images`` images of ``dataset``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    transform = build_transform("eval", encoder.img_size, mean, std)
    picks = pick_images(dataset, num_images, torch.Generator().manual_seed(seed)).tolist()
    data = TransformedDataset(dataset, transform)
    images = torch.stack([data[i][0] for i in picks])
    device = next(encoder.parameters()).device
    saliency = saliency_maps(encoder, images.to(device), what, layer=layer, head_fusion=head_fusion,
                             discard_ratio=discard_ratio).cpu()
    h, w = encoder.grid_size
    count = int(encoder.num_patches * mask_ratio)
    noise = sample_uniform(torch.tensor(picks), encoder.num_patches)
    masks = {
        f"AttMask-high {mask_ratio:.0%}": attmask(saliency, count, "high"),
        "AttMask-hint": attmask(saliency, count, "hint", noise=noise),
        "AttMask-low": attmask(saliency, count, "low"),
    }
    label = (f"[CLS] attention, block {layer % encoder.depth}" if what == "attention" else "attention rollout")
    label += f" ({head_fusion}" + (f", discard {discard_ratio:g})" if discard_ratio else ")")
    size = images.shape[-2:]
    heat = F.interpolate(saliency.view(-1, 1, h, w), size=size, mode="nearest")[:, 0]
    columns = ["image", label, *masks]
    fig, axes = plt.subplots(len(picks), len(columns), figsize=(2.2 * len(columns), 2.2 * len(picks)), squeeze=False)
    for r in range(len(picks)):
        img = _to_display(images[r], mean, std)
        cmap = "gray" if img.ndim == 2 else None
        axes[r, 0].imshow(img, cmap=cmap)
        axes[r, 1].imshow(img, cmap=cmap)
        axes[r, 1].imshow(heat[r].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
        for c, mask in enumerate(masks.values(), start=2):
            pixel_mask = F.interpolate(mask[r].float().view(1, 1, h, w), size=size, mode="nearest")[0, 0].numpy()
            shown = img * (1 - pixel_mask[..., None] if img.ndim == 3 else 1 - pixel_mask)
            shown = shown + 0.5 * (pixel_mask[..., None] if img.ndim == 3 else pixel_mask)
            axes[r, c].imshow(shown, cmap=cmap, vmin=0, vmax=1)
        for c, name in enumerate(columns):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


__all__ = ["saliency_maps", "draw_attention"]
