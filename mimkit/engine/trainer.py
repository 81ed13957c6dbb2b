"""The one training loop: any method, one process or torchrun/DDP, CPU or GPU.

It owns data order, the lr schedule, mixed precision, gradient accumulation and clipping,
checkpoints and logs. A method only supplies ``forward(images, sample_seeds) -> StepOutput``
(and optionally the hooks of :mod:`mimkit.methods.base`). Pretraining, fine-tuning and linear
probing all run here; they differ only in the :class:`TrainingSetup` they hand over:

* a model with ``uses_labels = True`` is called as ``forward(images, sample_seeds, labels=...)``;
* a model may supply ``optimizer_param_groups(weight_decay)`` (e.g. layer-decay groups with
  ``lr_scale``, which the schedule honours);
* ``evaluate(model, epoch) -> {"score": ..., ...}`` runs after each epoch; the best score is kept as
  ``best.pt`` beside ``last.pt``.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

import mimkit
from mimkit.checkpoint import extract_state_dict, load_file, load_state_dict_checked, save_atomic
from mimkit.config import Config, dump_config
from mimkit.engine.distributed import DistInfo, all_reduce_mean, barrier, cleanup, init_distributed
from mimkit.engine.optim import build_optimizer
from mimkit.engine.sampling import SeededSampler, SeededTransformDataset, generator_seed, sample_seed
from mimkit.engine.schedule import scaled_lr, warmup_cosine
from mimkit.errors import ConfigError, TrainingError
from mimkit.registry import create_model, model_arguments, resolve_model_kwargs

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def prepare_data(cfg: Config) -> tuple[Any, dict[str, Any], dict[str, list[float]]]:
    """Load the pretraining split; fill in the channel count and normalisation statistics.

    Returns (dataset, model_config, {"mean", "std"}). ``model_config`` is ``cfg.model`` with
    ``in_chans`` set from the data, so a checkpoint can rebuild exactly this model.
    """
    from mimkit.data import load_dataset, stats_for

    dataset = load_dataset(cfg.data.path, cfg.data.split)
    model_config = dict(cfg.model)
    given = model_config.get("in_chans")
    if given is None:
        model_config["in_chans"] = dataset.num_channels
    elif given != dataset.num_channels:
        raise ConfigError(
            f"model.in_chans is {given} but the images in {cfg.data.path} have {dataset.num_channels} channels: "
            f"remove model.in_chans to use the data's channel count."
        )
    if cfg.data.mean is not None:
        if len(cfg.data.mean) != dataset.num_channels or len(cfg.data.std) != dataset.num_channels:
            raise ConfigError(
                f"data.mean/data.std need {dataset.num_channels} values (one per channel), got "
                f"{len(cfg.data.mean)}/{len(cfg.data.std)}."
            )
        stats = {"mean": list(cfg.data.mean), "std": list(cfg.data.std)}
    else:
        stats = stats_for(dataset)
    return dataset, model_config, stats


def _pretrain_transform(model: nn.Module, cfg: Config, img_size: int, stats: dict[str, list[float]]):
    """The method's own augmentation (e.g. multi-crop) if it defines one, else the MAE recipe."""
    if hasattr(model, "pretrain_transform"):
        return model.pretrain_transform(img_size, stats["mean"], stats["std"], cfg.data)
    from mimkit.data import build_transform

    return build_transform(
        "pretrain", img_size, stats["mean"], stats["std"],
        crop_scale=tuple(cfg.data.crop_scale), hflip=cfg.data.hflip, interpolation=cfg.data.interpolation,
    )


def _weight_decay_at(t_cfg, epoch: float) -> float:
    """Constant ``weight_decay``, or a cosine from it to ``weight_decay_end`` (DINO/iBOT) over the run."""
    if t_cfg.weight_decay_end is None:
        return t_cfg.weight_decay
    progress = min(1.0, epoch / max(t_cfg.epochs, 1e-9))
    return t_cfg.weight_decay_end + (t_cfg.weight_decay - t_cfg.weight_decay_end) * 0.5 * (1 + math.cos(math.pi * progress))


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _Logger:
    """JSON lines (always) + TensorBoard (when installed), on the main process only."""

    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        self.path = out / "log.jsonl"
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


