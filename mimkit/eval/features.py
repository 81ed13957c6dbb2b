"""Frozen-encoder feature extraction shared by k-NN and linear probing, and its on-disk cache.

Under torchrun each process encodes every W-th image and the features are all-gathered back
into dataset order, so every rank ends up with the full bank.

The cache (:func:`cached_features`) is keyed by everything the features depend on, including
fingerprints of the data and checkpoint files (:func:`path_fingerprint`) and the precision. A
file that cannot be read, holds other shapes or labels, or carries another key is rebuilt with a
note. Under DDP only rank 0 reads and writes it and tells the other ranks whether it hit (and
what it read), so ranks on machines that do not share the cache folder never diverge.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from mimkit.checkpoint import save_atomic
from mimkit.data import TransformedDataset, build_transform

_MIB = 1 << 20


def probe_features(encoder: nn.Module, images: torch.Tensor, **pooling) -> torch.Tensor:
    """One feature per image: the encoder contract's ``pooled_features`` (pool, final_norm,
    n_last_blocks, avgpool; see :mod:`mimkit.models.encoder`)."""
    return encoder.pooled_features(images, **pooling)


def probe_feature_dim(encoder: nn.Module, *, n_last_blocks: int = 1, avgpool: bool = False, **_) -> int:
    """Width of :func:`probe_features`."""
    return encoder.pooled_dim(n_last_blocks=n_last_blocks, avgpool=avgpool)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _is_rank0() -> bool:
    return not _distributed() or dist.get_rank() == 0


def _backend_device(device: torch.device | str) -> torch.device:
    """Where collectives need their tensors: the GPU under NCCL, the CPU under gloo."""
    return torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")


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
    encoder: nn.Module,
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
    distributed = _distributed()
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
        backend_device = _backend_device(device)
        features = _gather_in_order(features.to(backend_device), world, len(dataset)).cpu()
        targets = _gather_in_order(targets.to(backend_device), world, len(dataset)).cpu()
    return features, targets


# -- the on-disk cache ---------------------------------------------------------------------------
def file_fingerprint(path: str | os.PathLike) -> str:
    """``size:mtime_ns:sha1`` of a file's first and last MiB.

    Reading 2 MiB costs nothing next to a feature pass. The tail of a zip container (``.npz``,
    torch checkpoints) is its central directory, which stores every member's CRC-32, so a change
    of content shows there even when a copy kept the size and mtime (``cp -p``, ``rsync -a``).
    """
    size, mtime = os.stat(path).st_size, os.stat(path).st_mtime_ns
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        digest.update(f.read(_MIB))
        if size > _MIB:
            f.seek(max(_MIB, size - _MIB))
            digest.update(f.read(_MIB))
    return f"{size}:{mtime}:{digest.hexdigest()}"


def folder_fingerprint(root: str | os.PathLike) -> str:
    """sha1 of the sorted (relative path, size, mtime_ns) of every non-hidden file under ``root``.

    One stat per file and no reads: cheap even for a million images, and any added, removed,
    renamed or rewritten image changes it.
    """
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                full = os.path.join(dirpath, name)
                st = os.stat(full)
                entries.append(f"{os.path.relpath(full, root)}\0{st.st_size}\0{st.st_mtime_ns}")
    return hashlib.sha1("\n".join(sorted(entries)).encode()).hexdigest()


def path_fingerprint(spec: str | os.PathLike) -> str:
    """Fingerprint of a data or checkpoint path: a file's or a folder's, or the spec itself for
    sources whose content is fixed ('digits', md5-checked 'medmnist:NAME')."""
    p = Path(os.fspath(spec)).expanduser()
    if p.is_file():
        return file_fingerprint(p)
    if p.is_dir():
        return folder_fingerprint(p)
    return os.fspath(spec)


def labels_digest(labels: torch.Tensor) -> str:
    """sha1 of a split's labels (cheap, and it tells two subsets of one split apart)."""
    return hashlib.sha1(labels.to(torch.int64).cpu().numpy().tobytes()).hexdigest()


