"""Frozen-encoder feature extraction shared by k-NN and linear probing.

Under torchrun each process encodes every W-th image and the features are all-gathered back
into dataset order, so every rank ends up with the full bank.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset

from mimkit.models.vit import MaskedViT


def probe_features(encoder: MaskedViT, images: torch.Tensor, *, pool: str = "cls", final_norm: bool = True,
                   n_last_blocks: int = 1, avgpool: bool = False) -> torch.Tensor:
    """One feature per image, [N, D * (n_last_blocks + avgpool)].

    n_last_blocks == 1: the [CLS] token ("cls") or mean patch token ("mean") of the last block,
    after the final norm (``final_norm``) or before it. n_last_blocks > 1 (DINO linear probe):
    the [CLS] tokens of the last n blocks, each after the final norm, concatenated; ``avgpool``
    appends the mean patch token of the last block (after the norm).
    """
    depth = encoder.depth
    if n_last_blocks == 1 and not avgpool:
        if final_norm:
            tokens = encoder.encode(images).tokens
        else:
            tokens = encoder.encode(images, return_blocks=[depth - 1]).blocks[depth - 1]
        return tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)
    wanted = list(range(depth - n_last_blocks, depth))
    out = encoder.encode(images, return_blocks=wanted)
    normed = [encoder.norm(out.blocks[i]) if final_norm else out.blocks[i] for i in wanted]
    parts = [t[:, 0] for t in normed]
    if avgpool:
        parts.append(normed[-1][:, 1:].mean(dim=1))
    return torch.cat(parts, dim=-1)


def _gather_in_order(local: torch.Tensor, world: int, total: int) -> torch.Tensor:
    """Rank r holds rows r, r+W, ...; all-gather (padded to equal size) and interleave back."""
    per_rank = -(-total // world)
    padded = local.new_zeros((per_rank, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    stacked = torch.stack(parts, dim=1)  # [per_rank, W, ...]: row j of rank r is dataset index j*W + r
    return stacked.reshape(per_rank * world, *local.shape[1:])[:total]


@torch.no_grad()
def extract_features(
    encoder: MaskedViT,
    dataset: Dataset,
    *,
    pool: str = "cls",
    final_norm: bool = True,
    n_last_blocks: int = 1,
    avgpool: bool = False,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, D'] (float32, on CPU) and labels [N] for every image of ``dataset`` (in order).

    See :func:`probe_features` for pool / final_norm / n_last_blocks / avgpool.
    """
    device = torch.device(device)
    encoder = encoder.to(device).eval()
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    part = Subset(dataset, range(rank, len(dataset), world)) if distributed else dataset
    loader = DataLoader(part, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    feats, labels = [], []
    for images, y in loader:
        with autocast:
            f = probe_features(encoder, images.to(device), pool=pool, final_norm=final_norm,
                               n_last_blocks=n_last_blocks, avgpool=avgpool)
        feats.append(f.float().cpu())
        labels.append(torch.as_tensor(y))
    features, targets = torch.cat(feats), torch.cat(labels).long()
    if distributed:
        backend_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
        features = _gather_in_order(features.to(backend_device), world, len(dataset)).cpu()
        targets = _gather_in_order(targets.to(backend_device), world, len(dataset)).cpu()
    return features, targets
