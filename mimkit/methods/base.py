"""The method interface (design.md, "A method").

A method is an ``nn.Module`` whose ``forward(images, sample_seeds=None)`` returns a
:class:`StepOutput`. ``images`` is a ``[N, C, H, W]`` tensor, or a list of such tensors when the
method's ``pretrain_transform`` returns several views per image (multi-crop). Optional hooks,
each called by the engine only when the method defines it (``progress`` is the fractional epoch):

* ``pretrain_transform(img_size, mean, std, data_cfg) -> callable``: per-image augmentation
  returning a tensor or a list of tensors (default: the MAE RandomResizedCrop + flip).
* ``set_epoch(progress)``: before every forward (schedules inside the loss, e.g. a teacher
  temperature warm-up or DAMA's ``stable_epoch``).
* ``before_optimizer_step(progress)``: after gradients are unscaled and clipped, before the
  update (e.g. iBOT freezes its last head layer during the first epoch by dropping its grads).
* ``after_optimizer_step(progress)``: after the update (EMA teachers).
* ``eval_encoders() -> dict[str, MaskedViT]``: the encoders evaluation may pick from, the
  default first (MAE: ``{"encoder": ...}``; DAMA: two students; iBOT: teacher and student).
  Without it, ``encoder`` is used.

The engine knows nothing else about a method.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mimkit.errors import ConfigError


@dataclass
class StepOutput:
    """loss: scalar to back-propagate. metrics: detached scalars to log (no host sync here)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def eval_encoders(model: nn.Module) -> dict[str, nn.Module]:
    """Named encoders of a method (default first); a bare encoder maps to ``{"encoder": model}``."""
    if hasattr(model, "eval_encoders"):
        return dict(model.eval_encoders())
    return {"encoder": model.encoder if hasattr(model, "encoder") else model}


def select_encoder(model: nn.Module, name: str | None = None) -> nn.Module:
    """The encoder called ``name`` (None = the method's default), with a clear error otherwise."""
    encoders = eval_encoders(model)
    if name is None:
        return next(iter(encoders.values()))
    if name not in encoders:
        raise ConfigError(f"This checkpoint has no encoder {name!r}: choose one of {', '.join(encoders)}.")
    return encoders[name]
