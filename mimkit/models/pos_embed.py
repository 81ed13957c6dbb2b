"""Fixed 2-D sine-cosine position embeddings (MAE flavour, methods.md §0.3) and their resizing (§0.11)."""

from __future__ import annotations

import torch
from timm.layers import resample_abs_pos_embed


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, embed_dim] as [sin(pos * w_k), cos(pos * w_k)], w_k = 10000^(-k/(D/2))."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D table [1, (1 if cls_token) + h*w, embed_dim], float32.

    Patch index l = i*w + j (row-major). As in official MAE, the first half of the channels
    encodes the column index j and the second half the row index i, so official
    checkpoints match bit for bit. The [CLS] row is all zeros.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding width must be divisible by 4, got {embed_dim}")
    h, w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    emb = torch.cat(
        [sincos_1d(embed_dim // 2, cols.reshape(-1)), sincos_1d(embed_dim // 2, rows.reshape(-1))], dim=1
    )
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float().unsqueeze(0)


def interpolate_pos_embed(pos_embed: torch.Tensor, new_grid: int | tuple[int, int],
                          num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resize a checkpoint's position table to another patch grid (methods.md §0.11).

    pos_embed [1, E + g0*g0, D] (a square g0 x g0 grid, row-major) -> [1, E + h*w, D] for
    ``new_grid`` = (h rows, w columns): the E prefix rows ([CLS]) are kept, the patch rows are
    resampled bicubically on the 2-D grid (timm ``resample_abs_pos_embed``, align_corners=False,
    no antialiasing, as MAE). A table that already has the requested grid is returned unchanged
    (the same tensor); the grid, not the row count, decides (6x6 -> 4x9 is resampled).
    """
    h, w = (new_grid, new_grid) if isinstance(new_grid, int) else new_grid
    patches = pos_embed.shape[1] - num_prefix_tokens
    side = int(round(patches ** 0.5))
    if side * side != patches:
        raise ValueError(f"cannot interpolate a position table of {patches} patch rows: not a square grid")
    if (side, side) == (h, w):
        return pos_embed
    return resample_abs_pos_embed(pos_embed.float(), [h, w], old_size=[side, side],
                                  num_prefix_tokens=num_prefix_tokens, interpolation="bicubic",
                                  antialias=False).to(pos_embed.dtype)