def _canonical(key: Any) -> str:
    return json.dumps(key, sort_keys=True, default=str)


def cache_path(cache_dir: str | os.PathLike, key: dict) -> Path:
    return Path(cache_dir) / f"features_{hashlib.sha1(_canonical(key).encode()).hexdigest()[:16]}.pt"


def _cache_problem(blob: Any, key: dict, labels: torch.Tensor, dim: int) -> str | None:
    """Why a loaded cache file cannot be used for ``key`` (None: it can)."""
    if not isinstance(blob, dict) or not {"features", "labels", "key"} <= blob.keys():
        return "lacks its features, labels or key"
    if _canonical(blob["key"]) != _canonical(key):
        return "was written for other data or settings"
    feats, cached_labels = blob["features"], blob["labels"]
    expected = (len(labels), dim)
    if not isinstance(feats, torch.Tensor) or feats.dtype != torch.float32 or tuple(feats.shape) != expected:
        shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
        return f"holds features of shape {shape}, expected {expected} float32"
    if not isinstance(cached_labels, torch.Tensor) or not torch.equal(cached_labels.long(), labels.long().cpu()):
        return "holds other labels than the split"
    return None


def read_feature_cache(path: Path, key: dict, labels: torch.Tensor, dim: int,
                       log: Callable | None = print) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(features [N, dim], labels [N]) cached at ``path`` for ``key``; None (with a note) when absent or unusable."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        problem = _cache_problem(blob, key, labels, dim)
    except Exception as e:  # truncated or not a torch file: rebuilt, never fatal
        problem = f"cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})"
    if problem:
        if log:
            log(f"feature cache {path} {problem}: extracting the features again")
        return None
    if log:
        log(f"features read from {path}")
    return blob["features"], blob["labels"].long()


def _share_rank0_hit(hit: tuple[torch.Tensor, torch.Tensor] | None, n: int, dim: int,
                     device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rank 0's cache read given to every rank: the same (features, labels) on all, or None on all."""
    if not _distributed():
        return hit
    where = _backend_device(device)
    flag = torch.tensor([int(hit is not None)], device=where)
    dist.broadcast(flag, src=0)
    if not flag.item():
        return None
    feats = hit[0].to(where) if _is_rank0() else torch.empty(n, dim, device=where)
    labels = hit[1].to(where) if _is_rank0() else torch.empty(n, dtype=torch.long, device=where)
    dist.broadcast(feats, src=0)
    dist.broadcast(labels, src=0)
    return feats.cpu(), labels.cpu()


def cached_features(encoder: nn.Module, dataset, stats: dict, kwargs: dict[str, Any], *,
                    cache_key: dict | None, cache_dir: str | os.PathLike | None, device,
                    precision: str, log: Callable | None = print) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, D'] and labels [N] of a labelled ``dataset`` under the eval transform.

    With ``cache_dir`` and a ``cache_key``: rank 0 reads a valid cache file (see
    :func:`read_feature_cache`) and shares it, or every rank extracts and rank 0 writes the file.
    ``kwargs`` are :func:`probe_features`'s.
    """
    path = cache_path(cache_dir, cache_key) if cache_dir and cache_key is not None else None
    if path is not None:
        dim = probe_feature_dim(encoder, **kwargs)
        hit = read_feature_cache(path, cache_key, dataset.labels, dim, log) if _is_rank0() else None
        hit = _share_rank0_hit(hit, len(dataset), dim, device)
        if hit is not None:
            return hit
    transform = build_transform("eval", encoder.img_size, stats["mean"], stats["std"])
    feats, labels = extract_features(encoder, TransformedDataset(dataset, transform), device=device,
                                     precision=precision, **kwargs)
    if path is not None and _is_rank0():
        save_atomic({"features": feats, "labels": labels, "key": cache_key}, path)
    return feats, labels
