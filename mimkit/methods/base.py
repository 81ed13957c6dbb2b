"""The method interface (design.md, "A method").

A method is an ``nn.Module`` whose ``forward(images, sample_seeds=None)`` returns a
:class:`StepOutput`. It may define ``after_optimizer_step(progress)`` (EMA teachers,
schedules) and must expose ``encoder``: the :class:`~mimkit.models.vit.MaskedViT` whose
features are evaluated downstream. The engine knows nothing else about it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepOutput:
    """loss: scalar to back-propagate. metrics: detached scalars to log (no host sync here)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
