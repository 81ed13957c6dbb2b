"""Pieces every supervised evaluation (linear probe, fine-tuning) shares: labelled splits, batch
fitting for small label fractions, and scoring the best/last checkpoints of a finished run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from mimkit.checkpoint import load_file
from mimkit.data import load_dataset
from mimkit.errors import ConfigError, DataError
from mimkit.eval.metrics import write_metrics


def fit_batch_to_data(cfg, num_images: int, log=print) -> None:
    """Small labelled sets (label fractions): lower train.batch_size to the largest even size that fits."""
    need = cfg.train.batch_size * cfg.train.accum_iter * int(os.environ.get("WORLD_SIZE", "1"))
    if num_images < need:
        fitted = max(2, (num_images // (cfg.train.accum_iter * int(os.environ.get("WORLD_SIZE", "1")))) // 2 * 2)
        if log:
            log(f"train.batch_size lowered from {cfg.train.batch_size} to {fitted}: only {num_images} labelled images")
        cfg.train.batch_size = fitted


def load_labelled_split(path: str, split: str, required: bool = True):
    """An ImageDataset with labels, or None for an optional split that the data does not have."""
    try:
        ds = load_dataset(path, split)
    except DataError:
        if required:
            raise
        return None
    if ds.num_classes == 0 or (ds.labels < 0).any():
        raise ConfigError(f"{path} split {split!r} has no labels: classification needs class sub-folders or a "
                          f"labelled .npz.")
    return ds


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
