"""AdamW with the MAE parameter groups."""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and no decay for biases, norms (1-D) and tokens/position tables.

    Names come from the model's ``no_weight_decay()`` (timm convention). Frozen parameters
    (the fixed sin-cos tables) are left out.
    """
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def adamw(groups: list[dict], lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
    """AdamW using the fused kernel where PyTorch has one for the parameters' device."""
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas)


def build_adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
    """AdamW over the MAE parameter groups (:func:`param_groups`)."""
    return adamw(param_groups(model, weight_decay), lr, betas)


def build_optimizer(model: nn.Module, t_cfg, lr: float) -> torch.optim.Optimizer:
    """The optimizer named by ``train.optimizer`` over the model's parameter groups.

    Groups come from ``model.optimizer_param_groups(weight_decay)`` when the model defines it
    (fine-tuning: timm layer-decay groups carrying ``lr_scale``), else :func:`param_groups`.

    * ``adamw``: betas ``train.betas``.
    * ``lars``: timm ``Lars`` with a real trust ratio (``always_adapt``: it is applied even with
      weight decay 0, as in official MAE; the 2021 timm copy used by MAE-priv silently skipped it,
      methods.md §0.8). As in official MAE, 1-D parameters (biases, norms) are not adapted and
      get plain momentum SGD.

      The trust ratio is **timm's**, not official MAE's. For a >1-D weight ``w`` with gradient
      ``g``, weight decay ``wd`` and trust coefficient ``tc = 0.001``, timm computes::

          ratio  = tc * ||w|| / (||g|| + wd * ||w|| + 1e-8)   (1 if ||w|| == 0 or ||g|| == 0)
          update = ratio * (g + wd * w)
          buf    = update (first step), else momentum * buf + update;   w -= lr * buf

      Official MAE (``util/lars.py``, from MoCo v3) forms ``u = g + wd * w`` first and divides by
      the norm of that decayed update: ``ratio = tc * ||w|| / ||u||`` (1 if ``||w||`` or ``||u||``
      is 0; no eps). The two agree at ``wd = 0`` (up to the eps); for ``wd > 0`` timm's denominator
      ``||g|| + wd ||w||`` is the triangle-inequality bound of MAE's ``||g + wd w||``: MAE's
      scaled update always has norm ``tc ||w||``, timm's has at most that (equal only when ``g``
      is a non-negative multiple of ``w``), so timm's steps are shorter. Exception: with an
      all-zero gradient and ``wd > 0`` timm's ratio is 1 (a full ``lr * wd * w`` step) where
      MAE's is ``tc / wd``. tests/test_optim.py pins timm's formula.
    * ``sgd``: momentum SGD (DINO linear probe).
    """
    wd = t_cfg.weight_decay
    groups = model.optimizer_param_groups(wd) if hasattr(model, "optimizer_param_groups") else param_groups(model, wd)
    groups = [g for g in groups if g["params"]]
    if t_cfg.optimizer == "adamw":
        return adamw(groups, lr, tuple(t_cfg.betas))
    if t_cfg.optimizer == "lars":
        from timm.optim import Lars

        split = []
        for g in groups:
            multi = [p for p in g["params"] if p.ndim > 1]
            single = [p for p in g["params"] if p.ndim <= 1]
            extra = {k: v for k, v in g.items() if k not in ("params", "weight_decay")}
            if multi:
                split.append({**extra, "params": multi, "weight_decay": g["weight_decay"], "always_adapt": True})
            if single:
                split.append({**extra, "params": single, "weight_decay": 0.0, "always_adapt": False})
        return Lars(split, lr=lr, momentum=t_cfg.momentum, trust_coeff=0.001)
    return torch.optim.SGD(groups, lr=lr, momentum=t_cfg.momentum)
