"""Weighted k-NN classifier on frozen features (DINO protocol, methods.md §0.9).

Cosine similarity of L2-normalised features; each of the k nearest training samples votes for
its class with weight exp(similarity / T). Test features are processed in fixed-size chunks,
so any test-set size works (the original splits into 100 chunks and breaks below 100 images).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mimkit.config import validate_knn
from mimkit.data import TransformedDataset, apply_label_fraction, build_transform, load_dataset, stats_for
from mimkit.data.sources import check_patch_fits
from mimkit.errors import DataError
from mimkit.eval.features import extract_features


@torch.no_grad()
def weighted_knn(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> dict[int, dict[str, float]]:
    """Top-1 (and top-5 when there are more than 5 classes) accuracy in percent for each k.

    train_features [M, D], train_labels [M], test_features [Q, D], test_labels [Q].
    k larger than M is clamped to M.
    """
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    ks = sorted({min(int(x), train.shape[0]) for x in k})
    k_max = ks[-1]
    correct1 = {kk: 0 for kk in ks}
    correct5 = {kk: 0 for kk in ks}
    for start in range(0, test.shape[0], chunk_size):
        feats = test[start : start + chunk_size]
        targets = test_labels[start : start + chunk_size]
        sims, idx = (feats @ train.T).topk(k_max, dim=1)  # sorted, most similar first
        neighbours = train_labels[idx]  # [B, k_max]
        # exp(s / T) relative to the best neighbour: the same argmax, but no float32 overflow at small T
        weights = ((sims - sims[:, :1]) / temperature).exp()
        one_hot = F.one_hot(neighbours, num_classes).float() * weights.unsqueeze(-1)  # [B, k_max, C]
        for kk in ks:
            scores = one_hot[:, :kk].sum(dim=1)  # [B, C]
            ranked = scores.argsort(dim=1, descending=True)
            correct1[kk] += (ranked[:, 0] == targets).sum().item()
            correct5[kk] += (ranked[:, : min(5, num_classes)] == targets[:, None]).any(dim=1).sum().item()
    n = test.shape[0]
    results = {}
    for kk in ks:
        results[kk] = {"top1": 100.0 * correct1[kk] / n}
        if num_classes > 5:
            results[kk]["top5"] = 100.0 * correct5[kk] / n
    return results


def _bank_and_queries(encoder, data: str, train_split: str, test_split: str, data_cfg, log):
    """The labelled train split (bank, label fraction applied) and the test split (queries), checked
    against the encoder: same channel count, images no smaller than a patch."""
    train = load_dataset(data, train_split)
    test = load_dataset(data, test_split)
    for ds in (train, test):
        if len(ds) and bool((ds.labels < 0).any()):
            raise DataError(f"{ds.source} has unlabelled images: k-NN needs class sub-folders or a labelled .npz.")
    if train.num_channels != encoder.in_chans:
        raise DataError(f"The encoder was trained on {encoder.in_chans}-channel images but {data} has "
                        f"{train.num_channels}-channel images: k-NN cannot change the channels of frozen features, so use data "
                        f"with {encoder.in_chans} channels, or mimkit finetune, which adapts the patch embedding.")
    check_patch_fits(train, encoder.patch_size)
    check_patch_fits(test, encoder.patch_size)
    if data_cfg is not None:
        train = apply_label_fraction(train, data_cfg, log=log)
    return train, test


def evaluate_encoder_knn(
    encoder,
    data: str,
    stats: dict[str, list[float]] | None = None,
    *,
    k: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    pool: str | None = None,  # None: the encoder's default_pool
    final_norm: bool = True,
    train_split: str = "train",
    test_split: str = "test",
    batch_size: int = 256,
    device: str = "cpu",
    data_cfg=None,
    chunk_size: int = 1024,
) -> dict:
    """k-NN accuracy of ``encoder`` on ``data`` (train split = bank, test split = queries).

    Images are normalised with ``stats`` (the pretraining statistics) or, when None, with
    statistics computed on the train split. ``data_cfg`` (a DataConfig) may restrict the bank to
    a label fraction (``labels_per_class`` / ``label_fraction``). Under torchrun the features are
    computed in shards and all-gathered, so every rank holds the whole bank. A k above the bank
    size is clamped to it, with a printed note. Returns a JSON-ready dict.
    """
    validate_knn(list(k), temperature)
    main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    log = print if main else None
    train, test = _bank_and_queries(encoder, data, train_split, test_split, data_cfg, log)
    too_big = sorted(x for x in set(k) if x > len(train))
    if too_big and log:
        log(f"note: k = {', '.join(map(str, too_big))} exceeds the {len(train)} images of the bank; "
            f"reported as k = {len(train)}")
    stats = stats_for(train, stats)
    transform = build_transform("eval", encoder.img_size, stats["mean"], stats["std"])
    pool = pool or encoder.default_pool  # [CLS] where the encoder has one, else the mean token
    kwargs = dict(pool=pool, final_norm=final_norm, batch_size=batch_size, device=device)
    train_x, train_y = extract_features(encoder, TransformedDataset(train, transform), **kwargs)
    test_x, test_y = extract_features(encoder, TransformedDataset(test, transform), **kwargs)
    accuracy = weighted_knn(train_x, train_y, test_x, test_y, k=k, temperature=temperature,
                            num_classes=train.num_classes, chunk_size=chunk_size)
    return {
        "data": str(data), "train_split": train_split, "test_split": test_split,
        "num_train": len(train), "num_test": len(test), "num_classes": train.num_classes,
        "temperature": temperature, "pool": pool, "final_norm": final_norm,
        "labels_per_class": getattr(data_cfg, "labels_per_class", None),
        "label_fraction": getattr(data_cfg, "label_fraction", None),
        "accuracy": {str(kk): v for kk, v in accuracy.items()},
    }
