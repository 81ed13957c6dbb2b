"""Pieces every supervised evaluation (linear probe, fine-tuning) shares: labelled splits, read and
checked before training, batch fitting for small label fractions, and scoring the best/last
checkpoints of a finished run."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mimkit.checkpoint import load_file
from mimkit.data import ImageDataset, load_dataset
from mimkit.engine.trainer import TrainingSetup, run_training
from mimkit.errors import ConfigError, DataError, MissingSplitError
from mimkit.eval.metrics import write_metrics


def fit_batch_to_data(cfg, num_images: int, log=print) -> None:
    """Small labelled sets (label fractions): lower train.batch_size to the largest even size that fits."""
    need = cfg.train.batch_size * cfg.train.accum_iter * int(os.environ.get("WORLD_SIZE", "1"))
    if num_images < need:
        fitted = max(2, (num_images // (cfg.train.accum_iter * int(os.environ.get("WORLD_SIZE", "1")))) // 2 * 2)
        if log:
            log(f"train.batch_size lowered from {cfg.train.batch_size} to {fitted}: only {num_images} labelled images")
        cfg.train.batch_size = fitted


def load_labelled_split(path: str, split: str, required: bool = True) -> ImageDataset | None:
    """An ImageDataset with labels, or None for an optional split that the data does not have.

    An optional split that exists but cannot be read (a corrupt image in val/) raises the data
    layer's DataError, which names the file: skipping it would silently drop validation and best.pt.
    """
    try:
        ds = load_dataset(path, split)
    except MissingSplitError:
        if required:
            raise
        return None
    if ds.num_classes == 0 or (ds.labels < 0).any():
        raise ConfigError(f"{path} split {split!r} has no labels: classification needs class sub-folders or a "
                          f"labelled .npz.")
    return ds


@dataclass
class EvalSplits:
    """The labelled splits a supervised run scores: ``val`` during training (None: no best.pt), ``test`` after."""

    val: ImageDataset | None
    test: ImageDataset


def load_eval_splits(cfg, train: ImageDataset, log=print) -> EvalSplits:
    """Read and check ``data.val_split`` (optional) and ``data.test_split`` before the first training step.

    A missing test split, an unreadable image in either, unlabeled images or a channel count
    other than the train split's fail here, not after the last epoch.
    """
    d = cfg.data
    val = load_labelled_split(d.path, d.val_split, required=False) if d.val_split else None
    if val is None and log:
        log(f"no {d.val_split!r} split: best.pt is not kept (only last.pt)")
    test = load_labelled_split(d.path, d.test_split)
    for name, ds in ((d.val_split, val), (d.test_split, test)):
        if ds is not None and ds.num_channels != train.num_channels:
            raise DataError(f"Split {name!r} of {d.path} has {ds.num_channels}-channel images but split "
                            f"{d.split!r} has {train.num_channels}: give every split the same channel count.")
    return EvalSplits(val, test)


def train_then_keep(cfg, make_setup: Callable[..., tuple[TrainingSetup, Any]]) -> tuple[dict[str, Any], Any]:
    """Run the engine on ``make_setup(cfg, dist_info, device) -> (TrainingSetup, kept)``.

    Returns (the training summary, ``kept``): what the setup read for scoring after training
    (e.g. the test split), so it is read once, before the first step.
    """
    kept: list[Any] = []

    def setup_only(c, di, device) -> TrainingSetup:
        setup, keep = make_setup(c, di, device)
        kept.append(keep)
        return setup

    summary = run_training(cfg, setup_only)
    return summary, kept[-1]


def score_best_and_last(result: dict[str, Any], out_dir: str | Path, metrics_name: str,
                        score: Callable[[dict[str, Any], Path], dict[str, Any]]) -> dict[str, Any]:
    """Score ``best.pt`` and ``last.pt`` of a finished run in ``out_dir`` with ``score(checkpoint, path)``.

    Fills ``result["best"]`` / ``result["last"]`` ({"epoch", "metrics"}), reports best when the run
    kept one (``result["metrics"]``, ``result["reported"]``) and writes ``<metrics_name>.json``.
    """
    out = Path(out_dir)
    for name in ("best", "last"):
        path = out / f"{name}.pt"
        if path.is_file():
            obj = load_file(path)
            result[name] = {"epoch": obj["epoch"] + 1, "metrics": score(obj, path)}
    chosen = "best" if "best" in result else "last"
    result["metrics"], result["reported"] = result[chosen]["metrics"], chosen
    result["metrics_json"] = str(write_metrics(result, out, metrics_name))
    return result
