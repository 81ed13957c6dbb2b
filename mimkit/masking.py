"""Mask generators: batched, vectorised, static shapes (design.md, "A mask").

Convention everywhere: ``mask[n, l] = 1`` means patch ``l`` of sample ``n`` is masked
(removed / to be predicted), ``0`` means visible. Generators for visible-token encoders
(MAE family) return a :class:`MaskDraw` with the indices the encoder gathers.

Randomness comes either from ``torch.rand`` or from :func:`sample_uniform`, a counter-based
hash of per-sample seeds. The engine gives every sample a seed that depends only on
(run seed, epoch, dataset index), so a mask is the same whether the batch was computed on one
process or split over several, and after a resume.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class MaskDraw(NamedTuple):
    """One masking decision for a batch.

    mask:        [N, L] float, 1 = masked, 0 = visible.
    ids_keep:    [N, K] long, patch indices the encoder sees, in shuffled order.
    ids_restore: [N, L] long, inverse permutation: gathering the shuffled sequence
                 (K visible tokens followed by L-K mask tokens) with it restores patch order.
    """

    mask: torch.Tensor
    ids_keep: torch.Tensor
    ids_restore: torch.Tensor


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """K = int(L * (1 - r)), the official MAE rounding (49 for L=196, r=0.75; 12 for L=49)."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must lie in (0, 1), got {mask_ratio}")
    k = int(num_patches * (1 - mask_ratio))
    if k < 1:
        raise ValueError(f"mask_ratio {mask_ratio} leaves no visible patch out of {num_patches}")
    return k


def mask_from_scores(scores: torch.Tensor, num_keep: int) -> MaskDraw:
    """Keep the ``num_keep`` patches with the lowest score per sample.

    scores: [N, L] any float; ties are broken by patch index (stable sort), so the result is
    deterministic on every device.
    """
    n, length = scores.shape
    ids_shuffle = torch.argsort(scores, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :num_keep]
    # Position in the shuffled order >= K means masked; un-shuffle with ids_restore.
    mask = (ids_restore >= num_keep).to(scores.dtype if scores.is_floating_point() else torch.float32)
    return MaskDraw(mask, ids_keep, ids_restore)


def random_masking(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    *,
    noise: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> MaskDraw:
    """Per-sample uniform random masking (official MAE, methods.md §0.4).

    noise: optional [N, L] uniform noise; small noise = keep. Passing it makes the mask
    deterministic (tests, visualisation, per-sample seeded training).
    """
    k = num_visible(num_patches, mask_ratio)
    if noise is None:
        noise = torch.rand(batch_size, num_patches, device=device)
    elif noise.shape != (batch_size, num_patches):
        raise ValueError(f"noise must have shape {(batch_size, num_patches)}, got {tuple(noise.shape)}")
    return mask_from_scores(noise, k)


_MASK32 = 0xFFFFFFFF


def hash32(x: torch.Tensor) -> torch.Tensor:
    """Bijective 32-bit integer hash (Wellons' lowbias32) on int64 tensors holding values < 2**32.

    int64 products may wrap past 2**63; the low 32 bits stay exact, which is all we keep.
    """
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    x = x ^ (x >> 16)
    return x


def sample_uniform(sample_seeds: torch.Tensor, count: int, stream: int = 0) -> torch.Tensor:
    """Counter-based uniform noise: [N] int64 seeds -> [N, count] float32 in [0, 1).

    Row n depends only on (sample_seeds[n], stream), never on the batch it sits in.
    ``stream`` separates independent uses (e.g. the two students of DAMA).
    """
    seeds = sample_seeds.to(torch.int64)
    counters = torch.arange(count, device=seeds.device, dtype=torch.int64)
    key = hash32(hash32(seeds & _MASK32) + 0x9E3779B9 * (stream + 1) ^ hash32((seeds >> 32) & _MASK32))
    # Two rounds over (key, counter) so neighbouring counters and keys decorrelate.
    bits = hash32(hash32(key[:, None] + counters[None, :] * 0x9E3779B9) ^ key[:, None])
    return (bits >> 8).to(torch.float32) / float(1 << 24)
