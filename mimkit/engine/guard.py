"""Non-finite losses and gradients: caught on the device, never applied, reported at the next log line.

The loop must not sync with the host every step, so it cannot ask ``if loss.isfinite()`` before
each update. Instead :class:`FiniteGuard` keeps 0-d tensors on the device: whether every step so
far was finite, the first step that was not, and whether that step's input held non-finite
pixels. :func:`gated_step` applies an update only where a 0-d bool tensor says so. The loop reads
the guard at its log intervals, where it syncs anyway, and stops before any checkpoint is written.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mimkit.errors import TrainingError


def grad_norm(params, clip: float | None) -> torch.Tensor:
    """Total L2 norm of the gradients (0-d, on their device); clips them to ``clip`` when given."""
    params = [p for p in params if p.grad is not None]
    if clip is not None:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


def gated_step(optimizer: torch.optim.Optimizer, ok: torch.Tensor) -> None:
    """``optimizer.step()`` that leaves parameters and optimizer state as they were unless ``ok``.

    ``ok`` is a 0-d bool tensor on the parameters' device; nothing here syncs with the host.
    Fused optimizers (AdamW here) skip the update on device when given ``found_inf``, the hook
    GradScaler uses, and undo their step count. Others (LARS, SGD: small probe heads) step, then
    put every parameter and state tensor back where ``ok`` is false.
    """
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.grad_scale, optimizer.found_inf = None, (~ok).float()
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
        return
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    before = {id(p): p.detach().clone() for p in params}
    state_before = {(id(p), k): v.clone() for p in params for k, v in optimizer.state.get(p, {}).items()
                    if isinstance(v, torch.Tensor)}
    optimizer.step()
    with torch.no_grad():
        for p in params:
            p.copy_(torch.where(ok, p, before[id(p)]))
            for k, v in optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    # State born in this step (a first momentum buffer) goes back to zeros, which
                    # momentum with dampening 0 treats exactly like no buffer.
                    v.copy_(torch.where(ok, v, state_before.get((id(p), k), torch.zeros_like(v))))


class FiniteGuard:
    """On-device record of the first optimizer step whose loss or gradients were not finite.

    Per micro-batch call :meth:`observe`; per optimizer step, :meth:`allow` gives the gate for
    :func:`gated_step`. Once a step fails every later step is gated too, so the weights stay those
    of the last good step until the loop stops. With ``grads_may_overflow`` (fp16) an infinite
    gradient only skips the step, as GradScaler always did, and only a non-finite loss is an error.
    """

    def __init__(self, device: torch.device, grads_may_overflow: bool = False):
        self.grads_may_overflow = grads_may_overflow
        self.healthy = torch.ones((), dtype=torch.bool, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_input = torch.zeros((), dtype=torch.bool, device=device)
        self._loss_ok = self._inputs_ok = self.healthy

    def observe(self, loss: torch.Tensor, images: torch.Tensor | list[torch.Tensor]) -> None:
        """One micro-batch: its loss (any shape) and its input images (a tensor or a list of crops)."""
        crops = images if isinstance(images, (list, tuple)) else [images]
        self._loss_ok = self._loss_ok & torch.isfinite(loss.detach()).all()
        self._inputs_ok = self._inputs_ok & torch.stack([torch.isfinite(x).all() for x in crops]).all()

    def allow(self, grad_norm: torch.Tensor, step: int) -> torch.Tensor:
        """Gate of optimizer step ``step`` (1-based) after its micro-batches: apply it or not."""
        grads_ok = torch.isfinite(grad_norm)
        failed = ~self._loss_ok if self.grads_may_overflow else ~(self._loss_ok & grads_ok)
        newly = self.healthy & failed
        self.first_bad = torch.where(newly, step, self.first_bad)
        self.bad_input = self.bad_input | (newly & ~self._inputs_ok)
        self.healthy = self.healthy & ~failed
        self._loss_ok = self._inputs_ok = torch.ones_like(self.healthy)
        return self.healthy & grads_ok

    def failed(self) -> torch.Tensor:
        """1.0 once a step failed, else 0.0 (float, to travel in the loop's all-reduce of metrics)."""
        return (~self.healthy).float().reshape(1)

    def error(self, epoch: int, last_good: tuple[Path, int] | None, fp16: bool,
              what: str | None = None) -> TrainingError:
        """The stop message: which step failed, which checkpoint is kept, and what to try.

        ``last_good`` is (path, epoch index) of the newest checkpoint on disk, or None; ``what``
        replaces the step description (e.g. a non-finite metric, or another process's failure).
        """
        if what is None:
            first = int(self.first_bad)
            what = (f"the loss or gradients became non-finite at step {first} (epoch {epoch + 1}), so no update "
                    f"was applied from that step on")
        kept = (f"the last good checkpoint, {last_good[0]} (epoch {last_good[1] + 1}), is kept" if last_good
                else "no checkpoint was written before it")
        if bool(self.bad_input):
            fix = "the images of that step hold NaN or infinite pixels, so fix or remove them in the data"
        else:
            fix = ("lower the learning rate (train.lr or train.blr)"
                   + (", use train.precision=bf16 instead of fp16 (fp16 overflow)" if fp16 else "")
                   + " or check the data for NaN values")
        return TrainingError(f"Training stopped: {what}; {kept}: {fix}.")
