"""Datasets (image folders, MedMNIST ``.npz``, MedMNIST downloads, sklearn digits) and transforms.

    ds = load_dataset("../shared/datasets/bloodmnist.npz", split="train")   # ImageDataset
    mean, std = compute_channel_stats(ds)
    train = TransformedDataset(ds, build_transform("pretrain", 28, mean, std))
"""

from .fractions import apply_label_fraction, stratified_indices
from mimkit.errors import DataError

from .collection import load_dataset
from .sources import ImageDataset, read_image
from .transforms import TransformedDataset, build_transform, compute_channel_stats, stats_for

__all__ = [
    "DataError",
    "ImageDataset",
    "TransformedDataset",
    "apply_label_fraction",
    "build_transform",
    "compute_channel_stats",
    "load_dataset",
    "read_image",
    "stats_for",
    "stratified_indices",
]
