"""The last steps of the input pipeline, batched on the training device.

Workers hand over uint8 (or raw 16-bit / float) crops; here a whole batch is copied
(pinned memory, non-blocking, the next batch's copy overlapping this step on CUDA), converted to
float and normalised in one fused pass, instead of once per image in a worker.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch


class DeviceNormalize:
    """``[N, C, H, W]`` stored pixels on ``device`` -> float32 ``(x / scale - mean) / std``.

    ``scale`` maps the storage to [0, 1] (255 for uint8, 65535 for 16-bit, 1 for float crops).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], scale: float, device: torch.device):
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        # (x / s - m) / d == (x - m s) * (1 / (d s)): one subtract and one multiply over the batch
        self.offset, self.factor = mean_t * scale, 1.0 / (std_t * scale)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.to(self.offset.device, non_blocking=True).float() - self.offset) * self.factor


def prefetch_to_device(batches: Iterable, device: torch.device) -> Iterator:
    """Yield the loader's batches with every tensor already on ``device``.

    On CUDA the copy of batch t+1 is issued on a side stream while batch t is being used (the
    loader must pin memory for the copy to be asynchronous). Elsewhere tensors are moved as they
    come, which costs nothing on the CPU.
    """
    if device.type != "cuda":
        for batch in batches:
            yield _move(batch, device)
        return
    stream = torch.cuda.Stream(device)
    iterator = iter(batches)
    pending = _copy_on(stream, next(iterator, None), device)
    while pending is not None:
        torch.cuda.current_stream(device).wait_stream(stream)
        ready = pending
        _record(ready, torch.cuda.current_stream(device))
        pending = _copy_on(stream, next(iterator, None), device)
        yield ready


def _copy_on(stream, batch, device):
    if batch is None:
        return None
    with torch.cuda.stream(stream):
        return _move(batch, device)


def _move(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(b, device) for b in batch)
    return batch


def _record(batch, stream) -> None:
    """Tell the caching allocator the tensors are used on ``stream`` (they were made on another)."""
    if isinstance(batch, torch.Tensor):
        batch.record_stream(stream)
    elif isinstance(batch, (list, tuple)):
        for b in batch:
            _record(b, stream)
