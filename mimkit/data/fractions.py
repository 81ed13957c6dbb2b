"""Label fractions: a stratified, seeded subset of a labelled split (``data.labels_per_class`` / ``data.label_fraction``).

Per class c with n_c images: ``labels_per_class=N`` keeps min(N, n_c); ``label_fraction=F`` keeps
max(1, round(F * n_c)) so that every class stays represented. Which images are kept depends only
on the seed and the labels (a per-class random permutation), never on the order of other classes.
"""

from __future__ import annotations

import numpy as np
import torch

from mimkit.errors import ConfigError


def stratified_indices(labels: torch.Tensor, *, labels_per_class: int | None = None,
                       label_fraction: float | None = None, seed: int = 0) -> torch.Tensor:
    """Sorted indices [M] of the kept images. labels [N] long (>= 0)."""
    if (labels_per_class is None) == (label_fraction is None):
        raise ConfigError("Pass exactly one of labels_per_class or label_fraction.")
    y = np.asarray(torch.as_tensor(labels).reshape(-1))
    if len(y) and y.min() < 0:
        raise ConfigError("Label fractions need labelled images, but this split has unlabelled ones (-1): use class "
                          "sub-folders or a labelled .npz, or drop data.labels_per_class / data.label_fraction.")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    # One random key per image, drawn in a fixed order; within each class the lowest keys win.
    keys = rng.random(len(y))
    order = np.lexsort((keys, y))  # grouped by class, random within the class
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    if labels_per_class is not None:
        keep = np.minimum(counts, labels_per_class)
    else:
        keep = np.maximum(1, np.rint(label_fraction * counts)).astype(np.int64)
    rank_in_class = np.arange(len(y)) - np.repeat(starts, counts)
    chosen = order[rank_in_class < np.repeat(keep, counts)]
    return torch.from_numpy(np.sort(chosen)).long()


def class_counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    return torch.bincount(torch.as_tensor(labels).reshape(-1), minlength=num_classes).tolist()


def apply_label_fraction(dataset, data_cfg, log=print):
    """``dataset`` reduced as ``data_cfg`` asks (or unchanged), printing the per-class counts."""
    if data_cfg.labels_per_class is None and data_cfg.label_fraction is None:
        return dataset
    idx = stratified_indices(dataset.labels, labels_per_class=data_cfg.labels_per_class,
                             label_fraction=data_cfg.label_fraction, seed=data_cfg.label_seed)
    subset = dataset.subset(idx)
    what = (f"{data_cfg.labels_per_class} per class" if data_cfg.labels_per_class is not None
            else f"fraction {data_cfg.label_fraction:g}")
    counts = class_counts(subset.labels, dataset.num_classes)
    if log is not None:
        log(f"label subset ({what}, seed {data_cfg.label_seed}): {len(subset)} of {len(dataset)} images; "
            f"per class {dict(zip(dataset.class_names, counts))}")
    return subset
