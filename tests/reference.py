"""Independent twins of mimkit's evaluation, for the tests to compare against (written without mimkit's
evaluation code): the DINO weighted k-NN in numpy, hand-normalised split images, and [CLS] features."""

import numpy as np
import torch

from mimkit.data import build_transform, load_dataset


def numpy_weighted_knn(train_x, train_y, test_x, test_y, k: int, temperature: float) -> float:
    """Top-1 % of the DINO weighted k-NN, written independently in float64 numpy.

    Cosine similarity of L2-normalised features; the k most similar bank rows vote for their
    class with weight exp(s / T); the class with the largest total wins.
    """
    bank = np.asarray(train_x, dtype=np.float64)
    queries = np.asarray(test_x, dtype=np.float64)
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = queries @ bank.T  # [Q, M]
    nearest = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # [Q, k]
    weights = np.exp(np.take_along_axis(sims, nearest, axis=1) / temperature)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    votes = np.zeros((len(queries), int(train_y.max()) + 1))
    np.add.at(votes, (np.arange(len(queries))[:, None], train_y[nearest]), weights)
    return 100.0 * float(np.mean(votes.argmax(axis=1) == test_y))


def split_tensors(data, split: str, mean, std, img_size: int | None = None):
    """All images of a split normalised by hand ((x - mean) / std) as [N, C, H, W], and labels [N].

    ``img_size``: images of another size go through mimkit's eval transform (resize + crop) first.
    """
    ds = load_dataset(data, split)
    if img_size is not None and tuple(ds.image_size) != (img_size, img_size):
        resize = build_transform("eval", img_size, [0.0] * len(mean), [1.0] * len(std))
        images = torch.stack([resize(ds[i][0]) for i in range(len(ds))])
    else:
        images = torch.stack([ds[i][0] for i in range(len(ds))])
    m = torch.tensor(mean, dtype=torch.float32)[None, :, None, None]
    s = torch.tensor(std, dtype=torch.float32)[None, :, None, None]
    return (images - m) / s, torch.as_tensor(ds.labels).long()


@torch.no_grad()
def cls_features(encoder, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """[CLS] token after the final norm, straight from ``encoder.encode`` (no DataLoader, no probe code)."""
    encoder.eval()
    return torch.cat([encoder.encode(images[i:i + batch_size]).tokens[:, 0] for i in range(0, len(images), batch_size)])
