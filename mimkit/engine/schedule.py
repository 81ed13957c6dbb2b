"""Learning-rate schedule and the linear scaling rule (methods.md §0.6)."""

from __future__ import annotations

import bisect
import math


def scaled_lr(blr: float, effective_batch: int) -> float:
    """Absolute lr = base lr x effective batch / 256."""
    return blr * effective_batch / 256


def warmup_cosine(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Linear warmup from 0, then half-cycle cosine to min_lr; ``epoch`` is fractional (per iteration)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    if epochs <= warmup_epochs:
        return lr
    progress = min(1.0, (epoch - warmup_epochs) / (epochs - warmup_epochs))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_multistep(epoch: float, lr: float, warmup_epochs: float, milestones: list[float], gamma: float) -> float:
    """Linear warmup from 0 (as :func:`warmup_cosine`), then ``lr x gamma^k``, k = the number of milestones
    <= ``epoch`` (SimMIM's multistep, DDMIM's StepLR); ``epoch`` is fractional (per iteration)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return lr * gamma ** bisect.bisect_right(milestones, epoch)
