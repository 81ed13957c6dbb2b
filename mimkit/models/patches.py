"""Patchify / unpatchify in the official MAE element order (methods.md §0.2)."""

from __future__ import annotations

import torch


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, L, p*p*C], each patch flattened as (row, col, channel) like official MAE."""
    n, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
    x = images.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid_size: tuple[int, int], channels: int) -> torch.Tensor:
    """[N, L, p*p*C] -> [N, C, H, W]; inverse of :func:`patchify`."""
    n = patches.shape[0]
    gh, gw = grid_size
    p = patch_size
    x = patches.reshape(n, gh, gw, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, channels, gh * p, gw * p)
