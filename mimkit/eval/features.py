"""Frozen-encoder feature extraction shared by k-NN and linear probing."""

from __future__ import annotations

import contextlib

import torch
from torch.utils.data import DataLoader, Dataset

from mimkit.models.vit import MaskedViT


@torch.no_grad()
def extract_features(
    encoder: MaskedViT,
    dataset: Dataset,
    *,
    pool: str = "cls",
    final_norm: bool = True,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, D] (float32, on CPU) and labels [N] for every image of ``dataset`` (in order).

    pool: "cls" ([CLS] token) or "mean" (mean of patch tokens).
    final_norm: take tokens after the encoder's final LayerNorm (True) or the last block's raw output.
    """
    device = torch.device(device)
    encoder = encoder.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    feats, labels = [], []
    last = encoder.depth - 1
    for images, y in loader:
        with autocast:
            out = encoder.encode(images.to(device), return_blocks=None if final_norm else [last])
        tokens = out.tokens if final_norm else out.blocks[last]
        pooled = tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)
        feats.append(pooled.float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels).long()
