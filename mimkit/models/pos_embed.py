"""Fixed 2-D sine-cosine position embeddings (MAE flavour, methods.md §0.3)."""

from __future__ import annotations

import torch


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