@dataclass
class TrainingSetup:
    """What a task (pretrain, finetune, linprobe) hands to the loop.

    model: the method (``forward -> StepOutput``), on the device.
    dataset: items ``(image, label)``; ``transform`` runs per sample under the sample's seed.
    model_config: rebuilds the model; a resume into a run of another model is refused.
    stats: data normalisation recorded in the checkpoint.
    evaluate: optional ``(model, epoch) -> {"score": float, ...}`` after every epoch (higher is better),
        or None to skip that epoch.
    extra: entries added to every checkpoint (e.g. the classifier head's configuration).
    """

    model: nn.Module
    dataset: Any
    transform: Callable
    model_config: dict[str, Any]
    stats: dict[str, list[float]]
    task: str = "pretrain"
    description: str = ""
    evaluate: Callable[[nn.Module, int], dict[str, float] | None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def pretrain(cfg: Config) -> dict[str, Any]:
    """Run (or resume) pretraining as configured; returns a summary dict (also saved as summary.json)."""
    return run_training(cfg, _pretrain_setup)


def run_training(cfg: Config, make_setup: Callable[[Config, DistInfo, torch.device], TrainingSetup]) -> dict[str, Any]:
    """Join the process group (under torchrun), build the task's setup, train; returns the summary."""
    dist_info, device = init_distributed(cfg.train.device)
    try:
        return train_loop(cfg, dist_info, device, make_setup(cfg, dist_info, device))
    finally:
        cleanup()


def _pretrain_setup(cfg: Config, di: DistInfo, device: torch.device) -> TrainingSetup:
    dataset, model_config, stats = prepare_data(cfg)
    # Schedules inside the method (iBOT's teacher momentum) span the run unless the config says otherwise.
    if "total_epochs" in model_arguments(model_config["name"]) and model_config.get("total_epochs") is None:
        model_config["total_epochs"] = cfg.train.epochs
    model_kwargs = resolve_model_kwargs(**model_config)
    torch.manual_seed(cfg.train.seed)
    model = create_model(model_config["name"], **{k: v for k, v in model_config.items() if k != "name"}).to(device)
    transform = _pretrain_transform(model, cfg, model_kwargs["img_size"], stats)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    description = (f"{model_config['name']} ({n_params:.1f}M params) on {cfg.data.path} "
                   f"[{len(dataset)} images, {model_config['in_chans']} ch]")
    return TrainingSetup(model, dataset, transform, model_config, stats, "pretrain", description)


def train_loop(cfg: Config, di: DistInfo, device: torch.device, setup: TrainingSetup) -> dict[str, Any]:
    t_cfg = cfg.train
    out = Path(cfg.output_dir)
    model, dataset, transform = setup.model, setup.dataset, setup.transform
    model_config, stats = setup.model_config, setup.stats
    uses_labels = getattr(model, "uses_labels", False)
    sampler = SeededSampler(len(dataset), t_cfg.seed, di.rank, di.world_size)
    loader = DataLoader(
        SeededTransformDataset(dataset, transform), batch_size=t_cfg.batch_size, sampler=sampler,
        num_workers=cfg.data.num_workers, drop_last=True, persistent_workers=cfg.data.num_workers > 0,
        pin_memory=device.type == "cuda",
    )
    iters_per_epoch = len(loader) // t_cfg.accum_iter * t_cfg.accum_iter
    if iters_per_epoch == 0:
        raise ConfigError(
            f"The training split has {len(dataset)} images, fewer than one batch of {t_cfg.batch_size} x "
            f"{t_cfg.accum_iter} x {di.world_size} processes: lower train.batch_size."
        )

    effective_batch = t_cfg.batch_size * t_cfg.accum_iter * di.world_size
    base_lr = t_cfg.lr if t_cfg.lr is not None else scaled_lr(t_cfg.blr, effective_batch)
    optimizer = build_optimizer(model, t_cfg, base_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=t_cfg.precision == "fp16")

    start_epoch, step = 0, 0
    best_score, best_record = -math.inf, None
    last_path = out / "last.pt"
    if t_cfg.resume and last_path.is_file():
        ckpt = load_file(last_path)
        if ckpt.get("model_config") != model_config:
            raise ConfigError(
                f"{out} holds a run of another model ({ckpt.get('model_config')}): choose a new output_dir "
                f"or set train.resume=false to start over."
            )
        load_state_dict_checked(model, extract_state_dict(ckpt), f"Checkpoint {last_path}")
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step = ckpt["epoch"] + 1, ckpt["step"]
        best_score = ckpt.get("best_score", -math.inf)
        best_record = ckpt.get("best_record")
        _set_rng_state(ckpt["rng"])
        if di.is_main:
            print(f"Resuming from {last_path} at epoch {start_epoch}/{t_cfg.epochs}.", flush=True)

    method = model  # the module whose hooks and state we use; `step_model` may wrap it
    step_model: nn.Module = torch.compile(model) if t_cfg.compile else model
    if di.enabled:
        step_model = nn.parallel.DistributedDataParallel(
            step_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    autocast = (
        torch.autocast(device.type, dtype=_DTYPES[t_cfg.precision])
        if t_cfg.precision in _DTYPES else contextlib.nullcontext()
    )

    if di.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(cfg))
        print(
            f"mimkit {setup.task}: {setup.description}, {t_cfg.epochs} epochs x {iters_per_epoch} it, "
            f"effective batch {effective_batch}, {t_cfg.optimizer} lr {base_lr:.3g}, {t_cfg.precision}"
            f"{', compiled' if t_cfg.compile else ''}, {di.world_size} process(es) on {device}",
            flush=True,
        )
    logger = _Logger(out, di.is_main)
    summary: dict[str, Any] = {}
    run_start = time.perf_counter()
    images_seen = 0

    for epoch in range(start_epoch, t_cfg.epochs):
        sampler.set_epoch(epoch)
        # Reseeding per epoch makes any randomness outside the per-sample seeds (dropout,
        # drop-path) identical after a resume.
        torch.manual_seed(generator_seed(sample_seed(t_cfg.seed, epoch, di.rank)))
        step_model.train()
        bar = _progress(iters_per_epoch, di.is_main and t_cfg.progress, f"epoch {epoch + 1}/{t_cfg.epochs}")
        sums: dict[str, torch.Tensor] = {}
        window: dict[str, torch.Tensor] = {}
        window_start, window_iters = time.perf_counter(), 0
        epoch_start = time.perf_counter()
        lr = base_lr
        for it, (images, labels, seeds) in enumerate(loader):
            if it >= iters_per_epoch:
                break
            if it % t_cfg.accum_iter == 0:
                lr = warmup_cosine(epoch + it / iters_per_epoch, base_lr, t_cfg.min_lr, t_cfg.warmup_epochs, t_cfg.epochs)
                wd = _weight_decay_at(t_cfg, epoch + it / iters_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                    if group["weight_decay"] > 0:
                        group["weight_decay"] = wd
            if hasattr(method, "set_epoch"):
                method.set_epoch(epoch + it / iters_per_epoch)
            images = ([x.to(device, non_blocking=True) for x in images] if isinstance(images, (list, tuple))
                      else images.to(device, non_blocking=True))
            boundary = (it + 1) % t_cfg.accum_iter == 0
            sync = contextlib.nullcontext() if boundary or not di.enabled else step_model.no_sync()
            with sync:
                with autocast:
                    if uses_labels:
                        output = step_model(images, sample_seeds=seeds, labels=labels.to(device, non_blocking=True))
                    else:
                        output = step_model(images, sample_seeds=seeds)
                scaler.scale(output.loss / t_cfg.accum_iter).backward()
            if boundary:
                if t_cfg.clip_grad is not None:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), t_cfg.clip_grad)
                if hasattr(method, "before_optimizer_step"):
                    method.before_optimizer_step(epoch + (it + 1) / iters_per_epoch)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if hasattr(method, "after_optimizer_step"):
                    method.after_optimizer_step(epoch + (it + 1) / iters_per_epoch)
            for k, v in output.metrics.items():
                v = v.detach().float()
                sums[k] = sums.get(k, 0) + v
                window[k] = window.get(k, 0) + v
            window_iters += 1
            if bar is not None:
                bar.update(1)
            if (it + 1) % t_cfg.log_every == 0 or it + 1 == iters_per_epoch:
                # The only host sync of the loop: every log_every iterations.
                keys = sorted(window)
                values = all_reduce_mean(torch.stack([window[k] for k in keys]) / window_iters).tolist()
                elapsed = time.perf_counter() - window_start
                record = {"kind": "train", "epoch": epoch, "step": step, "lr": lr, **dict(zip(keys, values)),
                          "images_per_s": window_iters * t_cfg.batch_size * di.world_size / max(elapsed, 1e-9)}
                if not all(math.isfinite(v) for v in values):
                    raise TrainingError(
                        f"The loss became {values} at epoch {epoch}, step {step}; stopped, keeping the last good "
                        f"checkpoint in {out}. Lower the learning rate or use train.precision=fp32/bf16."
                    )
                logger.log(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", ips=f"{record['images_per_s']:.0f}")
                window, window_iters, window_start = {}, 0, time.perf_counter()
        if bar is not None:
            bar.close()
        epoch_time = time.perf_counter() - epoch_start
        images_seen += iters_per_epoch * t_cfg.batch_size * di.world_size
        keys = sorted(sums)
        means = dict(zip(keys, all_reduce_mean(torch.stack([sums[k] for k in keys]) / iters_per_epoch).tolist()))
        if not all(math.isfinite(v) for v in means.values()):
            raise TrainingError(f"The loss became non-finite in epoch {epoch}; stopped, last good checkpoint kept in {out}.")
        record = {"kind": "epoch", "epoch": epoch, "step": step, "lr": lr, **means, "epoch_time_s": epoch_time,
                  "images_per_s": iters_per_epoch * t_cfg.batch_size * di.world_size / epoch_time}
        is_best = False
        scores = setup.evaluate(model, epoch) if setup.evaluate is not None else None  # on every rank
        if scores is not None:
            record.update({f"eval_{k}": v for k, v in scores.items()})
            is_best = scores["score"] > best_score
            if is_best:
                best_score, best_record = scores["score"], {"epoch": epoch, **scores}
        logger.log(record)
        if di.is_main:
            metric_text = " ".join(f"{k} {v:.4f}" for k, v in means.items())
            if scores is not None:
                metric_text += " | " + " ".join(f"{k} {v:.4f}" for k, v in scores.items())
            print(f"epoch {epoch + 1}/{t_cfg.epochs}  {metric_text}  lr {lr:.3g}  "
                  f"{record['images_per_s']:.0f} img/s  {epoch_time:.1f}s", flush=True)
            payload = {
                "format": "mimkit", "version": mimkit.__version__, "model": model.state_dict(),
                "model_config": model_config, "data_stats": stats, "epoch": epoch, "step": step,
                "config": cfg.to_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "rng": _rng_state(), "task": setup.task, "best_score": best_score, "best_record": best_record,
                **setup.extra,
            }
            save_atomic(payload, last_path)
            if is_best:
                weights_only = {k: v for k, v in payload.items() if k not in ("optimizer", "scaler", "rng")}
                save_atomic(weights_only, out / "best.pt")
            if (epoch + 1) % t_cfg.save_every == 0 or epoch + 1 == t_cfg.epochs:
                save_atomic(payload, out / f"checkpoint-{epoch + 1:04d}.pt")
        barrier()
        summary = {"final_epoch": epoch + 1, **{f"final_{k}": v for k, v in means.items()}}

    wall = time.perf_counter() - run_start
    summary.update({"wall_time_s": wall, "images_per_s": images_seen / wall if wall > 0 else 0.0,
                    "output_dir": str(out), "checkpoint": str(last_path)})
    if best_record is not None:
        summary["best"] = best_record
    if di.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.close()
    return summary
