"""The pretraining split and its input pipeline, as ``cfg.data`` asks.

Arrays (MedMNIST ``.npz``, digits) keep the tensor pipeline: crop, flip and normalise per image
(:func:`mimkit.data.build_transform`). Image folders, in memory or lazy, go through
:class:`~mimkit.data.lazy.PretrainCrop`, the official MAE crop on Pillow images: workers return
uint8 crops and :class:`~mimkit.data.device.DeviceNormalize` converts and normalises the batch
on the training device. A method with its own augmentation (iBOT's multi-crop) gets the float
image of either kind and normalises per view itself.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
from torch import nn

from mimkit.config import Config
from mimkit.data import build_transform, stats_for
from mimkit.data.collection import PretrainData, open_pretrain_data
from mimkit.data.device import DeviceNormalize
from mimkit.data.lazy import PretrainCrop
from mimkit.data.sources import check_patch_fits
from mimkit.errors import ConfigError
from mimkit.registry import resolve_model_kwargs


def prepare_data(cfg: Config, say: Callable[[str], None] = print) -> tuple[PretrainData, dict[str, Any], dict]:
    """Open the pretraining split; fill in the channel count and normalisation statistics.

    Returns (data, model_config, {"mean", "std"}). ``model_config`` is ``cfg.model`` with
    ``in_chans`` set from the data, so a checkpoint can rebuild exactly this model.
    """
    data = open_pretrain_data(cfg.data, cfg.data.split, say)
    dataset = data.dataset
    model_config = dict(cfg.model)
    if not data.lazy:  # a lazy folder's sizes are unknown until read; the crop resizes them anyway
        check_patch_fits(dataset, resolve_model_kwargs(**model_config)["patch_size"])
    given = model_config.get("in_chans")
    if given is None:
        model_config["in_chans"] = dataset.num_channels
    elif given != dataset.num_channels:
        raise ConfigError(
            f"model.in_chans is {given} but the images in {cfg.data.path} have {dataset.num_channels} channels: "
            f"remove model.in_chans to use the data's channel count."
        )
    return data, model_config, _stats(cfg, dataset)


def _stats(cfg: Config, dataset) -> dict[str, list[float]]:
    if cfg.data.mean is None:
        return stats_for(dataset, max_images=cfg.data.stats_images)
    if len(cfg.data.mean) != dataset.num_channels or len(cfg.data.std) != dataset.num_channels:
        raise ConfigError(f"data.mean/data.std need {dataset.num_channels} values (one per channel), got "
                          f"{len(cfg.data.mean)}/{len(cfg.data.std)}.")
    return {"mean": list(cfg.data.mean), "std": list(cfg.data.std)}


def pretrain_inputs(model: nn.Module, cfg: Config, data: PretrainData, img_size: int, stats: dict,
                    device: torch.device) -> tuple[Callable, Callable | None]:
    """(per-sample transform run in the workers, batch transform run on the device or None)."""
    d = cfg.data
    if hasattr(model, "pretrain_transform"):
        return model.pretrain_transform(img_size, stats["mean"], stats["std"], d), None
    if data.folder:
        crop = PretrainCrop(img_size, tuple(d.crop_scale), interpolation=d.interpolation, hflip=d.hflip,
                            draft=d.draft)
        return crop, DeviceNormalize(stats["mean"], stats["std"], crop.output_scale(data.dataset), device)
    return build_transform("pretrain", img_size, stats["mean"], stats["std"], crop_scale=tuple(d.crop_scale),
                           hflip=d.hflip, interpolation=d.interpolation), None


def worker_count(setting: int | str, lazy: bool) -> int:
    """``data.num_workers``: a number as given; auto = 0 for data in memory (a transform of an image
    in memory costs less than handing it between processes), else this process's share of the
    cores (at most 8, at least 1)."""
    if setting != "auto":
        return int(setting)
    if not lazy:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, per_process))
