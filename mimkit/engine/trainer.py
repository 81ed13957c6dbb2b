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
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

import mimkit
from mimkit.checkpoint import extract_state_dict, load_state_dict_checked, remove_stray_temporaries, save_atomic
from mimkit.checkpoint import write_text_atomic
from mimkit.config import Config, dump_config
from mimkit.data.device import prefetch_to_device
from mimkit.engine.distributed import DistInfo, all_reduce_mean, barrier, cleanup, init_distributed
from mimkit.engine.guard import FiniteGuard, gated_step, grad_norm
from mimkit.engine.optim import build_optimizer
from mimkit.engine.pretrain_data import prepare_data, pretrain_inputs, worker_count
from mimkit.engine.run_log import RunLog, progress_bar
from mimkit.engine.run_state import check_resumable, find_resume_point, rng_state, set_rng_state
from mimkit.engine.sampling import SeededSampler, SeededTransformDataset, check_run_seed, generator_seed, init_seed
from mimkit.engine.sampling import sample_seed
from mimkit.engine.schedule import scaled_lr, warmup_cosine, warmup_multistep
from mimkit.engine.unreadable import UnreadableFiles
from mimkit.errors import ConfigError
from mimkit.registry import create_model, model_arguments, resolve_model_kwargs

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _weight_decay_at(t_cfg, epoch: float) -> float:
    """Constant ``weight_decay``, or a cosine from it to ``weight_decay_end`` (DINO/iBOT) over the run."""
    if t_cfg.weight_decay_end is None:
        return t_cfg.weight_decay
    progress = min(1.0, epoch / max(t_cfg.epochs, 1e-9))
    return t_cfg.weight_decay_end + (t_cfg.weight_decay - t_cfg.weight_decay_end) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class TrainingSetup:
    """What a task (pretrain, finetune, linprobe) hands to the loop.

    model: the method (``forward -> StepOutput``), on the device.
    dataset: items ``(image, label)``; ``transform`` runs per sample under the sample's seed (see
        :class:`~mimkit.engine.sampling.SeededTransformDataset`), in the DataLoader workers.
    on_device: optional batch transform on the training device (uint8 crops -> normalised float).
    num_workers: DataLoader workers; None = ``data.num_workers`` (auto: 0, data in memory).
    unreadable: the counter of files that fail to decode; None = a fresh one over ``dataset``.
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
    on_device: Callable[[torch.Tensor], torch.Tensor] | None = None
    num_workers: int | None = None
    unreadable: UnreadableFiles | None = None


def pretrain(cfg: Config) -> dict[str, Any]:
    """Run (or resume) pretraining as configured; returns a summary dict (also saved as summary.json)."""
    return run_training(cfg, _pretrain_setup)


def run_training(cfg: Config, make_setup: Callable[[Config, DistInfo, torch.device], TrainingSetup]) -> dict[str, Any]:
    """Join the process group (under torchrun), build the task's setup, train; returns the summary."""
    check_run_seed(cfg.train.seed)
    dist_info, device = init_distributed(cfg.train.device)
    # torch seeds itself at random per process: a setup that initialises anything (a probe's head)
    # without seeding must still build the same model in every process, or a restart changes the run.
    torch.manual_seed(init_seed(cfg.train.seed))
    try:
        return train_loop(cfg, dist_info, device, make_setup(cfg, dist_info, device))
    finally:
        cleanup()


