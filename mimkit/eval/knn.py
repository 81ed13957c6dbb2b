"""Weighted k-NN classifier on frozen features (DINO protocol, methods.md §0.9).

Cosine similarity of L2-normalised features; each of the k nearest training samples votes for
its class with weight exp(similarity / T). Test features are processed in fixed-size chunks,
so any test-set size works (the original splits into 100 chunks and breaks below 100 images).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

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
        weights = (sims / temperature).exp()
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


def evaluate_encoder_knn(
    encoder,
    data: str,
    stats: dict[str, list[float]] | None = None,
    *,
    k: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    pool: str = "cls",
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
    computed in shards and all-gathered, so every rank holds the whole bank. Returns a JSON-ready dict.
    """
    from mimkit.data import TransformedDataset, apply_label_fraction, build_transform, load_dataset, stats_for

    train = load_dataset(data, train_split)
    test = load_dataset(data, test_split)
    if train.num_classes == 0:
        from mimkit.errors import MimkitError

        raise MimkitError(f"{data} has no labels: k-NN needs class sub-folders or a labelled .npz.")
    if data_cfg is not None:
        import torch.distributed as dist

        main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        train = apply_label_fraction(train, data_cfg, log=print if main else None)
    stats = stats_for(train, stats)
    transform = build_transform("eval", encoder.img_size, stats["mean"], stats["std"])
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
