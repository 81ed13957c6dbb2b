"""EMA teachers, shared by the self-distillation methods (iBOT, DDMIM).

A teacher is a copy of (part of) the student that is never optimised; after each optimizer step
its parameters follow the student's namesakes by an exponential moving average

    θ_t <- m θ_t + (1 - m) θ_s.

Parameters are matched by name, so a teacher may lack some of the student's (a mask token).
Buffers are not averaged: the teacher keeps its own (the encoders here only hold constant index
tables).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

ModulePairs = Iterable[tuple[nn.Module, nn.Module]]


def _matched(teacher: nn.Module, student: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Teacher parameters and their student namesakes; a teacher parameter without one is a bug here."""
    source = dict(student.named_parameters())
    missing = [name for name, _ in teacher.named_parameters() if name not in source]
    if missing:
        raise KeyError(f"the student has no parameter for the teacher's {', '.join(missing[:3])}")
    pairs = [(p, source[name]) for name, p in teacher.named_parameters()]
    return [t for t, _ in pairs], [s.detach() for _, s in pairs]


@torch.no_grad()
def ema_update_(pairs: ModulePairs, momentum: float) -> None:
    """θ_t <- m θ_t + (1 - m) θ_s for every (teacher, student) module pair, in place (fused foreach ops)."""
    for teacher, student in pairs:
        t_params, s_params = _matched(teacher, student)
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


@torch.no_grad()
def copy_into_teacher_(pairs: ModulePairs) -> None:
    """Teacher parameters set to the student's (the start of a teacher, and AveragedModel's first update)."""
    for teacher, student in pairs:
        t_params, s_params = _matched(teacher, student)
        torch._foreach_copy_(t_params, s_params)


def freeze_(modules: Iterable[nn.Module]) -> None:
    """No gradients for teacher modules: they only ever change through the EMA."""
    for module in modules:
        module.requires_grad_(False)