def _pretrain_setup(cfg: Config, di: DistInfo, device: torch.device) -> TrainingSetup:
    data, model_config, stats = prepare_data(cfg, print if di.is_main else (lambda *a, **k: None))
    # Schedules inside the method (iBOT's teacher momentum) span the run unless the config says otherwise.
    if "total_epochs" in model_arguments(model_config["name"]) and model_config.get("total_epochs") is None:
        model_config["total_epochs"] = cfg.train.epochs
    model_kwargs = resolve_model_kwargs(**model_config)
    torch.manual_seed(init_seed(cfg.train.seed))
    model = create_model(model_config["name"], **{k: v for k, v in model_config.items() if k != "name"}).to(device)
    transform, on_device = pretrain_inputs(model, cfg, data, model_kwargs["img_size"], stats, device)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    description = (f"{model_config['name']} ({n_params:.1f}M params) on {cfg.data.path} "
                   f"[{len(data.dataset)} images{', decoded per batch' if data.lazy else ''}, "
                   f"{model_config['in_chans']} ch]")
    unreadable = UnreadableFiles(data.num_files, cfg.data.max_bad_fraction, data.unreadable)
    unreadable.check(0, None)
    return TrainingSetup(model, data.dataset, transform, model_config, stats, "pretrain", description,
                         on_device=on_device, num_workers=worker_count(cfg.data.num_workers, data.lazy),
                         unreadable=unreadable)


def train_loop(cfg: Config, di: DistInfo, device: torch.device, setup: TrainingSetup) -> dict[str, Any]:
    """Train ``setup`` as ``cfg.train`` says (resuming from output_dir when it holds a run); returns the summary."""
    return _Loop(cfg, di, device, setup).run()


