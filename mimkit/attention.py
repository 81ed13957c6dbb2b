"""Attention maps of a ViT: head fusion, discarding weak entries, and attention rollout.

Shared by the attention-guided mask generators (:mod:`mimkit.masking`) and the figures
(:mod:`mimkit.viz.attention`). Everything is batched: ``[N, heads, T, T]`` softmax maps as
returned by ``MaskedViT.encode(..., return_attention=...)``, with T = 1 + L ([CLS] first).
The only Python loop is over layers.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

HEAD_FUSIONS = ("mean", "max", "min")


@contextmanager
def capture_attention(encoder: nn.Module, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Collect the softmax attention [N, heads, T, T] of blocks ``layers`` during forwards in this context.

    The requested blocks switch to timm's explicit attention path and a hook on their
    ``attn_drop`` records its input (the softmax probabilities; dropout is 0 in every preset).
    Unlike ``MaskedViT.encode(return_attention=...)``, which recomputes q and k next to the fused
    kernel, nothing is computed twice: with attention from every block (rollout) this costs a
    few percent of a teacher forward instead of ~25 %. Blocks go back to the fused path on exit.
    """
    maps: dict[int, torch.Tensor] = {}
    handles, previous = [], []
    blocks = encoder.blocks
    try:
        for i in layers:
            attn = blocks[i].attn
            previous.append((attn, attn.fused_attn))
            attn.fused_attn = False
            handles.append(attn.attn_drop.register_forward_hook(
                lambda module, inputs, output, i=i % len(blocks): maps.__setitem__(i, inputs[0])
            ))
        yield maps
    finally:
        for h in handles:
            h.remove()
        for attn, fused in previous:
            attn.fused_attn = fused


def fuse_heads(attention: torch.Tensor, fusion: str = "mean") -> torch.Tensor:
    """[N, heads, T, T] -> [N, T, T] by the mean, max or min over heads (vit-explain's choices)."""
    if fusion == "mean":
        return attention.mean(dim=1)
    if fusion == "max":
        return attention.amax(dim=1)
    if fusion == "min":
        return attention.amin(dim=1)
    raise ValueError(f"unknown head fusion {fusion!r}: choose one of {', '.join(HEAD_FUSIONS)}")


def discard_lowest(attention: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the lowest ``ratio`` fraction of the T*T entries of every map [N, T, T].

    The [CLS]->[CLS] entry is never discarded (as in vit-explain, methods.md §4.8), so a row
    of the rollout can always be normalised. Works per sample (vit-explain assumed batch 1).
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"discard ratio must lie in [0, 1), got {ratio}")
    n, t, _ = attention.shape
    count = int(t * t * ratio)
    if count == 0:
        return attention
    flat = attention.reshape(n, t * t)
    lowest = flat.topk(count, dim=1, largest=False).indices
    drop = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, lowest, True)
    drop[:, 0] = False  # keep [CLS]->[CLS]
    return flat.masked_fill(drop, 0.0).reshape(n, t, t)


def attention_rollout(
    attentions: Sequence[torch.Tensor],
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020; methods.md §0.12) -> [N, T, T].

    attentions: per-layer [N, heads, T, T] maps in *forward order* (first block first).
    For each layer: fuse heads, optionally discard the weakest entries, add the residual
    connection as (A + I) / 2, and row-normalise (each row is a distribution again after
    discarding). Later layers multiply on the left: R = Â_last ... Â_first. Row 0 of R is
    how much each token contributes to the final [CLS]. Computed in float32 (maps produced
    under bf16/fp16 autocast would lose the small entries).
    """
    if len(attentions) == 0:
        raise ValueError("attention rollout needs at least one layer")
    rollout = None
    for attention in attentions:
        fused = fuse_heads(attention.float(), head_fusion)
        if discard_ratio > 0:
            fused = discard_lowest(fused, discard_ratio)
        eye = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
        fused = (fused + eye) / 2
        fused = fused / fused.sum(dim=-1, keepdim=True)  # keepdim: row i / row-sum i (vit-explain#16)
        rollout = fused if rollout is None else fused @ rollout
    return rollout


def cls_to_patches(attention: torch.Tensor) -> torch.Tensor:
    """[N, heads, T, T] -> [N, heads, L]: how much [CLS] attends to each patch."""
    return attention[:, :, 0, 1:]


def normalise_by_max(saliency: torch.Tensor) -> torch.Tensor:
    """[N, L] -> [N, L] divided by each row's maximum (display scale, as vit-explain)."""
    return saliency / saliency.amax(dim=-1, keepdim=True).clamp_min(1e-12)


def rollout_layer_indices(which: str | Sequence[int], depth: int) -> list[int]:
    """Blocks a rollout multiplies, in forward order.

    ``"all"``: every block; ``"last"``: the last third (blocks 8-11 of 12);
    ``"middle"``: the middle third (blocks 4-7 of 12), the layer sets of methods.md §5.3
    generalised to any depth; or an explicit list of block indices (negative = from the end).
    """
    third = max(1, depth // 3)
    if isinstance(which, str):
        if which == "all":
            return list(range(depth))
        if which == "last":
            return list(range(depth - third, depth))
        if which == "middle":
            start = min(depth // 3, depth - third)
            return list(range(start, start + third))
        raise ValueError(f"unknown rollout layers {which!r}: use 'all', 'last', 'middle' or a list of block indices")
    layers = sorted({i % depth for i in which})
    if not layers:
        raise ValueError("rollout needs at least one block index")
    return layers


__all__ = [
    "HEAD_FUSIONS", "capture_attention", "fuse_heads", "discard_lowest", "attention_rollout", "cls_to_patches",
    "normalise_by_max", "rollout_layer_indices",
]