def _prepare_output_dir(out: Path) -> None:
    """Create output_dir (main process), with one sentence when that cannot work."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} is a file: choose a folder path for output_dir.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"Cannot create output_dir {out} ({exc.strerror or exc}): choose a writable folder.") from None
    if not os.access(out, os.W_OK):
        raise ConfigError(f"output_dir {out} is not writable: choose a folder you can write to.")


class _Loop:
    """One training run. ``run()`` reads as the loop; each method below is one of its steps.

    State across epochs: ``epoch0`` (first epoch to train), ``step`` (optimizer steps done),
    ``best_score``/``best_record`` (best evaluation so far), ``last_good`` (newest checkpoint on disk
    as (path, epoch)) and ``summary`` (of the last finished epoch).
    """

    def __init__(self, cfg: Config, di: DistInfo, device: torch.device, setup: TrainingSetup):
        self.cfg, self.t, self.di, self.device, self.setup = cfg, cfg.train, di, device, setup
        self.out, self.method = Path(cfg.output_dir), setup.model
        self.print = print if di.is_main else (lambda *a, **k: None)
        self.sampler, self.loader, self.iters_per_epoch = self._build_loader()
        self.effective_batch = self.t.batch_size * self.t.accum_iter * di.world_size
        self.base_lr = self.t.lr if self.t.lr is not None else scaled_lr(self.t.blr, self.effective_batch)
        self.optimizer = build_optimizer(self.method, self.t, self.base_lr)
        # Indices, not the dicts: loading a checkpoint's optimizer state replaces the group dicts.
        self.decayed_groups = [i for i, g in enumerate(self.optimizer.param_groups) if g["weight_decay"] > 0]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.t.precision == "fp16")
        self.guard = FiniteGuard(device, grads_may_overflow=self.t.precision == "fp16")
        self.epoch0, self.step, self.best_score, self.best_record = 0, 0, -math.inf, None
        self.last_good: tuple[Path, int] | None = None
        self.summary: dict[str, Any] = {}
        self.images_seen = 0
        self.unreadable = setup.unreadable or UnreadableFiles(len(setup.dataset), cfg.data.max_bad_fraction)

    def run(self) -> dict[str, Any]:
        if self.di.is_main:
            _prepare_output_dir(self.out)
            remove_stray_temporaries(self.out)
        finished = self._resume()
        if finished is not None:
            return finished
        self.step_model, self.autocast = self._wrap_model()
        self.warmup = self._warmup_epochs()
        if self.di.is_main:  # only now: a refused resume leaves config.yaml describing last.pt
            write_text_atomic(dump_config(self.cfg), self.out / "config.yaml")
            self._print_banner()
        self.log = RunLog(self.out, self.di.is_main, (self.epoch0 - 1, self.step) if self.epoch0 else None)
        run_start = time.perf_counter()
        try:
            for epoch in range(self.epoch0, self.t.epochs):
                self._train_epoch(epoch)
        finally:
            self.log.close()
        return self._write_summary(time.perf_counter() - run_start)

    # -- building ----------------------------------------------------------------------------------
    def _build_loader(self) -> tuple[SeededSampler, DataLoader, int]:
        """Seeded sampler + loader; iterations per epoch rounded down to whole accumulation windows."""
        t, dataset = self.t, self.setup.dataset
        workers = self.setup.num_workers
        if workers is None:
            workers = worker_count(self.cfg.data.num_workers, lazy=False)
        sampler = SeededSampler(len(dataset), t.seed, self.di.rank, self.di.world_size)
        loader = DataLoader(
            SeededTransformDataset(dataset, self.setup.transform), batch_size=t.batch_size, sampler=sampler,
            num_workers=workers, drop_last=True, persistent_workers=workers > 0, pin_memory=self.device.type == "cuda",
        )
        iters = len(loader) // t.accum_iter * t.accum_iter
        if iters == 0:
            raise ConfigError(
                f"The training split has {len(dataset)} images, fewer than one batch of {t.batch_size} x "
                f"{t.accum_iter} x {self.di.world_size} processes: lower train.batch_size."
            )
        return sampler, loader, iters

    def _wrap_model(self) -> tuple[nn.Module, Any]:
        """The module the steps call (compiled, DDP-wrapped) and the autocast context."""
        step_model: nn.Module = torch.compile(self.method) if self.t.compile else self.method
        if self.di.enabled:
            step_model = nn.parallel.DistributedDataParallel(
                step_model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        dtype = _DTYPES.get(self.t.precision)
        return step_model, torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def _warmup_epochs(self) -> float:
        """train.warmup_epochs, clamped to a run shorter than it (e.g. train.epochs=1 on a 4-epoch warmup)."""
        if self.t.warmup_epochs <= self.t.epochs:
            return self.t.warmup_epochs
        self.print(f"note: train.warmup_epochs={self.t.warmup_epochs:g} is longer than the run, so warmup is clamped "
                   f"to train.epochs={self.t.epochs} epochs (set train.warmup_epochs to choose another).", flush=True)
        return float(self.t.epochs)

    def _print_banner(self) -> None:
        t = self.t
        if t.precision == "fp16" and self.device.type == "cpu":
            print("warning: fp16 autocast on a CPU is about 10x slower than fp32 or bf16: set train.precision=bf16.",
                  flush=True)
        print(
            f"mimkit {self.setup.task}: {self.setup.description}, {t.epochs} epochs x {self.iters_per_epoch} it, "
            f"effective batch {self.effective_batch}, {t.optimizer} lr {self.base_lr:.3g}, {t.precision}"
            f"{', compiled' if t.compile else ''}, {self.di.world_size} process(es) on {self.device}",
            flush=True,
        )

    # -- resume ------------------------------------------------------------------------------------
    def _resume(self) -> dict[str, Any] | None:
        """Load the run in output_dir when there is one; returns its saved summary if it is finished."""
        point = find_resume_point(self.out, self.print) if self.t.resume else None
        if point is None:
            return None
        ckpt, path = point
        changed = check_resumable(ckpt, path, self.cfg.to_dict(), self.setup.model_config, self.setup.task,
                                  allow_changed=self.t.resume_changed)
        if changed:
            self.print(f"train.resume_changed=true: continuing {path} with "
                       + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()), flush=True)
        if path.name != "last.pt" and self.di.is_main:  # the fallback becomes last.pt, which was unusable
            save_atomic(ckpt, self.out / "last.pt")
        if ckpt["epoch"] + 1 >= self.t.epochs:
            return self._finished_summary(ckpt, path)
        self._load_state(ckpt, path, fresh_optimizer="train.optimizer" in changed)
        self.print(f"Resuming from {path} at epoch {self.epoch0}/{self.t.epochs}.", flush=True)
        return None

    def _load_state(self, ckpt: dict[str, Any], path: Path, fresh_optimizer: bool) -> None:
        """Weights, optimizer, scaler, counters and RNG from a checkpoint; the config's optimizer
        hyperparameters (betas, momentum, lr_scale) win over the saved ones."""
        load_state_dict_checked(self.method, extract_state_dict(ckpt), f"Checkpoint {path}")
        if fresh_optimizer:
            self.print(f"train.optimizer changed: the {self.t.optimizer} state starts fresh.", flush=True)
        else:
            configured = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
            self.optimizer.load_state_dict(ckpt["optimizer"])
            for group, hyper in zip(self.optimizer.param_groups, configured):
                group.update(hyper)
        if self.scaler.is_enabled() and ckpt["scaler"]:  # a disabled scaler saved {}
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch0, self.step = ckpt["epoch"] + 1, ckpt["step"]
        self.best_score, self.best_record = ckpt.get("best_score", -math.inf), ckpt.get("best_record")
        self.last_good = (path, ckpt["epoch"])
        set_rng_state(ckpt["rng"])

    def _finished_summary(self, ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
        """A finished run is left as it is: its summary.json, rebuilt from the checkpoint if a kill lost it."""
        summary_path = self.out / "summary.json"
        try:
            summary = json.loads(summary_path.read_text())
        except (OSError, ValueError):
            summary = {**ckpt.get("summary", {"final_epoch": ckpt["epoch"] + 1}),
                       "output_dir": str(self.out), "checkpoint": str(self.out / "last.pt")}
            if self.di.is_main:
                write_text_atomic(json.dumps(summary, indent=2), summary_path)
        self.print(f"{self.out} holds a finished run ({ckpt['epoch'] + 1} epochs, {path.name}): nothing to train; "
                   f"its summary is {summary_path}.", flush=True)
        return summary

    # -- one epoch ---------------------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        # Reseeding per epoch makes any randomness outside the per-sample seeds (dropout,
        # drop-path) identical after a resume.
        torch.manual_seed(generator_seed(sample_seed(self.t.seed, epoch, self.di.rank)))
        self.step_model.train()
        bar = progress_bar(self.iters_per_epoch, self.di.is_main and self.t.progress, f"epoch {epoch + 1}/{self.t.epochs}")
        sums: dict[str, torch.Tensor] = {}
        window: dict[str, torch.Tensor] = {}
        window_start, window_iters, epoch_start = time.perf_counter(), 0, time.perf_counter()
        self.unreadable.start_epoch()
        # The next batch's host-to-device copy overlaps this step (CUDA; pinned memory).
        batches, self.data_wait = prefetch_to_device(self.loader, self.device), 0.0
        for it in range(self.iters_per_epoch):
            images, labels, seeds, failed = self._next_batch(batches)
            self.unreadable.add(failed)
            for k, v in self._micro_step(epoch, it, images, labels, seeds).items():
                v = v.detach().float()
                sums[k] = sums.get(k, 0) + v
                window[k] = window.get(k, 0) + v
            window_iters += 1
            if bar is not None:
                bar.update(1)
            if (it + 1) % self.t.log_every == 0 or it + 1 == self.iters_per_epoch:
                self._log_window(epoch, window, window_iters, time.perf_counter() - window_start, bar)
                window, window_iters, window_start, self.data_wait = {}, 0, time.perf_counter(), 0.0
        if bar is not None:
            bar.close()
        self._end_epoch(epoch, sums, time.perf_counter() - epoch_start)

    def _next_batch(self, batches):
        """The next batch, adding the time the loop waited for it to ``data_wait`` (a loop that is
        fed fast enough waits ~0; a starved one waits most of the window)."""
        start = time.perf_counter()
        batch = next(batches)
        self.data_wait += time.perf_counter() - start
        return batch

    def _set_schedule(self, progress: float) -> None:
        """lr (times each group's lr_scale) and weight decay at a fractional epoch."""
        if self.t.lr_schedule == "multistep":
            self.lr = warmup_multistep(progress, self.base_lr, self.warmup, self.t.lr_milestones, self.t.lr_gamma)
        else:
            self.lr = warmup_cosine(progress, self.base_lr, self.t.min_lr, self.warmup, self.t.epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * group.get("lr_scale", 1.0)
        wd = _weight_decay_at(self.t, progress)
        for i in self.decayed_groups:
            self.optimizer.param_groups[i]["weight_decay"] = wd

    def _micro_step(self, epoch: int, it: int, images, labels, seeds) -> dict[str, torch.Tensor]:
        """Forward and backward of one batch; every accum_iter-th batch ends with an optimizer step."""
        progress = epoch + it / self.iters_per_epoch
        if it % self.t.accum_iter == 0:
            self._set_schedule(progress)
        if hasattr(self.method, "set_epoch"):
            self.method.set_epoch(progress)
        if self.setup.on_device is not None:
            images = self.setup.on_device(images)
        kwargs = {"labels": labels} if getattr(self.method, "uses_labels", False) else {}
        boundary = (it + 1) % self.t.accum_iter == 0
        sync = contextlib.nullcontext() if boundary or not self.di.enabled else self.step_model.no_sync()
        with sync:
            with self.autocast:
                output = self.step_model(images, sample_seeds=seeds, **kwargs)
            self.scaler.scale(output.loss / self.t.accum_iter).backward()
        self.guard.observe(output.loss, images)
        if boundary:
            self._optimizer_step(epoch + (it + 1) / self.iters_per_epoch)
        return output.metrics

    def _optimizer_step(self, progress: float) -> None:
        """Unscale, clip, and apply the update unless its loss or gradients are non-finite (no host sync)."""
        self.scaler.unscale_(self.optimizer)  # a no-op unless fp16: the norm and the clip see true gradients
        norm = grad_norm(self.method.parameters(), self.t.clip_grad)
        if hasattr(self.method, "before_optimizer_step"):
            self.method.before_optimizer_step(progress)
        gated_step(self.optimizer, self.guard.allow(norm, self.step + 1))
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if hasattr(self.method, "after_optimizer_step"):
            self.method.after_optimizer_step(progress)

    def _log_window(self, epoch: int, window: dict[str, torch.Tensor], iters: int, elapsed: float, bar) -> None:
        """Every log_every iterations, the loop's only host sync: log the window's mean metrics, and
        stop if a step since the last window failed (anywhere) or a metric is not finite."""
        keys = sorted(window)
        bad = torch.tensor([self.unreadable.local_count() / self.di.world_size], device=self.device)
        reduced = all_reduce_mean(torch.cat([torch.stack([window[k] for k in keys]) / iters, self.guard.failed(), bad]))
        *values, failed, bad_files = reduced.tolist()
        if failed or not all(math.isfinite(v) for v in values):
            self._stop(epoch, failed, dict(zip(keys, values)))
        self.unreadable.check(round(bad_files * self.di.world_size), epoch)
        record = {"kind": "train", "epoch": epoch, "step": self.step, "lr": self.lr, **dict(zip(keys, values)),
                  "images_per_s": iters * self.t.batch_size * self.di.world_size / max(elapsed, 1e-9),
                  "data_wait_fraction": self.data_wait / max(elapsed, 1e-9)}
        self.log.log(record)
        if bar is not None:
            bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", ips=f"{record['images_per_s']:.0f}")

    def _stop(self, epoch: int, failed: float, metrics: dict[str, float]) -> None:
        """Raise the non-finite error: the failed step when this process saw it, else what it knows."""
        what = None
        if bool(self.guard.healthy):
            bad = ", ".join(k for k, v in metrics.items() if not math.isfinite(v))
            what = (f"another process saw a non-finite loss or gradient by step {self.step} (epoch {epoch + 1})"
                    if failed else f"the logged {bad} became non-finite by step {self.step} (epoch {epoch + 1})")
        raise self.guard.error(epoch, self.last_good, self.t.precision == "fp16", what)

    # -- end of an epoch ---------------------------------------------------------------------------
    def _end_epoch(self, epoch: int, sums: dict[str, torch.Tensor], epoch_time: float) -> None:
        """Epoch means, evaluation, the epoch record and line, then the checkpoints (main process)."""
        n_images = self.iters_per_epoch * self.t.batch_size * self.di.world_size
        self.images_seen += n_images
        keys = sorted(sums)
        bad = torch.tensor([self.unreadable.local_count() / self.di.world_size], device=self.device)
        *values, bad_files = all_reduce_mean(torch.cat([torch.stack([sums[k] for k in keys]) / self.iters_per_epoch,
                                                        bad])).tolist()
        means = dict(zip(keys, values))
        unreadable = self.unreadable.report(round(bad_files * self.di.world_size))
        record = {"kind": "epoch", "epoch": epoch, "step": self.step, "lr": self.lr, **means,
                  "epoch_time_s": epoch_time, "images_per_s": n_images / epoch_time,
                  "unreadable_files": unreadable["count"]}
        scores = self.setup.evaluate(self.method, epoch) if self.setup.evaluate is not None else None  # every rank
        is_best = scores is not None and scores["score"] > self.best_score
        if scores is not None:
            record.update({f"eval_{k}": v for k, v in scores.items()})
        if is_best:
            self.best_score, self.best_record = scores["score"], {"epoch": epoch, **scores}
        self.log.log(record)
        self.summary = {"final_epoch": epoch + 1, **{f"final_{k}": v for k, v in means.items()},
                        "unreadable_files": unreadable}
        if self.di.is_main:
            metric_text = " ".join(f"{k} {v:.4f}" for k, v in means.items())
            if scores is not None:
                metric_text += " | " + " ".join(f"{k} {v:.4f}" for k, v in scores.items())
            print(f"epoch {epoch + 1}/{self.t.epochs}  {metric_text}  lr {self.lr:.3g}  "
                  f"{record['images_per_s']:.0f} img/s  {epoch_time:.1f}s", flush=True)
            if unreadable["count"]:
                print(f"  {unreadable['count']} unreadable image files skipped ({100 * unreadable['fraction']:.2g} %; "
                      f"first: {', '.join(unreadable['first'])})", flush=True)
            self._save(epoch, is_best)
        barrier()
        self.last_good = (self.out / "last.pt", epoch)

    def _payload(self, epoch: int) -> dict[str, Any]:
        """Everything a resume needs, plus what rebuilds the model and the summary so far."""
        summary = {**self.summary, **({"best": self.best_record} if self.best_record is not None else {})}
        return {
            "format": "mimkit", "version": mimkit.__version__, "model": self.method.state_dict(),
            "model_config": self.setup.model_config, "data_stats": self.setup.stats, "epoch": epoch, "step": self.step,
            "config": self.cfg.to_dict(), "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": rng_state(), "task": self.setup.task, "best_score": self.best_score, "best_record": self.best_record,
            "summary": summary, **self.setup.extra,
        }

    def _save(self, epoch: int, is_best: bool) -> None:
        """best.pt and checkpoint-NNNN.pt first, last.pt last: last.pt commits the epoch, so a kill
        before it repeats the epoch and rewrites the others identically."""
        payload = self._payload(epoch)
        if is_best:
            save_atomic({k: v for k, v in payload.items() if k not in ("optimizer", "scaler", "rng")}, self.out / "best.pt")
        if (epoch + 1) % self.t.save_every == 0 or epoch + 1 == self.t.epochs:
            save_atomic(payload, self.out / f"checkpoint-{epoch + 1:04d}.pt")
        save_atomic(payload, self.out / "last.pt")

    def _write_summary(self, wall: float) -> dict[str, Any]:
        summary = {**self.summary, "wall_time_s": wall, "images_per_s": self.images_seen / wall if wall > 0 else 0.0,
                   "output_dir": str(self.out), "checkpoint": str(self.out / "last.pt")}
        if self.best_record is not None:
            summary["best"] = self.best_record
        if self.di.is_main:
            write_text_atomic(json.dumps(summary, indent=2), self.out / "summary.json")
        return summary
